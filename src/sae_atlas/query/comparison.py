"""Which explainer writes better explanations, and how far each scorer can be trusted: study
statistics with their uncertainty.

Everything here is a pure function over the tables an output directory holds (per-latent scores,
explanation agreement, run settings), vectorised over explainers, scorers and metrics:

- **summary**: per explainer × scorer × metric, the latents scored, mean, median, the
  frequency-weighted mean (delphi weights F1 by firing count) and a percentile bootstrap CI of
  the mean, resampling latents. The resamples of n latents depend only on the seed and n
  (:class:`Resamples`), so groups of the same size share them, and one matrix product gives the
  means of every metric of a group;
- **paired differences** between every two explainers on the latents both explained: mean
  difference, paired bootstrap CI, Wilcoxon signed-rank p (SciPy) with Holm's correction over all
  the pairs compared, and win / tie / loss counts;
- **scorer agreement**: Spearman and Kendall (tau-b, ties handled) correlation of two scorers'
  scores of the same explanations, the overlap of their top deciles, and the RV coefficient of
  their score profiles (all metrics at once);
- **explainer agreement**: the distribution of the semantic similarity of two explainers'
  explanations of the same latent, its rank correlation with the latent's scores, and the latents
  where they disagree most;
- **comparability**: the run_config settings that change scores, per run, and a warning wherever
  compared runs differ.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator

import numpy as np
import orjson
import polars as pl

from sae_atlas import metrics as registry
from sae_atlas.query.comparability import data_checks
from sae_atlas.query.scores import RUN_SCORES

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DISAGREEMENTS = 20
# run_config fields that differ between compared runs by design
EXPECTED_TO_DIFFER = frozenset({"explainer_model"})


# -- the statistics ---------------------------------------------------------------------------------


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``resamples`` bootstrap samples
    ([resamples, n] float32): the draws are ``rng.integers(0, n, (resamples, n))``."""
    draws = rng.integers(0, n, size=(resamples, n))
    draws += np.arange(resamples)[:, None] * n  # in place: one [resamples, n] int64 array at a time
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float32)


# Resample counts are made and used a block at a time, so a comparison's memory does not grow with
# latents × resamples (20,000 resamples of 16k latents are 1.3 GB as one float32 matrix): each block
# holds at most this many counts.
BLOCK_CELLS = 1 << 22
# The counts of a group size are kept for the other groups of that size (every explainer of a study
# usually has the same latents) while all kept counts fit in this many cells (256 MB of float32);
# beyond it they are drawn again at each use: memory stays bounded, time grows.
KEPT_CELLS = 1 << 26


class Resamples:
    """Bootstrap resample counts by sample size n: ``resamples`` rows, made in blocks of
    :meth:`block_rows` rows, block k drawn from ``[seed, n, k]``. The counts depend only on the
    seed, n and the number of resamples, so a comparison's result does not depend on which other
    groups it computes, nor on what was kept."""

    def __init__(self, resamples: int, seed: int):
        self.resamples = resamples
        self.seed = seed
        self._kept: dict[int, list[np.ndarray]] = {}

    @staticmethod
    def block_rows(n: int) -> int:
        return max(1, BLOCK_CELLS // max(n, 1))

    def _draw(self, n: int) -> Iterator[np.ndarray]:
        rows = self.block_rows(n)
        for index, start in enumerate(range(0, self.resamples, rows)):
            size = min(rows, self.resamples - start)
            yield resample_counts(n, size, np.random.default_rng([self.seed, n, index]))

    def blocks(self, n: int) -> Iterator[np.ndarray]:
        """The [rows, n] float32 count blocks of the resamples of n items, in order."""
        if n in self._kept:
            return iter(self._kept[n])
        kept = sum(block.size for blocks in self._kept.values() for block in blocks)
        if kept + n * self.resamples > KEPT_CELLS:
            return self._draw(n)
        self._kept[n] = list(self._draw(n))
        return iter(self._kept[n])

    def counts(self, n: int) -> np.ndarray:
        """All the counts at once ([resamples, n]); for small n and tests."""
        return np.concatenate(list(self.blocks(n)))


def bootstrap_means(
    values: np.ndarray, counts: np.ndarray | Iterable[np.ndarray], confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap CI of the mean of each column of ``values`` [n, g] (NaN = missing,
    left out of that column's mean), from shared resample ``counts`` [B, n] (one array, or blocks
    of rows of it): (low, high) [g]. Sums and counts of every column come from one float32 matrix
    product per block; only the [B, g] means are kept."""
    present = ~np.isnan(values)
    stacked = np.concatenate([np.where(present, values, 0.0), present], axis=1).astype(np.float32)
    blocks = [counts] if isinstance(counts, np.ndarray) else counts
    totals = np.concatenate([(block @ stacked).astype(np.float64) for block in blocks])
    sums, weights = totals[:, : values.shape[1]], totals[:, values.shape[1] :]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / weights
    tail = (1 - confidence) / 2 * 100
    low = np.full(values.shape[1], np.nan)
    high = np.full(values.shape[1], np.nan)
    for column in range(values.shape[1]):
        finite = means[:, column][np.isfinite(means[:, column])]
        if len(finite):
            low[column], high[column] = np.percentile(finite, [tail, 100 - tail])
    return low, high


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of ``p_values`` (None stays None): the k-th smallest of m is
    multiplied by m − k + 1, then made monotone."""
    indexed = sorted((p, index) for index, p in enumerate(p_values) if p is not None and not math.isnan(p))
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(indexed):
        running = max(running, min(1.0, (len(indexed) - rank) * p))
        adjusted[index] = running
    return adjusted


def wilcoxon(differences: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p of paired ``differences`` (zeros dropped, SciPy's default);
    None when no difference is non-zero."""
    from scipy import stats

    nonzero = differences[differences != 0]
    if len(nonzero) == 0:
        return None
    return float(stats.wilcoxon(nonzero).pvalue)


def rv_coefficient(first: np.ndarray, second: np.ndarray) -> float | None:
    """The RV coefficient of two configurations of the same n items ([n, p] and [n, q]): the
    matrix correlation tr(XX'YY') / sqrt(tr(XX'XX') tr(YY'YY')) of the column-centred matrices,
    computed through the p × q cross-products (never n × n)."""
    x = first - first.mean(axis=0)
    y = second - second.mean(axis=0)
    cross = np.linalg.norm(x.T @ y) ** 2
    scale = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / scale) if scale > 0 else None


def top_decile_overlap(first: np.ndarray, second: np.ndarray) -> float | None:
    """Share of the top 10 % of items by ``first`` that are also in the top 10 % by ``second``
    (ties broken by item order)."""
    k = math.ceil(0.1 * len(first))
    if k == 0:
        return None
    order = np.arange(len(first))
    top_first = set(np.lexsort((order, -first))[:k].tolist())
    top_second = set(np.lexsort((order, -second))[:k].tolist())
    return len(top_first & top_second) / k


def rank_correlations(first: np.ndarray, second: np.ndarray) -> tuple[float | None, float | None]:
    """(Spearman rho, Kendall tau-b), None where undefined (fewer than 3 items, or a constant)."""
    from scipy import stats

    if len(first) < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return None, None
    return float(stats.spearmanr(first, second).statistic), float(stats.kendalltau(first, second).statistic)


def _number(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


# -- the comparison of one output -------------------------------------------------------------------


def score_column(scorer: str, metric: str) -> str:
    """The name of a scorer × metric column of :func:`wide_scores`: a JSON pair, so that no scorer
    name (``qwen|fuzz``, anything) can make two columns one, and nothing is ever split apart."""
    return orjson.dumps([scorer, metric]).decode()


def wide_scores(scores: pl.DataFrame, metrics: list[str]) -> pl.DataFrame:
    """One row per (feature, explainer), one :func:`score_column` per scorer and metric."""
    long = scores.unpivot(index=["feature_id", "explainer", "scorer"], on=metrics, variable_name="metric")
    pairs = long.select("scorer", "metric").unique()
    names = pairs.with_columns(
        column=pl.Series([score_column(scorer, metric) for scorer, metric in pairs.rows()], dtype=pl.String)
    )
    return long.join(names, on=["scorer", "metric"]).pivot(
        "column", index=["feature_id", "explainer"], values="value", aggregate_function="first"
    )


def _column_values(frame: pl.DataFrame, name: str) -> np.ndarray:
    """A column of ``frame`` as float64 with NaN for nulls; all NaN when ``frame`` lacks it."""
    if name not in frame.columns:
        return np.full(frame.height, np.nan)
    return frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy()


def summary(
    wide: pl.DataFrame,
    metrics: list[str],
    explainers: list[str],
    scorers: list[str],
    *,
    resamples: Resamples,
    confidence: float,
    weights: pl.DataFrame | None = None,
) -> list[dict]:
    """Per explainer × scorer × metric (``wide``: :func:`wide_scores`): latents, mean, median,
    weighted mean, bootstrap CI."""
    pairs = [(scorer, metric) for scorer in scorers for metric in metrics]
    columns = [score_column(scorer, metric) for scorer, metric in pairs]
    rows = []
    for explainer in explainers:
        mine = wide.filter(pl.col("explainer") == explainer).sort("feature_id")
        if mine.is_empty():
            continue
        values = np.column_stack([_column_values(mine, column) for column in columns])
        low, high = bootstrap_means(values, resamples.blocks(mine.height), confidence)
        frequency = None
        if weights is not None:
            frequency = (
                mine.select("feature_id").join(weights, on="feature_id", how="left")["weight"].fill_null(0).to_numpy()
            )
        for column_index, (scorer, metric) in enumerate(pairs):
            present = ~np.isnan(values[:, column_index])
            chosen = values[present, column_index]
            if not len(chosen):
                continue
            weighted = None
            if frequency is not None and frequency[present].sum() > 0:
                weighted = float(np.average(chosen, weights=frequency[present]))
            rows.append(
                {
                    "explainer": explainer,
                    "scorer": scorer,
                    "metric": metric,
                    "latents": len(chosen),
                    "mean": float(chosen.mean()),
                    "median": float(np.median(chosen)),
                    "ci_low": _number(low[column_index]),
                    "ci_high": _number(high[column_index]),
                    "weighted_mean": weighted,
                }
            )
    return rows


def paired_differences(
    wide: pl.DataFrame,
    metrics: list[str],
    explainers: list[str],
    scorers: list[str],
    *,
    resamples: Resamples,
    confidence: float,
) -> list[dict]:
    """Every two explainers on the latents both explained (``wide``: :func:`wide_scores`), per
    scorer × metric: mean difference (first − second), paired bootstrap CI, Wilcoxon p
    (Holm-adjusted over every row), win / tie / loss counts of the first against the second."""
    pairs = [(scorer, metric) for scorer in scorers for metric in metrics]
    columns = [score_column(scorer, metric) for scorer, metric in pairs]
    rows = []
    for first, second in itertools.combinations(explainers, 2):
        left = wide.filter(pl.col("explainer") == first).drop("explainer")
        right = wide.filter(pl.col("explainer") == second).drop("explainer")
        both = left.join(right, on="feature_id", suffix="#second").sort("feature_id")
        if both.is_empty():
            continue
        differences = np.column_stack(
            [_column_values(both, column) - _column_values(both, f"{column}#second") for column in columns]
        )
        low, high = bootstrap_means(differences, resamples.blocks(both.height), confidence)
        for column_index, (scorer, metric) in enumerate(pairs):
            difference = differences[:, column_index]
            difference = difference[~np.isnan(difference)]
            if not len(difference):
                continue
            rows.append(
                {
                    "first": first,
                    "second": second,
                    "scorer": scorer,
                    "metric": metric,
                    "latents": len(difference),
                    "mean_difference": float(difference.mean()),
                    "ci_low": _number(low[column_index]),
                    "ci_high": _number(high[column_index]),
                    "wilcoxon_p": wilcoxon(difference),
                    "wins": int((difference > 0).sum()),
                    "ties": int((difference == 0).sum()),
                    "losses": int((difference < 0).sum()),
                }
            )
    for row, adjusted in zip(rows, holm([row["wilcoxon_p"] for row in rows]), strict=True):
        row["holm_p"] = adjusted
    return rows


def scorer_agreement(scores: pl.DataFrame, metrics: list[str], scorers: list[str]) -> list[dict]:
    """Every two scorers over the explanations both scored: per metric, Spearman, Kendall and the
    top-decile overlap; per pair, the RV coefficient of their score profiles over the metrics."""
    rows = []
    keys = ["feature_id", "explainer"]
    for first, second in itertools.combinations(scorers, 2):
        left = scores.filter(pl.col("scorer") == first).select(*keys, *metrics)
        right = scores.filter(pl.col("scorer") == second).select(*keys, *metrics)
        both = left.join(right, on=keys, suffix="#second")
        if both.is_empty():
            continue
        profile_metrics = [
            metric
            for metric in metrics
            if both[metric].null_count() < both.height and both[f"{metric}#second"].null_count() < both.height
        ]
        complete = both.drop_nulls([*profile_metrics, *(f"{m}#second" for m in profile_metrics)])
        rv = None
        if profile_metrics and complete.height > 2:
            rv = rv_coefficient(
                complete.select(profile_metrics).to_numpy().astype(np.float64),
                complete.select(f"{m}#second" for m in profile_metrics).to_numpy().astype(np.float64),
            )
        for metric in metrics:
            pairs = both.select(metric, f"{metric}#second").drop_nulls()
            if pairs.height == 0:
                continue
            a, b = (pairs[name].cast(pl.Float64).to_numpy() for name in pairs.columns)
            spearman, kendall = rank_correlations(a, b)
            rows.append(
                {
                    "first": first,
                    "second": second,
                    "metric": metric,
                    "explanations": pairs.height,
                    "spearman": spearman,
                    "kendall": kendall,
                    "top_decile_overlap": top_decile_overlap(a, b),
                    "rv": rv,
                    "rv_metrics": profile_metrics,
                }
            )
    return rows


def explainer_agreement(
    similarity: pl.DataFrame, scores: pl.DataFrame, texts: pl.DataFrame, metrics: list[str], explainers: list[str]
) -> list[dict]:
    """Every two explainers: the distribution of the cosine of their explanations of the same
    latent, its Spearman correlation with the latent's mean score on each metric (both explainers,
    all scorers), and the latents where they disagree most.

    ``similarity``: feature_id, explainer, other, cosine; ``texts``: feature_id, explainer,
    explanation_text.
    """
    per_feature = scores.group_by("feature_id", "explainer").agg(pl.col(metrics).mean())
    rows = []
    for first, second in itertools.combinations(explainers, 2):
        pair = (
            similarity.filter((pl.col("explainer") == first) & (pl.col("other") == second))
            .drop_nulls("cosine")
            .select("feature_id", "cosine")
            .sort("feature_id")
        )
        if pair.is_empty():
            continue
        cosines = pair["cosine"].cast(pl.Float64).to_numpy()
        quartiles = np.percentile(cosines, [0, 25, 50, 75, 100])
        both = (
            per_feature.filter(pl.col("explainer").is_in([first, second]))
            .group_by("feature_id")
            .agg(pl.col(metrics).mean())
        )
        joined = pair.join(both, on="feature_id", how="left")
        correlations = {}
        for metric in metrics:
            valid = joined.select("cosine", metric).drop_nulls()
            spearman, _ = rank_correlations(
                valid["cosine"].cast(pl.Float64).to_numpy(), valid[metric].cast(pl.Float64).to_numpy()
            )
            correlations[metric] = spearman
        lowest = pair.sort(["cosine", "feature_id"]).head(DISAGREEMENTS)
        first_texts = texts.filter(pl.col("explainer") == first).select("feature_id", first_text="explanation_text")
        second_texts = texts.filter(pl.col("explainer") == second).select("feature_id", second_text="explanation_text")
        disagreements = (
            lowest.join(first_texts, on="feature_id", how="left")
            .join(second_texts, on="feature_id", how="left")
            .sort(["cosine", "feature_id"])
        )
        rows.append(
            {
                "first": first,
                "second": second,
                "latents": pair.height,
                "mean": float(cosines.mean()),
                "min": float(quartiles[0]),
                "q1": float(quartiles[1]),
                "median": float(quartiles[2]),
                "q3": float(quartiles[3]),
                "max": float(quartiles[4]),
                "correlation_with_scores": correlations,
                "disagreements": [
                    {
                        "feature_id": int(feature),
                        "cosine": float(cosine),
                        "first_text": first_text,
                        "second_text": second_text,
                    }
                    for feature, cosine, first_text, second_text in disagreements.rows()
                ],
            }
        )
    return rows


def comparability(settings: dict[str, dict], runs: list[dict]) -> dict:
    """The score-relevant settings of each run and a warning per setting on which compared runs
    differ (``runs``: data_source, explainer, scorer)."""
    keys = sorted({key for values in settings.values() for key in values})
    warnings = []
    unrecorded = []
    for key in keys:
        values = {run["data_source"]: settings.get(run["data_source"], {}).get(key) for run in runs}
        known = {source: value for source, value in values.items() if value is not None}
        if not known:
            unrecorded.append(key)
            continue
        if key in EXPECTED_TO_DIFFER:
            continue
        distinct = {repr(value) for value in known.values()}
        if len(distinct) > 1 or len(known) < len(values):
            described = ", ".join(
                f"{source}: {'not recorded' if value is None else value}" for source, value in values.items()
            )
            warnings.append({"setting": key, "message": f"{key} differs between compared runs ({described})"})
    return {
        "runs": [{**run, "settings": settings.get(run["data_source"], {})} for run in runs],
        "warnings": warnings,
        "not_recorded": unrecorded,
    }


# -- one output's comparison -----------------------------------------------------------------------


def compare_output(
    features: pl.DataFrame,
    scores_table: pl.DataFrame,
    explainers: list[str],
    scorers: list[str],
    settings: tuple[dict, list[dict]],
    chosen: list[str],
    *,
    resamples: int,
    seed: int,
    confidence: float,
    run_scores: pl.DataFrame | None = None,
) -> dict:
    """The comparison of one output directory (:meth:`Atlas.compare`'s result): ``features`` is
    features.parquet (explanations, agreement), ``scores_table`` one row per (feature, explainer,
    scorer) with a column per score metric, ``settings`` each run's score-relevant settings,
    ``run_scores`` one row per (run, method, latent) for the checks of :mod:`comparability`."""

    scores = scores_table.select("feature_id", "explainer", "scorer", *chosen)
    wide = wide_scores(scores, chosen)
    draws = Resamples(resamples, seed)
    firing = (
        scores_table.group_by("feature_id")
        .agg(weight=pl.col("firing_frequency").drop_nulls().first())
        .drop_nulls("weight")
    )
    similarity = (
        features.select("feature_id", explainer="llm_explainer", pairs="semantic_similarity")
        .explode("pairs")
        .drop_nulls("pairs")
        .select(
            "feature_id",
            "explainer",
            other=pl.col("pairs").struct.field("explainer").cast(pl.String),
            cosine=pl.col("pairs").struct.field("cosine_similarity"),
        )
    )
    texts = features.select("feature_id", explainer="llm_explainer", explanation_text="explanation_text")
    result = {
        "settings": {
            "resamples": resamples,
            "seed": seed,
            "confidence": confidence,
            "metrics": chosen,
            "holm_family": "every paired row of this comparison",
            "weights": "firing frequency" if firing.height else None,
        },
        "explainers": explainers,
        "scorers": scorers,
        "metrics": {name: registry.BY_NAME[name].description for name in chosen},
        "summary": summary(
            wide,
            chosen,
            explainers,
            scorers,
            resamples=draws,
            confidence=confidence,
            weights=firing if firing.height else None,
        ),
        "paired": paired_differences(wide, chosen, explainers, scorers, resamples=draws, confidence=confidence),
        "scorer_agreement": scorer_agreement(scores, chosen, scorers),
        "explainer_agreement": explainer_agreement(similarity, scores, texts, chosen, explainers),
        "comparability": comparability(*settings),
    }
    if run_scores is None:
        run_scores = pl.DataFrame(schema=RUN_SCORES)
    checks, identical = data_checks(features, run_scores, explainers)
    result["comparability"]["warnings"] += checks
    result["comparability"]["comparable"] = not result["comparability"]["warnings"]
    result["identical_text_control"] = identical_text_control(
        wide, identical, chosen, scorers, resamples=draws, confidence=confidence
    )
    return result


def identical_text_control(
    wide: pl.DataFrame, identical: dict, metrics: list[str], scorers: list[str], *, resamples, confidence: float
) -> list[dict]:
    """On the latents where two explainers wrote the same text, their paired difference can only be
    the scorers' noise: a control whose interval should cover 0 (rows as :func:`paired_differences`)."""
    return [
        row
        for (first, second), ids in identical.items()
        if len(ids)
        for row in paired_differences(
            wide.filter(pl.col("feature_id").is_in(ids.tolist())),
            metrics,
            [first, second],
            scorers,
            resamples=resamples,
            confidence=confidence,
        )
    ]
