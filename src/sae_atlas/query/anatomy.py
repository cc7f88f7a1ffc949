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
import pyarrow.parquet as pq

from sae_atlas import layout
from sae_atlas.query.profiles import interval_rows
from sae_atlas.query.resampling import Resamples

NON_ACTIVATING = -1  # the quantile column's value for the non-activating examples


RATE_KEYS = ["feature_id", "data_source", "method", "quantile"]
SET_KEYS = ["data_source", "method", "feature_id"]
BATCH_ROWS = 1 << 22  # records read at a time: memory stays bounded at 131k latents (tens of millions)


def _partial(batch: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    decided = batch.filter(pl.col("correct").is_not_null() & pl.col("activating").is_not_null())
    rates = (
        decided.with_columns(quantile=pl.when(pl.col("activating")).then(pl.col("quantile")).otherwise(NON_ACTIVATING))
        .group_by(RATE_KEYS)
        .agg(errors=(~pl.col("correct")).sum().cast(pl.UInt32), decided=pl.len().cast(pl.UInt32))
    )
    sets = batch.group_by(SET_KEYS).agg(
        examples=pl.len().cast(pl.UInt32), fingerprint=pl.col("example_id").hash().sum()
    )
    return rates, sets


def read_error_rates(output_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(error rates, example sets) from ``stages/score_records.parquet``: one row per (latent,
    run, method, quantile or :data:`NON_ACTIVATING`) with ``errors`` and ``decided``; one row per
    (run, method, latent) with its records and an order-free fingerprint of their example ids (the
    sum of their hashes). Read :data:`BATCH_ROWS` records at a time and summed."""
    rates_schema = {"feature_id": pl.Int64, "data_source": pl.String, "method": pl.String, "quantile": pl.Int16}
    sets_schema = {"data_source": pl.String, "method": pl.String, "feature_id": pl.Int64, "examples": pl.UInt32}
    path = Path(output_dir) / layout.SCORE_RECORDS
    if not path.exists():
        return (
            pl.DataFrame(schema={**rates_schema, "errors": pl.UInt32, "decided": pl.UInt32}),
            pl.DataFrame(schema={**sets_schema, "fingerprint": pl.UInt64}),
        )
    columns = ["feature_id", "data_source", "method", "activating", "quantile", "correct", "example_id"]
    rates, sets = [], []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
        # categorical names: a partial result holding plain strings would keep its whole batch's
        # string buffers alive (gigabytes over a 131k-latent study)
        part = (
            pl.from_arrow(batch)
            .filter(pl.col("method").is_in(["fuzz", "detection"]))
            .with_columns(pl.col("data_source", "method").cast(pl.Categorical))
        )
        rate, example_set = _partial(part)
        rates.append(rate)
        sets.append(example_set)
    # a latent cut by a batch boundary has two partial rows: summed
    rates = (
        pl.concat(rates)
        .group_by(RATE_KEYS)
        .agg(pl.col("errors").sum(), pl.col("decided").sum())
        .select(*[pl.col(name).cast(dtype) for name, dtype in rates_schema.items()], "errors", "decided")
        .sort(RATE_KEYS)
    )
    sets = (
        pl.concat(sets)
        .group_by(SET_KEYS)
        .agg(pl.col("examples").sum(), pl.col("fingerprint").sum())
        .select(*[pl.col(name).cast(dtype) for name, dtype in sets_schema.items()], "fingerprint")
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
