"""Stage 4, ``activation_embeddings``: each feature's sampled activation windows, embedded.

The windows of all features are selected at once (``sampling``); the runner then streams them
through the embedding model a chunk of features at a time, so memory stays bounded by the chunk,
and writes one row per feature: the sampled prompt ids (top example first) and their vectors in
the configured storage dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import polars as pl

from sae_atlas.sampling import centre_positions, sample_examples, window_texts
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


def embed_windows(
    windows: pl.DataFrame, *, sae_id: str, embed: Callable[[Sequence[str]], np.ndarray], dtype: str
) -> pl.DataFrame:
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
