"""The delphi run reader, on the example run and on hand-made malformed runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from sae_atlas.config import SourceConfig
from sae_atlas.problems import Problems, StrictModeError
from sae_atlas.sources import delphi
from tests.conftest import PYTHIA_RUN

RECORD = {
    "str_tokens": [" a"],
    "activations": [0.0],
    "distance": 0,
    "activating": True,
    "prediction": True,
    "probability": None,
    "correct": True,
}


def make_run(
    root: Path, *, run_config: dict | None = None, explanations: dict | None = None, scores: dict | None = None
) -> Path:
    """A delphi run directory: ``explanations`` maps file name → raw bytes/str, ``scores`` maps
    "method/file name" → raw content."""
    root.mkdir(parents=True, exist_ok=True)
    if run_config is not None:
        (root / "run_config.json").write_bytes(orjson.dumps(run_config))
    for name, content in (explanations or {}).items():
        path = root / "explanations" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for name, content in (scores or {}).items():
        path = root / "scores" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else orjson.dumps(content))
    return root


CONFIG = {
    "explainer_model": "E",
    "sparse_model": "google/gemma-scope-9b-pt-res",
    "hookpoints": ["layer_30/width_16k/average_l0_120"],
}


def discover(root: Path, problems: Problems | None = None, **source) -> tuple[delphi.DelphiRun, Problems]:
    problems = Problems() if problems is None else problems
    return delphi.discover_run(SourceConfig(path=root, **source), problems), problems


def test_example_run_is_read_with_every_quirk():
    run, problems = discover(PYTHIA_RUN)
    assert not problems.items
    assert run.explainer == run.scorer == "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
    assert run.sae_id == "EleutherAI/sae-pythia-160m-32k/layers.3.mlp"
    assert run.explanation_method == "quantiles"
    assert sorted(run.scores) == ["detection", "embedding", "fuzz", "intruder", "simulation"]
    assert any("surprisal" in note for note in run.notes)
    explanations = delphi.read_explanations(run, problems)
    assert explanations.to_dicts() == [
        {
            "feature_id": 0,
            "explanation_text": 'The token "of" in noun phrases, e.g. "the end of"',
            "explanation_ok": True,
        },
        {"feature_id": 1, "explanation_text": "Explanation could not be parsed.", "explanation_ok": False},
    ]


def test_file_names_parse_with_prefix_collisions_legacy_names_and_escaped_hooks(tmp_path):
    root = make_run(
        tmp_path / "run",
        run_config={**CONFIG, "hookpoints": ["layers.1"]},
        explanations={
            "layers.1_latent7.txt": '"seven"',
            "layers.10_latent8.txt": '"other hook"',
            ".transformer.h.0_feature12.txt": '"hidden legacy"',
        },
        scores={"fuzz/layers.1_latent7.txt": [RECORD], "nested/exp/fuzz/layers.1_latent9.txt": [RECORD]},
    )
    run, problems = discover(root)
    assert [entry.latent for entry in run.explanations] == [7]
    assert [entry.latent for entry in run.scores["fuzz"]] == [7, 9]  # score dirs at any depth
    assert any("other hookpoints" in note for note in run.notes)
    assert not problems.items


def test_gemma_scope_files_join_the_configured_hookpoint_loosely(tmp_path):
    root = make_run(
        tmp_path / "run",
        run_config=CONFIG,
        explanations={"layers.30_latent3.txt": '"three"'},
        scores={"detection/layers.30_latent3.txt": [RECORD]},
    )
    run, _ = discover(root)
    assert run.sae_id == "google/gemma-scope-9b-pt-res/layer_30/width_16k/average_l0_120"
    assert run.explanations[0].hook == "layers.30"
    slashed = make_run(
        tmp_path / "slashed",
        run_config={**CONFIG, "hookpoints": ["model/layers.2"]},
        scores={"fuzz/model--layers.2_latent4.txt": [RECORD]},
    )
    run, _ = discover(slashed)
    assert run.scores["fuzz"][0].hook == "model/layers.2"


def test_scored_latent_without_explanation_gets_the_delphi_sentinel(tmp_path):
    root = make_run(
        tmp_path / "run",
        run_config=CONFIG,
        explanations={"layers.30_latent1.txt": '"one"'},
        scores={"fuzz/layers.30_latent2.txt": [RECORD]},
    )
    run, problems = discover(root)
    frame = delphi.read_explanations(run, problems)
    assert frame.rows() == [(1, "one", True), (2, "No explanation found", False)]


def test_plain_text_explanations_are_accepted():
    assert delphi.parse_explanation(b"Hand written explanation\n") == "Hand written explanation"
    assert delphi.parse_explanation(b'"escaped \\"quote\\"\\nand newline"') == 'escaped "quote"\nand newline'


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'"The token \\"of', "truncated or invalid JSON"),
        (b"[1, 2]", "expected a JSON string, got list"),
        (b"42", "expected a JSON string, got int"),
        (b"", "empty explanation file"),
    ],
)
def test_malformed_explanation_is_reported_and_the_rest_kept(tmp_path, content, fragment):
    root = make_run(
        tmp_path / "run",
        run_config=CONFIG,
        explanations={"layers.30_latent1.txt": content, "layers.30_latent2.txt": '"fine"'},
    )
    run, problems = discover(root)
    frame = delphi.read_explanations(run, problems)
    assert frame["feature_id"].to_list() == [2]
    [problem] = problems.items
    assert problem.file.endswith("layers.30_latent1.txt") and problem.latent == 1 and fragment in problem.message
    assert "\n" not in str(problem)


def test_malformed_score_files_are_reported_and_the_rest_kept(tmp_path):
    root = make_run(
        tmp_path / "run",
        run_config=CONFIG,
        scores={
            "fuzz/layers.30_latent1.txt": b'[{"correct": true}, {"corr',  # truncated
            "fuzz/layers.30_latent2.txt": {"not": "a list"},  # wrong type
            "fuzz/layers.30_latent3.txt": [RECORD, "a string"],  # wrong record type
            "fuzz/layers.30_latent4.txt": [RECORD, RECORD],
            "fuzz/experiment_config.json": {"legacy": True},  # foreign file name
            "fuzz/notes.txt": b"scratch",
        },
    )
    run, problems = discover(root)
    records = delphi.read_score_records(run, problems)
    assert records.files["feature_id"].to_list() == [4]
    assert records.records.height == 2  # the records of the one readable file
    by_file = {Path(problem.file).name: problem for problem in problems}
    assert "truncated or invalid JSON" in by_file["layers.30_latent1.txt"].message
    assert "expected a JSON array of records, got dict" in by_file["layers.30_latent2.txt"].message
    assert "record 1 is a str" in by_file["layers.30_latent3.txt"].message
    assert by_file["experiment_config.json"].kind == "foreign"
    assert by_file["notes.txt"].kind == "foreign"
    assert len(problems) == 5


def test_missing_run_config_falls_back_to_the_source_name(tmp_path):
    root = make_run(tmp_path / "my-run", explanations={"layers.30_latent1.txt": '"x"'})
    run, problems = discover(root)
    assert run.explainer == run.scorer == "my-run"
    [problem] = problems.items
    assert problem.file.endswith("run_config.json") and problem.kind == "missing"
    # Naming explainer and scorer in the config makes a missing run_config.json no problem at all.
    run, problems = discover(root, explainer="E", scorer="S")
    assert (run.explainer, run.scorer, len(problems)) == ("E", "S", 0)


def test_malformed_run_config_is_reported(tmp_path):
    root = make_run(tmp_path / "run", explanations={"layers.30_latent1.txt": '"x"'})
    (root / "run_config.json").write_text('{"explainer_model": ')
    _, problems = discover(root, explainer="E", scorer="S")
    assert any(p.file.endswith("run_config.json") and "not valid JSON" in p.message for p in problems)
    (root / "run_config.json").write_bytes(orjson.dumps({"explainer_model": 3, "hookpoints": "layers.1"}))
    _, problems = discover(root)
    messages = [problem.message for problem in problems]
    assert any("explainer_model should be a string" in message for message in messages)
    assert any("hookpoints should be a list" in message for message in messages)


def test_empty_or_missing_run_directories(tmp_path):
    (tmp_path / "empty" / "explanations").mkdir(parents=True)
    (tmp_path / "empty" / "scores").mkdir()
    run, problems = discover(tmp_path / "empty", explainer="E", scorer="S")
    assert run.explanations == [] and run.scores == {}
    assert any("no explanation or score files" in problem.message for problem in problems)
    run, problems = discover(tmp_path / "absent", explainer="E", scorer="S")
    assert any("does not exist" in problem.message for problem in problems)


def test_strict_mode_raises_on_the_first_problem(tmp_path):
    root = make_run(tmp_path / "run", run_config=CONFIG, scores={"fuzz/stray.json": {}})
    with pytest.raises(StrictModeError, match=r"stray\.json"):
        discover(root, Problems(strict=True))


def test_sae_id_comes_from_the_config_or_the_first_run(tmp_path):
    first = make_run(tmp_path / "a", run_config=CONFIG)
    other = make_run(tmp_path / "b", run_config={**CONFIG, "sparse_model": "other/sae"})
    problems = Problems()
    runs = [discover(first, problems)[0], discover(other, problems)[0]]
    assert delphi.resolve_sae_id("configured/id", runs, problems) == "configured/id"
    sae_id = delphi.resolve_sae_id(None, runs, problems)
    assert sae_id == "google/gemma-scope-9b-pt-res/layer_30/width_16k/average_l0_120"
    assert any(problem.kind == "inconsistent" for problem in problems)


def test_real_example_run_copied_with_extra_hidden_files(tmp_path):
    copy = shutil.copytree(PYTHIA_RUN, tmp_path / "copy")
    (copy / "scores" / "fuzz" / ".DS_Store").write_bytes(b"\0")
    run, problems = discover(copy)
    assert [problem.kind for problem in problems] == ["foreign"]
    assert len(run.scores["fuzz"]) == 1


def test_latent_ids_beyond_what_the_outputs_hold_are_refused_without_a_declared_width(tmp_path):
    root = make_run(
        tmp_path / "run",
        run_config=CONFIG,
        explanations={"layers.30_latent4294967296.txt": '"too far"', "layers.30_latent7.txt": '"fine"'},
        scores={"fuzz/layers.30_latent4294967296.txt": [RECORD], "fuzz/layers.30_latent7.txt": [RECORD]},
    )
    run, problems = discover(root)
    assert [entry.latent for entry in run.explanations] == [7]
    assert [entry.latent for entry in run.scores["fuzz"]] == [7]
    assert len(problems.items) == 2
    assert all("latent 4294967296 is beyond the largest feature id" in item.message for item in problems.items)
