"""The comparison statistics: values worked out by hand on small fixtures, and calibration on synth
corpora with a planted difference between explainers (or none)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline
from sae_atlas.query import agreement, comparison, resampling
from sae_atlas.query.scores import score_columns
from sae_atlas.synth import SynthOptions, synthesize


def test_bootstrap_interval_is_the_percentiles_of_resampled_means():
    values = np.array([[0.2, 1.0], [0.4, np.nan], [0.9, 3.0], [0.5, 5.0], [0.1, 7.0]])
    counts = resampling.resample_counts(5, 400, np.random.default_rng(11))
    low, high = resampling.bootstrap_means(values, counts, 0.9)
    # the same resamples, drawn and averaged the slow way
    draws = np.random.default_rng(11).integers(0, 5, size=(400, 5))
    first = values[draws, 0].mean(axis=1)
    second = np.array([np.nanmean(values[row, 1]) for row in draws])
    second = second[np.isfinite(second)]
    assert (low[0], high[0]) == pytest.approx(tuple(np.percentile(first, [5, 95])), abs=1e-6)
    assert (low[1], high[1]) == pytest.approx(tuple(np.percentile(second, [5, 95])), abs=1e-6)
    # a constant has a zero-width interval
    constant = resampling.bootstrap_means(
        np.ones((4, 1)), resampling.resample_counts(4, 50, np.random.default_rng(0)), 0.95
    )
    assert (constant[0][0], constant[1][0]) == (1.0, 1.0)


def test_holm_by_hand():
    # sorted: 0.005 ×4 = 0.02, 0.01 ×3 = 0.03, 0.03 ×2 = 0.06, 0.04 ×1 = 0.04 → monotone 0.06
    adjusted = resampling.holm([0.01, 0.04, 0.03, 0.005, None])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and adjusted[4] is None
    assert resampling.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_rank_correlations_with_ties_by_hand():
    # pairs: 3 concordant, 1 discordant, 1 tied in the first only, 1 in the second only:
    # tau-b = (3 - 1) / sqrt((6 - 1)(6 - 1)) = 0.4; mid-ranks [1, 2.5, 2.5, 4] and [1, 4, 2.5, 2.5]: rho = 0.5
    spearman, kendall = comparison.rank_correlations(np.array([1, 2, 2, 3.0]), np.array([1, 3, 2, 2.0]))
    assert kendall == pytest.approx(0.4) and spearman == pytest.approx(0.5)
    assert comparison.rank_correlations(np.array([1, 1, 1.0]), np.array([1, 2, 3.0])) == (None, None)


def test_top_decile_overlap_and_wilcoxon_by_hand():
    first = np.arange(20.0)
    second = first.copy()
    second[18], second[0] = second[0], second[18]  # 19 stays on top, 18 drops out: 1 of 2
    assert agreement.top_decile_overlap(first, second) == 0.5
    # five positive differences: exact two-sided p = 2 / 2**5
    assert resampling.wilcoxon(np.array([1.0, 2, 3, 4, 5])) == pytest.approx(0.0625)
    assert resampling.wilcoxon(np.zeros(4)) is None


def scores_frame(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["feature_id", "explainer", "scorer", "fuzz"], orient="row").with_columns(
        pl.col("feature_id").cast(pl.Int64)
    )


def test_paired_differences_by_hand():
    scores = scores_frame(
        [
            (1, "A", "S", 0.9),
            (2, "A", "S", 0.8),
            (3, "A", "S", 0.5),
            (4, "A", "S", 0.7),
            (1, "B", "S", 0.6),
            (2, "B", "S", 0.8),
            (3, "B", "S", 0.7),
            (5, "B", "S", 0.1),  # only B explained latent 5: not paired
        ]
    )
    [row] = comparison.paired_differences(
        comparison.wide_scores(scores, ["fuzz"]),
        ["fuzz"],
        ["A", "B"],
        ["S"],
        resamples=resampling.Resamples(200, 0),
        confidence=0.95,
    )
    # latents 1-3: differences 0.3, 0.0, -0.2
    assert row["latents"] == 3 and row["mean_difference"] == pytest.approx(0.1 / 3)
    assert (row["wins"], row["ties"], row["losses"]) == (1, 1, 1)
    assert row["ci_low"] <= row["mean_difference"] <= row["ci_high"]
    assert row["interval"] == "t"  # three latents: a Student-t interval, not the bootstrap
    # mean 0.0333, s = sqrt(((0.2667)² + (0.0333)² + (0.2333)²) / 2) = 0.2517, t(0.975, 2) = 4.3027
    half = 4.302652729911275 * 0.25166114784235827 / np.sqrt(3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.1 / 3 - half, 0.1 / 3 + half))


def test_comparability_warns_about_settings_that_differ():
    settings = {
        "a": {"sampler_cfg.n_examples_test": 50, "explainer_model": "E1", "fuzz_type": None},
        "b": {"sampler_cfg.n_examples_test": 40, "explainer_model": "E2", "fuzz_type": None},
    }
    runs = [
        {"data_source": "a", "explainer": "E1", "scorer": "S"},
        {"data_source": "b", "explainer": "E2", "scorer": "S"},
    ]
    result = comparison.comparability(settings, runs)
    assert [warning["setting"] for warning in result["warnings"]] == ["sampler_cfg.n_examples_test"]
    assert "a: 50, b: 40" in result["warnings"][0]["message"]
    assert result["not_recorded"] == ["fuzz_type"]  # no run says: noted, not a warning


# -- calibration: the statistics recover what synth planted -------------------------------------------


def paired_fuzz(tmp_path, seed: int, quality: tuple[float, float]) -> dict:
    options = SynthOptions(
        features=160, explained=120, explainers=2, scorers=1, prompts=60, ctx=32, d_model=16, seed=seed
    )
    options = SynthOptions(**{**options.__dict__, "explainer_quality": quality})
    corpus = synthesize(tmp_path / f"corpus-{seed}", options)
    config = load_config(corpus.config)
    Pipeline(config).run(only=["scores"])
    scores = score_columns(pl.read_parquet(config.output_dir / "stages/scores.parquet"))
    explainers = list(dict.fromkeys(scores["explainer"].to_list()))
    [row] = comparison.paired_differences(
        comparison.wide_scores(scores, ["fuzz"]),
        ["fuzz"],
        explainers,
        scores["scorer"].unique().to_list(),
        resamples=resampling.Resamples(1000, 0),
        confidence=0.95,
    )
    return row


def test_a_planted_difference_is_found_with_the_right_sign(tmp_path):
    row = paired_fuzz(tmp_path, 1, (0.9, 0.7))
    assert row["ci_low"] > 0 and row["mean_difference"] > 0  # the first explainer hits more often
    assert row["wilcoxon_p"] < 0.05


@pytest.mark.slow
def test_equal_explainers_are_not_told_apart(tmp_path):
    """With the same hit rate, the 95 % paired interval covers 0 in at least 17 of 20 corpora."""
    covered = 0
    for seed in range(20):
        row = paired_fuzz(tmp_path, 100 + seed, (0.7, 0.7))
        covered += row["ci_low"] <= 0 <= row["ci_high"]
    assert covered >= 17, covered


def test_names_are_data_never_separators():
    """A scorer called ``qwen|fuzz`` beside one called ``qwen``: two scorers, each with its own
    means and differences, and no metric that is not a metric."""
    scores = pl.DataFrame(
        {
            "feature_id": [0, 0, 1, 1] * 2,
            "explainer": ["a", "b"] * 4,
            "scorer": ["qwen|fuzz"] * 4 + ["qwen"] * 4,
            "fuzz": [0.9, 0.5, 0.8, 0.4, 0.1, 0.2, 0.3, 0.4],
        }
    )
    wide = comparison.wide_scores(scores, ["fuzz"])
    draws = resampling.Resamples(200, 0)
    rows = comparison.summary(wide, ["fuzz"], ["a", "b"], ["qwen|fuzz", "qwen"], resamples=draws, confidence=0.9)
    means = {(row["explainer"], row["scorer"], row["metric"]): row["mean"] for row in rows}
    assert means == pytest.approx(
        {
            ("a", "qwen|fuzz", "fuzz"): 0.85,
            ("b", "qwen|fuzz", "fuzz"): 0.45,
            ("a", "qwen", "fuzz"): 0.2,
            ("b", "qwen", "fuzz"): 0.3,
        }
    )
    paired = comparison.paired_differences(
        wide, ["fuzz"], ["a", "b"], ["qwen|fuzz", "qwen"], resamples=draws, confidence=0.9
    )
    assert {(row["scorer"], row["metric"]): row["mean_difference"] for row in paired} == pytest.approx(
        {("qwen|fuzz", "fuzz"): 0.4, ("qwen", "fuzz"): -0.1}
    )


def test_resampling_memory_is_bounded_by_blocks_not_latents_times_resamples(monkeypatch):
    """2,000 resamples of 16,384 latents: 131 MB of float32 counts and 262 MB of int64 draws at
    once before; blocks of BLOCK_CELLS counts now. The counts of a size are the same whatever else
    is computed, and the same as one array of them."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n = 16_384
    values = rng.random((n, 3))
    kept = resampling.bootstrap_means(values, resampling.Resamples(2000, 0).blocks(n), 0.95)
    monkeypatch.setattr(resampling, "KEPT_CELLS", 0)  # beyond the budget of kept counts
    draws = resampling.Resamples(2000, 0)
    tracemalloc.start()
    low, high = resampling.bootstrap_means(values, draws.blocks(n), 0.95)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * resampling.BLOCK_CELLS * 8, peak  # a block: its int64 draws and counts; was ~900 MB
    assert np.all(low < values.mean(axis=0)) and np.all(values.mean(axis=0) < high)
    np.testing.assert_array_equal(np.array(kept), np.array((low, high)))  # keeping counts changes nothing
    small = resampling.Resamples(300, 1)
    whole = resampling.bootstrap_means(values[:50], small.counts(50), 0.9)
    blocked = resampling.bootstrap_means(values[:50], small.blocks(50), 0.9)
    np.testing.assert_array_equal(whole, blocked)
