"""The runner: sidecars, skipping unchanged stages, --force/--only/--strict, missing and bad inputs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_atlas.config import load_config
from sae_atlas.layout import read_sidecar, write_parquet
from sae_atlas.pipeline import OUTPUTS, STAGES, Pipeline, PipelineError
from sae_atlas.problems import StrictModeError
from sae_atlas.schema import MASTER_SCHEMAS, STAGE_SCHEMAS
from sae_atlas.synth import SynthOptions, synthesize
from sae_atlas.validate import validate

SMALLER = SynthOptions(features=96, explained=16, explainers=2, scorers=2, prompts=80, ctx=40, d_model=32, seed=5)


@pytest.fixture
def corpus(tmp_path):
    return synthesize(tmp_path / "corpus", SMALLER)


def statuses(report) -> dict[str, str]:
    return {outcome.name: outcome.status for outcome in report.outcomes}


def test_full_run_writes_valid_outputs_with_sidecars(small_run):
    config, report = small_run
    assert statuses(report) == dict.fromkeys(STAGES, "ran")
    result = validate(config.output_dir)
    assert result.ok, result.violations
    assert set(result.checked) == set(MASTER_SCHEMAS) | set(STAGE_SCHEMAS)
    for stage in STAGES:
        path = config.output_dir / OUTPUTS[stage]
        sidecar = read_sidecar(path)
        for key in (
            "created_at",
            "sae_atlas_version",
            "sae_id",
            "rows",
            "schema",
            "config",
            "fingerprint",
            "inputs",
            "timing",
            "statistics",
            "problems",
        ):
            assert key in sidecar, (stage, key)
        assert sidecar["rows"] == pq.ParquetFile(path).metadata.num_rows
        assert list(sidecar["schema"]) == pl.read_parquet_schema(path).names()
        assert sidecar["sae_id"] == "google/gemma-scope-9b-pt-res/layer_30/width_512/average_l0_120"
    features = read_sidecar(config.output_dir / "features.parquet")
    assert features["schema"]["scores"].startswith("List(Struct(")
    assert (config.output_dir / "run_report.json").exists()


def test_sae_id_is_identical_everywhere(small_run):
    config, _ = small_run
    for name in MASTER_SCHEMAS:
        path = config.output_dir / name
        if path.exists():
            ids = pl.scan_parquet(path).select(pl.col("sae_id").cast(pl.String).unique()).collect()
            assert ids.to_series().to_list() == ["google/gemma-scope-9b-pt-res/layer_30/width_512/average_l0_120"]


@pytest.mark.slow
def test_unchanged_stages_are_skipped_and_changes_rerun_what_depends_on_them(corpus, embedder):
    config = load_config(corpus.config)
    assert set(statuses(Pipeline(config, embedder=embedder).run()).values()) == {"ran"}
    before = {stage: (config.output_dir / OUTPUTS[stage]).stat().st_mtime_ns for stage in STAGES}
    assert set(statuses(Pipeline(config, embedder=embedder).run()).values()) == {"unchanged"}
    assert before == {stage: (config.output_dir / OUTPUTS[stage]).stat().st_mtime_ns for stage in STAGES}

    explanation = next((corpus.root / "raw" / "llama_e-llama_s" / "explanations").glob("*.txt"))
    explanation.write_bytes(orjson.dumps("Names of calendar months"))
    assert statuses(Pipeline(config, embedder=embedder).run()) == {
        "activation_examples": "unchanged",
        "decoder_similarity": "unchanged",
        "scores": "unchanged",
        "explanation_embeddings": "ran",
        "features": "ran",
        "activation_embeddings": "unchanged",
        "activation_similarity": "unchanged",
        "activation_patterns": "unchanged",
        "claims": "ran",
        "diagnosis": "ran",
        "latent_map": "unchanged",  # the decoder's alone: a new explanation never redoes the map
        "families": "ran",  # named by explanations
        "family_pairs": "ran",
    }

    assert set(statuses(Pipeline(config, force=True, embedder=embedder).run()).values()) == {"ran"}


@pytest.mark.slow
def test_changing_five_explanations_embeds_exactly_five_texts(corpus, fresh_embedder):
    config = load_config(corpus.config)
    Pipeline(config, embedder=fresh_embedder).run()
    explainer_runs = sorted((corpus.root / "raw").glob("llama_e-*"))
    files = sorted((explainer_runs[0] / "explanations").glob("*.txt"))[:5]
    for index, path in enumerate(files):
        for run in explainer_runs:  # an explainer's text is the same in every run it explains
            (run / "explanations" / path.name).write_bytes(orjson.dumps(f"Edited explanation number {index}"))

    def encoded(report) -> int:
        outcome = next(outcome for outcome in report.outcomes if outcome.name == "explanation_embeddings")
        return outcome.statistics.get("texts_encoded") if outcome.status == "ran" else 0

    assert encoded(Pipeline(config, embedder=fresh_embedder).run()) == 5
    unchanged = Pipeline(config, embedder=fresh_embedder).run()
    assert set(statuses(unchanged).values()) == {"unchanged"}
    forced = Pipeline(config, force=True, embedder=fresh_embedder).run()
    assert encoded(forced) == 0
    activation = next(outcome for outcome in forced.outcomes if outcome.name == "activation_embeddings")
    assert activation.statistics["texts_encoded"] == 0
    assert activation.statistics["texts_from_cache"] == activation.statistics["distinct_texts"]


def test_only_runs_the_named_stages_and_needs_their_inputs(corpus, embedder):
    config = load_config(corpus.config)
    report = Pipeline(config, embedder=embedder).run(only=["features"])
    [outcome] = report.outcomes
    assert outcome.status == "failed" and "scores.parquet" in outcome.reason
    report = Pipeline(config, embedder=embedder).run(only=["scores", "explanation_embeddings", "features"])
    assert statuses(report) == {"scores": "ran", "explanation_embeddings": "ran", "features": "ran"}
    assert not (config.output_dir / "activation_examples.parquet").exists()
    with pytest.raises(PipelineError, match="unknown stage"):
        Pipeline(config).run(only=["nonsense"])


def test_missing_optional_inputs_skip_their_stages(corpus, embedder):
    text = corpus.config.read_text()
    trimmed = text[: text.index("[activations]")] + text[text.index("[embedding]") :]
    corpus.config.write_text(trimmed)
    config = load_config(corpus.config)
    report = Pipeline(config, embedder=embedder).run()
    outcomes = {outcome.name: outcome for outcome in report.outcomes}
    assert outcomes["activation_examples"].status == "skipped"
    assert outcomes["activation_examples"].reason == "no [activations] in the config"
    assert outcomes["decoder_similarity"].reason == "no [decoder] in the config"
    features = pl.read_parquet(config.output_dir / "features.parquet")
    assert features["decoder_similarity"].list.len().sum() == 0
    assert validate(config.output_dir).ok


def break_inputs(corpus) -> None:
    raw = corpus.root / "raw"
    fuzz = sorted((raw / "llama_e-llama_s" / "scores" / "fuzz").glob("*.txt"))
    fuzz[0].write_bytes(fuzz[0].read_bytes()[:50])  # truncated by a killed run
    (raw / "llama_e-llama_s" / "scores" / "fuzz" / "experiment_config.json").write_text("{}")
    explanation = sorted((raw / "gwen_e-gwen_s" / "explanations").glob("*.txt"))[0]
    explanation.write_bytes(b"[1, 2]")
    with (raw / "activation_examples" / "activations.jsonl").open("ab") as handle:
        handle.write(b'{"index": "3", "dataSetPromptId": 99999, "sparseValues": [[1, 2.0]]}\n')
        handle.write(b'{"index": "3", "dataSetPromptId": -4, "sparseValues": [[1, 2.0]]}\n')
    decoder = next((raw / "sae").rglob("params.npz"))
    np.savez(decoder, W_dec=np.zeros((95, 32), np.float32), threshold=np.zeros(96, np.float32))


def test_bad_inputs_are_counted_reported_and_lose_nothing_else(corpus, embedder):
    config = load_config(corpus.config)
    Pipeline(config, embedder=embedder).run()
    clean_features = pl.read_parquet(config.output_dir / "features.parquet")
    clean_examples = pq.ParquetFile(config.output_dir / "activation_examples.parquet").metadata.num_rows
    break_inputs(corpus)

    report = Pipeline(config, embedder=embedder).run()
    outcomes = {outcome.name: outcome for outcome in report.outcomes}
    problems = {stage: [str(problem) for problem in outcome.problems] for stage, outcome in outcomes.items()}
    assert any("activations.jsonl:" in line and "out of range" in line for line in problems["activation_examples"])
    assert any("negative prompt id -4" in line for line in problems["activation_examples"])
    assert any("params.npz: W_dec has shape [95, 32]" in line for line in problems["decoder_similarity"])
    assert outcomes["decoder_similarity"].status == "skipped"
    assert any("truncated or invalid JSON" in line for line in problems["scores"])
    assert any("experiment_config.json" in line for line in problems["scores"])
    assert any("expected a JSON string, got list" in line for line in problems["explanation_embeddings"])
    assert all("\n" not in line for lines in problems.values() for line in lines)

    # counted in the run report and in the sidecars
    run_report = orjson.loads((config.output_dir / "run_report.json").read_bytes())
    assert run_report["problems"] == report.problem_count >= 6
    by_stage = {stage["stage"]: stage for stage in run_report["stages"]}
    assert by_stage["scores"]["problems"]["count"] == 2
    assert read_sidecar(config.output_dir / "stages" / "scores.parquet")["problems"]["count"] == 2
    assert read_sidecar(config.output_dir / "activation_examples.parquet")["problems"]["count"] == 2

    # nothing else lost: every other record and row is still there
    assert pq.ParquetFile(config.output_dir / "activation_examples.parquet").metadata.num_rows == clean_examples
    # the broken explanation file is one of two runs of its explainer: the other still gives the text
    features = pl.read_parquet(config.output_dir / "features.parquet")
    assert features.select("feature_id", "llm_explainer", "explanation_text").equals(
        clean_features.select("feature_id", "llm_explainer", "explanation_text")
    )
    assert validate(config.output_dir).ok


def test_strict_mode_makes_bad_input_fatal(corpus, embedder):
    break_inputs(corpus)
    with pytest.raises(StrictModeError):
        Pipeline(load_config(corpus.config), strict=True, embedder=embedder).run()


def test_a_crash_while_writing_leaves_no_half_file(tmp_path):
    path = tmp_path / "table.parquet"
    write_parquet(path, pa.table({"x": [1, 2, 3]}), compression="zstd")
    original = path.read_bytes()
    schema = pa.schema([("x", pa.int64())])

    def batches():
        yield pa.record_batch([pa.array([7, 8])], schema=schema)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_parquet(path, batches(), compression="zstd", schema=schema)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["table.parquet"]


def test_outputs_can_be_copied_elsewhere_and_stay_valid(small_run, tmp_path):
    config, _ = small_run
    copy = shutil.copytree(config.output_dir, tmp_path / "copy", ignore=shutil.ignore_patterns(".cache"))
    assert validate(copy).ok


def test_files_read_by_worker_processes_give_the_same_outputs_and_problems(corpus, embedder, monkeypatch, tmp_path):
    from sae_atlas.engine import LocalEngine
    from sae_atlas.stages import explanation_embeddings, scores

    # Small chunks, so that the 2-worker run really spreads many tasks over two processes.
    monkeypatch.setattr(scores, "FILES_PER_TASK", 7)
    monkeypatch.setattr(explanation_embeddings, "FILES_PER_TASK", 5)
    broken = next((corpus.root / "raw").rglob("scores/fuzz/*.txt"))
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated score file, reported by a worker
    outputs = {}
    for workers in (1, 2):
        config = load_config(corpus.config)
        config.output_dir = tmp_path / f"workers-{workers}"
        engine = LocalEngine(workers)
        report = Pipeline(config, embedder=embedder, engine=engine).run(only=["scores", "explanation_embeddings"])
        assert engine._pool is None  # closed with the run
        problems = sorted(str(problem) for outcome in report.outcomes for problem in outcome.problems)
        outputs[workers] = (
            pl.read_parquet(config.output_dir / "stages/scores.parquet"),
            pl.read_parquet(config.output_dir / "explanation_embeddings.parquet"),
            problems,
        )
    (scores_one, explanations_one, problems_one), (scores_two, explanations_two, problems_two) = outputs.values()
    assert scores_one.equals(scores_two) and explanations_one.equals(explanations_two)
    assert problems_one == problems_two and any(str(broken) in problem for problem in problems_two)

    strict = load_config(corpus.config)
    strict.output_dir = tmp_path / "strict"
    with pytest.raises(StrictModeError, match="truncated or invalid JSON"):
        Pipeline(strict, strict=True, embedder=embedder, engine=LocalEngine(2)).run(only=["scores"])
