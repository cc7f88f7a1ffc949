"""The scorers against people: AUC and Spearman by hand, bootstrap intervals, and a synth corpus with
planted scorer reliability and explainer quality labelled from its ground truth."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr

from sae_atlas.query.against_people import against_people, auc, spearman


def labels(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={"feature_id": pl.Int64, "explainer": pl.String, "verdict": pl.String, "origin": pl.String},
        orient="row",
    ).with_columns(stale=pl.lit(False))


def test_auc_and_spearman_by_hand():
    # good 0.9, 0.8 against bad 0.7, 0.95: 2 of 4 pairs won
    assert auc(np.array([0.9, 0.8, 0.7, 0.95]), np.array([True, True, False, False])) == 0.5
    # a tie counts half: good 0.5 against bad 0.5 and 0.1
    assert auc(np.array([0.5, 0.5, 0.1]), np.array([True, False, False])) == 0.75
    assert auc(np.array([0.5, 0.6]), np.array([True, True])) is None
    scores, ordinal = np.array([0.9, 0.2, 0.5, 0.4, 0.7]), np.array([2, 0, 1, 0, 2])
    assert spearman(scores, ordinal) == pytest.approx(spearmanr(scores, ordinal).statistic)
    assert spearman(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 2])) is None


def test_a_small_study_by_hand():
    judged = labels(
        [
            (1, "e1", "good", "triage:random"),
            (2, "e1", "good", "triage:random"),
            (3, "e1", "bad", "triage:random"),
            (4, "e2", "bad", "cli"),
            (5, "e2", "partial", "cli"),
            (6, "e2", "unsure", "cli"),  # left out
        ]
    )
    scores = pl.DataFrame(
        {
            "feature_id": [1, 2, 3, 4, 5, 6] * 2,
            "explainer": ["e1", "e1", "e1", "e2", "e2", "e2"] * 2,
            "scorer": ["A"] * 6 + ["B"] * 6,
            "score": [0.9, 0.8, 0.7, 0.95, 0.5, 0.3, 0.9, 0.8, 0.1, 0.2, 0.5, 0.3],
        }
    )
    result = against_people(scores, judged, resamples=500, seed=1)
    assert result["n"] == 5 and result["unbiased"] is False and result["origins"] == {"cli": 2, "triage:random": 3}
    by_scorer = {row["scorer"]: row for row in result["scorers"]}
    assert by_scorer["A"]["auc"] == 0.5 and by_scorer["B"]["auc"] == 1.0  # partial left out of the AUC
    ordinal = np.array([2, 2, 0, 0, 1])
    expected = spearmanr([0.9, 0.8, 0.1, 0.2, 0.5], ordinal).statistic
    assert by_scorer["B"]["spearman"] == pytest.approx(expected)
    assert (by_scorer["B"]["n"], by_scorer["B"]["n_good"], by_scorer["B"]["n_bad"]) == (5, 2, 2)
    for row in result["scorers"]:
        assert row["auc_low"] <= row["auc"] <= row["auc_high"]
    shares = {row["explainer"]: row for row in result["explainers"]}
    assert shares["e1"]["share_good"] == pytest.approx(2 / 3) and shares["e2"]["share_good"] == 0.0
    assert shares["e1"]["low"] <= 2 / 3 <= shares["e1"]["high"]
    # the same seed, the same intervals
    assert against_people(scores, judged, resamples=500, seed=1) == result


@pytest.mark.slow
def test_planted_scorer_reliability_and_explainer_quality_are_recovered(tmp_path, embedder):
    from sae_atlas.config import load_config
    from sae_atlas.label_store import LabelIn
    from sae_atlas.pipeline import Pipeline
    from sae_atlas.query.atlas import Atlas
    from sae_atlas.query.labelling import Labelling
    from sae_atlas.serve import pages
    from sae_atlas.serve.parameters import LabelsQuery
    from sae_atlas.synth import SynthOptions, synthesize

    options = SynthOptions(
        features=512, explained=120, explainers=2, scorers=2, prompts=300, ctx=48, d_model=32, seed=11,
        explainer_quality=(0.85, 0.45), scorer_reliability=(0.95, 0.15),
    )  # fmt: skip
    corpus = synthesize(tmp_path / "corpus", options)
    config = load_config(corpus.config)
    Pipeline(config, embedder=embedder).run(only=["scores", "explanation_embeddings", "features"])
    atlas = Atlas(config.output_dir, embedder=embedder)
    truth = (
        pl.read_parquet(corpus.root / "ground_truth.parquet")
        .explode("explanations")
        .unnest("explanations")
        .filter(pl.col("explained") & ~pl.col("sentinel"))
    )
    labelled = atlas.features(limit=None).filter(pl.col("explanation_ok")).select("feature_id", "explainer")
    truth = truth.join(labelled.with_columns(pl.col("feature_id").cast(pl.UInt32)), on=["feature_id", "explainer"])
    chosen = truth.sample(200, seed=0)
    Labelling(atlas).add(
        [
            LabelIn(feature_id=int(f), explainer=e, verdict="good" if hit else "bad", origin="triage:random")
            for f, e, hit in chosen.select("feature_id", "explainer", "hit").iter_rows()
        ],
        author="ground truth",
    )
    summary = pages.label_summary(atlas, LabelsQuery(resamples=500))
    people = summary["people"]
    assert people["unbiased"] and people["n"] == 200
    reliable, unreliable = sorted(people["scorers"], key=lambda row: -(row["auc"] or 0))
    planted = {
        scorer: reliability for scorer, reliability in zip(atlas.scorers, options.scorer_reliability, strict=True)
    }
    assert planted[reliable["scorer"]] > planted[unreliable["scorer"]]
    assert reliable["auc_low"] > unreliable["auc_high"]  # told apart, not only ordered
    better, worse = sorted(people["explainers"], key=lambda row: -row["share_good"])
    quality = {explainer: rate for explainer, rate in zip(atlas.explainers, options.explainer_quality, strict=True)}
    assert quality[better["explainer"]] > quality[worse["explainer"]]
