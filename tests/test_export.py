"""Exports: the Neuronpedia batch files (validated against a schema written from Neuronpedia's own
utilities) and the filtered feature table as CSV, JSON Lines and Parquet, from the CLI and the API."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import jsonschema
import orjson
import polars as pl
import pytest
from fastapi.testclient import TestClient
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from sae_atlas import Atlas
from sae_atlas.cli import app
from sae_atlas.exports import tables
from sae_atlas.serve.app import create_app

SCHEMA = orjson.loads((Path(__file__).parent / "fixtures" / "neuronpedia" / "export.schema.json").read_bytes())
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": SCHEMA["$defs"]})


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


@pytest.fixture(scope="module")
def atlas(small_run, embedder):
    return Atlas(small_run[0].output_dir, embedder=embedder)


@pytest.fixture(scope="module")
def neuronpedia(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("neuronpedia")
    result = export_neuronpedia(small_run, out)
    assert result.exit_code == 0, result.output
    return out / "pythia-70m" / "3-res-sm"


def export_neuronpedia(small_run, out: Path):
    output = small_run[0].output_dir
    return invoke("export", "neuronpedia", output, "--model-id", "pythia-70m", "--source", "3-res-sm", "-o", out)


def test_the_neuronpedia_export_validates_against_the_schema(neuronpedia):
    assert sorted(path.name for path in neuronpedia.iterdir()) == [
        "activations",
        "delete-before-reimport.sql",
        "explanations",
        "features",
        "model.jsonl",
        "sae-atlas-export.parquet",
        "source.jsonl",
        "sourceset.jsonl",
    ]
    source = orjson.loads((neuronpedia / "source.jsonl").read_bytes())
    validator("Source").validate(source)
    validator("Model").validate(orjson.loads((neuronpedia / "model.jsonl").read_bytes()))
    validator("SourceSet").validate(orjson.loads((neuronpedia / "sourceset.jsonl").read_bytes()))
    assert source["id"] == "3-res-sm" and source["setName"] == "res-sm" and source["modelId"] == "pythia-70m"
    counted = {}
    for folder, kind in (("features", "Feature"), ("activations", "Activation"), ("explanations", "Explanation")):
        files = sorted(neuronpedia.joinpath(folder).glob("batch-*.jsonl.gz"))
        assert files, folder
        rows = [row for path in files for row in lines(path)]
        check = validator(kind)
        for row in rows:
            check.validate(row)
        counted[folder] = rows
    # the schema is strict: a field Neuronpedia's dataclasses do not have is refused
    with pytest.raises(jsonschema.ValidationError):
        validator("Feature").validate({**counted["features"][0], "unknown": 1})
    assert all(row["layer"] == "3-res-sm" and row["modelId"] == "pythia-70m" for row in counted["activations"])


def test_the_neuronpedia_export_holds_what_the_atlas_holds(neuronpedia, atlas):
    features = {int(row["index"]): row for path in neuronpedia.glob("features/*.gz") for row in lines(path)}
    # every latent of the SAE (the decoder stage covers them all), in batches of 1024 by index
    assert set(features) == set(atlas.latents_with_neighbours().tolist())
    for path in neuronpedia.glob("features/*.gz"):
        batch = int(path.name.split("-")[1].split(".")[0])
        assert {int(row["index"]) // 1024 for row in lines(path)} == {batch}
    latent = int(atlas.sampled_latents()[0])
    neighbours = atlas.neighbours_of(latent)
    assert features[latent]["topkCosSimIndices"] == [row["feature_id"] for row in neighbours]
    assert features[latent]["topkCosSimValues"] == pytest.approx(
        [row["cosine_similarity"] for row in neighbours], abs=1e-6
    )
    examples = atlas.feature_examples(latent)
    activations = [
        row for path in neuronpedia.glob("activations/*.gz") for row in lines(path) if row["index"] == str(latent)
    ]
    assert len(activations) == len(examples)
    by_prompt = {int(row["dataIndex"]): row for row in activations}
    for example in examples:
        row = by_prompt[example["prompt_id"]]
        assert row["tokens"] == example["tokens"] and len(row["values"]) == len(row["tokens"])
        assert row["maxValue"] == pytest.approx(example["max_activation"], abs=1e-3)
        assert row["binMin"] <= row["maxValue"] <= row["binMax"] + 1e-3
    assert features[latent]["maxActApprox"] == pytest.approx(
        max(example["max_activation"] for example in examples), abs=5e-4
    )

    explanations = [row for path in neuronpedia.glob("explanations/*.gz") for row in lines(path)]
    expected = atlas.features(limit=None).filter(pl.col("explanation_ok"))
    assert len(explanations) == expected.height
    assert {row["explanationModelName"] for row in explanations} == {
        name.split("/")[-1] for name in expected["explainer"].unique()
    }
    assert len({row["id"] for row in explanations}) == len(explanations)  # one id per (latent, explainer)


def test_a_re_export_gives_the_same_record_ids(neuronpedia, small_run, tmp_path):
    again = export_neuronpedia(small_run, tmp_path)
    assert again.exit_code == 0, again.output
    ids = [row["id"] for row in lines(next(neuronpedia.glob("explanations/*.gz")))]
    name = next(neuronpedia.glob("explanations/*.gz")).name
    assert [row["id"] for row in lines(tmp_path / "pythia-70m" / "3-res-sm" / "explanations" / name)] == ids


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--source", "res-16k", "is not a Neuronpedia source id"),
        ("--model-id", "gemma 2", "is not a Neuronpedia model id"),
    ],
)
def test_the_neuronpedia_export_refuses_bad_ids(small_run, tmp_path, option, value, message):
    arguments = {"--model-id": "gemma-2-9b", "--source": "30-gemmascope-res-16k", option: value}
    result = invoke("export", "neuronpedia", small_run[0].output_dir, *sum(arguments.items(), ()), "-o", tmp_path)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


FILTERS = {"fuzz_min": "0.5", "detection_max": "0.95", "sort": "detection", "order": "desc"}


def expected_rows(atlas: Atlas, format: str = "parquet") -> pl.DataFrame:
    """The filtered rows, with the (empty) label columns every download carries; CSV holds a
    label's causes as JSON text."""
    rows = atlas.features(
        filters={"fuzz": (0.5, None), "detection": (None, 0.95)}, sort="detection", descending=True, limit=None
    )
    causes = pl.String if format == "csv" else pl.List(pl.String)
    return rows.with_columns(
        verdict=pl.lit(None, pl.String), causes=pl.lit(None, causes), label_stale=pl.lit(None, pl.Boolean)
    )


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_the_table_export_reads_back_as_the_filtered_rows(small_run, atlas, tmp_path, suffix):
    output = tmp_path / "exports" / f"features.{suffix}"  # a folder that does not exist yet
    result = invoke(
        "export", "table", small_run[0].output_dir, "--min", "fuzz=0.5", "--max", "detection=0.95",
        "--sort", "detection", "--order", "desc", "-o", output,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = expected_rows(atlas, suffix)
    assert 0 < expected.height < atlas.features(limit=None).height  # the filters select, and not everything
    assert f"wrote {expected.height:,} rows" in result.output
    assert_frame_equal(tables.read(output, expected.schema), expected)
    assert [path.name for path in output.parent.iterdir()] == [output.name]  # no temporary file left behind


def test_the_table_export_takes_explainer_scorer_and_text(small_run, atlas, tmp_path):
    explainer, scorer = atlas.explainers[0], atlas.scorers[-1]
    text = atlas.features(explainer=explainer, limit=1)["explanation_text"][0].split()[0]
    output = tmp_path / "one.parquet"
    result = invoke(
        "export", "table", small_run[0].output_dir, "--explainer", explainer, "--scorer", scorer, "--contains", text,
        "-o", output,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = atlas.features(explainer=explainer, scorer=scorer, contains=text, limit=None)
    written = pl.read_parquet(output)
    assert written.select(pl.col("verdict", "causes", "label_stale").is_null().all()).row(0) == (True,) * 3
    assert_frame_equal(written.drop("verdict", "causes", "label_stale"), expected)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-o", "features.xlsx"], "unknown table format 'xlsx'"),
        (["--min", "fuzz", "-o", "features.csv"], "expected METRIC=VALUE"),
        (["--min", "nonsense=1", "-o", "features.csv"], "nonsense_min"),
        (["--min", "fuzz=high", "-o", "features.csv"], "fuzz_min"),
        (["--sort", "nothing", "-o", "features.csv"], "sort"),
    ],
)
def test_the_table_export_refuses_bad_options_in_one_line(small_run, tmp_path, arguments, message):
    arguments = [str(tmp_path / value) if value.startswith("features.") else value for value in arguments]
    result = invoke("export", "table", small_run[0].output_dir, *arguments)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_text_formats_are_encoded_a_chunk_at_a_time(atlas):
    frame = atlas.features(limit=None)
    for chosen in ("csv", "jsonl"):
        chunks = list(tables.encode(frame, chosen, chunk_rows=50))
        assert len(chunks) == -(-frame.height // 50)
        whole = b"".join(chunks)
        assert whole == b"".join(tables.encode(frame, chosen, chunk_rows=frame.height))
    assert b"".join(tables.encode(frame.clear(), "csv")).decode().startswith("feature_id,")


@pytest.fixture(scope="module")
def client(atlas):
    return TestClient(create_app(atlas, prepare=False))


@pytest.mark.parametrize("chosen", ["csv", "jsonl", "parquet"])
def test_the_api_downloads_every_matching_row(client, atlas, chosen):
    response = client.get("/api/features", params={**FILTERS, "format": chosen})
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == tables.RENDERERS[chosen].media_type.split(";")[0]
    assert response.headers["content-disposition"] == f'attachment; filename="features.{chosen}"'
    expected = expected_rows(atlas, chosen)
    assert expected.height > 100  # more than one JSON page: a download is not paged
    body = io.BytesIO(response.content)
    read = {
        "csv": lambda: pl.read_csv(body, schema=expected.schema),
        "jsonl": lambda: pl.read_ndjson(body, schema=expected.schema),
        "parquet": lambda: pl.read_parquet(body),
    }[chosen]()
    assert_frame_equal(read, expected)
    limited = client.get("/api/features", params={**FILTERS, "format": chosen, "limit": 5})
    assert limited.status_code == 200 and limited.content != response.content  # an explicit limit is kept


def test_the_index_page_links_a_download_with_its_filters(client):
    page = client.get("/", params={"fuzz_min": "0.5", "sort": "detection", "order": "desc"}).text
    for chosen in ("csv", "jsonl", "parquet"):
        link = next(part for part in page.split('href="')[1:] if f"format={chosen}" in part.split('"')[0])
        target = link.split('"')[0].replace("&amp;", "&")
        assert target.startswith("/api/features?") and "fuzz_min=0.5" in target and "sort=detection" in target
        assert "limit=" not in target and "offset=" not in target
        assert client.get(target).status_code == 200
    assert client.get("/api/features", params={"format": "xml"}).status_code == 422


# Hardening round 3: nothing a command writes may destroy an output


@pytest.mark.parametrize(
    ("command", "target"),
    [
        (["export", "table"], "features.parquet"),
        (["export", "table"], "stages/scores.parquet"),
        (["export", "table"], "activation_examples.parquet"),
        (["report", "--format", "md"], "features.parquet.metadata.json"),
        (["report", "--format", "md"], "features.parquet"),
        (["report"], "run_report.json"),
        (["report"], ".cache/report.html"),
    ],
)
def test_no_command_writes_over_a_file_of_an_output_directory(small_run, command, target):
    output = small_run[0].output_dir
    protected = output / target
    before = protected.read_bytes() if protected.exists() else None
    result = invoke(*command, output, "-o", protected)
    assert result.exit_code == 1, result.output
    assert "refusing to write over" in result.output and len(result.output.strip().splitlines()) == 1
    assert (protected.read_bytes() if protected.exists() else None) == before


def test_a_file_of_ones_own_beside_the_outputs_may_be_written(small_run, tmp_path):
    output = small_run[0].output_dir
    mine = output / "my-report.md"
    try:
        result = invoke("report", output, "-o", mine, "--resamples", "100")
        assert result.exit_code == 0, result.output
        assert mine.read_text().startswith("# Explainers and scorers compared")
    finally:
        mine.unlink(missing_ok=True)


def test_a_neuronpedia_export_never_leaves_its_directory(small_run, tmp_path):
    out = tmp_path / "out"
    for model in ("..", ".", "../x"):
        result = invoke(
            "export", "neuronpedia", small_run[0].output_dir, "--model-id", model, "--source", "3-x", "-o", out
        )
        assert result.exit_code == 1 and "is not a Neuronpedia model id" in result.output
    assert not any(tmp_path.iterdir())


def test_a_re_export_into_an_earlier_export_leaves_no_stale_batches(neuronpedia, small_run, tmp_path):
    root = tmp_path / "pythia-70m" / "3-res-sm"
    stale = [root / kind / "batch-977.jsonl.gz" for kind in ("features", "activations", "explanations")]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(b'{"stale": true}\n'))
    result = export_neuronpedia(small_run, tmp_path)
    assert result.exit_code == 0, result.output
    assert not any(path.exists() for path in stale)
    assert sorted(path.name for path in (root / "features").iterdir()) == sorted(
        path.name for path in (neuronpedia / "features").iterdir()
    )


FORMULAS = ["=1+1", "+SUM(A1)", "-2+3", "@cmd", "\tTAB", "\rCR", "'quoted", "plain text"]


def test_csv_cells_a_spreadsheet_would_evaluate_are_escaped_and_read_back_exactly(tmp_path):
    """OWASP's rule: a leading apostrophe on every text cell starting with = + - @ TAB or CR (and
    on one already starting with an apostrophe, so the escape can be undone). JSONL and Parquet hold
    the texts as they are."""
    frame = pl.DataFrame({"feature_id": list(range(len(FORMULAS))), "explanation_text": FORMULAS, "x": [-1.5] * 8})
    tables.write(frame, tmp_path / "t.csv")
    cells = pl.read_csv(tmp_path / "t.csv")["explanation_text"].to_list()
    assert cells == ["'=1+1", "'+SUM(A1)", "'-2+3", "'@cmd", "'\tTAB", "'\rCR", "''quoted", "plain text"]
    assert pl.read_csv(tmp_path / "t.csv")["x"].to_list() == [-1.5] * 8  # numbers are not text
    assert_frame_equal(tables.read(tmp_path / "t.csv", frame.schema), frame)
    for suffix in ("jsonl", "parquet"):
        tables.write(frame, tmp_path / f"t.{suffix}")
        assert tables.read(tmp_path / f"t.{suffix}", frame.schema)["explanation_text"].to_list() == FORMULAS


def test_the_api_csv_download_is_escaped_too(client):
    body = client.get("/api/features", params={"format": "csv", "limit": 5}).text
    assert body.splitlines()[0].startswith("feature_id")
    for line in body.splitlines()[1:]:
        assert not any(cell.startswith(("=", "+", "@")) for cell in line.split(","))


def test_the_report_suffix_decides_the_format_or_is_refused(small_run, tmp_path):
    result = invoke("report", small_run[0].output_dir, "-o", tmp_path / "x.pdf")
    assert result.exit_code == 1 and "cannot tell the report format" in result.output
    assert not (tmp_path / "x.pdf").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--seed", str(2**64)), ("--seed", "-1"), ("--confidence", "1.0"), ("--resamples", "5")]
)
def test_compare_settings_have_the_apis_ranges_and_message(small_run, option, value):
    result = invoke("compare", small_run[0].output_dir, option, value)
    assert result.exit_code == 1, result.output
    assert "unexpected" not in result.output and len(result.output.strip().splitlines()) == 1
    client = TestClient(create_app(Atlas(small_run[0].output_dir), prepare=False))
    answer = client.get("/api/compare", params={option.strip("-"): value})
    assert answer.status_code == 422 and answer.json()["detail"].split(":")[0] in result.output
