"""Comparability read from the data: each check on a hand-built output where it must fire, and
where it must not."""

from __future__ import annotations

import polars as pl

from sae_atlas.query.comparability import data_checks
from sae_atlas.query.scores import RUN_SCORES

A, B, S = "org/explainer-a", "org/explainer-b", "org/scorer-s"


def features() -> pl.DataFrame:
    texts = {
        A: ["dates", "the word Paris", "months of the year", "code"],
        B: ["times", "the word Paris", "months of the year", "Explanation could not be parsed."],
    }
    return pl.DataFrame(
        [
            {"feature_id": latent, "llm_explainer": explainer, "explanation_text": text, "explanation_ok": ok}
            for explainer, rows in texts.items()
            for latent, text in enumerate(rows)
            for ok in [not text.startswith("Explanation could not")]
        ]
    )


def runs(*, thin_simulation: bool = True, fewer_examples: bool = True, self_scored: bool = False) -> pl.DataFrame:
    rows = []
    for source, explainer in (("a_e-s_s", A), ("b_e-s_s", B)):
        for latent in range(4):
            examples = 8 if (fewer_examples and source == "b_e-s_s" and latent == 2) else 10
            rows.append((source, explainer, S, "fuzz", latent, examples, 0.7))
        for latent in range(20):
            if thin_simulation and source == "b_e-s_s" and latent >= 10:
                continue  # b's simulation covers the first ten latents only
            rows.append((source, explainer, S, "simulation", latent, 11, 0.9 if latent >= 10 else 0.1 + latent / 100))
    if self_scored:
        rows.append(("s_e-s_s", S, S, "fuzz", 0, 10, 0.5))
    return pl.DataFrame(rows, schema=RUN_SCORES, orient="row")


def by_check(warnings: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for warning in warnings:
        grouped.setdefault(warning["setting"], []).append(warning)
    return grouped


def test_every_check_fires_where_the_data_says_so():
    warnings, identical = data_checks(features(), runs(), [A, B])
    checks = by_check(warnings)
    [same] = checks["identical texts"]
    assert same["latents"] == 2 and same["feature_ids"] == [1, 2]
    assert "for 2 of the 3 latents both explained (67%)" in same["message"]  # B's latent 3 is unparsed
    assert identical[A, B].tolist() == [1, 2]
    [counts] = checks["example counts"]
    assert counts["feature_ids"] == [2] and "mean 10.0 against 8.0" in counts["message"]
    [thin] = checks["coverage"]
    assert thin["latents"] == 10 and thin["feature_ids"] == list(range(10, 20))
    assert "b_e-s_s scored simulation on 10 of the 20 latents a_e-s_s scored" in thin["message"]
    assert "mean simulation is 0.900 against 0.145" in thin["message"] and "not a random subset" in thin["message"]
    assert "self-scoring" not in checks
    [notes] = checks["unparsed explanations"]
    assert notes["feature_ids"] == [3] and notes["message"].startswith("explainer-b: 1 explanations")


def test_runs_that_agree_raise_nothing_but_their_real_differences():
    agreeing = features().with_columns(
        explanation_text=pl.format("{} {}", pl.col("llm_explainer"), pl.col("feature_id")), explanation_ok=True
    )
    warnings, identical = data_checks(agreeing, runs(thin_simulation=False, fewer_examples=False), [A, B])
    assert warnings == [] and identical[A, B].tolist() == []


def test_a_random_gap_in_coverage_is_reported_without_blame():
    """Latents missing at random: reported (the sets differ) but not called a biased subset."""
    even = runs(thin_simulation=False).filter(
        ~((pl.col("data_source") == "b_e-s_s") & (pl.col("method") == "simulation") & (pl.col("feature_id") % 2 == 1))
    )
    [gap] = by_check(data_checks(features(), even, [A, B])[0])["coverage"]
    assert gap["latents"] == 10 and "no clear difference from the rest" in gap["message"]


def test_a_scorer_scoring_its_own_explanations_is_named():
    [own] = by_check(data_checks(features(), runs(self_scored=True), [A, B])[0])["self-scoring"]
    assert own["message"].startswith("s_e-s_s: scorer-s scores its own explanations")


def test_runs_that_scored_different_examples_are_told_apart():
    from sae_atlas.query.comparability import same_examples

    sets = pl.DataFrame(
        {
            "data_source": ["a_e-s_s"] * 3 + ["b_e-s_s"] * 3,
            "method": ["fuzz"] * 6,
            "feature_id": [0, 1, 2, 0, 1, 2],
            "examples": [10, 10, 10, 10, 8, 10],
            "fingerprint": [11, 12, 13, 11, 99, 13],
        },
        schema_overrides={"fingerprint": pl.UInt64},
    )
    [warning] = same_examples(runs(), sets)
    assert warning["setting"] == "same examples" and warning["feature_ids"] == [1]
    assert "different examples for 1 of 3 latents" in warning["message"]
    assert same_examples(runs(), sets.with_columns(fingerprint=pl.lit(5, pl.UInt64))) == []
