"""The headline of a comparison: which explainer is ahead, by how much, how sure we are, and on which
latents.

For each headline score metric (the registry's: fuzz, detection, simulation, embedding, intruder)
that the output has, on the latents every explainer × scorer run scored (the *common* latents, so
that every mean is over the same latents):

- each explainer's score is first averaged over the scorers, per latent; explainers are ranked by
  the mean of that over the common latents;
- every two explainers' paired difference is the mean over latents of the scorer-averaged
  difference. Its interval resamples latents and keeps all of a latent's scorers together (a
  clustered bootstrap: the scorers scored the same latents, so they are not independent draws);
  Student-t below :data:`~sae_atlas.query.resampling.SMALL_SAMPLE` latents;
- its Wilcoxon signed-rank p is Holm-adjusted over a family fixed in advance: every headline metric
  the output has × every two explainers, whatever metrics the reader ticks;
- how many scorers agree on the sign, and whether the difference depends on the scorer (the
  explainer × scorer interaction: Wilcoxon on the two scorers' differences, Friedman for three or
  more, not adjusted: a diagnostic);
- one sentence of plain language per two explainers adjacent in the ranking.
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
from scipy import stats

from sae_atlas import metrics as registry
from sae_atlas.query.resampling import Resamples, finite_or_none, holm, mean_intervals, wilcoxon


def short_name(name: str) -> str:
    """A model name without its organisation."""
    return str(name).rsplit("/", 1)[-1]


def present_headline_metrics(scores: pl.DataFrame) -> list[str]:
    """The registry's headline score metrics with at least one value in ``scores``."""
    return [
        metric.name
        for metric in registry.HEADLINE_SCORE_METRICS
        if metric.name in scores.columns and scores[metric.name].null_count() < scores.height
    ]


def scorer_matrix(
    scores: pl.DataFrame, metric: str, explainers: list[str], scorers: list[str], latents: np.ndarray
) -> np.ndarray:
    """[latent, explainer, scorer] values of ``metric`` on ``latents`` (sorted ids), NaN where absent."""
    chosen = scores.filter(pl.col("feature_id").is_in(latents.tolist())).select(
        "feature_id", "explainer", "scorer", metric
    )
    cube = np.full((len(latents), len(explainers), len(scorers)), np.nan)
    if chosen.is_empty():
        return cube
    explainer_index = {name: index for index, name in enumerate(explainers)}
    scorer_index = {name: index for index, name in enumerate(scorers)}
    chosen = chosen.filter(pl.col("explainer").is_in(explainers) & pl.col("scorer").is_in(scorers)).drop_nulls(metric)
    rows = np.searchsorted(latents, chosen["feature_id"].to_numpy())
    columns = chosen["explainer"].replace_strict(explainer_index, return_dtype=pl.Int64).to_numpy()
    depth = chosen["scorer"].replace_strict(scorer_index, return_dtype=pl.Int64).to_numpy()
    cube[rows, columns, depth] = chosen[metric].cast(pl.Float64).to_numpy()
    return cube


def common_latents(scores: pl.DataFrame, metric: str, explainers: list[str], scorers: list[str]) -> np.ndarray:
    """The latents (sorted ids) on which every explainer × scorer run has a value of ``metric``."""
    runs = len(explainers) * len(scorers)
    return (
        scores.filter(pl.col("explainer").is_in(explainers) & pl.col("scorer").is_in(scorers))
        .drop_nulls(metric)
        .group_by("feature_id")
        .agg(pl.struct("explainer", "scorer").n_unique().alias("runs"))
        .filter(pl.col("runs") == runs)["feature_id"]
        .sort()
        .to_numpy()
    )


def interaction_p(differences: np.ndarray) -> tuple[float | None, str | None]:
    """Whether two explainers' difference depends on the scorer (``differences``: [latent, scorer]):
    (p, test); (None, None) with one scorer or no variation."""
    if differences.shape[1] < 2 or len(differences) < 3:
        return None, None
    if differences.shape[1] == 2:
        return wilcoxon(differences[:, 0] - differences[:, 1]), "Wilcoxon signed-rank"
    if np.ptp(differences, axis=1).max() == 0:
        return None, "Friedman"
    return float(stats.friedmanchisquare(*differences.T).pvalue), "Friedman"


def _pair_rows(
    metric: str,
    cube: np.ndarray,
    explainers: list[str],
    scorers: list[str],
    order: list[int],
    *,
    resamples: Resamples,
    confidence: float,
) -> list[dict]:
    """Every two explainers on one metric, the one ranked higher first."""
    pairs = [(order[i], order[j]) for i, j in itertools.combinations(range(len(order)), 2)]
    averaged = cube.mean(axis=2)
    differences = np.column_stack([averaged[:, a] - averaged[:, b] for a, b in pairs]) if pairs else None
    if differences is None:
        return []
    low, high, methods = mean_intervals(differences, resamples.blocks(len(differences)), confidence)
    rows = []
    for index, (a, b) in enumerate(pairs):
        per_scorer = cube[:, a, :] - cube[:, b, :]
        means = per_scorer.mean(axis=0)
        mean = float(differences[:, index].mean())
        p, test = interaction_p(per_scorer)
        rows.append(
            {
                "metric": metric,
                "first": explainers[a],
                "second": explainers[b],
                "latents": len(differences),
                "mean_difference": mean,
                "ci_low": finite_or_none(low[index]),
                "ci_high": finite_or_none(high[index]),
                "interval": methods[index],
                "wilcoxon_p": wilcoxon(differences[:, index]),
                "per_scorer": {scorer: float(value) for scorer, value in zip(scorers, means, strict=True)},
                "scorers_agreeing": int((np.sign(means) == np.sign(mean)).sum()) if mean != 0 else 0,
                "interaction_p": p,
                "interaction_test": test,
            }
        )
    return rows


def _ranking(
    metric: str, cube: np.ndarray, explainers: list[str], *, resamples: Resamples, confidence: float
) -> tuple[dict, list[int]]:
    averaged = cube.mean(axis=2)
    low, high, methods = mean_intervals(averaged, resamples.blocks(len(averaged)), confidence)
    means = averaged.mean(axis=0)
    order = sorted(range(len(explainers)), key=lambda index: (-means[index], index))
    ranking = {
        "metric": metric,
        "latents": len(averaged),
        "chance": registry.BY_NAME[metric].range[0],
        "explainers": [
            {
                "explainer": explainers[index],
                "rank": rank + 1,
                "mean": float(means[index]),
                "ci_low": finite_or_none(low[index]),
                "ci_high": finite_or_none(high[index]),
                "interval": methods[index],
            }
            for rank, index in enumerate(order)
        ],
    }
    return ranking, order


def headline(
    scores: pl.DataFrame,
    explainers: list[str],
    scorers: list[str],
    *,
    excluded: np.ndarray,
    identical: dict[tuple[str, str], np.ndarray],
    resamples: Resamples,
    confidence: float,
) -> dict:
    """Rankings, paired differences and sentences for every headline metric (``scores``: one row per
    feature × explainer × scorer; ``excluded``: latents left out; ``identical``: per two explainers,
    the latents where they wrote the same text)."""
    metrics = present_headline_metrics(scores)
    rankings, pairs = [], []
    for metric in metrics:
        latents = np.setdiff1d(common_latents(scores, metric, explainers, scorers), excluded)
        if not len(latents):
            continue
        cube = scorer_matrix(scores, metric, explainers, scorers, latents)
        ranking, order = _ranking(metric, cube, explainers, resamples=resamples, confidence=confidence)
        rankings.append(ranking)
        rows = _pair_rows(metric, cube, explainers, scorers, order, resamples=resamples, confidence=confidence)
        for row in rows:
            same = identical.get((row["first"], row["second"]), identical.get((row["second"], row["first"])))
            row["identical_texts"] = 0 if same is None else len(np.intersect1d(latents, same))
        pairs += rows
    for row, adjusted in zip(pairs, holm([row["wilcoxon_p"] for row in pairs]), strict=True):
        row["holm_p"] = adjusted
        row["significant"] = adjusted is not None and adjusted < 1 - confidence
    family = f"{len(metrics)} headline metrics × {len(explainers) * (len(explainers) - 1) // 2} pairs of explainers"
    return {
        "metrics": metrics,
        "family": family,
        "rankings": rankings,
        "pairs": pairs,
        "sentences": sentences(pairs, rankings, scorers, excluded=len(excluded) > 0),
    }


def scorer_note(first: str, second: str, scorers: list[str]) -> str:
    """What the reader must know about the scorers of two explainers' comparison: self-scoring, and
    how many scorers there are."""
    own = [short_name(scorer) for scorer in scorers if scorer in (first, second)]
    if len(scorers) == 1:
        return f"the only scorer is {own[0]} itself" if own else f"one scorer, {short_name(scorers[0])}"
    if len(own) == 1:
        return f"{own[0]} also scores its own explanations"
    return f"{' and '.join(own)} also score their own explanations" if own else ""


def _bound(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


def _latents(row: dict, excluded: bool) -> str:
    if row["identical_texts"]:
        return f"over {row['latents']:,} latents ({row['identical_texts']:,} with the same text from both)"
    return f"over {row['latents']:,} latents" + (" with different texts" if excluded else "")


def sentences(pairs: list[dict], rankings: list[dict], scorers: list[str], *, excluded: bool) -> list[str]:
    """One sentence per headline metric and two explainers adjacent in its ranking."""
    by_pair = {(row["metric"], row["first"], row["second"]): row for row in pairs}
    said = []
    for ranking in rankings:
        order = [item["explainer"] for item in ranking["explainers"]]
        for first, second in itertools.pairwise(order):
            row = by_pair[ranking["metric"], first, second]
            bounds = f"[{_bound(row['ci_low'])}, {_bound(row['ci_high'])}]"
            interval = f"{row['mean_difference']:.3f} {bounds} (Holm p {_p(row['holm_p'])})"
            latents = _latents(row, excluded)
            label = registry.BY_NAME[ranking["metric"]].label
            if row["significant"]:
                text = f"{short_name(first)} is ahead of {short_name(second)} on {label} by {interval} {latents}"
            else:
                text = (
                    f"{short_name(first)} and {short_name(second)} cannot be told apart on {label}: "
                    f"{interval} {latents}"
                )
            notes = [scorer_note(first, second, scorers)]
            if len(scorers) > 1:
                notes.append(f"{row['scorers_agreeing']} of {len(scorers)} scorers agree")
            said.append("; ".join([text, *(note for note in notes if note)]) + ".")
    return said
