"""``sae-atlas synth``: a realistic raw corpus in the real formats, with a known ground truth.

Deterministic from the seed. Writes, under the output directory::

    raw/<explainer>_e-<scorer>_s/      one delphi run per (explainer, scorer) pair (with its
                                       log/hookpoint_firing_counts.pt)
    raw/activation_examples/           activations.jsonl + prompts.json      (--activation-format jsonl, both)
    raw/latents/layers.<L>/ + raw/tokenizer.json   delphi latent cache       (--activation-format delphi, both)
    raw/sae/…                          decoder weights (npz | saelens | sparsify)
    sae-atlas.toml                     a ready config (with both formats: the jsonl records;
    sae-atlas-delphi.toml              the same with the delphi cache)
    ground_truth.parquet               concepts per latent, hit/miss per explanation

The reference scale of the study is ``--features 16384 --explained 824 --explainers 3 --scorers 3
--prompts 24571 --ctx 127 --d-model 3584``. Activation records are generated and written a block of
latents at a time, so memory stays bounded at any width (131,072 latents: under 4 GiB).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from sae_atlas.config import DEFAULT_MODEL
from sae_atlas.synth import delphi_runs, formats
from sae_atlas.synth.latents import activation_blocks, assign_latents, concept_count, decoder_weights
from sae_atlas.synth.pairs import plant_pairs
from sae_atlas.synth.text import build_prompts

LAYER = 30
SPARSE_MODEL = "google/gemma-scope-9b-pt-res"
FILE_HOOK = f"layers.{LAYER}"  # delphi names files by the resolved module, not the Gemma Scope id
EXPLAINED_SHARE = 0.85  # delphi skips latents below min_examples: ~15 % of the range is missing
MISSING_SIMULATION_RATE = 0.03
EMPTY_SCORE_FILE_RATE = 0.002
UNEXPLAINED_RATE = 0.005
UNSCORED_RATE = 0.005
BLOCK_LATENTS = 8192  # activation records are generated and written this many latents at a time
ACTIVATION_FORMATS = ("jsonl", "delphi", "both")


@dataclass(frozen=True)
class SynthOptions:
    """Size and formats of a synthetic corpus."""

    features: int = 1024
    explained: int = 64
    explainers: int = 3
    scorers: int = 2
    prompts: int = 1000
    ctx: int = 127
    d_model: int = 256
    seed: int = 0
    activation_format: str = "jsonl"
    decoder_format: str = "npz"
    # the share of latents each explainer gets right (default: delphi_runs.HIT_RATES), so that a
    # comparison of explainers can be checked against a difference planted on purpose
    explainer_quality: tuple[float, ...] | None = None
    # the share of latents where every explainer's text is the first explainer's, word for word (as
    # in the real study: a control on which explainers cannot differ)
    identical_texts: float = 0.0
    # how far each scorer's fuzz / detection verdicts follow the explanation's quality (1: as
    # delphi_runs plants it, 0: coin flips), so that scorers can be checked against people's labels
    scorer_reliability: tuple[float, ...] | None = None
    # plant a pattern per latent (lexical, mixed, contextual, diffuse: synth/latents.py) and, on
    # lexical latents, explanations that name or miss the token; off, the corpus is unchanged
    plant_patterns: bool = False
    # plant decoder twins and same-words pairs of latents (synth/pairs.py); off, the corpus is unchanged
    plant_families: bool = False

    def check(self) -> None:
        if self.features < 8:
            raise ValueError("--features must be at least 8")
        if not 1 <= self.explained <= self.features:
            raise ValueError("--explained must be between 1 and --features")
        if self.ctx < delphi_runs.EXAMPLE_TOKENS:
            raise ValueError(f"--ctx must be at least {delphi_runs.EXAMPLE_TOKENS}")
        if self.prompts < 10 or self.d_model < 8:
            raise ValueError("--prompts must be at least 10 and --d-model at least 8")
        if self.activation_format not in ACTIVATION_FORMATS:
            raise ValueError("--activation-format must be jsonl, delphi or both")
        if self.decoder_format not in ("npz", "saelens", "sparsify"):
            raise ValueError("--decoder-format must be npz, saelens or sparsify")
        if self.explainer_quality is not None:
            if len(self.explainer_quality) != self.explainers:
                given = len(self.explainer_quality)
                raise ValueError(f"--explainer-quality gives {given} hit rates for {self.explainers} explainers")
            if not all(0.0 <= rate <= 1.0 for rate in self.explainer_quality):
                raise ValueError("--explainer-quality hit rates must lie between 0 and 1")
        if not 0.0 <= self.identical_texts <= 1.0:
            raise ValueError("--identical-texts must lie between 0 and 1")
        if self.scorer_reliability is not None:
            if len(self.scorer_reliability) != self.scorers:
                given = len(self.scorer_reliability)
                raise ValueError(f"--scorer-reliability gives {given} values for {self.scorers} scorers")
            if not all(0.0 <= value <= 1.0 for value in self.scorer_reliability):
                raise ValueError("--scorer-reliability values must lie between 0 and 1")


@dataclass
class SynthResult:
    """Where the corpus went and what it holds."""

    root: Path
    config: Path
    ground_truth: Path
    sources: list[str]
    activation_records: int
    activation_pairs: int


def width_label(n_features: int) -> str:
    """Gemma Scope's width label: 16384 → "16k", 1048576 → "1m"."""
    if n_features % (1 << 20) == 0:
        return f"{n_features >> 20}m"
    if n_features % 1024 == 0:
        return {65536: "65k", 131072: "131k", 262144: "262k", 524288: "524k"}.get(n_features, f"{n_features // 1024}k")
    return str(n_features)


def _toml_string(value: str) -> str:
    return orjson.dumps(value).decode()  # a JSON string is a valid TOML basic string


def _write_config(
    root: Path,
    sources: list[tuple[str, str, str]],
    activation_format: str,
    decoder_path: Path,
    sae_id: str,
    file_name: str = "sae-atlas.toml",
) -> Path:
    lines = [
        "# Written by `sae-atlas synth`; paths are relative to this file.",
        f"sae_id = {_toml_string(sae_id)}",
        'output_dir = "master"',
        "",
    ]
    for name, explainer, scorer in sources:
        lines += [
            "[[sources]]",
            f"name = {_toml_string(name)}",
            f"path = {_toml_string('raw/' + name)}",
            f"explainer = {_toml_string(explainer)}",
            f"scorer = {_toml_string(scorer)}",
            "",
        ]
    lines.append("[activations]")
    if activation_format == "jsonl":
        lines += ['format = "jsonl"', 'path = "raw/activation_examples"']
    else:
        lines += ['format = "delphi"', f'path = "raw/latents/{FILE_HOOK}"', 'tokenizer = "raw/tokenizer.json"']
    lines += [
        "",
        "[decoder]",
        f"path = {_toml_string(decoder_path.relative_to(root).as_posix())}",
        "top_k = 10",
        "",
        "[embedding]",
        f"model = {_toml_string(DEFAULT_MODEL)}",
        "",
    ]
    path = root / file_name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


Progress = Callable[[str], None]


def synthesize(
    root: str | Path, options: SynthOptions = SynthOptions(), progress: Progress | None = None
) -> SynthResult:
    """Write a synthetic corpus under ``root`` (created if needed)."""
    options.check()
    say = progress or (lambda message: None)
    root = Path(root)
    raw = root / "raw"
    rng = np.random.default_rng(options.seed)
    n_concepts = concept_count(options.features)

    say(f"prompts: {options.prompts:,} × {options.ctx} tokens")
    jsonl = options.activation_format in ("jsonl", "both")
    delphi = options.activation_format in ("delphi", "both")
    # The jsonl shape (Neuronpedia-like) starts each prompt with <bos> and never activates on it.
    corpus = build_prompts(options.prompts, options.ctx, n_concepts, rng, bos=jsonl)
    latents = assign_latents(options.features, corpus, n_concepts, rng, plant=options.plant_patterns)

    say(f"activations of {options.features:,} latents")
    n_records, n_pairs, firing = _write_activations(raw, corpus, latents, options, rng, jsonl=jsonl)

    say(f"decoder weights: {options.features:,} × {options.d_model} ({options.decoder_format})")
    label = width_label(options.features)
    weights = decoder_weights(latents, options.d_model, rng)
    planted = None
    if options.plant_families:
        primary = np.array([concepts[0] for concepts in latents.concepts])
        planted = plant_pairs(primary, weights, np.random.default_rng([options.seed, 1]))
    decoder_path = formats.write_decoder(
        raw / "sae",
        options.decoder_format,
        weights,
        layer=LAYER,
        width_label=label,
        rng=rng,
    )

    explainers = delphi_runs.models(options.explainers)
    scorers = delphi_runs.models(options.scorers)
    candidates = min(options.features, math.ceil(options.explained / EXPLAINED_SHARE))
    explained = np.sort(rng.choice(candidates, size=options.explained, replace=False))
    say(
        f"explanations and scores: {options.explained:,} latents × {len(explainers)} explainers "
        f"× {len(scorers)} scorers"
    )
    explanations = delphi_runs.explain(
        latents, explained, explainers, n_concepts, rng, hit_rates=options.explainer_quality
    )
    if options.identical_texts:
        explanations = delphi_runs.copy_first_explainer(explanations, options.identical_texts, rng)
    if planted is not None:
        explanations = planted.copy_explanations(explanations, explained)
    by_latent = {(item.feature_id, item.explainer.short): item for item in explanations}
    unexplained = {key for key in by_latent if rng.random() < UNEXPLAINED_RATE}
    hookpoint = f"layer_{LAYER}/width_{label}/average_l0_120"
    runs = [(explainer, scorer) for explainer in explainers for scorer in scorers]
    sources = _write_runs(raw, runs, explained, by_latent, unexplained, firing, options, hookpoint, candidates)
    _write_scores(raw, runs, explained, by_latent, unexplained, corpus, latents, rng, options.scorer_reliability)

    sae_id = f"{SPARSE_MODEL}/{hookpoint}"
    config = _write_config(root, sources, "delphi" if not jsonl else "jsonl", decoder_path, sae_id)
    if jsonl and delphi:
        _write_config(root, sources, "delphi", decoder_path, sae_id, file_name="sae-atlas-delphi.toml")
    ground_truth = root / "ground_truth.parquet"
    _write_ground_truth(ground_truth, latents, explained, explanations, unexplained, planted)
    say(f"wrote {root}")
    return SynthResult(root, config, ground_truth, [name for name, _, _ in sources], n_records, n_pairs)


def _write_activations(raw: Path, corpus, latents, options: SynthOptions, rng, *, jsonl: bool):
    """The activation records in the chosen formats, a block of latents at a time; returns
    (records, pairs, tokens each latent fired on: what delphi logs in hookpoint_firing_counts.pt)."""
    delphi = options.activation_format in ("delphi", "both")
    writers = []
    if jsonl:
        writers.append(formats.JsonlActivationWriter(raw / "activation_examples", corpus))
    if delphi:
        cache = formats.DelphiCacheWriter(raw / "latents" / FILE_HOOK, corpus, options.features)
        formats.write_tokenizer(raw / "tokenizer.json", corpus.vocabulary)
    # Blocks never straddle a shard boundary, so each shard is written as soon as it is complete.
    boundaries = sorted({*range(0, options.features, BLOCK_LATENTS), *formats.shard_boundaries(options.features)})
    n_records = n_pairs = 0
    # tokens each latent fires on: what delphi logs in log/hookpoint_firing_counts.pt
    firing = np.zeros(options.features, dtype=np.int64)
    for block, stop in zip(
        activation_blocks(corpus, latents, rng, skip_first=jsonl, boundaries=boundaries),
        boundaries[1:],
        strict=True,
    ):
        n_records += len(block.feature)
        n_pairs += int(block.offsets[-1])
        firing += np.bincount(block.feature, weights=np.diff(block.offsets), minlength=options.features).astype(
            np.int64
        )
        for writer in writers:
            writer.write(block)
        if delphi:
            cache.write(block, stop)
    for writer in writers:
        writer.close()

    return n_records, n_pairs, firing


def _write_runs(raw: Path, runs, explained, by_latent, unexplained, firing, options, hookpoint, candidates) -> list:
    """Each (explainer, scorer) run's run_config.json, firing counts and explanation files;
    returns the [[sources]] (name, explainer, scorer)."""
    sources = []
    for explainer, scorer in runs:
        name = f"{explainer.short}_e-{scorer.short}_s"
        sources.append((name, explainer.name, scorer.name))
        run_root = raw / name
        formats.write_json(
            run_root / "run_config.json",
            formats.run_config(
                name=name,
                explainer=explainer.name,
                sparse_model=SPARSE_MODEL,
                hookpoint=hookpoint,
                max_latents=candidates,
                n_prompts=options.prompts,
                ctx=options.ctx,
            ),
            indent=True,
        )
        formats.write_firing_counts(run_root / "log" / "hookpoint_firing_counts.pt", FILE_HOOK, firing)
        for latent in explained.tolist():
            if (latent, explainer.short) not in unexplained:
                formats.write_json(
                    run_root / "explanations" / f"{FILE_HOOK}_latent{latent}.txt",
                    by_latent[latent, explainer.short].text,
                )
    return sources


def _write_scores(raw: Path, runs, explained, by_latent, unexplained, corpus, latents, rng, reliability=None) -> None:
    """Every run's score files; examples are drawn once per latent and shared by every run."""
    # as delphi's seeded sampler does
    for latent in explained.tolist():
        examples = delphi_runs.draw_examples(corpus, latents, latent, rng)
        for explainer, scorer in runs:
            explanation = by_latent[latent, explainer.short]
            good = explanation.hit and (latent, explainer.short) not in unexplained
            if rng.random() < UNSCORED_RATE:
                continue  # explanation without score files
            bias = delphi_runs.SCORER_BIAS[scorer.index]
            trust = reliability[scorer.index] if reliability is not None else 1.0
            records = {
                "fuzz": delphi_runs.classifier_records(
                    examples, good=good, method="fuzz", bias=bias, rng=rng, reliability=trust
                ),
                "detection": delphi_runs.classifier_records(
                    examples, good=good, method="detection", bias=bias, rng=rng, reliability=trust
                ),
                "embedding": delphi_runs.embedding_records(examples, good=good, rng=rng),
                "simulation": delphi_runs.simulation_records(good=good, rng=rng),
            }
            if rng.random() < MISSING_SIMULATION_RATE:
                del records["simulation"]
            directory = raw / f"{explainer.short}_e-{scorer.short}_s" / "scores"
            for method, method_records in records.items():
                if rng.random() < EMPTY_SCORE_FILE_RATE:
                    method_records = []
                formats.write_json(directory / method / f"{FILE_HOOK}_latent{latent}.txt", method_records)


def _write_ground_truth(path: Path, latents, explained: np.ndarray, explanations, unexplained: set, planted) -> None:
    rows: dict[int, list[dict]] = {}
    for item in explanations:
        missing = (item.feature_id, item.explainer.short) in unexplained
        rows.setdefault(item.feature_id, []).append(
            {
                "explainer": item.explainer.name,
                "hit": bool(item.hit and not missing),
                "sentinel": bool(item.sentinel or missing),
                "described": list(item.described) if not missing else [],
                "kind": "sentinel" if missing else item.kind,
            }
        )
    n_features = len(latents.concepts)
    explained_set = set(explained.tolist())
    frame = pl.DataFrame(
        {
            "feature_id": np.arange(n_features, dtype=np.uint32),
            "concepts": [latents.concept_names(latent) for latent in range(n_features)],
            "multi_concept": latents.multi_concept,
            "explained": [latent in explained_set for latent in range(n_features)],
            "explanations": [rows.get(latent, []) for latent in range(n_features)],
            "pattern": [latents.pattern_of(latent) for latent in range(n_features)],
            "word": latents.word if latents.word is not None else [None] * n_features,
            **(planted.partner_columns(n_features, explained) if planted is not None else {}),
        },
        schema={
            "feature_id": pl.UInt32,
            "concepts": pl.List(pl.String),
            "multi_concept": pl.Boolean,
            "explained": pl.Boolean,
            "explanations": pl.List(
                pl.Struct(
                    {
                        "explainer": pl.String,
                        "hit": pl.Boolean,
                        "sentinel": pl.Boolean,
                        "described": pl.List(pl.String),
                        "kind": pl.String,
                    }
                )
            ),
            "pattern": pl.String,
            "word": pl.String,
            **({"decoder_twin_of": pl.UInt32, "same_words_as": pl.UInt32} if planted is not None else {}),
        },
    )
    frame.write_parquet(path)
