"""Incremental reading of score files: a run after one file changed re-reads that file only, and
its outputs equal those of a run that read every file."""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl
import pytest

from sae_atlas import layout
from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline
from sae_atlas.synth import SynthOptions, synthesize

TINY = SynthOptions(features=256, explained=30, explainers=2, scorers=2, prompts=300, ctx=48, d_model=64, seed=3)
OUTPUTS = (layout.SCORES, layout.SCORE_RECORDS, layout.SCORE_EXAMPLES)


def scores_run(config_path: Path, output: Path, embedder) -> dict:
    """The scores stage into ``output``; its statistics."""
    config = load_config(config_path)
    config.output_dir = output
    Pipeline(config, embedder=embedder).run(only=["scores"])
    report = orjson.loads((output / layout.RUN_REPORT).read_bytes())
    return next(stage for stage in report["stages"] if stage["stage"] == "scores")["statistics"]


def assert_same_outputs(left: Path, right: Path) -> None:
    for name in OUTPUTS:
        assert pl.read_parquet(left / name).equals(pl.read_parquet(right / name)), name


@pytest.fixture
def corpus(tmp_path):
    return synthesize(tmp_path / "corpus", TINY)


def fuzz_files(root: Path, latent: int) -> list[Path]:
    return sorted(root.glob(f"raw/*/scores/fuzz/*_latent{latent}.txt"))


def test_changing_one_score_file_rereads_that_file_only(corpus, tmp_path, embedder):
    output = tmp_path / "incremental"
    first = scores_run(corpus.config, output, embedder)
    files = first["score_files_read"]
    assert first["score_files_read_from_disk"] == files > 0
    latent = int(pl.read_parquet(output / layout.SCORE_RECORDS)["feature_id"][0])
    path = fuzz_files(corpus.root, latent)[0]
    records = orjson.loads(path.read_bytes())
    records[0]["prediction"] = not records[0]["prediction"]
    records[0]["correct"] = not records[0]["correct"]
    path.write_bytes(orjson.dumps(records))
    before = pl.read_parquet(output / layout.SCORE_RECORDS)

    second = scores_run(corpus.config, output, embedder)
    assert second["score_files_read_from_disk"] == 1
    assert second["score_files_read"] == files
    after = pl.read_parquet(output / layout.SCORE_RECORDS)
    source = path.parent.parent.parent.name
    this_file = (pl.col("data_source") == source) & (pl.col("method") == "fuzz") & (pl.col("feature_id") == latent)
    # the other files' records unchanged, this one's first record flipped
    assert after.filter(~this_file).equals(before.filter(~this_file))
    changed = after.filter(this_file & (pl.col("record") == 0))
    assert changed["correct"].item() == (not before.filter(this_file & (pl.col("record") == 0))["correct"].item())
    # the same outputs as a run that reads every file
    fresh = tmp_path / "fresh"
    assert scores_run(corpus.config, fresh, embedder)["score_files_read_from_disk"] == files
    assert_same_outputs(output, fresh)


def test_an_example_only_the_changed_file_supplied_is_taken_from_the_latents_other_files(corpus, tmp_path, embedder):
    output = tmp_path / "incremental"
    scores_run(corpus.config, output, embedder)
    examples = pl.read_parquet(output / layout.SCORE_EXAMPLES)
    latent = int(examples["feature_id"][0])
    # the run whose copy of the latent's examples is kept comes first by name: empty its files
    emptied = sorted(corpus.root.glob(f"raw/*/scores/*/*_latent{latent}.txt"))
    first_source = sorted({path.parent.parent.parent.name for path in emptied})[0]
    for path in emptied:
        if path.parent.parent.parent.name == first_source:
            path.write_bytes(b"[]")
    statistics = scores_run(corpus.config, output, embedder)
    # the latent's other files were read again to settle which copy of each example to keep
    assert statistics["score_files_read_from_disk"] == len(emptied)
    fresh = tmp_path / "fresh"
    scores_run(corpus.config, fresh, embedder)
    assert_same_outputs(output, fresh)


def test_an_unreadable_cache_is_a_full_read(corpus, tmp_path, embedder):
    output = tmp_path / "out"
    files = scores_run(corpus.config, output, embedder)["score_files_read"]
    for table in (output / layout.SCORE_CACHE).rglob("records.parquet"):
        table.write_bytes(b"not parquet")
    path = fuzz_files(corpus.root, int(pl.read_parquet(output / layout.SCORE_RECORDS)["feature_id"][0]))[0]
    path.touch()
    assert scores_run(corpus.config, output, embedder)["score_files_read_from_disk"] == files
    fresh = tmp_path / "fresh"
    scores_run(corpus.config, fresh, embedder)
    assert_same_outputs(output, fresh)
