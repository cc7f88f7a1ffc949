"""Stage 1, ``scores``: one row per feature × explainer × scorer × method.

Definitions (DESIGN.md §2):

- fuzz, detection, intruder: accuracy = correct / (records − failed); a record failed when its
  ``correct`` is not a boolean (a null batch, or a Gen 1/2 ``-1`` prediction).
- embedding: ROC-AUC of ``similarity`` against the activating label, ties counted half (the
  Mann–Whitney form); null when only one class is present.
- simulation: mean and sample variance of the finite top-level ``ev_correlation_score`` values;
  ``"nan"`` strings and nulls count as failed. The variance of a single value is null.
"""

from __future__ import annotations

import polars as pl

from sae_atlas.schema import STAGE_SCORES

KEYS = ["data_source", "method", "feature_id"]
AGGREGATE_COLUMNS = {
    "data_source": pl.String,
    "method": pl.String,
    "feature_id": pl.UInt32,
    "score": pl.Float64,
    "n_failed": pl.UInt32,
    "variance": pl.Float64,
}
FILE_COLUMNS = {"data_source": pl.String, "method": pl.String, "feature_id": pl.UInt32, "n_examples": pl.UInt32}


def _conform(part: pl.DataFrame, columns: dict = AGGREGATE_COLUMNS) -> pl.DataFrame:
    """``part`` with exactly ``columns``, absent ones null, so the parts can be concatenated."""
    return part.select(
        [
            pl.col(name).cast(dtype) if name in part.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in columns.items()
        ]
    )


def _accuracy(records: pl.DataFrame) -> pl.DataFrame:
    return records.group_by(KEYS).agg(
        n_failed=pl.col("correct").null_count(),
        score=pl.col("correct").cast(pl.Float64).mean(),
    )


def _roc_auc(records: pl.DataFrame) -> pl.DataFrame:
    groups = ["data_source", "feature_id"]
    failed = pl.col("similarity").is_null() | pl.col("activating").is_null()
    counts = records.group_by(groups).agg(n_failed=failed.sum())
    valid = records.filter(~failed).with_columns(rank=pl.col("similarity").rank("average").over(groups))
    auc = (
        valid.group_by(groups)
        .agg(
            positives=pl.col("activating").sum(),
            negatives=(~pl.col("activating")).sum(),
            positive_rank_sum=pl.col("rank").filter(pl.col("activating")).sum(),
        )
        .with_columns(
            score=pl.when((pl.col("positives") > 0) & (pl.col("negatives") > 0)).then(
                (pl.col("positive_rank_sum") - pl.col("positives") * (pl.col("positives") + 1) / 2)
                / (pl.col("positives") * pl.col("negatives"))
            )
        )
    )
    return counts.join(auc.select([*groups, "score"]), on=groups, how="left").with_columns(method=pl.lit("embedding"))


def _correlation(records: pl.DataFrame) -> pl.DataFrame:
    return (
        records.group_by(["data_source", "feature_id"])
        .agg(
            n_failed=pl.col("correlation").null_count(),
            score=pl.col("correlation").mean(),
            variance=pl.col("correlation").var(ddof=1),
        )
        .with_columns(method=pl.lit("simulation"))
    )


def build_scores(
    *,
    files: pl.DataFrame,
    classifier: pl.DataFrame,
    embedding: pl.DataFrame,
    simulation: pl.DataFrame,
    intruder: pl.DataFrame,
    runs: pl.DataFrame,
) -> pl.DataFrame:
    """Aggregate per-example score records into the ``stages/scores.parquet`` table.

    Every input carries a ``data_source`` column; ``files`` has one row per readable score file
    (``method``, ``feature_id``, ``n_records``) and ``runs`` maps ``data_source`` to
    ``llm_explainer`` and ``llm_scorer``.
    """
    aggregated = pl.concat(
        [
            _conform(_accuracy(classifier)),
            _conform(_roc_auc(embedding)),
            _conform(_correlation(simulation)),
            _conform(_accuracy(intruder.with_columns(method=pl.lit("intruder")))),
        ]
    )
    table = (
        _conform(files.rename({"n_records": "n_examples"}), FILE_COLUMNS)
        .join(aggregated, on=KEYS, how="left")
        .join(runs.with_columns(pl.col("data_source").cast(pl.String)), on="data_source", how="left")
        .with_columns(pl.col("n_failed").fill_null(0))
    )
    source_order = {name: position for position, name in enumerate(runs["data_source"].cast(pl.String))}
    return (
        table.with_columns(_source_order=pl.col("data_source").replace_strict(source_order, return_dtype=pl.UInt32))
        .sort(["feature_id", "_source_order", "method"])
        .select([pl.col(name).cast(dtype) for name, dtype in STAGE_SCORES.items()])
    )
