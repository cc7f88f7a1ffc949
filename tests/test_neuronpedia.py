"""Neuronpedia, round trip: an export its importer (tests/neuronpedia_importer.py, a model of its code
and tables) loads completely, honest re-exports, and its explanations read back as an explainer."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest
from typer.testing import CliRunner

from sae_atlas import layout
from sae_atlas.cli import app
from sae_atlas.config import SourceConfig, load_config
from sae_atlas.exports.neuronpedia import DEFAULT_CREATOR_ID, ExportError, Target, export, resolve
from sae_atlas.pipeline import Pipeline
from sae_atlas.problems import Problems
from sae_atlas.query.atlas import Atlas
from sae_atlas.sources import neuronpedia
from tests.neuronpedia_importer import Database, ImportFailed, import_source

MODEL, SOURCE = "pythia-70m", "3-res-sm"


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


@pytest.fixture(scope="module")
def atlas(small_run, embedder):
    return Atlas(small_run[0].output_dir, embedder=embedder)


def registered(atlas: Atlas) -> dict[str, str]:
    """Every explainer mapped to a lowercase API-style id, as Neuronpedia registers them."""
    return {explainer: explainer.split("/")[-1].lower() for explainer in atlas.explainers}


def database(names) -> Database:
    return Database(
        users={DEFAULT_CREATOR_ID}, explanation_models=set(names), explanation_types={"eleuther_acts_top20"}
    )


def exported(atlas: Atlas, out: Path, **options) -> tuple[Path, dict]:
    result = export(atlas, out, Target(model_id=MODEL, source=SOURCE, **options))
    return out / MODEL / SOURCE, result


def test_an_export_with_its_names_mapped_imports_completely_field_for_field(atlas, tmp_path):
    names = registered(atlas)
    root, result = exported(atlas, tmp_path, explainer_names=names)
    assert result["unmapped"] == []
    db = database(names.values())
    import_source(db, root)
    assert len(db.rows["Model"]) == len(db.rows["SourceSet"]) == len(db.rows["Source"]) == 1
    for table, folder in (("Neuron", "features"), ("Activation", "activations"), ("Explanation", "explanations")):
        written = [row for path in sorted((root / folder).glob("*.gz")) for row in lines(path)]
        assert len(db.rows[table]) == len(written) == result[folder] > 0, table
        for row in written:
            stored = db.rows[table][db.key(table, row)]
            assert {name: row[name] for name in stored} == stored, table
    model = next(iter(db.rows["Model"].values()))
    assert (model["layers"], model["neuronsPerLayer"], model["owner"]) == (6, 2048, "EleutherAI")
    assert {row["explanationModelName"] for row in db.rows["Explanation"].values()} == set(names.values())


def test_unmapped_explainer_names_are_listed_and_would_fail_the_insert(atlas, small_run, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "export",
            "neuronpedia",
            str(small_run[0].output_dir),
            "--model-id",
            MODEL,
            "--source",
            SOURCE,
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    short = sorted({explainer.split("/")[-1] for explainer in atlas.explainers})
    assert "register these explanation model names" in result.output
    assert all(name in result.output for name in short)
    db = database(registered(atlas).values())
    with pytest.raises(ImportFailed, match="explanationModelName"):
        import_source(db, tmp_path / MODEL / SOURCE)
    # the old layout (no model.jsonl, no sourceset.jsonl) aborts before a row is stored
    (tmp_path / MODEL / SOURCE / "model.jsonl").unlink()
    fresh = database(short)
    with pytest.raises(ImportFailed, match=r"model\.jsonl"):
        import_source(fresh, tmp_path / MODEL / SOURCE)
    assert all(not rows for rows in fresh.rows.values())


def test_a_mapping_of_an_unknown_explainer_and_an_unknown_model_are_refused(atlas, tmp_path):
    with pytest.raises(ExportError, match="explained nothing here"):
        exported(atlas, tmp_path, explainer_names={"nobody": "x"})
    with pytest.raises(ExportError, match="--layers, --neurons-per-layer"):
        resolve(Target(model_id="my-model", source="3-x"), sae_id=None)
    resolved = resolve(Target(model_id="my-model", source="3-x"), sae_id="google/gemma-scope-9b-pt-res/layer_30")
    assert (resolved.layers, resolved.neurons_per_layer, resolved.dimension, resolved.owner) == (
        42,
        14336,
        3584,
        "Google",
    )


def test_re_exports_against_on_conflict_do_nothing(atlas, tmp_path, monkeypatch):
    names = registered(atlas)
    root, _ = exported(atlas, tmp_path, explainer_names=names)
    db = database(names.values())
    import_source(db, root)
    before = {table: dict(rows) for table, rows in db.rows.items()}
    # unchanged: the same ids, nothing reported, nothing duplicated
    _, again = exported(atlas, tmp_path, explainer_names=names)
    assert again["changed"] == {"features": 0, "activations": 0, "explanations": 0}
    import_source(db, root)
    assert {table: set(rows) for table, rows in db.rows.items()} == {table: set(rows) for table, rows in before.items()}

    # one explanation rewritten: reported; the importer would keep the old text beside the new one
    original = Atlas.features
    frame = original(atlas, limit=None)
    latent, explainer = frame.filter(pl.col("explanation_ok")).select("feature_id", "explainer").row(0)
    changed = pl.when((pl.col("feature_id") == latent) & (pl.col("explainer") == explainer))
    monkeypatch.setattr(
        Atlas,
        "features",
        lambda self, **query: original(self, **query).with_columns(
            explanation_text=changed.then(pl.lit("a rewritten explanation")).otherwise(pl.col("explanation_text"))
        ),
    )
    _, third = exported(atlas, tmp_path, explainer_names=names)
    assert third["changed"] == {"features": 0, "activations": 0, "explanations": 1}
    import_source(db, root)
    texts = [
        row["description"]
        for row in db.rows["Explanation"].values()
        if row["index"] == str(latent) and row["explanationModelName"] == names[explainer]
    ]
    assert len(texts) == 2 and "a rewritten explanation" in texts
    # what the export says to do: delete the source's rows, then import
    sql = (root / "delete-before-reimport.sql").read_text()
    for table in ("Explanation", "Activation", "Neuron"):
        assert f'DELETE FROM "{table}" WHERE "modelId" = \'{MODEL}\' AND "layer" = \'{SOURCE}\';' in sql
    db.delete_source(MODEL, SOURCE)
    import_source(db, root)
    texts = [
        row["description"]
        for row in db.rows["Explanation"].values()
        if row["index"] == str(latent) and row["explanationModelName"] == names[explainer]
    ]
    assert texts == ["a rewritten explanation"]


def test_every_latent_gets_its_firing_frequency_and_neuronpedias_bins(atlas, small_run, tmp_path):
    root, _ = exported(atlas, tmp_path, explainer_names=registered(atlas))
    features = {int(row["index"]): row for path in (root / "features").glob("*.gz") for row in lines(path)}
    firing = pl.read_parquet(small_run[0].output_dir / layout.FIRING).unique(
        "feature_id", keep="first", maintain_order=True
    )
    explained = set(atlas.features(limit=None)["feature_id"].to_list())
    unexplained = firing.filter(~pl.col("feature_id").is_in(list(explained)) & (pl.col("firing_frequency") > 0))
    assert unexplained.height > 0
    for latent, frequency in unexplained.select("feature_id", "firing_frequency").head(20).iter_rows():
        assert features[latent]["frac_nonzero"] == pytest.approx(frequency)

    # the bins of one latent, by hand from every prompt's peak activation (stage 4's rule, 4 bins)
    latent = int(atlas.sampled_latents()[0])
    peaks = (
        pl.read_parquet(small_run[0].output_dir / layout.ACTIVATION_EXAMPLES, columns=["feature_id", "max_activation"])
        .filter(pl.col("feature_id") == latent)["max_activation"]
        .cast(pl.Float64)
        .to_numpy()
    )
    bounds = np.quantile(peaks, [0.25, 0.5, 0.75])
    edges = [peaks.min(), *bounds, peaks.max()]
    share = np.bincount((peaks[:, None] > bounds[None, :]).sum(axis=1), minlength=4) / len(peaks)
    rows = [row for path in (root / "activations").glob("*.gz") for row in lines(path) if row["index"] == str(latent)]
    by_bin = {example["prompt_id"]: example["quantile"] for example in atlas.feature_examples(latent)}
    for row in rows:
        position = by_bin[int(row["dataIndex"])]
        if position == 3:  # the top bin: Neuronpedia's top group
            assert (row["binMin"], row["binContains"]) == (-1.0, -1.0)
            assert row["binMax"] == pytest.approx(features[latent]["maxActApprox"], abs=1e-3)
        else:
            assert row["binMin"] == pytest.approx(edges[position], abs=5e-4)
            assert row["binMax"] == pytest.approx(edges[position + 1], abs=5e-4)
            assert row["binContains"] == pytest.approx(share[position])


def test_the_export_reads_back_as_an_explainer_source(atlas, small_run, tmp_path, embedder):
    names = registered(atlas)
    root, _ = exported(atlas, tmp_path / "export", explainer_names=names)
    explainer = atlas.explainers[0]
    config = load_config(small_run[0].output_dir.parent / "sae-atlas.toml")
    config.sources = [SourceConfig(path=root, name="neuronpedia", explainer=names[explainer], kind="neuronpedia")]
    config.output_dir = tmp_path / "out"
    Pipeline(config, embedder=embedder).run(only=["explanation_embeddings"])
    read = pl.read_parquet(
        config.output_dir / layout.EXPLANATION_EMBEDDINGS, columns=["feature_id", "explanation_text"]
    )
    original = (
        atlas.features(limit=None)
        .filter((pl.col("explainer") == explainer) & pl.col("explanation_ok"))
        .select("feature_id", "explanation_text")
    )
    assert read.sort("feature_id").rows() == original.sort("feature_id").rows()


def test_neuronpedia_rows_are_checked_one_line_each(tmp_path):
    root = tmp_path / "3-res-x"
    rows = [
        {"index": "1", "layer": "3-res-x", "description": "one", "explanationModelName": "m"},
        {"index": "2", "layer": "3-res-x", "description": "two", "explanationModelName": "other"},
        {"index": "x", "layer": "3-res-x", "description": "bad", "explanationModelName": "m"},
        {"index": "70000", "layer": "3-res-x", "description": "far", "explanationModelName": "m"},
        {"index": "1", "layer": "3-res-x", "description": "again", "explanationModelName": "m"},
        {"index": "3", "layer": "4-res-x", "description": "elsewhere", "explanationModelName": "m"},
    ]
    body = (
        b"\n".join(orjson.dumps(row) for row in rows[:2])
        + b"\n{not json\n"
        + b"\n".join(orjson.dumps(row) for row in rows[2:])
    )
    (root / "explanations").mkdir(parents=True)
    (root / "explanations" / "batch-0.jsonl.gz").write_bytes(gzip.compress(body))
    problems = Problems()
    run = neuronpedia.describe_run(SourceConfig(path=root, explainer="m", kind="neuronpedia"), problems)
    neuronpedia.list_run_files(run, problems, width=65536)
    batch = root / "explanations" / "batch-0.jsonl.gz"
    assert [str(problem) for problem in problems] == [
        f"{batch}:3: not a JSON line (unexpected character, expected a string key: line 1 column 2 (char 1))",
        f"{batch}:4: index 'x' is not a latent id",
        f"{batch}:5 (latent 70000): latent 70000 is outside the SAE (65,536 latents); skipped",
    ]
    assert run.texts == {1: "one"}
    assert any("other models" in note for note in run.notes) and any("first kept" in note for note in run.notes)
    with pytest.raises(ValueError, match="names the explanation model"):
        SourceConfig(path=root, kind="neuronpedia")
