"""Stage 4, ``activation_embeddings``: each feature's sampled activation windows, embedded.

The windows of all features are selected at once (``sampling``); the runner then streams them
through the embedding model a chunk of features at a time, so memory stays bounded by the chunk,
and writes one row per feature: the sampled prompt ids (top example first) and their vectors in
the configured storage dtype. The sampled examples themselves (prompt, quantile, window) go to
``stages/sampled_examples.parquet``, so the query layer shows exactly what was embedded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.sampling import centre_positions, sample_examples, window_texts
from sae_atlas.schema import STAGE_SAMPLED_EXAMPLES
from sae_atlas.stage import EmbedFunction, Plan, Product, Stage, StageContext
from sae_atlas.vector_storage import DTYPES, SCALES_COLUMN, quantise

CHUNK_WINDOWS = 16_384


def select_windows(
    examples: pl.DataFrame, prompts: pl.Series, *, quantiles: int, per_quantile: int, window: int
) -> pl.DataFrame:
    """The sampled windows of every feature with their text.

    ``examples`` has ``feature_id``, ``prompt_id``, ``max_activation`` and ``activation_pairs``
    (the activation-examples table); ``prompts[p]`` holds prompt p's tokens.
    """
    candidates = examples.select(
        "feature_id", "prompt_id", "max_activation", centre=centre_positions(pl.col("activation_pairs"))
    )
    sampled = sample_examples(candidates, quantiles=quantiles, per_quantile=per_quantile)
    return window_texts(sampled, prompts, window)


def feature_chunks(windows: pl.DataFrame, rows: int = CHUNK_WINDOWS) -> Iterator[pl.DataFrame]:
    """Consecutive slices of ``windows`` (sorted by feature) of about ``rows`` rows, never
    splitting a feature."""
    features = windows["feature_id"].to_numpy()
    boundaries = np.flatnonzero(np.diff(features)) + 1 if len(features) else np.zeros(0, np.int64)
    start = 0
    while start < len(features):
        stop = start + rows
        if stop < len(features):
            following = boundaries[boundaries >= stop]
            stop = int(following[0]) if len(following) else len(features)
        stop = min(stop, len(features))
        yield windows.slice(start, stop - start)
        start = stop


def empty_table(dtype: str) -> pl.DataFrame:
    """A zero-row table with the schema of the file for ``dtype``."""
    schema = {
        "feature_id": pl.UInt32,
        "sae_id": pl.Categorical(),
        "prompt_ids": pl.List(pl.UInt32),
        "embeddings": pl.List(pl.List(DTYPES[dtype])),
    }
    if dtype == "int8":
        schema[SCALES_COLUMN] = pl.List(pl.Float32)
    return pl.DataFrame(schema=schema)


def sampled_examples(windows: pl.DataFrame) -> pl.DataFrame:
    """``stages/sampled_examples.parquet``: the sampled windows without their text."""
    return windows.select(
        pl.col("feature_id"),
        pl.col("prompt_id"),
        pl.col("quantile"),
        pl.col("max_activation"),
        pl.col("centre").alias("max_position"),
        pl.col("window_start"),
        pl.col("window_stop"),
    ).cast(dict(STAGE_SAMPLED_EXAMPLES))


def embed_windows(windows: pl.DataFrame, *, sae_id: str, embed: EmbedFunction, dtype: str) -> pl.DataFrame:
    """One row per feature of ``windows``: prompt ids and the stored vectors of their texts."""
    if windows.is_empty():
        return empty_table(dtype)
    stored, scales = quantise(embed(windows["text"].to_list()), dtype)
    columns = {"embedding": pl.Series(stored).cast(pl.List(DTYPES[dtype]))}
    if scales is not None:
        columns["scale"] = pl.Series(scales, dtype=pl.Float32)
    grouped = (
        windows.select("feature_id", "prompt_id")
        .with_columns(**columns)
        .group_by("feature_id", maintain_order=True)
        .agg(
            prompt_ids=pl.col("prompt_id").cast(pl.UInt32),
            embeddings=pl.col("embedding"),
            **({SCALES_COLUMN: pl.col("scale")} if scales is not None else {}),
        )
    )
    grouped = grouped.with_columns(pl.col("feature_id").cast(pl.UInt32), sae_id=pl.lit(sae_id).cast(pl.Categorical()))
    return grouped.select(empty_table(dtype).columns).cast(empty_table(dtype).schema)


def statistics(windows: pl.DataFrame) -> dict:
    """Windows per feature, for the sidecar."""
    per_feature = windows.group_by("feature_id").len()["len"]
    histogram = per_feature.value_counts().sort("len")
    return {
        "features": per_feature.len(),
        "windows": windows.height,
        "distinct_texts": windows["text"].n_unique(),
        "windows_per_feature": {
            "mean": round(float(per_feature.mean() or 0.0), 3),
            "min": int(per_feature.min() or 0),
            "max": int(per_feature.max() or 0),
            "histogram": {str(count): int(features) for count, features in histogram.iter_rows()},
        },
    }


def plan(context: StageContext) -> Plan:
    sampling, settings = context.config.sampling, context.config.embedding
    dtype = context.config.output.embedding_dtype

    def execute(problems: Problems) -> Product:
        columns = ["feature_id", "prompt_id", "max_activation", "activation_pairs"]
        examples = context.read("activation_examples", columns)
        windows = select_windows(
            examples,
            context.prompt_tokens(),
            quantiles=sampling.quantiles,
            per_quantile=sampling.per_quantile,
            window=sampling.window,
        )
        del examples
        stats = statistics(windows)
        embed = context.embed(STAGE.name, total=windows.height)
        before = context.embedder.stats.snapshot()

        def parts():
            dimension = None
            for chunk in feature_chunks(windows):
                part = embed_windows(chunk, sae_id=context.sae_id, embed=embed, dtype=dtype)
                dimension = dimension or len(part["embeddings"][0][0])
                yield part
            work = context.embedder.stats.since(before)
            stats.update(
                model=settings.model,
                quantize=settings.quantize,
                dimension=dimension,
                embedding_dtype=dtype,
                texts_encoded=work["embedded"],
                texts_from_cache=work["from_cache"],
                seconds_encoding=round(work["seconds_encoding"], 3),
            )

        return Product(
            data=parts(),
            rows=stats["features"],
            statistics=stats,
            schema=empty_table(dtype).to_arrow().schema,
            extra={layout.SAMPLED_EXAMPLES: sampled_examples(windows)},
        )

    return Plan(key={}, execute=execute)


STAGE = Stage(
    name="activation_embeddings",
    output=layout.ACTIVATION_EMBEDDINGS,
    version=2,
    plan=plan,
    reads=("activation_examples",),
    config=("sampling", "embedding.model", "embedding.quantize", "output.embedding_dtype"),
    extra_outputs=(layout.SAMPLED_EXAMPLES,),
    description="each feature's sampled activation windows, embedded",
)
