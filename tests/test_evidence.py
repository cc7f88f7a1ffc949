"""Scorer evidence: every scored record kept one for one with the raw files, examples shared across
runs recognised as one, and a hand-built latent whose scorers disagree on known examples."""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl
import pytest

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.query.evidence import ScoreEvidence
from sae_atlas.scored_examples import ExampleStore
from sae_atlas.sources import delphi
from sae_atlas.stages.score_evidence import build_score_evidence, evidence_rows

PYTHIA_RUN = Path(__file__).parent / "fixtures" / "raw-formats" / "results" / "pythia-demo"


def raw_records(corpus_root: Path) -> pl.DataFrame:
    """Every fuzz, detection and embedding record of the corpus's raw files, read plainly."""
    rows = []
    for path in sorted((corpus_root / "raw").glob("*_e-*_s/scores/*/*.txt")):
        method = path.parent.name
        if method not in ("fuzz", "detection", "embedding"):
            continue
        latent = int(path.stem.rsplit("latent", 1)[1])
        for position, record in enumerate(orjson.loads(path.read_bytes())):
            rows.append(
                {
                    "data_source": path.parent.parent.parent.name,
                    "method": method,
                    "feature_id": latent,
                    "record": position,
                    "prediction": record.get("prediction"),
                    "correct": record.get("correct"),
                }
            )
    return pl.DataFrame(rows, schema_overrides={"prediction": pl.Boolean, "correct": pl.Boolean})


def test_the_records_equal_the_raw_files_one_for_one(small_run, small_corpus):
    config, _ = small_run
    stored = pl.read_parquet(config.output_dir / layout.SCORE_RECORDS)
    raw = raw_records(small_corpus.root)
    keys = ["data_source", "method", "feature_id", "record"]
    assert stored.height == raw.height
    joined = raw.join(stored.with_columns(pl.col("feature_id").cast(pl.Int64)), on=keys, how="left", suffix="_stored")
    classifier = joined.filter(pl.col("method") != "embedding")
    # failed batches included: a null prediction stays null, and so does its verdict
    assert classifier["prediction"].eq_missing(classifier["prediction_stored"]).all()
    assert classifier["correct"].eq_missing(classifier["correct_stored"]).all()
    assert joined["example_id"].null_count() == 0
    # the same example (latent and tokens) scored by every run is one example
    examples = pl.read_parquet(config.output_dir / layout.SCORE_EXAMPLES)
    per_example = (
        stored.filter(pl.col("method") == "fuzz")
        .group_by("feature_id", "example_id")
        .agg(runs=pl.col("data_source").n_unique())
    )
    runs = stored["data_source"].n_unique()
    assert per_example["runs"].max() == runs and per_example["runs"].mode().item() == runs
    assert examples.select("feature_id", "example_id").is_unique().all()


def classifier_record(tokens: list[str], activating: bool, prediction: bool | None) -> dict:
    return {
        "str_tokens": tokens,
        "activations": [1.0 if activating else 0.0] * len(tokens),
        "distance": 0 if activating else -1,
        "activating": activating,
        "prediction": prediction,
        "probability": None,
        "correct": None if prediction is None else prediction == activating,
    }


def evidence_of(tmp_path: Path, verdicts: dict[str, dict[str, bool | None]]) -> ScoreEvidence:
    """Latent 7's fuzz files, one per run (``verdicts``: run → example → prediction; every example
    activating, its text the example's name), through the reader and the stage into an output."""
    parts, store = [], ExampleStore()
    for source, predictions in verdicts.items():
        path = tmp_path / source / "fuzz_latent7.txt"
        path.parent.mkdir(parents=True)
        records = [classifier_record([name, " x"], True, prediction) for name, prediction in predictions.items()]
        path.write_bytes(orjson.dumps(records))
        read = delphi.read_score_files(
            "fuzz", [delphi.LatentFile(7, "layers.0", path)], Problems(), store, source=source
        )
        parts.append(evidence_rows(read.records.with_columns(data_source=pl.lit(source))))
    records, texts = build_score_evidence(pl.concat(parts), store.table())
    output = tmp_path / "output"
    (output / "stages").mkdir(parents=True)
    records.write_parquet(output / layout.SCORE_RECORDS)
    texts.write_parquet(output / layout.SCORE_EXAMPLES)
    return ScoreEvidence(output)


def shown(evidence: ScoreEvidence, runs: list[dict], show: str = "all") -> list[str]:
    [fuzz] = evidence.of_feature(7, runs, method="fuzz", show=show)["methods"]
    return sorted(example["str_tokens"][0] for example in fuzz["examples"])


def test_scorers_that_disagree_on_known_examples(tmp_path):
    """One explainer, two scorers, four examples: the scorers disagree on examples b and c, both
    miss d, and s2's batch failed on a."""
    verdicts = {  # the scorers' predictions; every example is activating
        "e_e-s1_s": {"d": False, "c": False, "b": True, "a": True},
        "e_e-s2_s": {"d": False, "c": True, "b": False, "a": None},
    }
    evidence = evidence_of(tmp_path, verdicts)
    runs = [{"data_source": source, "explainer": "E", "scorer": source[4:6]} for source in verdicts]
    assert shown(evidence, runs, "disagree") == ["b", "c"]
    assert shown(evidence, runs, "all_miss") == ["d"]
    assert shown(evidence, runs, "failed") == ["a"]
    [fuzz] = evidence.of_feature(7, runs, method="fuzz")["methods"]
    by_example = {example["str_tokens"][0]: example["verdicts"] for example in fuzz["examples"]}
    assert by_example == {
        "a": ["correct", "failed"],
        "b": ["correct", "wrong"],
        "c": ["wrong", "correct"],
        "d": ["wrong", "wrong"],
    }
    assert fuzz["counts"] == {"disagree": 2, "all_miss": 1, "failed": 1}


def test_a_miss_by_every_explainer_needs_every_explainer_judged(tmp_path):
    """E's run scored a and b, F's only b: both missed b; only E was judged on a, so a is not a
    miss by every explainer (the study's reconstructed records give each run its own examples)."""
    evidence = evidence_of(tmp_path, {"e_e-s_s": {"a": False, "b": False}, "f_e-s_s": {"b": False}})
    runs = [
        {"data_source": "e_e-s_s", "explainer": "E", "scorer": "S"},
        {"data_source": "f_e-s_s", "explainer": "F", "scorer": "S"},
    ]
    assert shown(evidence, runs, "all_miss") == ["b"]
    assert shown(evidence, runs) == ["a", "b"]


def test_error_rates_by_hand_and_as_planted(tmp_path, small_run):
    """The hand-built latent above: s1 misses 2 of 4 activating examples, s2 2 of the 3 it decided
    (its failed record left out). On synth, where a miss is likelier in lower quantiles and for
    explainers that hit less often, the anatomy says so."""
    from sae_atlas.query.anatomy import NON_ACTIVATING, read_error_rates
    from sae_atlas.query.atlas import Atlas

    test_scorers_that_disagree_on_known_examples(tmp_path)
    rates, sets = read_error_rates(tmp_path / "output")
    assert rates.select("data_source", "quantile", "errors", "decided").rows() == [
        ("e_e-s1_s", 0, 2, 4),
        ("e_e-s2_s", 0, 2, 3),
    ]
    assert sets["examples"].to_list() == [4, 4] and sets["fingerprint"].n_unique() == 1  # the same examples

    comparison = Atlas(small_run[0].output_dir).compare(["fuzz"], resamples=200)
    errors = comparison["error_anatomy"]
    runs = {(row["explainer"], row["scorer"]) for row in errors}
    for explainer, scorer in runs:
        mine = {
            row["quantile"]: row["mean"] for row in errors if (row["explainer"], row["scorer"]) == (explainer, scorer)
        }
        top, bottom = min(q for q in mine if q >= 0), max(mine)
        assert mine[bottom] > mine[top]  # synth: recall falls with the quantile
        assert 0 < mine[NON_ACTIVATING] < 0.5
    # synth's default hit rates: llama 0.85, gemma 0.65; a miss makes false positives likelier
    false_positive = {
        (row["explainer"].split("/")[0], row["scorer"]): row["mean"]
        for row in errors
        if row["quantile"] == NON_ACTIVATING
    }
    for scorer in {scorer for _, scorer in runs}:
        assert false_positive["hugging-quants", scorer] < false_positive["google", scorer]


def test_every_delphi_generation_keeps_its_records_one_for_one(tmp_path):
    """Gen 1 (text only, 1-based distance, prediction -1 on failure), Gen 2 (str_tokens, 1-based,
    -1), Gen 3 (activating, 0-based, null on failure): each record kept, its verdict as recorded,
    failures null, quantiles 0 = top."""
    generations = {
        "gen1": [
            {
                "text": "a b",
                "distance": 1,
                "ground_truth": True,
                "prediction": 1,
                "highlighted": False,
                "correct": True,
            },
            {"text": "c d", "distance": -1, "ground_truth": False, "prediction": 1, "highlighted": False},
            {
                "text": "e f",
                "distance": 3,
                "ground_truth": True,
                "prediction": -1,
                "highlighted": False,
                "correct": False,
            },
        ],
        "gen2": [
            {
                "str_tokens": ["a", " b"],
                "activations": [0, 2],
                "distance": 2,
                "ground_truth": True,
                "prediction": 0,
                "highlighted": False,
                "probability": 0.0,
                "correct": False,
            },
            {
                "str_tokens": ["c", " d"],
                "activations": [0, 0],
                "distance": -1,
                "ground_truth": False,
                "prediction": -1,
                "highlighted": False,
                "probability": -1,
                "correct": False,
            },
        ],
        "gen3": [
            {
                "str_tokens": ["a", " b"],
                "activations": [1.5, 0],
                "distance": 0,
                "activating": True,
                "prediction": True,
                "probability": 0.9,
                "correct": True,
            },
            {
                "str_tokens": ["c", " d"],
                "activations": [0, 0],
                "distance": -1,
                "activating": False,
                "prediction": None,
                "probability": None,
                "correct": None,
            },
        ],
    }
    expected = {
        "gen1": [(True, 0, True, True), (False, None, True, False), (True, 2, None, None)],
        "gen2": [(True, 1, False, False), (False, None, None, None)],
        "gen3": [(True, 0, True, True), (False, None, None, None)],
    }
    for generation, records in generations.items():
        path = tmp_path / f"{generation}_latent3.txt"
        path.write_bytes(orjson.dumps(records))
        store = ExampleStore()
        read = delphi.read_score_files("fuzz", [delphi.LatentFile(3, "x", path)], Problems(), store)
        rows = evidence_rows(read.records.with_columns(data_source=pl.lit(generation)))
        kept, examples = build_score_evidence(rows, store.table())
        assert kept.select("activating", "quantile", "prediction", "correct").rows() == expected[generation], generation
        assert kept["record"].to_list() == list(range(len(records)))
        assert examples.height == len(records) and kept["example_id"].null_count() == 0


def test_a_record_without_a_readable_example_is_reported_and_keeps_its_verdict(tmp_path):
    records = [
        classifier_record(["a", " b"], True, True),
        {**classifier_record(["c"], True, False), "str_tokens": [1, 2]},  # tokens that are not text
        {**classifier_record(["d"], False, False), "str_tokens": None},  # no example at all
    ]
    path = tmp_path / "fuzz_latent5.txt"
    path.write_bytes(orjson.dumps(records))
    problems, store = Problems(), ExampleStore()
    read = delphi.read_score_files("fuzz", [delphi.LatentFile(5, "x", path)], problems, store)
    [problem] = problems.items
    assert problem.file == str(path) and problem.latent == 5 and problem.message.startswith("2 record(s) without")
    kept, examples = build_score_evidence(
        evidence_rows(read.records.with_columns(data_source=pl.lit("r"))), store.table()
    )
    assert kept["correct"].to_list() == [True, False, True] and kept["example_id"].null_count() == 2
    assert examples.height == 1


def test_simulation_sequences_intruders_and_queries_are_kept_record_by_record(tmp_path):
    """delphi's own files (raw-formats examples): a simulation file's sequences (the pooled group's
    repeat of an activating one dropped), the intruder a record had to find, the batch's query."""
    root = PYTHIA_RUN / "scores"
    store, parts, sequences = ExampleStore(), [], []
    for method in ("simulation", "intruder", "example_embedding"):
        path = root / method / "layers.3.mlp_latent0.txt"
        if method == "example_embedding":
            path = tmp_path / "example_embedding.json"
            path.write_bytes(
                orjson.dumps(
                    [
                        {
                            "batch": {"positive_query": " a query", "quantile_positive_query": 2},
                            "delta_plus": 0.3,
                            "delta_minus": 0.1,
                        },
                        {"batch": None, "delta_plus": "nan", "delta_minus": 0.1},
                    ]
                )
            )
        problems = Problems()
        read = delphi.read_score_files(method, [delphi.LatentFile(0, "x", path)], problems, store, source="run")
        assert not problems.items, problems.items
        parts.append(read.records.with_columns(data_source=pl.lit("run")))
        sequences.append(read.sequences.with_columns(data_source=pl.lit("run")))
    records, examples = build_score_evidence(evidence_rows(pl.concat(parts), pl.concat(sequences)), store.table())
    text = dict(zip(examples["example_id"], ["".join(tokens) for tokens in examples["str_tokens"]], strict=True))

    simulation = records.filter(pl.col("method") == "simulation").sort("record")
    assert simulation["record"].to_list() == [0, 1]
    assert simulation["activating"].to_list() == [True, False]
    assert simulation["quantile"].to_list() == [0, None]
    assert simulation["outcome"].to_list() == [0.987, None]  # "nan" for the constant sequence
    assert simulation["correct"].null_count() == 2  # a correlation is not a verdict
    assert simulation["true_activations"][0].to_list() == [0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert simulation["simulated_activations"][0].to_list() == pytest.approx([0.1, 0.0, 7.9, 0.3, 0.0, 0.0, 0.0, 0.2])
    assert {text[i] for i in simulation["example_id"]} == {" the end of the road, and then"}

    intruder = records.filter(pl.col("method") == "intruder").sort("record")
    assert intruder["correct"].to_list() == [True, None]  # the second sample failed (sample: null)
    assert intruder["quantile"].to_list() == [3, None]
    assert text[intruder["example_id"][0]] == " road works ahead"  # the intruder, at intruder_index 2
    assert intruder["example_id"][1] is None

    query = records.filter(pl.col("method") == "example_embedding").sort("record")
    assert query["outcome"][0] == pytest.approx(0.2) and query["outcome"][1] is None
    assert text[query["example_id"][0]] == " a query" and query["correct"].null_count() == 2


def test_a_simulation_sequence_without_tokens_is_reported_and_kept(tmp_path):
    path = tmp_path / "simulation.txt"
    sequence = {"distance": 0, "true_activations": [1.0], "ev_correlation_score": 0.5}
    path.write_bytes(
        orjson.dumps([{"distance": 1, "scored_sequence_simulations": [sequence], "ev_correlation_score": 0.5}])
    )
    problems = Problems()
    read = delphi.read_score_files("simulation", [delphi.LatentFile(4, "x", path)], problems, source="r")
    assert [str(problem) for problem in problems] == [
        f"{path} (latent 4): 1 record(s) without a readable example (str_tokens of strings, or text); "
        "their verdicts are kept, without the example"
    ]
    assert read.sequences["outcome"].to_list() == [0.5] and read.sequences["example_text"].to_list() == [None]
