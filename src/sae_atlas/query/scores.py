"""The scores of an output directory as the query layer reads them: one row per (feature,
explainer, scorer) with a column per score metric of the registry, and the scores per activation
quantile. Both from ``stages/scores.parquet``, the one score table every view reads (the table,
the feature page, ``stats``, ``compare``); an output written by another tool has only the
``scores`` struct of features.parquet (the contract's methods)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from sae_atlas import layout, metrics
from sae_atlas.query.lazy import Lazy
from sae_atlas.schema import CONTRACT_SCORE_FIELDS

SCORE_NAMES = tuple(metric.name for metric in metrics.SCORE_METRICS)
QUANTILE_FIELDS = ("scorer", "method", "quantile", "score", "examples")


def score_columns(long: pl.DataFrame) -> pl.DataFrame:
    """``stages/scores.parquet`` rows (one per feature × run × method) as one row per (feature,
    explainer, scorer) with a column per score metric of the registry (null where the table has
    no such column, e.g. an output of an earlier version)."""

    def value(metric: metrics.Metric) -> pl.Expr:
        if metric.column not in long.columns:
            return pl.lit(None, pl.Float64).alias(metric.name)
        chosen = pl.col(metric.column).cast(pl.Float64)
        if metric.method is not None:
            chosen = chosen.filter(pl.col("method") == metric.method)
        return chosen.drop_nulls().first().alias(metric.name)

    return (
        long.with_columns(
            pl.col("feature_id").cast(pl.Int64),
            pl.col("llm_explainer").cast(pl.String).alias("explainer"),
            pl.col("llm_scorer").cast(pl.String).alias("scorer"),
            pl.col("method").cast(pl.String),
        )
        .group_by(["feature_id", "explainer", "scorer"], maintain_order=True)
        .agg(value(metric) for metric in metrics.SCORE_METRICS)
    )


def read_scores(output_dir: Path, features: pl.DataFrame, explainers: list[str]) -> pl.DataFrame:
    """``feature_id``, ``explainer``, ``scorer`` and one column per score metric, sorted by feature
    (explainers in ``explainers``' order, then as stored)."""
    path = Path(output_dir) / layout.SCORES
    if path.exists():
        present = set(pq.read_schema(path).names)
        # An output of an earlier version lacks the newer columns: their metrics are null.
        columns = sorted({metric.column for metric in metrics.SCORE_METRICS} & present)
        table = score_columns(
            pl.read_parquet(path, columns=["feature_id", "llm_explainer", "llm_scorer", "method", *columns])
        )
    else:
        table = (
            features.select("feature_id", pl.col("llm_explainer").alias("explainer"), "scores")
            .explode("scores")
            .drop_nulls("scores")
            .unnest("scores")
            .with_columns(
                pl.lit(None, pl.Float64).alias(name) for name in SCORE_NAMES if name not in CONTRACT_SCORE_FIELDS
            )
        )
    rank = {name: position for position, name in enumerate(explainers)}
    return (
        table.with_columns(
            _explainer=pl.col("explainer").replace_strict(rank, default=len(rank)), _row=pl.int_range(pl.len())
        )
        .sort("feature_id", "_explainer", "_row")
        .select("feature_id", "explainer", "scorer", *SCORE_NAMES)
    )


def _read_nested_quantiles(path: Path) -> tuple[pl.DataFrame, np.ndarray]:
    """One row per (feature, explainer, scorer, method) with its ``by_quantile`` list, by feature:
    ten times fewer rows than one per quantile, which a latent's page unnests for itself."""
    if path.exists() and "by_quantile" in pq.read_schema(path).names:
        table = pl.read_parquet(
            path, columns=["feature_id", "llm_explainer", "llm_scorer", "method", "by_quantile"]
        ).select(
            pl.col("feature_id").cast(pl.Int64),
            pl.col("llm_explainer").cast(pl.String).alias("explainer"),
            pl.col("llm_scorer").cast(pl.String).alias("scorer"),
            pl.col("method").cast(pl.String),
            "by_quantile",
        )
        table = table.sort("feature_id", maintain_order=True)
    else:
        table = pl.DataFrame(
            schema={"feature_id": pl.Int64, "explainer": pl.String, "scorer": pl.String, "method": pl.String}
        )
    return table, table["feature_id"].to_numpy()


def _unnested(nested: pl.DataFrame) -> pl.DataFrame:
    """One row per (feature, explainer, scorer, method, quantile)."""
    if "by_quantile" not in nested.columns:
        return pl.DataFrame(schema={"feature_id": pl.Int64, "explainer": pl.String, **dict.fromkeys(QUANTILE_FIELDS)})
    return (
        nested.explode("by_quantile")
        .drop_nulls("by_quantile")
        .unnest("by_quantile")
        .select("feature_id", "explainer", "scorer", "method", "quantile", "score", "examples")
    )


class QuantileScores:
    """Every score per activation quantile, read on first use: nested for a latent's look-up,
    one row per (feature, explainer, scorer, method, quantile) for the comparison."""

    def __init__(self, output_dir: Path):
        self.nested = Lazy(lambda: _read_nested_quantiles(Path(output_dir) / layout.SCORES), name="quantile-scores")
        self.table = Lazy(lambda: (_unnested(self.nested.get()[0]),), name="quantile-table")

    def of_feature(self, feature_id: int) -> dict[str, list[dict]]:
        """A latent's quantile scores, by explainer."""
        nested, ids = self.nested.get()
        low, high = np.searchsorted(ids, [feature_id, feature_id + 1])
        by_explainer: dict[str, list[dict]] = {}
        for explainer, *values in _unnested(nested.slice(low, high - low)).drop("feature_id").rows():
            by_explainer.setdefault(explainer, []).append(dict(zip(QUANTILE_FIELDS, values, strict=True)))
        return by_explainer


def run_settings(output_dir: Path) -> tuple[dict, list[dict]]:
    """Each run's score-relevant settings (from the scores sidecar) and which runs there are."""
    path = Path(output_dir) / layout.SCORES
    if not path.exists():
        return {}, []
    runs = (
        pl.read_parquet(path, columns=["data_source", "llm_explainer", "llm_scorer"])
        .unique(maintain_order=True)
        .select(
            pl.col("data_source").cast(pl.String),
            explainer=pl.col("llm_explainer").cast(pl.String),
            scorer=pl.col("llm_scorer").cast(pl.String),
        )
    )
    sidecar = layout.read_sidecar(path) or {}
    settings = (sidecar.get("statistics") or {}).get("run_settings") or {}
    return settings, runs.to_dicts()


RUN_SCORES = {
    "data_source": pl.String,
    "explainer": pl.String,
    "scorer": pl.String,
    "method": pl.String,
    "feature_id": pl.Int64,
    "n_examples": pl.Int64,
    "score": pl.Float64,
}


def read_run_scores(output_dir: Path) -> pl.DataFrame:
    """One row per (run, method, latent) of ``stages/scores.parquet``: who scored what, on how many
    examples (the comparability checks); empty without the file."""
    path = Path(output_dir) / layout.SCORES
    if not path.exists():
        return pl.DataFrame(schema=RUN_SCORES)
    columns = ["data_source", "llm_explainer", "llm_scorer", "method", "feature_id", "n_examples", "score"]
    return pl.read_parquet(path, columns=columns).select(
        pl.col(name).cast(dtype).alias(alias)
        for name, alias, dtype in zip(columns, RUN_SCORES, RUN_SCORES.values(), strict=True)
    )
