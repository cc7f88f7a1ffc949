"""Which explainer writes better explanations, and how far each scorer can be trusted: study
statistics with their uncertainty, computed on like-for-like latents.

Everything here is a pure function over the tables an output directory holds (per-latent scores,
explanation agreement, run settings), vectorised over explainers, scorers and metrics. Before any
number, :mod:`comparability` reads from the data whether the runs can be compared at all. Then:

- **the headline** (:mod:`headline`): explainers ranked on the latents every run scored, paired
  differences averaged over scorers with a clustered bootstrap, Holm over a fixed family;
- **summary**: per explainer × scorer × metric, the latents scored, mean, median, the
  frequency-weighted mean (delphi weights F1 by firing count) and an interval of the mean,
  resampling latents (percentile bootstrap; Student-t below
  :data:`~sae_atlas.query.resampling.SMALL_SAMPLE` latents). By default every metric is compared
  on the latents every explainer × scorer run scored, so that the means are over the same latents;
- **paired differences** per scorer between every two explainers: mean difference, paired
  interval, Wilcoxon signed-rank p (not adjusted: exploratory; the confirmatory test is the
  headline's), and win / tie / loss counts;
- **scorer agreement** within each explainer (:mod:`agreement`): ρ with its interval, τ-b,
  top-decile overlap beside chance, Krippendorff's α over all scorers, the scorers' rankings;
- **profiles** (:mod:`profiles`): scores by activation quantile and by firing frequency;
- **explainer agreement**: the distribution of the semantic similarity of two explainers'
  explanations of the same latent, its rank correlation with the latent's scores, and the latents
  where they disagree most;
- **comparability**: the run_config settings that change scores, per run, and a warning wherever
  compared runs differ; the identical-text control.
"""

from __future__ import annotations

import itertools

import numpy as np
import orjson
import polars as pl

from sae_atlas import metrics as registry
from sae_atlas.query import agreement, anatomy, profiles
from sae_atlas.query.comparability import data_checks
from sae_atlas.query.headline import common_latents, headline, short_name
from sae_atlas.query.resampling import SMALL_SAMPLE, Resamples, finite_or_none, mean_intervals, wilcoxon
from sae_atlas.query.scores import RUN_SCORES

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DISAGREEMENTS = 20
# run_config fields that differ between compared runs by design
EXPECTED_TO_DIFFER = frozenset({"explainer_model"})


# -- the statistics ---------------------------------------------------------------------------------


def rank_correlations(first: np.ndarray, second: np.ndarray) -> tuple[float | None, float | None]:
    """(Spearman rho, Kendall tau-b), None where undefined (fewer than 3 items, or a constant)."""
    from scipy import stats

    if len(first) < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return None, None
    return float(stats.spearmanr(first, second).statistic), float(stats.kendalltau(first, second).statistic)


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
        low, high, methods = mean_intervals(values, resamples.blocks(mine.height), confidence)
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
                    "ci_low": finite_or_none(low[column_index]),
                    "ci_high": finite_or_none(high[column_index]),
                    "interval": methods[column_index],
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
        low, high, methods = mean_intervals(differences, resamples.blocks(both.height), confidence)
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
                    "ci_low": finite_or_none(low[column_index]),
                    "ci_high": finite_or_none(high[column_index]),
                    "interval": methods[column_index],
                    "wilcoxon_p": wilcoxon(difference),
                    "wins": int((difference > 0).sum()),
                    "ties": int((difference == 0).sum()),
                    "losses": int((difference < 0).sum()),
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


def select_latents(
    scores: pl.DataFrame,
    metrics: list[str],
    explainers: list[str],
    scorers: list[str],
    *,
    common: bool,
    excluded: np.ndarray,
) -> tuple[pl.DataFrame, dict[str, np.ndarray], list[dict]]:
    """The latents each metric is compared on: those every explainer × scorer run scored
    (``common``) or every latent with a value, less ``excluded``. Returns ``scores`` with the values
    of other latents nulled, the latents per metric, and their counts."""
    used, counts = {}, []
    for metric in metrics:
        with_values = np.sort(scores.drop_nulls(metric)["feature_id"].unique().to_numpy())
        shared = common_latents(scores, metric, explainers, scorers)
        chosen = np.setdiff1d(shared if common else with_values, excluded)
        used[metric] = chosen
        counts.append({"metric": metric, "with_values": len(with_values), "common": len(shared), "used": len(chosen)})
    masked = scores.with_columns(
        pl.when(pl.col("feature_id").is_in(used[metric].tolist())).then(pl.col(metric)).alias(metric)
        for metric in metrics
    )
    return masked, used, counts


def _small_samples(result: dict) -> list[dict]:
    """Every interval of the result that is Student-t because it rests on few latents."""
    found = []
    for section, label in (("summary", "{explainer} · {scorer}"), ("paired", "{first} − {second} · {scorer}")):
        for row in result[section]:
            if row["interval"] == "t":
                names = {key: short_name(value) for key, value in row.items() if isinstance(value, str)}
                found.append({"where": f"{row['metric']}: {label.format(**names)}", "latents": row["latents"]})
    for row in result["headline"]["pairs"]:
        if row["interval"] == "t":
            where = f"{row['metric']}: {short_name(row['first'])} − {short_name(row['second'])}, headline"
            found.append({"where": where, "latents": row["latents"]})
    return found


def _firing_weights(scores_table: pl.DataFrame) -> pl.DataFrame:
    return (
        scores_table.group_by("feature_id")
        .agg(weight=pl.col("firing_frequency").drop_nulls().first())
        .drop_nulls("weight")
    )


def _explanation_similarity(features: pl.DataFrame) -> pl.DataFrame:
    return (
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
    latents: str = "common",
    exclude_identical: bool = False,
    run_scores: pl.DataFrame | None = None,
    quantiles: pl.DataFrame | None = None,
    evidence: tuple[pl.DataFrame, pl.DataFrame] | None = None,
) -> dict:
    """The comparison of one output directory (:meth:`Atlas.compare`'s result): ``features`` is
    features.parquet (explanations, agreement), ``scores_table`` one row per (feature, explainer,
    scorer) with a column per score metric, ``settings`` each run's score-relevant settings,
    ``run_scores`` one row per (run, method, latent) for the checks of :mod:`comparability`,
    ``quantiles`` the scores per activation quantile, ``evidence`` the error rates and example sets
    of the scored records (:func:`anatomy.read_error_rates`). ``latents``: "common" compares every metric
    on the latents every run scored, "all" on every latent with a value; ``exclude_identical``
    leaves out the latents where two explainers wrote the same text."""
    runs = pl.DataFrame(schema=RUN_SCORES) if run_scores is None else run_scores
    rates, example_sets = evidence if evidence is not None else (None, None)
    checks, identical = data_checks(features, runs, explainers, example_sets)
    with_identical = np.unique(np.concatenate([np.zeros(0, np.int64), *identical.values()]))
    excluded = with_identical if exclude_identical else np.zeros(0, np.int64)
    draws = Resamples(resamples, seed)
    firing = _firing_weights(scores_table)
    scores, used, counts = select_latents(
        scores_table.select("feature_id", "explainer", "scorer", *chosen),
        chosen,
        explainers,
        scorers,
        common=latents == "common",
        excluded=excluded,
    )
    wide = wide_scores(scores, chosen)
    statistics = {"resamples": draws, "confidence": confidence}
    texts = features.select("feature_id", explainer="llm_explainer", explanation_text="explanation_text")
    result = {
        "settings": {
            "resamples": resamples,
            "seed": seed,
            "confidence": confidence,
            "metrics": chosen,
            "latents": latents,
            "exclude_identical": exclude_identical,
            "small_sample": SMALL_SAMPLE,
            "weights": "firing frequency" if firing.height else None,
        },
        "selection": {"latents": latents, "identical_latents": len(with_identical), "metrics": counts},
        "explainers": explainers,
        "scorers": scorers,
        "metrics": {name: registry.BY_NAME[name].description for name in chosen},
        "headline": headline(scores_table, explainers, scorers, excluded=excluded, identical=identical, **statistics),
        "summary": summary(wide, chosen, explainers, scorers, weights=firing if firing.height else None, **statistics),
        "paired": paired_differences(wide, chosen, explainers, scorers, **statistics),
        "scorer_agreement": agreement.scorer_pairs(scores, chosen, explainers, scorers, **statistics),
        "scorer_reliability": agreement.reliability(scores, chosen, explainers, scorers, **statistics),
        "explainer_agreement": explainer_agreement(
            _explanation_similarity(features), scores, texts, chosen, explainers
        ),
        "comparability": comparability(*settings),
    }
    result["selection"]["excluded_identical"] = len(excluded)
    result["ranking_agreement"] = agreement.ranking_agreement(
        scores_table, result["headline"]["rankings"], explainers, scorers, excluded=excluded
    )
    result["profiles"] = _profiles(scores, quantiles, firing, used, **statistics)
    result["comparability"]["warnings"] += checks
    result["comparability"]["comparable"] = not result["comparability"]["warnings"]
    all_latents = wide_scores(scores_table.select("feature_id", "explainer", "scorer", *chosen), chosen)
    result["identical_text_control"] = identical_text_control(all_latents, identical, chosen, scorers, **statistics)
    result["error_anatomy"] = _error_anatomy(rates, settings[1], used, **statistics)
    result["small_samples"] = _small_samples(result)
    return result


def _error_anatomy(rates, runs: list[dict], used: dict[str, np.ndarray], *, resamples, confidence) -> list[dict]:
    """Where fuzz and detection errors fall, on each method's compared latents (none without records)."""
    if rates is None:
        return []
    chosen = {method: used[method] for method in ("fuzz", "detection") if method in used}
    return anatomy.error_anatomy(rates, runs, chosen, resamples=resamples, confidence=confidence)


def _profiles(scores, quantiles, firing, used: dict[str, np.ndarray], *, resamples, confidence) -> dict:
    """Scores by activation quantile (the methods that have them) and by firing frequency (the
    headline metrics compared), on each metric's compared latents."""
    statistics = {"resamples": resamples, "confidence": confidence}
    methods = set(quantiles["method"].unique().to_list()) if quantiles is not None and quantiles.height else set()
    headline_names = {metric.name for metric in registry.HEADLINE_SCORE_METRICS}
    return {
        "by_quantile": profiles.by_quantile(
            quantiles, {metric: ids for metric, ids in used.items() if metric in methods}, **statistics
        )
        if methods
        else [],
        "by_firing": profiles.by_firing(
            scores, firing, {metric: ids for metric, ids in used.items() if metric in headline_names}, **statistics
        )
        if firing.height
        else [],
    }


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
