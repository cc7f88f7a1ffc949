"""Headline numbers of an output directory: rows per file, mean score per explainer × scorer ×
method, and how much explainers agree. Used by ``sae-atlas demo`` and the run summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from sae_atlas import layout, metrics


def rows_per_file(output_dir: Path) -> pl.DataFrame:
    """``file`` and ``rows`` of every master file present (read from Parquet metadata only)."""
    names, rows = [], []
    for name in layout.MASTER_FILES:
        path = Path(output_dir) / name
        if path.exists():
            names.append(name)
            rows.append(pq.ParquetFile(path).metadata.num_rows)
    return pl.DataFrame({"file": names, "rows": rows}, schema={"file": pl.String, "rows": pl.Int64})


def mean_scores(scores: pl.DataFrame) -> pl.DataFrame:
    """Mean of every score method's score per (explainer, scorer), over the features it scored.

    ``scores``: the query layer's score table (:func:`sae_atlas.query.scores.read_scores`, one row
    per feature × explainer × scorer), the one every other view reads, so every method is here."""
    names = [metric.name for metric in metrics.METHOD_SCORES]
    return (
        scores.group_by(["explainer", "scorer"], maintain_order=True)
        .agg(*[pl.col(name).mean() for name in names], features=pl.len())
        .sort(["explainer", "scorer"])
        .select("explainer", "scorer", *names, pl.col("features").cast(pl.UInt32))
    )


def mean_semantic_similarity(features: pl.DataFrame) -> pl.DataFrame:
    """Mean cross-explainer cosine of each explainer's explanations to each other explainer's."""
    pairs = (
        features.select(pl.col("llm_explainer").cast(pl.String).alias("explainer"), "semantic_similarity")
        .explode("semantic_similarity")
        .drop_nulls("semantic_similarity")
        .select(
            "explainer",
            pl.col("semantic_similarity").struct.field("explainer").cast(pl.String).alias("other"),
            pl.col("semantic_similarity").struct.field("cosine_similarity").alias("cosine"),
        )
    )
    return (
        pairs.group_by(["explainer", "other"])
        .agg(mean_cosine=pl.col("cosine").mean(), pairs=pl.col("cosine").count())
        .sort(["explainer", "other"])
    )


def histogram_of(table: pl.DataFrame, metric: str, bins: int) -> dict:
    """Counts of ``table``'s column ``metric`` over ``bins`` equal-width bins between its finite
    extremes (rows where it is null or not finite are counted as missing)."""
    values = table[metric].drop_nulls().to_numpy()
    values = values[np.isfinite(values)]
    if len(values):
        low, high = float(values.min()), float(values.max())
        counts, edges = np.histogram(values, bins=bins, range=(low, high) if high > low else (low - 0.5, low + 0.5))
    else:
        counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
    return {
        "metric": metric,
        "description": metrics.BY_NAME[metric].description,
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "count": len(values),
        "missing": table.height - len(values),
    }
