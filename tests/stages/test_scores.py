"""Stage 1: score aggregation against values computed by hand."""

from __future__ import annotations

import math

import polars as pl
import pytest

from sae_atlas.config import SourceConfig
from sae_atlas.problems import Problems
from sae_atlas.sources import delphi
from sae_atlas.stages.scores import build_scores
from tests.conftest import PYTHIA_RUN
from tests.sources.test_delphi import make_run


def gen3(correct, *, distance=0, activating=True):
    return {
        "str_tokens": [" x"],
        "activations": [1.0],
        "distance": distance,
        "activating": activating,
        "prediction": None if correct is None else (activating if correct else not activating),
        "probability": None,
        "correct": correct,
    }


def group(distance, value):
    return {
        "distance": distance,
        "scored_sequence_simulations": [],
        "ev_correlation_score": value,
        "rsquared_score": 0,
        "absolute_dev_explained_score": 0,
    }


HOOK = "layers.30_latent"
FILES = {
    # fuzz: a good batch (4 of 5 right) and a failed batch of 5 nulls -> 4/5
    f"fuzz/{HOOK}1.txt": [gen3(True), gen3(True), gen3(False), gen3(True, distance=-1.0, activating=False), gen3(True)]
    + [gen3(None)] * 5,
    # detection, Gen 1 (sae-auto-interp): 1-based distance, -1 predictions mark failures, one record
    # without the dynamic `correct` attribute -> 3 right of 4 valid
    f"detection/{HOOK}1.txt": [
        {"text": "a", "distance": 1, "ground_truth": True, "prediction": 1, "highlighted": False, "correct": True},
        {"text": "b", "distance": 10, "ground_truth": True, "prediction": 0, "highlighted": False, "correct": False},
        {"text": "c", "distance": -1, "ground_truth": False, "prediction": -1, "highlighted": False, "correct": False},
        {"text": "d", "distance": -1, "ground_truth": False, "prediction": 0, "highlighted": False, "correct": True},
        {"text": "e", "distance": 2, "ground_truth": True, "prediction": 1, "highlighted": False},
    ],
    # simulation: "nan" strings and nulls are failures; mean 0.3, sample variance 0.04
    f"simulation/{HOOK}1.txt": [group(1, 0.5), group(2, "nan"), group(3, 0.1), group(4, None), group(0, 0.3)],
    f"simulation/{HOOK}2.txt": [group(distance, "nan") for distance in [*range(1, 11), 0]],
    f"simulation/{HOOK}3.txt": [group(1, 0.2), group(0, "nan")],
    # embedding, 0-based: distance 0 is activating, -0.0 (Jaccard-0 neighbour) is not; one tie
    # between classes counts half: (0.5 vs 0.5) 0.5 + (0.5 vs 0.2) 1 + (0.7 vs 0.5) 1 + (0.7 vs 0.2) 1
    f"embedding/{HOOK}1.txt": [
        {"text": "a", "distance": 0, "similarity": 0.5},
        {"text": "b", "distance": -0.0, "similarity": 0.5},
        {"text": "c", "distance": 3, "similarity": 0.7},
        {"text": "d", "distance": -1.0, "similarity": 0.2},
        {"text": "e", "distance": 2, "similarity": None},
    ],
    # single class: no AUC
    f"embedding/{HOOK}2.txt": [
        {"text": "a", "distance": 0, "similarity": 0.4},
        {"text": "b", "distance": 5, "similarity": 0.1},
    ],
    # 1-based (Gen 2) distances: 1..10 activating, -1 not -> 3 of 4 pairs ordered
    f"embedding/{HOOK}3.txt": [
        {"text": "a", "distance": 1, "similarity": 0.9},
        {"text": "b", "distance": 10, "similarity": 0.4},
        {"text": "c", "distance": -1, "similarity": 0.6},
        {"text": "d", "distance": -1, "similarity": 0.1},
    ],
    # an explicit `activating` field wins over the distance
    f"embedding/{HOOK}4.txt": [
        {"text": "a", "distance": -1, "similarity": 0.3, "activating": True},
        {"text": "b", "distance": 0, "similarity": 0.1, "activating": False},
    ],
    f"intruder/{HOOK}1.txt": [
        {"interpretation": "x", "sample": {"examples": []}, "prediction": 1, "correct_index": 1, "correct": True},
        {"interpretation": "", "sample": None, "prediction": 0, "correct_index": -1, "correct": False},
        {"interpretation": "y", "sample": {"examples": []}, "prediction": 0, "correct_index": 2, "correct": False},
    ],
    f"fuzz/{HOOK}5.txt": [],
}


def score_table(root, problems: Problems | None = None) -> pl.DataFrame:
    """The scores of one run; with no ``problems`` given, the run must read without any."""
    expect_clean = problems is None
    problems = problems if problems is not None else Problems()
    run = delphi.discover_run(SourceConfig(path=root, explainer="E", scorer="S"), problems)
    records = delphi.read_score_records(run, problems)
    assert not (expect_clean and problems.items)

    def tag(frame):
        return frame.with_columns(data_source=pl.lit(run.name))

    return build_scores(
        files=tag(records.files),
        records=tag(records.records),
        runs=pl.DataFrame({"data_source": [run.name], "llm_explainer": ["E"], "llm_scorer": ["S"]}),
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = make_run(tmp_path_factory.mktemp("scores") / "run", run_config={}, scores=FILES)
    return score_table(root)


EXPECTED = [
    # feature, method, score, n_examples, n_failed, variance
    (1, "detection", 0.75, 5, 1, None),
    (1, "embedding", 0.875, 5, 1, None),
    (1, "fuzz", 0.8, 10, 5, None),
    (1, "intruder", 0.5, 3, 1, None),
    (1, "simulation", 0.3, 5, 2, 0.04),
    (2, "embedding", None, 2, 0, None),
    (2, "simulation", None, 11, 11, None),
    (3, "embedding", 0.75, 4, 0, None),
    (3, "simulation", 0.2, 2, 1, None),
    (4, "embedding", 1.0, 2, 0, None),
    (5, "fuzz", None, 0, 0, None),
]


def test_scores_match_hand_computed_values(table):
    rows = table.select(
        "feature_id", pl.col("method").cast(pl.String), "score", "n_examples", "n_failed", "variance"
    ).rows()
    assert len(rows) == len(EXPECTED)
    for actual, expected in zip(rows, EXPECTED, strict=True):
        assert actual[:2] == expected[:2]
        for got, want in zip(actual[2:], expected[2:], strict=True):
            assert (got is None and want is None) or math.isclose(got, want, rel_tol=1e-12), (actual, expected)


def test_score_table_carries_explainer_and_scorer(table):
    assert table["llm_explainer"].cast(pl.String).unique().to_list() == ["E"]
    assert table["llm_scorer"].cast(pl.String).unique().to_list() == ["S"]
    assert table.schema["method"] == pl.Categorical()


def test_example_run_scores():
    table = score_table(PYTHIA_RUN)
    scores = {
        row["method"]: (row["score"], row["n_examples"], row["n_failed"])
        for row in table.with_columns(pl.col("method").cast(pl.String)).iter_rows(named=True)
    }
    # fuzz/detection: 2 valid records, both correct; 2 nulls
    assert scores["fuzz"] == (1.0, 4, 2) and scores["detection"] == (1.0, 4, 2)
    assert scores["embedding"] == (1.0, 2, 0)
    assert scores["intruder"] == (1.0, 2, 1)
    assert scores["simulation"][1:] == (2, 0)
    assert math.isclose(scores["simulation"][0], (0.987 + 0.842) / 2)


def with_probability(record: dict, probability: float) -> dict:
    return {**record, "probability": probability}


def test_classification_metrics_follow_delphi_result_analysis(tmp_path):
    """Counted by hand: latent 7 has TP 2, FN 1, TN 1, FP 1 and a failed batch of 5; latent 8 has
    only activating examples, both right (delphi scores an empty class's rate as 0)."""
    files = {
        f"fuzz/{HOOK}7.txt": [
            with_probability(gen3(True), 0.9),
            with_probability(gen3(True), 0.8),
            with_probability(gen3(False), 0.3),
            with_probability(gen3(True, distance=-1.0, activating=False), 0.2),
            with_probability(gen3(False, distance=-1.0, activating=False), 0.6),
        ]
        + [gen3(None)] * 5,
        f"detection/{HOOK}8.txt": [gen3(True), gen3(True, distance=3)],
    }
    table = score_table(make_run(tmp_path / "run", run_config={}, scores=files))
    fuzz = table.filter(pl.col("method") == "fuzz").row(0, named=True)
    assert (fuzz["true_positives"], fuzz["false_negatives"], fuzz["true_negatives"], fuzz["false_positives"]) == (
        2,
        1,
        1,
        1,
    )
    assert fuzz["n_failed"] == 5 and fuzz["score"] == pytest.approx(3 / 5)  # the study's accuracy
    assert fuzz["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert fuzz["precision"] == pytest.approx(2 / 3) and fuzz["recall"] == pytest.approx(2 / 3)
    assert fuzz["f1"] == pytest.approx(2 / 3)
    # probabilities: activating 0.9, 0.8, 0.3 against 0.2, 0.6: 5 of 6 pairs ordered
    assert fuzz["probability_auc"] == pytest.approx(5 / 6)
    detection = table.filter(pl.col("method") == "detection").row(0, named=True)
    assert detection["balanced_accuracy"] == pytest.approx(0.5)
    assert (detection["precision"], detection["recall"], detection["f1"]) == (1.0, 1.0, 1.0)
    assert detection["probability_auc"] is None
    # methods that are not classifications have no confusion counts
    assert table.filter(pl.col("method") != "fuzz").filter(pl.col("method") != "detection").is_empty()


def test_firing_counts_from_the_delphi_log(tmp_path):
    import torch

    from sae_atlas.stages.scores import firing_table

    root = make_run(
        tmp_path / "run",
        run_config={"cache_cfg": {"n_tokens": 1000}},
        scores={f"fuzz/{HOOK}1.txt": [gen3(True)], f"fuzz/{HOOK}2.txt": [gen3(False)]},
    )
    (root / "log").mkdir()
    torch.save({"layers.30": torch.tensor([0, 50, 7], dtype=torch.int64)}, root / "log" / "hookpoint_firing_counts.pt")
    problems = Problems()
    run = delphi.discover_run(SourceConfig(path=root, explainer="E", scorer="S"), problems)
    counts = delphi.read_firing_counts(run, problems)
    assert not problems.items and counts.tolist() == [0, 50, 7]
    firing = firing_table(run.name, counts, run.settings["cache_cfg.n_tokens"])
    assert firing.filter(pl.col("feature_id") == 1)["firing_frequency"].item() == pytest.approx(0.05)

    (root / "log" / "hookpoint_firing_counts.pt").write_bytes(b"not a torch file")
    damaged = Problems()
    assert delphi.read_firing_counts(run, damaged) is None
    assert "not a readable torch file" in damaged.items[0].message


def test_simulation_correlations_delphi_wrote_past_one_are_kept_and_absurd_ones_refused(tmp_path):
    """The study's legacy-simulator files hold a few overall-group scores a little above 1, which
    its own per-latent means include; a value no correlation can have is refused and reported."""
    files = {
        f"simulation/{HOOK}1.txt": [group(1, 0.5), group(2, 0.2), group(0, 1.25)],
        f"simulation/{HOOK}2.txt": [group(1, 0.4), group(0, 1.7e308)],
    }
    root = make_run(tmp_path / "run", run_config={}, scores=files)
    problems = Problems()
    run = delphi.discover_run(SourceConfig(path=root, explainer="E", scorer="S"), problems)
    records = delphi.read_score_records(run, problems)
    [problem] = problems.items
    assert problem.latent == 2 and "outside [-2.0, 2.0] (e.g. 1.7e+308); counted as failed" in problem.message

    def tag(frame):
        return frame.with_columns(data_source=pl.lit(run.name))

    table = build_scores(
        files=tag(records.files),
        records=tag(records.records),
        runs=pl.DataFrame({"data_source": [run.name], "llm_explainer": ["E"], "llm_scorer": ["S"]}),
    )
    scores = dict(table.select("feature_id", "score").rows())
    assert scores[1] == pytest.approx((0.5 + 0.2 + 1.25) / 3)  # as the study computes it
    assert scores[2] == pytest.approx(0.4)


def breakdown(table: pl.DataFrame, feature: int, method: str) -> dict[int, tuple]:
    row = table.filter((pl.col("feature_id") == feature) & (pl.col("method") == method)).row(0, named=True)
    return {item["quantile"]: (item["score"], item["examples"]) for item in row["by_quantile"] or []}


def test_scores_per_activation_quantile_by_hand(table):
    # fuzz, latent 1: four valid activating records of quantile 0 (3 right); the failed batch
    # counts for nothing
    assert breakdown(table, 1, "fuzz") == {0: (0.75, 4)}
    # simulation, latent 1: groups at outer distance 1..4 are quantiles 0..3 ("nan" and null empty)
    assert breakdown(table, 1, "simulation") == {0: (0.5, 1), 1: (None, 0), 2: (0.1, 1), 3: (None, 0)}
    # embedding, latent 1: quantile 0's 0.5 against the negatives 0.5 (tie: ½) and 0.2 (1) → 0.75;
    # quantile 3's 0.7 is above both → 1; quantile 2's record failed
    assert breakdown(table, 1, "embedding") == {0: (0.75, 1), 3: (1.0, 1)}
    # the overall (pooled, distance 0) group apart; the study's score stays the mean of every group
    simulation = table.filter((pl.col("feature_id") == 1) & (pl.col("method") == "simulation")).row(0, named=True)
    assert simulation["overall"] == pytest.approx(0.3) and simulation["score"] == pytest.approx(0.3)
    three = table.filter((pl.col("feature_id") == 3) & (pl.col("method") == "simulation")).row(0, named=True)
    assert three["overall"] is None and three["score"] == pytest.approx(0.2)  # its overall group is "nan"


def test_example_embedding_is_a_method_of_its_own(tmp_path):
    def batch(quantile, plus, minus):
        query = {"quantile_positive_query": quantile, "distance_negative_query": -1.0}
        return {
            "batch": {"negative_examples": [], "positive_examples": [], **query},
            "delta_plus": plus,
            "delta_minus": minus,
        }

    files = {
        f"example_embedding/{HOOK}6.txt": [batch(0, 0.3, -0.1), batch(2, 0.1, 0.05), batch(1, "nan", 0.2)],
    }
    table = score_table(make_run(tmp_path / "run", run_config={}, scores=files))
    row = table.row(0, named=True)
    assert row["method"] == "example_embedding" and row["n_failed"] == 1
    assert row["score"] == pytest.approx((0.4 + 0.05) / 2)
    assert breakdown(table, 6, "example_embedding") == {
        0: (pytest.approx(0.4), 1),
        1: (None, 0),
        2: (pytest.approx(0.05), 1),
    }


def test_the_newest_and_the_legacy_simulation_files_give_the_same_scores(tmp_path):
    """delphi ≥ 0.1.1 writes scores/simulation/ with inner `absolute_dev_explained_score` 0; the
    legacy simulator wrote null there, floats for outer scores, and custom pipelines name the
    directory after the scorer class, `simulator/`."""

    def groups(inner_dev, outer_zero):
        return [
            {
                "distance": distance,
                "scored_sequence_simulations": [
                    {
                        "distance": max(distance - 1, -1),
                        "simulation": {"tokens": [" a", " b"], "expected_activations": [0.0, 0.0]},
                        "true_activations": [0, 0],
                        "ev_correlation_score": "nan",
                        "absolute_dev_explained_score": inner_dev,
                    }
                ],
                "ev_correlation_score": value,
                "rsquared_score": outer_zero,
                "absolute_dev_explained_score": outer_zero,
            }
            for distance, value in ((1, 0.6), (2, 0.4), (0, 0.5))
        ]

    newest = score_table(make_run(tmp_path / "new", run_config={}, scores={f"simulation/{HOOK}9.txt": groups(0, 0)}))
    legacy = score_table(
        make_run(tmp_path / "old", run_config={}, scores={f"simulator/{HOOK}9.txt": groups(None, 0.0)})
    )
    columns = ["feature_id", "method", "score", "variance", "overall", "by_quantile"]
    assert newest.select(columns).equals(legacy.select(columns))
    assert newest["score"].item() == pytest.approx(0.5) and newest["overall"].item() == pytest.approx(0.5)


def test_malformed_files_in_the_newest_layouts_are_reported_and_the_rest_kept(tmp_path):
    good = {"batch": {"quantile_positive_query": 0}, "delta_plus": 0.5, "delta_minus": 0.1}
    files = {
        f"simulator/{HOOK}1.txt": b'[{"distance": 0, "ev_correlation_sc',  # truncated
        f"simulator/{HOOK}2.txt": [group(1, 0.4), "a string"],  # wrong record type
        f"simulator/{HOOK}3.txt": [group(1, 0.4), group(0, 0.2)],
        f"example_embedding/{HOOK}4.txt": {"delta_plus": 1},  # not a list of batches
        # a batch that is not an object and deltas that are not numbers: failed batches, not crashes
        f"example_embedding/{HOOK}5.txt": [good, {**good, "batch": "?"}, {**good, "delta_minus": "high"}],
    }
    problems = Problems()
    table = score_table(make_run(tmp_path / "run", run_config={}, scores=files), problems)
    by_file = {problem.file.rsplit("/", 1)[-1]: problem.message for problem in problems}
    assert set(by_file) == {f"{HOOK}1.txt", f"{HOOK}2.txt", f"{HOOK}4.txt"}
    assert "truncated or invalid JSON" in by_file[f"{HOOK}1.txt"]
    assert "record 1 is a str" in by_file[f"{HOOK}2.txt"]
    assert "expected a JSON array" in by_file[f"{HOOK}4.txt"]
    rows = {(row["feature_id"], row["method"]): row for row in table.iter_rows(named=True)}
    assert set(rows) == {(3, "simulation"), (5, "example_embedding")}
    assert rows[3, "simulation"]["score"] == pytest.approx(0.3) and rows[3, "simulation"]["overall"] == 0.2
    embedding = rows[5, "example_embedding"]
    assert embedding["score"] == pytest.approx(0.4) and embedding["n_failed"] == 1
