"""The comparison's headline and its agreement statistics: each checked against a hand computation
on a small fixture (Krippendorff's published example, explicit resamples, a tie worked out by hand),
and against what synth planted (explainer qualities, identical texts)."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
from scipy import stats

from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline
from sae_atlas.query import agreement, comparison, headline, resampling
from sae_atlas.query.comparability import data_checks
from sae_atlas.query.scores import RUN_SCORES, score_columns
from sae_atlas.synth import SynthOptions, synthesize

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the example of section C:
# 4 observers (rows) × 12 units (columns), NaN where an observer gave no value.
N = np.nan
KRIPPENDORFF_EXAMPLE = np.array(
    [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
        [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
    ]
).T  # units × coders


def alpha_by_pairs(values: np.ndarray) -> float:
    """Krippendorff's interval α written out pair by pair, as the paper defines it."""
    units = [row[~np.isnan(row)] for row in values]
    units = [unit for unit in units if len(unit) >= 2]
    pooled = np.concatenate(units)
    observed = sum(
        (a - b) ** 2 / (len(unit) - 1)
        for unit in units
        for i, a in enumerate(unit)
        for j, b in enumerate(unit)
        if i != j
    )
    expected = sum((a - b) ** 2 for i, a in enumerate(pooled) for j, b in enumerate(pooled) if i != j)
    return 1 - (len(pooled) - 1) * observed / expected


def test_krippendorff_alpha_matches_the_published_example():
    assert agreement.krippendorff_alpha(KRIPPENDORFF_EXAMPLE) == pytest.approx(0.849, abs=5e-4)
    assert agreement.krippendorff_alpha(KRIPPENDORFF_EXAMPLE) == pytest.approx(alpha_by_pairs(KRIPPENDORFF_EXAMPLE))
    # weights are repeats: α with unit weights (2, 0, 1, …) is α of the data written out that way
    weights = np.array([2, 0, 1, 1, 3, 1, 0, 1, 2, 1, 1, 1], dtype=np.float64)
    written_out = np.repeat(KRIPPENDORFF_EXAMPLE, weights.astype(int), axis=0)
    assert agreement.krippendorff_alpha(KRIPPENDORFF_EXAMPLE, weights) == pytest.approx(alpha_by_pairs(written_out))
    # coders that agree exactly: α = 1
    assert agreement.krippendorff_alpha(np.array([[1.0, 1], [2, 2], [3, 3]])) == pytest.approx(1.0)


def test_bootstrap_spearman_is_spearman_of_each_resample_written_out():
    rng = np.random.default_rng(3)
    first = rng.integers(0, 6, 40).astype(float)  # many ties
    second = first + rng.integers(0, 3, 40)
    draws = resampling.Resamples(300, 5)
    low, high = agreement.bootstrap_spearman(first, second, draws, 0.9)
    values = []
    for counts in draws.counts(40):
        index = np.repeat(np.arange(40), counts.astype(int))
        values.append(stats.spearmanr(first[index], second[index]).statistic)
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [5, 95])), abs=1e-9)


def test_top_decile_ties_are_averaged_whatever_the_row_order():
    # 10 items, top decile = 1 item. By the first score items 0 and 1 tie on top (½ each); by the
    # second, item 0 alone is on top: expected overlap ½, where breaking ties by row order gave 1 or 0.
    first = np.array([5.0, 5, 1, 1, 1, 1, 1, 1, 1, 1])
    second = np.array([9.0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    second[0] = 10
    assert agreement.top_decile_overlap(first, second) == pytest.approx(0.5)
    order = np.array([1, 0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert agreement.top_decile_overlap(first[order], second[order]) == pytest.approx(0.5)
    assert agreement.top_decile_chance(10) == pytest.approx(0.1)
    assert agreement.top_decile_chance(824) == pytest.approx(83 / 824)


def long_scores(cube: np.ndarray, explainers: list[str], scorers: list[str], metric: str = "fuzz") -> pl.DataFrame:
    """[latent, explainer, scorer] values as one row per feature × explainer × scorer."""
    rows = [
        (latent, explainer, scorer, float(cube[latent, e, s]))
        for latent, (e, explainer), (s, scorer) in itertools.product(
            range(cube.shape[0]), enumerate(explainers), enumerate(scorers)
        )
        if not np.isnan(cube[latent, e, s])
    ]
    return pl.DataFrame(rows, schema=["feature_id", "explainer", "scorer", metric], orient="row")


def test_the_headline_interval_resamples_latents_with_all_their_scorers():
    """Clustered bootstrap by hand: the scorer-averaged difference of each latent, resampled with
    the same counts; and the interaction test is Wilcoxon on the two scorers' differences."""
    rng = np.random.default_rng(0)
    n = 150
    cube = rng.random((n, 2, 2))
    cube[:, 0, :] += 0.1  # A is ahead
    cube[:, 0, 1] += 0.05  # more so by the second scorer
    scores = long_scores(cube, ["A", "B"], ["S", "T"])
    draws = resampling.Resamples(500, 2)
    result = headline.headline(
        scores, ["A", "B"], ["S", "T"], excluded=np.zeros(0, np.int64), identical={}, resamples=draws, confidence=0.9
    )
    [pair] = result["pairs"]
    d = (cube[:, 0, :] - cube[:, 1, :]).mean(axis=1)
    means = draws.counts(n) @ d / n
    assert pair["first"] == "A" and pair["mean_difference"] == pytest.approx(d.mean())
    assert (pair["ci_low"], pair["ci_high"]) == pytest.approx(tuple(np.percentile(means, [5, 95])), abs=1e-6)
    assert pair["interval"] == "bootstrap" and pair["scorers_agreeing"] == 2
    per_scorer = cube[:, 0, :] - cube[:, 1, :]
    assert pair["interaction_p"] == pytest.approx(stats.wilcoxon(per_scorer[:, 0] - per_scorer[:, 1]).pvalue)
    assert pair["holm_p"] == pytest.approx(pair["wilcoxon_p"])  # one metric × one pair: a family of one
    [ranking] = result["rankings"]
    assert [item["explainer"] for item in ranking["explainers"]] == ["A", "B"]
    assert result["sentences"][0].startswith("A is ahead of B on fuzz by ")
    assert "one scorer" not in result["sentences"][0] and "2 of 2 scorers agree" in result["sentences"][0]


def test_small_samples_get_a_student_t_interval_finite_at_any_confidence_and_none_for_one_latent():
    """Below SMALL_SAMPLE latents: mean ± t(n−1) · s/√n by hand. A confidence within 1e-16 of 1
    (schemathesis sent 0.9999999999999999) must give finite bounds, not ±inf: (1 + c)/2 rounds to 1.0
    there. One latent has no interval: None in the result and in its sentence, never NaN."""
    rng = np.random.default_rng(3)
    cube = rng.random((12, 2, 1))
    cube[:, 0, 0] += 0.2
    args = dict(excluded=np.zeros(0, np.int64), identical={}, resamples=resampling.Resamples(200, 0))
    scores = long_scores(cube, ["A", "B"], ["S"])
    [pair] = headline.headline(scores, ["A", "B"], ["S"], confidence=0.9, **args)["pairs"]
    d = cube[:, 0, 0] - cube[:, 1, 0]
    half = stats.t.ppf(0.95, 11) * d.std(ddof=1) / np.sqrt(12)
    assert pair["interval"] == "t"
    assert (pair["ci_low"], pair["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    extreme = headline.headline(scores, ["A", "B"], ["S"], confidence=0.9999999999999999, **args)
    [pair] = extreme["pairs"]
    bounds = [pair["ci_low"], pair["ci_high"]] + [
        bound for item in extreme["rankings"][0]["explainers"] for bound in (item["ci_low"], item["ci_high"])
    ]
    assert all(np.isfinite(bounds)) and pair["ci_low"] < d.mean() < pair["ci_high"]
    single = headline.headline(long_scores(cube[:1], ["A", "B"], ["S"]), ["A", "B"], ["S"], confidence=0.9, **args)
    [pair] = single["pairs"]
    assert pair["ci_low"] is None and pair["ci_high"] is None
    assert "[–, –]" in single["sentences"][0]


def test_the_headline_says_who_scores_itself_and_uses_only_latents_every_run_scored():
    rng = np.random.default_rng(1)
    cube = rng.random((30, 2, 1))
    cube[20:, 1, 0] = np.nan  # B's runs lack ten latents
    scores = long_scores(cube, ["org/A", "org/B"], ["org/A"])
    result = headline.headline(
        scores,
        ["org/A", "org/B"],
        ["org/A"],
        excluded=np.array([0, 1]),
        identical={},
        resamples=resampling.Resamples(200, 0),
        confidence=0.95,
    )
    [pair] = result["pairs"]
    assert pair["latents"] == 18  # 20 common latents, less the two excluded
    assert pair["interval"] == "t"  # below SMALL_SAMPLE
    assert "the only scorer is A itself" in result["sentences"][0]
    assert "with different texts" in result["sentences"][0]


def comparison_of(cube: np.ndarray, chosen: list[str], **options) -> dict:
    explainers, scorers = ["A", "B"], ["S", "T"]
    scores = long_scores(cube[..., 0], explainers, scorers, "fuzz").join(
        long_scores(cube[..., 1], explainers, scorers, "detection"),
        on=["feature_id", "explainer", "scorer"],
        how="full",
        coalesce=True,
    )
    scores = scores.with_columns(firing_frequency=pl.lit(None, pl.Float64), simulation=pl.lit(None, pl.Float64))
    features = pl.DataFrame(
        {
            "feature_id": [latent for latent in range(cube.shape[0]) for _ in explainers],
            "llm_explainer": explainers * cube.shape[0],
            "explanation_text": [f"{e} {latent}" for latent in range(cube.shape[0]) for e in explainers],
            "explanation_ok": True,
            "semantic_similarity": None,
        },
        schema_overrides={
            "semantic_similarity": pl.List(pl.Struct({"explainer": pl.String, "cosine_similarity": pl.Float32}))
        },
    )
    return comparison.compare_output(
        features,
        scores,
        explainers,
        scorers,
        ({}, []),
        chosen,
        resamples=200,
        seed=0,
        confidence=0.95,
        run_scores=pl.DataFrame(schema=RUN_SCORES),
        **options,
    )


def test_the_holm_family_is_fixed_and_means_are_over_the_same_latents():
    rng = np.random.default_rng(4)
    cube = rng.random((120, 2, 2, 2))  # latent, explainer, scorer, metric (fuzz, detection)
    cube[:40, 1, :, 0] = np.nan  # B's fuzz lacks 40 latents
    cube[:, 0, :, 0] += 0.05
    one = comparison_of(cube, ["fuzz"])
    both = comparison_of(cube, ["fuzz", "detection"])
    assert [row["holm_p"] for row in one["headline"]["pairs"]] == [row["holm_p"] for row in both["headline"]["pairs"]]
    assert one["headline"]["family"] == "2 headline metrics × 1 pairs of explainers"
    common = {row["explainer"]: row["latents"] for row in one["summary"] if row["scorer"] == "S"}
    assert common == {"A": 80, "B": 80}  # like with like: the latents both explainers were scored on
    every = comparison_of(cube, ["fuzz"], latents="all")
    assert {row["explainer"]: row["latents"] for row in every["summary"] if row["scorer"] == "S"} == {"A": 120, "B": 80}
    assert one["selection"]["metrics"] == [{"metric": "fuzz", "with_values": 120, "common": 80, "used": 80}]
    [alpha] = [row for row in one["scorer_reliability"] if row["explainer"] == "A"]
    values = cube[40:, 0, :, 0]
    assert alpha["alpha"] == pytest.approx(alpha_by_pairs(values)) and alpha["latents"] == 80


# -- planted truth -------------------------------------------------------------------------------------


def planted_corpus(tmp_path, seed: int, embedder, explainers: int = 3, scorers: int = 2, **planted):
    options = SynthOptions(
        features=200,
        explained=160,
        explainers=explainers,
        scorers=scorers,
        prompts=60,
        ctx=32,
        d_model=16,
        seed=seed,
        **planted,
    )
    corpus = synthesize(tmp_path / f"corpus-{seed}", options)
    config = load_config(corpus.config)
    Pipeline(config, embedder=embedder).run(only=["scores", "explanation_embeddings"])
    scores = score_columns(pl.read_parquet(config.output_dir / "stages/scores.parquet"))
    explanations = pl.read_parquet(config.output_dir / "explanation_embeddings.parquet").with_columns(
        pl.col("llm_explainer").cast(pl.String)
    )
    explainers = list(dict.fromkeys(explanations["llm_explainer"].to_list()))
    return scores, explanations, explainers, sorted(scores["scorer"].unique().to_list())


def test_the_headline_ranks_explainers_as_planted(tmp_path, embedder):
    scores, _, explainers, scorers = planted_corpus(tmp_path, 11, embedder, explainer_quality=(0.5, 0.9, 0.7))
    result = headline.headline(
        scores,
        explainers,
        scorers,
        excluded=np.zeros(0, np.int64),
        identical={},
        resamples=resampling.Resamples(1000, 0),
        confidence=0.95,
    )
    for metric in ("fuzz", "detection"):
        [ranking] = [item for item in result["rankings"] if item["metric"] == metric]
        assert [item["explainer"] for item in ranking["explainers"]] == [explainers[1], explainers[2], explainers[0]]
    best = [row for row in result["pairs"] if row["metric"] == "fuzz" and row["second"] == explainers[0]]
    assert best[0]["first"] == explainers[1] and best[0]["significant"]


@pytest.mark.slow
def test_the_identical_text_control_covers_zero_as_often_as_it_should(tmp_path, embedder):
    """A quarter of the latents with the same text from every explainer: the control's 95 % interval
    covers 0 in at least 17 of 20 corpora, though the explainers differ elsewhere."""
    covered = 0
    for seed in range(20):
        scores, explanations, explainers, scorers = planted_corpus(
            tmp_path, 300 + seed, embedder, 2, 1, explainer_quality=(0.9, 0.6), identical_texts=0.25
        )
        _, identical = data_checks(explanations, pl.DataFrame(schema=RUN_SCORES), explainers)
        assert len(identical[explainers[0], explainers[1]]) > 20
        rows = comparison.identical_text_control(
            comparison.wide_scores(scores, ["fuzz"]),
            {pair: identical[pair] for pair in [(explainers[0], explainers[1])]},
            ["fuzz"],
            scorers,
            resamples=resampling.Resamples(1000, seed),
            confidence=0.95,
        )
        [row] = rows
        covered += row["ci_low"] <= 0 <= row["ci_high"]
    assert covered >= 17, covered
