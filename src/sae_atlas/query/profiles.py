"""Scores along a second variable, per explainer, with intervals that resample latents: by activation
quantile (delphi's plot: does an explanation hold beyond the top activations?) and by firing
frequency (are rare or frequent latents explained better?). Each latent's score is first averaged
over the scorers, as in the headline."""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas.query.resampling import Resamples, mean_intervals

FIRING_BINS = 8


def interval_rows(frame: pl.DataFrame, keys: list[str], *, resamples: Resamples, confidence: float) -> list[dict]:
    """``frame``: feature_id, the ``keys`` and ``value``; one row per distinct key with the mean over
    latents and its interval (latents resampled, every key from the same resamples; NaN values,
    e.g. a rate with nothing to divide, are left out)."""
    if frame.is_empty():
        return []
    groups = frame.select(keys).unique().sort(keys).with_row_index("_group")
    indexed = frame.join(groups, on=keys)
    latents = np.sort(indexed["feature_id"].unique().to_numpy())
    values = np.full((len(latents), groups.height), np.nan)
    rows_of = np.searchsorted(latents, indexed["feature_id"].to_numpy())
    values[rows_of, indexed["_group"].to_numpy()] = indexed["value"].cast(pl.Float64).to_numpy()
    low, high, methods = mean_intervals(values, resamples.blocks(len(latents)), confidence)
    present = ~np.isnan(values)
    rows = []
    for index, key in enumerate(groups.drop("_group").iter_rows(named=True)):
        chosen = values[present[:, index], index]
        rows.append(
            {
                **key,
                "latents": int(present[:, index].sum()),
                "mean": float(chosen.mean()),
                "ci_low": None if np.isnan(low[index]) else float(low[index]),
                "ci_high": None if np.isnan(high[index]) else float(high[index]),
                "interval": methods[index],
            }
        )
    return rows


def by_quantile(
    quantiles: pl.DataFrame, latents: dict[str, np.ndarray], *, resamples: Resamples, confidence: float
) -> list[dict]:
    """Per method (on the latents ``latents[method]`` holds), explainer and activation quantile (0 =
    top): the mean score with its interval. ``quantiles``: feature_id, explainer, scorer, method,
    quantile, score."""
    rows = []
    for method, chosen in latents.items():
        frame = (
            quantiles.filter((pl.col("method") == method) & pl.col("feature_id").is_in(chosen.tolist()))
            .drop_nulls("score")
            .group_by("feature_id", "explainer", "quantile")
            .agg(value=pl.col("score").cast(pl.Float64).mean())
            .with_columns(method=pl.lit(method))
        )
        rows += interval_rows(frame, ["method", "explainer", "quantile"], resamples=resamples, confidence=confidence)
    return rows


def firing_bins(frequency: np.ndarray, bins: int = FIRING_BINS) -> np.ndarray:
    """The edges of ``bins`` bins of equal count over the (positive) firing frequencies, on a log
    scale so that the rare latents are not one bin."""
    positive = frequency[frequency > 0]
    if not len(positive):
        return np.array([])
    return np.unique(10 ** np.quantile(np.log10(positive), np.linspace(0, 1, bins + 1)))


def by_firing(
    scores: pl.DataFrame,
    firing: pl.DataFrame,
    latents: dict[str, np.ndarray],
    *,
    resamples: Resamples,
    confidence: float,
) -> list[dict]:
    """Per metric (on ``latents[metric]``), explainer and bin of firing frequency (``firing``:
    feature_id, weight): the mean score with its interval and the bin's frequency range."""
    edges = firing_bins(firing["weight"].cast(pl.Float64).to_numpy())
    if len(edges) < 2:
        return []
    positive = firing.filter(pl.col("weight") > 0)
    places = np.searchsorted(edges, positive["weight"].cast(pl.Float64).to_numpy(), side="right") - 1
    binned = positive.with_columns(bin=pl.Series(np.clip(places, 0, len(edges) - 2)))
    rows = []
    for metric, chosen in latents.items():
        frame = (
            scores.filter(pl.col("feature_id").is_in(chosen.tolist()))
            .drop_nulls(metric)
            .group_by("feature_id", "explainer")
            .agg(value=pl.col(metric).cast(pl.Float64).mean())
            .join(binned.select("feature_id", "bin"), on="feature_id")
            .with_columns(metric=pl.lit(metric))
        )
        for row in interval_rows(frame, ["metric", "explainer", "bin"], resamples=resamples, confidence=confidence):
            low, high = edges[row["bin"]], edges[row["bin"] + 1]
            rows.append({**row, "frequency_low": float(low), "frequency_high": float(high)})
    return rows
