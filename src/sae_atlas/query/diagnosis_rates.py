"""The diagnosis per explainer, with uncertainty: how often each cause holds, how often the top token
of a lexical latent is named, how an explainer scores on each kind of latent, and which explainer is
best on which kind.

Unit of resampling: the latent (each bootstrap resample draws latents with replacement, with every
explanation of each), as in the rest of the comparison; intervals are percentile-bootstrap from
:data:`~sae_atlas.query.resampling.SMALL_SAMPLE` latents up, Student-t below (Welch's for the gap
between two kinds of latent; a share's interval is kept within [0, 1]). These are descriptive
intervals: no test is made, so there is no multiple-testing family to correct.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats

from sae_atlas.query.headline import short_name
from sae_atlas.query.resampling import SMALL_SAMPLE, Resamples, finite_or_none, mean_intervals
from sae_atlas.stages.activation_patterns import PATTERNS
from sae_atlas.stages.diagnosis import CAUSES

UNIT = "latents: each resample draws latents with replacement, with all their explanations"
FAMILY = "descriptive intervals, no test: nothing to correct for multiple testing"


def _columns(table: pl.DataFrame, explainers: list[str]) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """[latents, columns] values (NaN = no value) and each column's (quantity, explainer, kind)."""
    latents = table["feature_id"].unique().sort()
    frame = pl.DataFrame({"feature_id": latents})
    columns, keys = [], []

    def add(quantity: str, explainer: str, kind: str, value: pl.Expr) -> None:
        mine = table.filter(pl.col("explainer") == explainer).select("feature_id", value=value)
        joined = frame.join(mine, on="feature_id", how="left", maintain_order="left")
        columns.append(joined["value"].cast(pl.Float64).fill_null(np.nan).to_numpy())
        keys.append((quantity, explainer, kind))

    for explainer in explainers:
        for cause in CAUSES:
            add("cause", explainer, cause, (pl.col("cause") == cause).fill_null(False).cast(pl.Float64))
        lexical = pl.col("pattern") == "lexical"
        add("names", explainer, "lexical", pl.when(lexical).then(pl.col("names_top_token").cast(pl.Float64)))
        if "corroborated_share" in table.columns:
            add("corroborated", explainer, "claims", pl.col("corroborated_share"))
        for kind in PATTERNS:
            add("fuzz", explainer, kind, pl.when(pl.col("pattern") == kind).then(pl.col("fuzz")))
    values = np.column_stack(columns) if columns else np.zeros((len(latents), 0))
    return values, keys


def _gaps(values: np.ndarray, pairs: list[tuple[int, int]], resamples: Resamples, confidence: float):
    """Bootstrap intervals of mean(column a) − mean(column b) for each pair, latents resampled
    (only the paired columns are resampled)."""
    columns = sorted({column for pair in pairs for column in pair})
    position = {column: index for index, column in enumerate(columns)}
    values = values[:, columns]
    pairs = [(position[a], position[b]) for a, b in pairs]
    present = ~np.isnan(values)
    stacked = np.concatenate([np.where(present, values, 0.0), present], axis=1).astype(np.float32)
    totals = np.concatenate([(block @ stacked).astype(np.float64) for block in resamples.blocks(len(values))])
    width = values.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = totals[:, :width] / totals[:, width:]
    tail = (1 - confidence) / 2 * 100
    rows = []
    for a, b in pairs:
        first, second = values[present[:, a], a], values[present[:, b], b]
        point = first.mean() - second.mean() if len(first) and len(second) else np.nan
        if min(len(first), len(second)) >= SMALL_SAMPLE:
            gaps = means[:, a] - means[:, b]
            low, high = np.percentile(gaps[np.isfinite(gaps)], [tail, 100 - tail])
        else:  # few latents of a kind: Welch's interval, as the small samples elsewhere get Student-t
            low, high = _welch(first, second, confidence)
        rows.append((point, low, high))
    return rows


def _welch(first: np.ndarray, second: np.ndarray, confidence: float) -> tuple[float, float]:
    """Welch's interval of mean(first) − mean(second); NaN below two values on either side."""
    if len(first) < 2 or len(second) < 2:
        return np.nan, np.nan
    a, b = first.var(ddof=1) / len(first), second.var(ddof=1) / len(second)
    if a + b == 0:
        return first.mean() - second.mean(), first.mean() - second.mean()
    freedom = (a + b) ** 2 / (a**2 / (len(first) - 1) + b**2 / (len(second) - 1))
    half = stats.t.isf((1 - confidence) / 2, freedom) * np.sqrt(a + b)
    return first.mean() - second.mean() - half, first.mean() - second.mean() + half


def explainer_rates(
    table: pl.DataFrame, explainers: list[str], *, resamples: Resamples, confidence: float
) -> dict | None:
    """Per explainer, from the diagnosis ``table`` (stages/diagnosis.parquet's columns): each
    cause's rate, the rate of naming the top token on lexical latents, fuzz by kind of latent, the
    lexical − contextual gap; which explainer is best on each kind. None without a diagnosis."""
    scored = table.filter(pl.col("fuzz").is_not_null() | pl.col("false_positive_rate").is_not_null())
    if not scored.height:
        return None
    values, keys = _columns(scored, explainers)
    low, high, methods = mean_intervals(values, resamples.blocks(len(values)), confidence)
    counts = (~np.isnan(values)).sum(axis=0)
    rows = [
        {
            "quantity": quantity,
            "explainer": explainer,
            "kind": kind,
            "mean": finite_or_none(np.nanmean(values[:, index])) if counts[index] else None,
            # a share's interval stays within [0, 1] (Student-t on few latents would leave it)
            "ci_low": finite_or_none(max(low[index], 0.0) if quantity != "fuzz" else low[index]),
            "ci_high": finite_or_none(min(high[index], 1.0) if quantity != "fuzz" else high[index]),
            "interval": methods[index],
            "n": int(counts[index]),
        }
        for index, (quantity, explainer, kind) in enumerate(keys)
    ]
    position = {key: index for index, key in enumerate(keys)}
    pairs = [(position["fuzz", name, "lexical"], position["fuzz", name, "contextual"]) for name in explainers]
    intervals = _gaps(values, pairs, resamples, confidence)
    gaps = [
        {"explainer": name, "gap": finite_or_none(point), "ci_low": finite_or_none(gap_low),
         "ci_high": finite_or_none(gap_high)}
        for name, (point, gap_low, gap_high) in zip(explainers, intervals, strict=True)
    ]  # fmt: skip
    patterns = scored.unique("feature_id").group_by("pattern").len()
    best = best_by_kind(rows)
    return {
        "latents": len(values),
        "unit": UNIT,
        "family": FAMILY,
        "patterns": {str(kind): int(count) for kind, count in patterns.iter_rows() if kind is not None},
        "rates": rows,
        "gaps": gaps,
        "best": best,
        "sentences": sentences(best),
    }


def best_by_kind(rows: list[dict]) -> list[dict]:
    """For each kind of latent with fuzz scores, the explainer with the highest mean and whether its
    interval clears the runner-up's (else the two cannot be told apart)."""
    best = []
    for kind in PATTERNS:
        ranked = sorted(
            (row for row in rows if row["quantity"] == "fuzz" and row["kind"] == kind and row["mean"] is not None),
            key=lambda row: -row["mean"],
        )
        if not ranked:
            continue
        first, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        bounds = (first["ci_low"], second["ci_high"]) if second else (None, None)
        clear = None not in bounds and bounds[0] > bounds[1]
        best.append({"kind": kind, "explainer": first["explainer"], "fuzz": first["mean"], "latents": first["n"],
                     "runner_up": second["explainer"] if second else None, "clear": clear})  # fmt: skip
    return best


def sentences(best: list[dict]) -> list[str]:
    """One sentence per kind of latent: which explainer is best on it (:func:`best_by_kind`)."""
    said = []
    for row in best:
        runner_up = short_name(row["runner_up"] or "")
        verdict = "ahead, intervals apart" if row["clear"] else f"not clearly ahead of {runner_up}"
        said.append(
            f"On {row['kind']} latents ({row['latents']:,}) {short_name(row['explainer'])} has the highest fuzz, "
            f"{row['fuzz']:.3f}: {verdict}."
        )
    return said
