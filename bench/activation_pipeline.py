"""Activation stages at reference scale: stage 4 against a bare ``model.encode``, int8 against float32,
length-sorted against unsorted batches, storage dtypes, stage 5, and the whole pipeline with int8.

    python bench/activation_pipeline.py            # about 30 minutes on the 2-core reference machine

Results go to the "activation" section of docs/benchmarks.md.
"""

from __future__ import annotations

import resource
import shutil
import time

import numpy as np
import orjson
import polars as pl

from common import CLI, gib, measured, reference_corpus, update_section
from sae_atlas.config import load_config
from sae_atlas.embedding import Embedder
from sae_atlas.layout import read_sidecar
from sae_atlas.pipeline import Pipeline
from sae_atlas.stages.activation_embeddings import select_windows
from sae_atlas.vector_storage import read_activation_embeddings

SORT_SAMPLE = 12_000
STATISTICS = [
    "mean_pairwise_similarity",
    "std_pairwise_similarity",
    "min_pairwise_similarity",
    "max_pairwise_similarity",
]


def configured(root, name: str, *, quantize: str = "none", dtype: str = "float32"):
    """A copy of the corpus config writing to ``root/name`` with the given options."""
    text = (root / "sae-atlas.toml").read_text()
    text = text.replace('output_dir = "master"', f'output_dir = "{name}"')
    text += f'quantize = "{quantize}"\n\n[output]\nembedding_dtype = "{dtype}"\n'
    path = root / f"{name}.toml"
    path.write_text(text)
    return load_config(path)


def sidecar(config, stage_file: str) -> dict:
    return read_sidecar(config.output_dir / stage_file)


def main() -> None:
    root = reference_corpus()
    lines = []

    # 1. float32 stage 4, then a bare model.encode of the same distinct texts in the same process
    config = configured(root, "float32")
    shutil.rmtree(config.output_dir, ignore_errors=True)
    Pipeline(config).run(only=["activation_examples"])
    embedder = Embedder(cache_dir=config.embedding_cache_dir)
    started = time.perf_counter()
    Pipeline(config, embedder=embedder).run(only=["activation_embeddings"])
    stage_seconds = time.perf_counter() - started
    stage_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    statistics = sidecar(config, "activation_embeddings.parquet")["statistics"]
    examples = pl.read_parquet(
        config.output_dir / "activation_examples.parquet",
        columns=["feature_id", "prompt_id", "max_activation", "activation_pairs"],
    )
    prompts = pl.read_parquet(config.output_dir / "stages" / "prompts.parquet")["prompt_tokens"]
    sampling = config.sampling
    texts = (
        select_windows(
            examples, prompts, quantiles=sampling.quantiles, per_quantile=sampling.per_quantile, window=sampling.window
        )["text"]
        .unique(maintain_order=True)
        .to_list()
    )
    del examples
    model = embedder.backend.model
    started = time.perf_counter()
    bare = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    bare_seconds = time.perf_counter() - started
    del bare
    lines += [
        "### Stage 4 (`activation_embeddings`) against a bare `model.encode`",
        "",
        f"{statistics['windows']:,} sampled windows of {statistics['features']:,} features, "
        f"{statistics['distinct_texts']:,} distinct texts (all embedded: empty cache), float32, batch 64.",
        "",
        "| | seconds | texts/s |",
        "|---|---:|---:|",
        f"| stage 4, whole (read, sample, embed, write) | {stage_seconds:.0f} | "
        f"{statistics['distinct_texts'] / stage_seconds:.0f} |",
        f"| bare `model.encode(texts, batch_size=64)` of the same distinct texts | {bare_seconds:.0f} | "
        f"{len(texts) / bare_seconds:.0f} |",
        "",
        f"Ratio stage / bare encode: **{stage_seconds / bare_seconds:.2f}** (target ≤ 1.1). "
        f"Peak RSS of the process after stage 4: **{gib(stage_peak)}** (target < 4 GiB).",
        "",
    ]
    print("\n".join(lines), flush=True)

    # 2. length-sorted against unsorted batches (same model, same texts)
    sample = texts[:SORT_SAMPLE]
    backend = embedder.backend
    started = time.perf_counter()
    for start in range(0, len(sample), 64):
        backend.encode(sample[start : start + 64])
    unsorted_seconds = time.perf_counter() - started
    started = time.perf_counter()
    Embedder(batch_size=64, backend=backend).encode_uncached(sample)
    sorted_seconds = time.perf_counter() - started
    lines += [
        "### Length-sorted against unsorted batches",
        "",
        f"{len(sample):,} window texts, batch 64, float32: unsorted {len(sample) / unsorted_seconds:.0f} texts/s, "
        f"sorted by token count {len(sample) / sorted_seconds:.0f} texts/s "
        f"(×{unsorted_seconds / sorted_seconds:.2f}).",
        "",
    ]

    # 3. storage dtypes: vectors come from the cache, so only storage differs
    Pipeline(config, embedder=embedder).run(only=["activation_similarity"])
    reference_stats = pl.read_parquet(config.output_dir / "activation_example_similarity.parquet")
    rows = []
    for dtype in ("int8", "float16", "float32"):  # float32 last: step 4 compares against it
        variant = configured(root, "float32", dtype=dtype)
        Pipeline(variant, embedder=embedder).run(only=["activation_embeddings", "activation_similarity"])
        size = (variant.output_dir / "activation_embeddings.parquet").stat().st_size
        stage5 = sidecar(variant, "activation_example_similarity.parquet")["timing"]["seconds"]
        table = pl.read_parquet(variant.output_dir / "activation_example_similarity.parquet")
        error = max(float((table[column] - reference_stats[column]).abs().max() or 0.0) for column in STATISTICS)
        rows.append(f"| {dtype} | {size / 2**20:.0f} MiB | {error:.1e} | {stage5:.1f} s |")
    lines += [
        "### Storage dtype of `activation_embeddings.parquet`",
        "",
        "Largest absolute difference of any stage-5 statistic (mean, std, min, max pairwise cosine) against "
        "float32 storage, and stage 5's time on that file (target < 5 s).",
        "",
        "| dtype | file size | largest stage-5 error | stage 5 |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]
    print("\n".join(lines[-8:]), flush=True)

    # 4. the whole pipeline with quantize = "int8", fresh output and cache, in its own process
    int8 = configured(root, "int8", quantize="int8")
    shutil.rmtree(int8.output_dir, ignore_errors=True)
    wall, peak = measured([*CLI, "run", str(root / "int8.toml")])
    stage4_int8 = sidecar(int8, "activation_embeddings.parquet")
    float_vectors = read_activation_embeddings(config.output_dir / "activation_embeddings.parquet")
    int8_vectors = read_activation_embeddings(int8.output_dir / "activation_embeddings.parquet")
    cosines = np.sum(float_vectors.vectors * int8_vectors.vectors, axis=1)
    stages = orjson.loads((int8.output_dir / "run_report.json").read_bytes())["stages"]
    int8_seconds = stage4_int8["timing"]["seconds"]
    lines += [
        '### The whole pipeline with `quantize = "int8"`',
        "",
        "`sae-atlas run` on the reference corpus from an empty output directory and cache, in one process "
        "(the int8 ONNX model is exported and quantised inside this run).",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {stage['stage']} | {stage['seconds']:.1f} |" for stage in stages],
        f"| **total (process wall)** | **{wall:.0f}** ({wall / 60:.1f} min; target < 15 min) |",
        "",
        f"Peak RSS of the whole run {gib(peak)}. Stage 4 int8 {int8_seconds:.0f} s against float32 "
        f"{stage_seconds:.0f} s (step 1): **×{stage_seconds / int8_seconds:.2f}** (target ≥ 1.6). Cosine of each "
        f"int8 window vector to its float32 vector: mean **{cosines.mean():.4f}**, min {cosines.min():.4f} "
        "(target mean ≥ 0.99).",
        "",
    ]
    update_section("activation", "## Activation stages at reference scale\n\n" + "\n".join(lines))
    print("\n".join(lines[-12:]), flush=True)


if __name__ == "__main__":
    main()
