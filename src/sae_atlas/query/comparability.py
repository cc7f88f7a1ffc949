"""Whether the compared runs can be compared, read from the data rather than from their configs.

A run_config can agree on every setting while the runs still differ where it matters. Each check
here looks at what the output holds and, when it fires, gives one warning naming the runs, the
number of latents concerned and the first of their ids:

- **identical texts**: two explainers wrote the same explanation, word for word, for a latent; on
  those latents the scorer sees the same text twice, so the paired difference there measures the
  scorers' noise, not the explainers (it is given as a control: it should be near 0);
- **example counts**: two runs scored the same method of a latent on different numbers of examples;
- **same examples**: two runs scored a method of a latent on different examples (from the scored
  records);
- **coverage**: a run scored a method on fewer latents than another, and the latents it lacks are
  not like the rest (the other run's scores there, against its scores on the common latents:
  Mann-Whitney U, two-sided);
- **self-scoring**: the scorer is also the explainer (the same model name);
- **unparsed explanations**: explanations that could not be parsed (delphi's sentinels), which
  are scored and averaged like the others.

Each warning has a severity: *serious* when it can change the answer (identical texts or different
example counts on at least 5 % of the latents, a latent set that is not a random subset), *warning*
when the reader must know it (fewer identical texts, self-scoring, unparsed explanations), *notice*
when it is benign (latents missing at random).
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
from scipy.stats import mannwhitneyu

from sae_atlas.query.headline import short_name

SHOWN_IDS = 10
# Below this p-value the latents a run lacks are reported as not a random subset.
COVERAGE_P = 0.01
# From this share of the latents both runs have, identical texts or different example counts are
# serious (they can move the answer); below it they are warnings.
SERIOUS_SHARE = 0.05


def _warning(check: str, message: str, latents: int, ids, severity: str = "warning") -> dict:
    return {
        "setting": check,
        "message": message,
        "severity": severity,
        "latents": int(latents),
        "feature_ids": [int(value) for value in list(ids)[:SHOWN_IDS]],
    }


def identical_texts(features: pl.DataFrame, explainers: list[str]) -> tuple[list[dict], dict[tuple, np.ndarray]]:
    """A warning per pair of explainers with word-for-word identical explanations of a latent, and
    those latents' ids per pair (for the zero-difference control)."""
    texts = features.filter(pl.col("explanation_ok")).select(
        "feature_id", explainer=pl.col("llm_explainer").cast(pl.String), text=pl.col("explanation_text")
    )
    warnings, identical = [], {}
    for first, second in itertools.combinations(explainers, 2):
        both = texts.filter(pl.col("explainer") == first).join(
            texts.filter(pl.col("explainer") == second), on="feature_id", suffix="_second"
        )
        same = both.filter(pl.col("text") == pl.col("text_second"))["feature_id"].sort().to_numpy()
        identical[first, second] = same
        if len(same):
            warnings.append(
                _warning(
                    "identical texts",
                    f"{short_name(first)} and {short_name(second)} wrote the same explanation, word for word, for "
                    f"{len(same):,} of the {both.height:,} latents both explained ({len(same) / both.height:.0%}): "
                    "there the explainers cannot differ, and the paired difference measures the scorers' noise",
                    len(same),
                    same,
                    "serious" if len(same) >= SERIOUS_SHARE * both.height else "warning",
                )
            )
    return warnings, identical


def _run_pairs(runs: pl.DataFrame):
    """Every two runs with the same scorer, and the method both scored."""
    names = runs.select("data_source", "scorer", "method").unique().sort("data_source", "method")
    for (scorer, method), group in names.group_by(["scorer", "method"], maintain_order=True):
        for first, second in itertools.combinations(group["data_source"].to_list(), 2):
            yield scorer, method, first, second


def example_counts(runs: pl.DataFrame) -> tuple[list[dict], set[int]]:
    """A warning per two runs (same scorer and method) that scored latents on different numbers of
    examples, and every such latent."""
    warnings, latents = [], set()
    for _, method, first, second in _run_pairs(runs):
        left = runs.filter((pl.col("data_source") == first) & (pl.col("method") == method))
        right = runs.filter((pl.col("data_source") == second) & (pl.col("method") == method))
        both = left.join(right, on="feature_id", suffix="_second")
        # an empty score file (0 examples) is a latent not scored, which coverage counts, not a count
        differing = both.filter(
            (pl.col("n_examples") != pl.col("n_examples_second"))
            & (pl.col("n_examples") > 0)
            & (pl.col("n_examples_second") > 0)
        )
        latents.update(differing["feature_id"].to_list())
        if differing.height:
            warnings.append(
                _warning(
                    "example counts",
                    f"{first} and {second} scored {method} on different numbers of examples for "
                    f"{differing.height:,} of {both.height:,} latents (mean {differing['n_examples'].mean():.1f} "
                    f"against {differing['n_examples_second'].mean():.1f} there)",
                    differing.height,
                    differing["feature_id"].sort(),
                    "serious" if differing.height >= SERIOUS_SHARE * both.height else "warning",
                )
            )
    return warnings, latents


def same_examples(runs: pl.DataFrame, sets: pl.DataFrame) -> list[dict]:
    """A warning per two runs (same scorer and method) that scored a latent on different examples
    (``sets``: data_source, method, feature_id, examples, fingerprint of the example ids, from the
    scored records); latents scored on different numbers of examples count too."""
    warnings = []
    if sets.is_empty():
        return warnings
    for _, method, first, second in _run_pairs(runs):
        left = sets.filter((pl.col("data_source") == first) & (pl.col("method") == method))
        right = sets.filter((pl.col("data_source") == second) & (pl.col("method") == method))
        both = left.join(right, on="feature_id", suffix="_second")
        differing = both.filter(pl.col("fingerprint") != pl.col("fingerprint_second"))
        if differing.height:
            warnings.append(
                _warning(
                    "same examples",
                    f"{first} and {second} scored {method} on different examples for {differing.height:,} of "
                    f"{both.height:,} latents: their scores there are not on the same test",
                    differing.height,
                    differing["feature_id"].sort(),
                    "serious" if differing.height >= SERIOUS_SHARE * both.height else "warning",
                )
            )
    return warnings


def coverage(runs: pl.DataFrame) -> list[dict]:
    """A warning per run that scored a method on fewer latents than another run of the same
    scorer, saying whether the latents it lacks differ from the common ones."""
    warnings = []
    for _, method, first, second in _run_pairs(runs):
        for fuller, thinner in ((first, second), (second, first)):
            full = runs.filter((pl.col("data_source") == fuller) & (pl.col("method") == method))
            thin = runs.filter((pl.col("data_source") == thinner) & (pl.col("method") == method))
            missing = full.join(thin, on="feature_id", how="anti")
            if missing.is_empty() or thin.is_empty():
                continue
            common = full.join(thin.select("feature_id"), on="feature_id", how="semi")
            a, b = (frame["score"].drop_nulls().to_numpy() for frame in (missing, common))
            p_value = float(mannwhitneyu(a, b).pvalue) if len(a) and len(b) else None
            judged = (
                "not a random subset"
                if p_value is not None and p_value < COVERAGE_P
                else "no clear difference from the rest"
            )
            mean_missing = f"{a.mean():.3f}" if len(a) else "–"
            mean_common = f"{b.mean():.3f}" if len(b) else "–"
            p_text = "–" if p_value is None else f"{p_value:.2g}"
            warnings.append(
                _warning(
                    "coverage",
                    f"{thinner} scored {method} on {thin.height:,} of the {full.height:,} latents {fuller} scored; "
                    f"on the {missing.height:,} it lacks, {fuller}'s mean {method} is {mean_missing} against "
                    f"{mean_common} on the common ones (Mann-Whitney p {p_text}): {judged}",
                    missing.height,
                    missing["feature_id"].sort(),
                    "serious" if judged == "not a random subset" else "notice",
                )
            )
    return warnings


def self_scoring(runs: pl.DataFrame) -> list[dict]:
    """A warning per run whose scorer is also its explainer."""
    pairs = runs.select("data_source", "explainer", "scorer").unique().sort("data_source")
    own = pairs.filter(pl.col("explainer").str.to_lowercase() == pl.col("scorer").str.to_lowercase())
    return [
        _warning(
            "self-scoring",
            f"{source}: {short_name(scorer)} scores its own explanations (explainer and scorer are the same model)",
            0,
            [],
        )
        for source, _, scorer in own.rows()
    ]


def unparsed(features: pl.DataFrame, explainers: list[str]) -> list[dict]:
    """A note per explainer with explanations that could not be parsed."""
    notes = []
    for explainer in explainers:
        rows = features.filter((pl.col("llm_explainer").cast(pl.String) == explainer) & ~pl.col("explanation_ok"))
        if rows.height:
            notes.append(
                _warning(
                    "unparsed explanations",
                    f"{short_name(explainer)}: {rows.height:,} explanations could not be parsed; they are scored and "
                    "averaged like the others",
                    rows.height,
                    rows["feature_id"].sort(),
                )
            )
    return notes


def data_checks(
    features: pl.DataFrame, runs: pl.DataFrame, explainers: list[str], example_sets: pl.DataFrame | None = None
) -> tuple[list[dict], dict]:
    """Every check of the module docstring: (warnings, identical-text latents per explainer pair).

    ``features``: features.parquet's feature_id, llm_explainer, explanation_text, explanation_ok;
    ``runs``: one row per (run, method, latent) with data_source, explainer, scorer, method,
    feature_id, n_examples, score; ``example_sets``: the examples each run scored per latent
    (:func:`sae_atlas.query.anatomy.read_error_rates`), where the scored records are kept."""
    identical_warnings, identical = identical_texts(features, explainers)
    count_warnings, fewer = example_counts(runs)
    for warning, ids in zip(identical_warnings, [ids for ids in identical.values() if len(ids)], strict=True):
        shared = len(fewer.intersection(ids.tolist()))
        if shared:  # two symptoms of one cause, most likely: say so
            warning["message"] += f"; {shared:,} of these latents were scored on different numbers of examples"
    warnings = [
        *identical_warnings,
        *count_warnings,
        *(same_examples(runs, example_sets) if example_sets is not None else []),
        *coverage(runs),
        *self_scoring(runs),
        *unparsed(features, explainers),
    ]
    return warnings, identical
