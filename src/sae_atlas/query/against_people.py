"""The scorers against people: how far each LLM scorer's score agrees with the verdicts people gave,
and each explainer's share of good explanations by those verdicts.

Per scorer, over the labelled explanations it scored (current labels, not stale, of an
explanation; "unsure" left out):

- the ROC-AUC of its score for good against bad verdicts (Mann–Whitney, ties count half; "partial"
  left out): the chance that a good explanation scores above a bad one;
- Spearman's ρ between its score and the verdict as an ordinal (bad 0 < partial 1 < good 2).

Per explainer, the share of good among its good, partial and bad verdicts.

Every interval is a percentile bootstrap whose unit of resampling is the labelled explanation
(a latent × explainer, with every scorer's score of it: the scorers are compared on the same
resamples). No multiple-testing correction is made: these are estimates with intervals, not tests.
Only labels taken in the triage queue's random order estimate the explainers' shares without bias
(``unbiased`` says whether every label used was); the scorers' AUC and ρ hold for the explanations
labelled, whatever chose them.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.stats import rankdata

from sae_atlas.query.headline import present_headline_metrics

ORDINAL = {"bad": 0, "partial": 1, "good": 2}
UNBIASED_ORIGIN = "triage:random"


def auc(scores: np.ndarray, good: np.ndarray) -> float | None:
    """ROC-AUC of ``scores`` for ``good`` against the rest (ties half); None with one class."""
    positives, negatives = int(good.sum()), int((~good).sum())
    if not positives or not negatives:
        return None
    ranks = rankdata(scores)
    return float((ranks[good].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def spearman(scores: np.ndarray, ordinal: np.ndarray) -> float | None:
    """Spearman's ρ (average ranks for ties); None when either side is constant."""
    if len(scores) < 3:
        return None
    left, right = rankdata(scores), rankdata(ordinal)
    if left.std() == 0 or right.std() == 0:
        return None
    return float(np.corrcoef(left, right)[0, 1])


def _interval(values: list, confidence: float) -> tuple[float | None, float | None]:
    finite = np.array([value for value in values if value is not None and np.isfinite(value)])
    if not len(finite):
        return None, None
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def against_people(
    scores: pl.DataFrame, labels: pl.DataFrame, *, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """``scores``: feature_id, explainer, scorer, score (one headline metric); ``labels``: the
    current labels (feature_id, explainer, verdict, stale, origin). See the module docstring."""
    judged = labels.filter(
        pl.col("explainer").is_not_null() & ~pl.col("stale") & pl.col("verdict").is_in(list(ORDINAL))
    ).select(pl.col("feature_id").cast(pl.Int64), "explainer", "verdict", "origin")
    wide = judged.join(
        scores.with_columns(pl.col("feature_id").cast(pl.Int64)).pivot(
            "scorer", index=["feature_id", "explainer"], values="score", aggregate_function="first"
        ),
        on=["feature_id", "explainer"],
        how="left",
    )
    scorers = sorted(scores["scorer"].unique().to_list())
    ordinal = wide["verdict"].replace_strict(ORDINAL, return_dtype=pl.Int64).to_numpy()
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, wide.height, wide.height) for _ in range(resamples)] if wide.height else []
    rows = []
    for scorer in scorers:
        values = wide[scorer].to_numpy().astype(np.float64) if scorer in wide.columns else np.full(wide.height, np.nan)
        rows.append(_scorer_row(scorer, values, ordinal, draws, confidence))
    explainers = []
    for name in sorted(wide["explainer"].unique().to_list()):
        good = (wide.filter(pl.col("explainer") == name)["verdict"] == "good").to_numpy()
        local = np.random.default_rng(seed)
        shares = [float(good[local.integers(0, len(good), len(good))].mean()) for _ in range(resamples)]
        low, high = _interval(shares, confidence)
        explainers.append(
            {"explainer": name, "n": len(good), "share_good": float(good.mean()), "low": low, "high": high}
        )
    origins = dict(judged.group_by("origin").len().sort("origin").iter_rows())
    return {
        "n": wide.height,
        "scorers": rows,
        "explainers": explainers,
        "origins": origins,
        "unbiased": bool(origins) and set(origins) == {UNBIASED_ORIGIN},
        "resamples": resamples,
        "confidence": confidence,
        "unit": "a labelled explanation (latent × explainer), with every scorer's score of it",
    }


def _scorer_row(scorer: str, values: np.ndarray, ordinal: np.ndarray, draws: list, confidence: float) -> dict:
    scored = ~np.isnan(values)
    decided = scored & (ordinal != ORDINAL["partial"])

    def statistics(rows: np.ndarray) -> tuple[float | None, float | None]:
        pick, keep = rows[decided[rows]], rows[scored[rows]]
        return auc(values[pick], ordinal[pick] == ORDINAL["good"]), spearman(values[keep], ordinal[keep])

    everything = np.arange(len(values))
    point_auc, point_rho = statistics(everything)
    resampled = [statistics(rows) for rows in draws]
    auc_low, auc_high = _interval([value[0] for value in resampled], confidence)
    rho_low, rho_high = _interval([value[1] for value in resampled], confidence)
    return {
        "scorer": scorer,
        "n": int(scored.sum()),
        "n_good": int((scored & (ordinal == ORDINAL["good"])).sum()),
        "n_bad": int((scored & (ordinal == ORDINAL["bad"])).sum()),
        "auc": point_auc,
        "auc_low": auc_low,
        "auc_high": auc_high,
        "spearman": point_rho,
        "spearman_low": rho_low,
        "spearman_high": rho_high,
    }


def for_atlas(atlas, labels: pl.DataFrame, *, resamples: int = 2000, seed: int = 0, confidence: float = 0.95):
    """(metric, :func:`against_people` of ``atlas``'s scorers on their first headline score with values) — (metric,
    None) when nothing is labelled or no headline score exists. ``labels``: the current labels."""
    rows = atlas.features(limit=None).filter(pl.col("explanation_ok"))
    metric = next(iter(present_headline_metrics(rows)), None)
    judged = labels.filter(pl.col("explainer").is_not_null() & ~pl.col("stale"))
    if metric is None or not judged.height:
        return metric, None
    scores = pl.concat(
        atlas.features(limit=None, scorer=scorer).select(
            "feature_id", "explainer", pl.lit(scorer).alias("scorer"), pl.col(metric).alias("score")
        )
        for scorer in atlas.scorers
    )
    return metric, against_people(scores, labels, resamples=resamples, seed=seed, confidence=confidence)
