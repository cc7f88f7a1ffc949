"""How far the scorers agree, measured within each explainer (pooling explainers would make the
figure move with the mix of explainers), with intervals that resample latents.

- **pairs of scorers**: Spearman's ρ with a percentile-bootstrap interval (each resample's ρ is
  computed exactly, from mid-ranks within the resample: :func:`bootstrap_spearman`), Kendall's
  τ-b, and the overlap of their top deciles with ties at the boundary averaged over every way of
  breaking them (:func:`top_decile_overlap`), beside the overlap of two random deciles (chance);
- **all scorers at once**: Krippendorff's α for interval data (Krippendorff 2011, "Computing
  Krippendorff's Alpha-Reliability", eq. for the interval metric), latents as units and scorers as
  coders, with a bootstrap interval resampling latents;
- **the ranking of explainers**: whether each scorer orders the explainers as the scorer-averaged
  headline does.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats

from sae_atlas.query.headline import common_latents, scorer_matrix
from sae_atlas.query.resampling import Resamples

SHARE = 0.1  # the top decile


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _midranks(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The mid-rank of each item in each resample ([rows, n]; ``counts``: how often each item is
    drawn): items below it count fully, items tied with it (itself included) half, as if the
    resample were written out with its repeats."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    group_of_item = np.empty(len(values), dtype=np.int64)
    group_of_item[order] = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    totals = np.add.reduceat(counts[:, order], starts, axis=1)
    midrank = np.cumsum(totals, axis=1) - totals + (totals + 1) / 2
    return midrank[:, group_of_item]


def bootstrap_spearman(
    first: np.ndarray, second: np.ndarray, resamples: Resamples, confidence: float
) -> tuple[float | None, float | None]:
    """Percentile-bootstrap interval of Spearman's ρ of two scorers' scores of the same items:
    each resample's ρ is the Pearson correlation of its mid-ranks, weighted by how often each item
    was drawn, i.e. exactly ``spearmanr`` of the resample written out."""
    values = []
    for block in resamples.blocks(len(first)):
        counts = block.astype(np.float64)
        x, y = _midranks(first, counts), _midranks(second, counts)
        total = counts.sum(axis=1, keepdims=True)
        x -= (counts * x).sum(axis=1, keepdims=True) / total
        y -= (counts * y).sum(axis=1, keepdims=True) / total
        with np.errstate(invalid="ignore", divide="ignore"):
            values.append(
                (counts * x * y).sum(axis=1) / np.sqrt((counts * x * x).sum(axis=1) * (counts * y * y).sum(axis=1))
            )
    return _percentiles(np.concatenate(values), confidence)


def _top_membership(values: np.ndarray, k: int) -> np.ndarray:
    """The probability that each item is among the top ``k`` when ties at the boundary are broken at
    random: 1 above the k-th largest value, (places left) / (items tied) on it, 0 below."""
    threshold = np.sort(values)[::-1][k - 1]
    above = values > threshold
    tied = values == threshold
    membership = above.astype(np.float64)
    membership[tied] = (k - above.sum()) / tied.sum()
    return membership


def top_decile_overlap(first: np.ndarray, second: np.ndarray) -> float | None:
    """The expected share of the top 10 % (⌈n/10⌉ items) by ``first`` that is also in the top 10 % by
    ``second``, ties at either boundary broken at random (so the row order of ties cannot move it)."""
    k = math.ceil(SHARE * len(first))
    if k == 0:
        return None
    return float((_top_membership(first, k) * _top_membership(second, k)).sum() / k)


def top_decile_chance(n: int) -> float | None:
    """The expected overlap of two random top deciles of n items: ⌈n/10⌉ / n."""
    return math.ceil(SHARE * n) / n if n else None


def krippendorff_alpha(values: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Krippendorff's α for interval data of ``values`` [unit, coder] (NaN = not coded), units
    weighted by ``weights`` (a bootstrap's counts; default 1). Units with fewer than two values are
    not pairable and left out. α = 1 − (N − 1) Σᵤ Σ_{c≠k} (x_uc − x_uk)² / (mᵤ − 1) / Σ_{i≠j} (xᵢ − xⱼ)²
    over the N pairable values."""
    alpha = krippendorff_alphas(values, (np.ones((1, len(values))) if weights is None else weights[None, :]))
    return None if not np.isfinite(alpha[0]) else float(alpha[0])


def krippendorff_alphas(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`krippendorff_alpha` for each row of unit weights ``counts`` [rows, units] at once."""
    coded = ~np.isnan(values)
    pairable = coded.sum(axis=1) >= 2
    values, coded = values[pairable], coded[pairable]
    counts = counts[:, pairable].astype(np.float64)
    filled = np.where(coded, values, 0.0)
    m = coded.sum(axis=1).astype(np.float64)
    first, second = filled.sum(axis=1), (filled**2).sum(axis=1)
    within = 2 * (m * second - first**2) / np.maximum(m - 1, 1)  # Σ_{c≠k} (x_c − x_k)² / (m − 1)
    n = counts @ m
    total, squares = counts @ first, counts @ second
    between = 2 * (n * squares - total**2)  # Σ_{i≠j} (x_i − x_j)² over all pairable values
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - (n - 1) * (counts @ within) / between


def scorer_pairs(
    scores, metrics: list[str], explainers: list[str], scorers: list[str], *, resamples: Resamples, confidence: float
) -> list[dict]:
    """Per explainer, metric and two scorers, on the latents both scored that explainer's
    explanations of: ρ with its interval, τ-b, top-decile overlap beside chance."""
    rows = []
    for explainer, metric in itertools.product(explainers, metrics):
        mine = scores.filter(scores["explainer"] == explainer)
        for first, second in itertools.combinations(scorers, 2):
            latents = common_latents(mine, metric, [explainer], [first, second])
            if len(latents) < 3:
                continue
            cube = scorer_matrix(mine, metric, [explainer], [first, second], latents)[:, 0, :]
            a, b = cube[:, 0], cube[:, 1]
            constant = np.ptp(a) == 0 or np.ptp(b) == 0
            low, high = (None, None) if constant else bootstrap_spearman(a, b, resamples, confidence)
            rows.append(
                {
                    "explainer": explainer,
                    "metric": metric,
                    "first": first,
                    "second": second,
                    "latents": len(latents),
                    "spearman": None if constant else float(stats.spearmanr(a, b).statistic),
                    "spearman_low": low,
                    "spearman_high": high,
                    "kendall": None if constant else float(stats.kendalltau(a, b).statistic),
                    "top_decile_overlap": top_decile_overlap(a, b),
                    "top_decile_chance": top_decile_chance(len(latents)),
                }
            )
    return rows


def reliability(
    scores, metrics: list[str], explainers: list[str], scorers: list[str], *, resamples: Resamples, confidence: float
) -> list[dict]:
    """Krippendorff's α over every scorer, per explainer and metric, with a bootstrap interval over
    latents (the units)."""
    rows = []
    if len(scorers) < 2:
        return rows
    for explainer, metric in itertools.product(explainers, metrics):
        mine = scores.filter(scores["explainer"] == explainer).drop_nulls(metric)
        latents = np.sort(mine["feature_id"].unique().to_numpy())
        values = scorer_matrix(mine, metric, [explainer], scorers, latents)[:, 0, :]
        values = values[(~np.isnan(values)).sum(axis=1) >= 2]
        if len(values) < 3:
            continue
        alpha = krippendorff_alpha(values)
        draws = np.concatenate([krippendorff_alphas(values, block) for block in resamples.blocks(len(values))])
        low, high = _percentiles(draws, confidence)
        rows.append(
            {
                "explainer": explainer,
                "metric": metric,
                "scorers": len(scorers),
                "latents": len(values),
                "alpha": alpha,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return rows


def ranking_agreement(
    scores, rankings: list[dict], explainers: list[str], scorers: list[str], *, excluded: np.ndarray
) -> list[dict]:
    """Per headline ranking: each scorer's own order of the explainers (mean on the same common
    latents) and how many scorers order them as the scorer-averaged ranking does."""
    rows = []
    for ranking in rankings:
        metric = ranking["metric"]
        consensus = [item["explainer"] for item in ranking["explainers"]]
        latents = np.setdiff1d(common_latents(scores, metric, explainers, scorers), excluded)
        cube = scorer_matrix(scores, metric, explainers, scorers, latents)
        orders = {}
        for index, scorer in enumerate(scorers):
            means = cube[:, :, index].mean(axis=0)
            orders[scorer] = [explainers[i] for i in sorted(range(len(explainers)), key=lambda i: (-means[i], i))]
        rows.append(
            {
                "metric": metric,
                "consensus": consensus,
                "orders": orders,
                "agreeing": sum(order == consensus for order in orders.values()),
                "scorers": len(scorers),
            }
        )
    return rows
