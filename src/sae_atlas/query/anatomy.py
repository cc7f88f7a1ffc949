"""Error anatomy: where each explanation's fuzz and detection errors fall, from every scored record.

Per latent and run, the scorer's error rate on the activating examples of each activation quantile
(the false-negative rate: does the explanation cover only the top activations?) and on the
non-activating examples (the false-positive rate: is it too broad?); failed records are left out.
Then per explainer × scorer × method, the mean over latents with an interval resampling latents,
like every statistic of the comparison.

The same pass gives each run's set of examples per latent, for the comparability check "the runs
scored different examples".
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from sae_atlas import layout
from sae_atlas.query.profiles import interval_rows
from sae_atlas.query.resampling import Resamples

NON_ACTIVATING = -1  # the quantile column's value for the non-activating examples


def read_error_rates(output_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(error rates, example sets) from ``stages/score_records.parquet``: one row per (latent,
    run, method, quantile or :data:`NON_ACTIVATING`) with ``errors`` and ``decided``; one row per
    (run, method, latent) with the number of examples and an order-free fingerprint of their ids."""
    path = Path(output_dir) / layout.SCORE_RECORDS
    if not path.exists():
        rates = {"feature_id": pl.Int64, "data_source": pl.String, "method": pl.String, "quantile": pl.Int16}
        sets = {"data_source": pl.String, "method": pl.String, "feature_id": pl.Int64, "examples": pl.UInt32}
        return (
            pl.DataFrame(schema={**rates, "errors": pl.UInt32, "decided": pl.UInt32}),
            pl.DataFrame(schema={**sets, "fingerprint": pl.UInt64}),
        )
    scan = pl.scan_parquet(path).filter(pl.col("method").is_in(["fuzz", "detection"]))
    rates = (
        scan.filter(pl.col("correct").is_not_null() & pl.col("activating").is_not_null())
        .with_columns(quantile=pl.when(pl.col("activating")).then(pl.col("quantile")).otherwise(NON_ACTIVATING))
        .group_by("feature_id", "data_source", "method", "quantile")
        .agg(errors=(~pl.col("correct")).sum().cast(pl.UInt32), decided=pl.len().cast(pl.UInt32))
        .with_columns(pl.col("feature_id").cast(pl.Int64), pl.col("quantile").cast(pl.Int16))
        .sort("feature_id", "data_source", "method", "quantile")
        .collect()
    )
    sets = (
        scan.group_by("data_source", "method", "feature_id")
        .agg(
            examples=pl.col("example_id").n_unique().cast(pl.UInt32),
            fingerprint=pl.col("example_id").unique().hash().sum(),
        )
        .with_columns(pl.col("feature_id").cast(pl.Int64))
        .collect()
    )
    return rates, sets


def error_anatomy(
    rates: pl.DataFrame,
    runs: list[dict],
    latents: dict[str, object],
    *,
    resamples: Resamples,
    confidence: float,
) -> list[dict]:
    """Per explainer, scorer, method and quantile (:data:`NON_ACTIVATING`: the false-positive
    rate): the mean error rate over latents with its interval, on the latents ``latents[method]``
    the comparison uses for that method."""
    names = pl.DataFrame(runs, schema={"data_source": pl.String, "explainer": pl.String, "scorer": pl.String})
    rows = []
    for method, chosen in latents.items():
        frame = (
            rates.filter((pl.col("method") == method) & pl.col("feature_id").is_in(list(chosen)))
            .join(names, on="data_source")
            .select(
                "feature_id", "explainer", "scorer", "method", "quantile", value=pl.col("errors") / pl.col("decided")
            )
        )
        rows += interval_rows(
            frame, ["method", "explainer", "scorer", "quantile"], resamples=resamples, confidence=confidence
        )
    return [
        {**row, "kind": "false positives" if row["quantile"] == NON_ACTIVATING else "false negatives"} for row in rows
    ]
