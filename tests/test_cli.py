"""The command line, driven through Typer's runner as a user would type it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sae_atlas.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.mark.parametrize("command", ["synth", "run", "validate", "demo", "show", "search", "sql", "serve"])
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.slow
def test_synth_run_validate(tmp_path):
    corpus = tmp_path / "corpus"
    result = invoke(
        "synth",
        corpus,
        "--features",
        64,
        "--explained",
        8,
        "--explainers",
        2,
        "--scorers",
        1,
        "--prompts",
        40,
        "--ctx",
        32,
        "--d-model",
        16,
        "--seed",
        1,
    )
    assert result.exit_code == 0, result.output
    assert "sae-atlas run" in result.output
    result = invoke("run", corpus / "sae-atlas.toml")
    assert result.exit_code == 0, result.output
    assert "features" in result.output and "ran" in result.output
    result = invoke("run", corpus / "sae-atlas.toml")
    assert result.exit_code == 0 and "unchanged" in result.output
    result = invoke("validate", corpus / "master")
    assert result.exit_code == 0 and "is valid" in result.output

    (next((corpus / "raw").glob("*/scores/fuzz/*.txt"))).write_text("[{")
    result = invoke("run", corpus / "sae-atlas.toml", "--strict")
    assert result.exit_code == 1
    assert "error" in result.output and "(--strict)" in result.output and "truncated or invalid JSON" in result.output
    result = invoke("run", corpus / "sae-atlas.toml", "--only", "scores")
    assert result.exit_code == 0 and "1 input problem(s)" in result.output


def test_failures_are_one_line_with_exit_code_1(tmp_path):
    result = invoke("run", tmp_path / "missing.toml")
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "no such config file" in result.output
    result = invoke("validate", tmp_path)
    assert result.exit_code == 1 and "features.parquet: missing" in result.output
    result = invoke("synth", tmp_path / "x", "--explained", 0)
    assert result.exit_code == 1 and "--explained" in result.output


@pytest.mark.slow
def test_demo_prints_the_summary(tmp_path):
    result = invoke("demo", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    for title in (
        "rows per file",
        "mean score per explainer × scorer × method",
        "mean cross-explainer semantic similarity",
    ):
        assert title in result.output
    assert (tmp_path / "demo" / "master" / "features.parquet").exists()


def test_lookups_show_search_sql(small_run):
    outputs = small_run[0].output_dir
    import orjson
    import polars as pl

    feature_id = int(pl.read_parquet(outputs / "features.parquet")["feature_id"][0])
    result = invoke("show", outputs, feature_id)
    assert result.exit_code == 0, result.output
    assert "explanations" in result.output and "decoder neighbours" in result.output
    record = orjson.loads(invoke("show", outputs, feature_id, "--json").output)
    assert record["feature_id"] == feature_id and record["activation_examples"]
    result = invoke("show", outputs, 10**6)
    assert result.exit_code == 1 and "is not in" in result.output

    hits = orjson.loads(invoke("search", outputs, "names of birds", "--k", 3, "--json").output)
    assert len(hits) == 3 and {"feature_id", "explainer", "explanation_text", "similarity"} <= set(hits[0])
    assert "closest explanations" in invoke("search", outputs, "birds").output

    rows = orjson.loads(invoke("sql", outputs, "SELECT count(*) AS n FROM features", "--json").output)
    assert rows == [{"n": pl.read_parquet(outputs / "features.parquet").height}]
    result = invoke("sql", outputs, "DROP VIEW features")
    assert result.exit_code == 1 and "only a single SELECT" in result.output


@pytest.mark.parametrize("command", ["compare", "report"])
def test_the_comparison_commands_have_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_compare_and_report(small_run, tmp_path):
    import orjson

    output = small_run[0].output_dir
    result = invoke("compare", output, "--metric", "detection", "--resamples", 200, "--json")
    assert result.exit_code == 0, result.output
    data = orjson.loads(result.stdout)
    assert data["settings"]["metrics"] == ["detection"] and data["settings"]["resamples"] == 200
    assert {row["metric"] for row in data["summary"]} == {"detection"} and data["paired"]
    # the headline covers every headline metric whatever is ticked: its Holm family is fixed
    assert {"fuzz", "detection"} <= set(data["headline"]["metrics"]) and data["headline"]["sentences"]
    table = invoke("compare", output, "--metric", "fuzz", "--resamples", 200, "--exclude-identical")
    assert table.exit_code == 0, table.output
    assert " is ahead of " in table.output or " cannot be told apart on " in table.output
    assert "headline" in table.output and "exploratory" in table.output
    wrong = invoke("compare", output, "--latents", "some")
    assert wrong.exit_code == 1 and "latents" in wrong.output

    html = tmp_path / "report.html"
    assert invoke("report", output, "-o", html, "--resamples", 200).exit_code == 0
    page = html.read_text()
    # self-contained: the stylesheet inlined, plots as inline SVG, no script, nothing to fetch
    assert "<style>" in page and "<svg" in page and "<script" not in page
    assert "http://" not in page and "https://" not in page and "/static/" not in page
    assert "Provenance" in page and "Score distributions" in page
    # the answer comes first, before the comparability checks and the per-metric sections
    assert page.index("The answer") < page.index("Comparability of the runs") < page.index('id="metric-fuzz"')
    markdown = tmp_path / "report.md"
    assert invoke("report", output, "-o", markdown, "--resamples", 200).exit_code == 0
    text = markdown.read_text()
    assert text.startswith("# Explainers and scorers compared") and "| explainer | scorer |" in text
    assert text.index("## The answer") < text.index("## Comparability") and "| ahead − behind |" in text

    refused = invoke("compare", output, "--metric", "nonsense")
    assert refused.exit_code == 1 and "cannot compare 'nonsense'" in refused.output
    assert invoke("report", output, "-o", tmp_path / "x.pdf", "--format", "pdf").exit_code == 1


def test_synth_refuses_a_bad_explainer_quality(tmp_path):
    result = invoke("synth", tmp_path / "c", "--explainers", 2, "--explainer-quality", "0.9")
    assert result.exit_code == 1 and "gives 1 hit rates for 2 explainers" in result.output
    result = invoke("synth", tmp_path / "c", "--explainers", 2, "--explainer-quality", "high,low")
    assert result.exit_code == 1 and "is not a list of numbers" in result.output
