"""Writers for the real raw formats (raw-formats.md): delphi run directories, activation records
(``activations.jsonl`` + ``prompts.json``, or a delphi latent cache with a ``tokenizer.json``) and
decoder weights (Gemma Scope ``params.npz``, SAELens, sparsify)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from sae_atlas.synth.latents import ActivationTable
from sae_atlas.synth.text import BYTE_PIECES, SPECIAL_TOKENS, WORD_MARK, PromptCorpus


def write_json(path: Path, value, *, indent: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else 0))


def run_config(
    *, name: str, explainer: str, sparse_model: str, hookpoint: str, max_latents: int, n_prompts: int, ctx: int
) -> dict:
    """A delphi 0.1.3 ``run_config.json``; ``explainer_model`` names the explainer, as in the study."""
    return {
        "cache_cfg": {
            "dataset_repo": "EleutherAI/SmolLM2-135M-10B",
            "dataset_split": "train[:1%]",
            "dataset_name": "",
            "dataset_column": "text",
            "batch_size": 32,
            "cache_ctx_len": ctx,
            "n_tokens": n_prompts * ctx,
            "n_splits": 5,
        },
        "constructor_cfg": {
            "faiss_embedding_model": "sentence-transformers/all-MiniLM-L6-v2",
            "faiss_embedding_cache_dir": ".embedding_cache",
            "faiss_embedding_cache_enabled": True,
            "example_ctx_len": 32,
            "min_examples": 200,
            "n_non_activating": 50,
            "center_examples": True,
            "non_activating_source": "random",
            "neighbours_type": "co-occurrence",
        },
        "sampler_cfg": {
            "n_examples_train": 40,
            "n_examples_test": 50,
            "n_quantiles": 10,
            "train_type": "quantiles",
            "test_type": "quantiles",
            "ratio_top": 0.2,
        },
        "model": "google/gemma-2-9b",
        "sparse_model": sparse_model,
        "hookpoints": [hookpoint],
        "explainer_model": explainer,
        "explainer_model_max_len": 5120,
        "explainer_provider": "offline",
        "explainer": "default",
        "scorers": ["fuzz", "detection", "simulation"],
        "name": name,
        "max_latents": max_latents,
        "filter_bos": True,
        "log_probs": False,
        "hf_token": None,
        "seed": 22,
        "verbose": True,
        "num_examples_per_scorer_prompt": 5,
    }


class JsonlActivationWriter:
    """``activations.jsonl`` (one record per line, values rounded to 3 decimals) + ``prompts.json``,
    written a block of records at a time."""

    def __init__(self, directory: Path, corpus: PromptCorpus):
        directory.mkdir(parents=True, exist_ok=True)
        vocabulary = np.array(corpus.vocabulary, dtype=object)
        write_json(directory / "prompts.json", vocabulary[corpus.tokens].tolist())
        self.handle = (directory / "activations.jsonl").open("wb")

    def write(self, table: ActivationTable) -> None:
        positions = table.positions.tolist()
        values = np.round(table.values.astype(np.float64), 3).tolist()
        offsets = table.offsets.tolist()
        lines = []
        for record, (feature, prompt) in enumerate(zip(table.feature.tolist(), table.prompt.tolist(), strict=True)):
            start, stop = offsets[record], offsets[record + 1]
            pairs = [
                [position, value] for position, value in zip(positions[start:stop], values[start:stop], strict=True)
            ]
            lines.append(orjson.dumps({"index": str(feature), "dataSetPromptId": prompt, "sparseValues": pairs}))
        if lines:
            self.handle.write(b"\n".join(lines) + b"\n")

    def close(self) -> None:
        self.handle.close()


def write_tokenizer(path: Path, vocabulary: list[str]) -> None:
    """A SentencePiece-style Unigram ``tokenizer.json`` (byte fallback, ``▁`` word marks)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [(piece, -10.0 if piece in BYTE_PIECES or piece in SPECIAL_TOKENS else -1.0) for piece in vocabulary]
    tokenizer = Tokenizer(models.Unigram(scores, unk_id=vocabulary.index("<unk>"), byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(WORD_MARK), normalizers.Replace(" ", WORD_MARK)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(WORD_MARK, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))


def write_firing_counts(path: Path, hookpoint: str, counts: np.ndarray) -> None:
    """delphi's ``log/hookpoint_firing_counts.pt``: ``torch.save({hookpoint: LongTensor[latents]})``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({hookpoint: torch.from_numpy(counts.astype(np.int64))}, path)


def shard_boundaries(n_features: int, n_splits: int = 5) -> list[int]:
    """Where delphi's ``LatentCache.save_splits`` cuts the latents: ``linspace(0, width, n+1)``."""
    return np.linspace(0, n_features, n_splits + 1).astype(np.int64).tolist()


class DelphiCacheWriter:
    """``{start}_{end}.safetensors`` shards as ``LatentCache.save_splits`` writes them, each written
    as soon as the blocks of its latent range have arrived (blocks must not straddle a boundary)."""

    def __init__(self, directory: Path, corpus: PromptCorpus, n_features: int, n_splits: int = 5):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.tokens = corpus.tokens.astype(np.int64)
        self.boundaries = shard_boundaries(n_features, n_splits)
        self.shard = 0
        self.pending: list[ActivationTable] = []
        n_prompts, ctx = corpus.tokens.shape
        write_json(
            directory / "config.json",
            {
                "dataset_repo": "EleutherAI/SmolLM2-135M-10B",
                "dataset_split": "train[:1%]",
                "dataset_name": "",
                "dataset_column": "text",
                "batch_size": 32,
                "cache_ctx_len": ctx,
                "n_tokens": n_prompts * ctx,
                "n_splits": n_splits,
                "model_name": "google/gemma-2-9b",
            },
            indent=True,
        )

    def write(self, table: ActivationTable, stop: int) -> None:
        """Add a block of records of latents below ``stop``; write every shard it completes."""
        self.pending.append(table)
        while self.shard < len(self.boundaries) - 1 and stop >= self.boundaries[self.shard + 1]:
            self._write_shard(ActivationTable.concatenate(self.pending))
            self.pending = []
            self.shard += 1

    def _write_shard(self, table: ActivationTable) -> None:
        from safetensors.numpy import save_file

        start, stop = self.boundaries[self.shard], self.boundaries[self.shard + 1]
        counts = np.diff(table.offsets)
        latent = np.repeat(table.feature, counts)
        sequence = np.repeat(table.prompt, counts)
        # torch.nonzero order: (sequence, position, latent)
        order = np.lexsort((latent, table.positions, sequence))
        locations = np.stack([sequence[order], table.positions[order], latent[order] - start], axis=1)
        small = locations[:, 0].max(initial=0) < 2**16 and locations[:, 2].max(initial=0) < 2**16
        save_file(
            {
                "locations": locations.astype(np.uint16 if small else np.uint32),
                "activations": table.values[order].astype(np.float16),
                "tokens": self.tokens,
            },
            str(self.directory / f"{start}_{stop - 1}.safetensors"),
        )


def write_decoder(
    directory: Path, decoder_format: str, weights: np.ndarray, *, layer: int, width_label: str, rng: np.random.Generator
) -> Path:
    """Decoder weights in ``decoder_format``; returns the path the config should name."""
    n_features, d_model = weights.shape
    # W_enc is W_dec transposed: a view (np.savez streams it), never a copy of a 1.9 GB matrix.
    encoder = weights.T
    b_enc = rng.normal(0, 0.01, n_features).astype(np.float32)
    b_dec = rng.normal(0, 0.01, d_model).astype(np.float32)
    threshold = np.abs(rng.normal(0.5, 0.1, n_features)).astype(np.float32)
    if decoder_format == "npz":
        path = directory / f"layer_{layer}" / f"width_{width_label}" / "average_l0_120" / "params.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, W_enc=encoder, W_dec=weights, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
        return path
    from safetensors.numpy import save_file

    if decoder_format == "saelens":
        path = directory / f"blocks.{layer}.hook_resid_post"
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "W_enc": np.ascontiguousarray(encoder),
                "W_dec": weights,
                "b_enc": b_enc,
                "b_dec": b_dec,
                "threshold": threshold,
            },
            str(path / "sae_weights.safetensors"),
        )
        write_json(
            path / "cfg.json",
            {
                "d_in": d_model,
                "d_sae": n_features,
                "dtype": "float32",
                "device": "cpu",
                "apply_b_dec_to_input": False,
                "normalize_activations": "none",
                "reshape_activations": "none",
                "metadata": {
                    "sae_lens_version": "6.54.12",
                    "model_name": "gemma-2-9b",
                    "hook_name": f"blocks.{layer}.hook_resid_post",
                    "context_size": 1024,
                    "prepend_bos": True,
                },
                "architecture": "jumprelu",
            },
        )
        return path
    if decoder_format == "sparsify":
        path = directory / f"layers.{layer}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {"encoder.weight": weights.copy(), "encoder.bias": b_enc, "W_dec": weights, "b_dec": b_dec},
            str(path / "sae.safetensors"),
        )
        write_json(
            path / "cfg.json",
            {
                "activation": "topk",
                "expansion_factor": max(1, n_features // d_model),
                "normalize_decoder": True,
                "num_latents": n_features,
                "k": 32,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": d_model,
            },
        )
        return path
    raise ValueError(f"unknown decoder format {decoder_format!r} (npz, saelens, sparsify)")
