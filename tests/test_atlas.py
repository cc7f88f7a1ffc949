"""The query layer: Atlas over the small synthetic run, and over directories missing optional files."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from sae_atlas import Atlas
from sae_atlas.query.atlas import COLUMNS, METRICS, FeatureNotFound, QueryError
from sae_atlas.synth.concepts import CONCEPTS
from sae_atlas.vector_storage import read_activation_embeddings


@pytest.fixture(scope="module")
def atlas(small_run, embedder):
    config, _ = small_run
    return Atlas(config.output_dir, embedder=embedder)


@pytest.fixture(scope="module")
def outputs(small_run):
    return small_run[0].output_dir


def explained_feature(outputs) -> int:
    features = pl.read_parquet(outputs / "features.parquet")
    counts = features.group_by("feature_id").len().filter(pl.col("len") == 3).sort("feature_id")
    return int(counts["feature_id"][0])


def test_feature_has_everything_about_a_latent(atlas, outputs):
    feature_id = explained_feature(outputs)
    record = atlas.feature(feature_id)
    features = pl.read_parquet(outputs / "features.parquet").filter(pl.col("feature_id") == feature_id)
    assert [item["explainer"] for item in record["explanations"]] == features["llm_explainer"].cast(pl.String).to_list()
    assert [item["scores"] for item in record["explanations"]] == features["scores"].to_list()
    assert [len(item["semantic_similarity"]) for item in record["explanations"]] == [2, 2, 2]

    assert len(record["decoder_neighbours"]) == 10
    explained = set(features["feature_id"].to_list()) | set(
        pl.read_parquet(outputs / "features.parquet")["feature_id"].to_list()
    )
    for neighbour in record["decoder_neighbours"]:
        assert bool(neighbour["explanations"]) == (neighbour["feature_id"] in explained)

    similarity = (
        pl.read_parquet(outputs / "activation_example_similarity.parquet")
        .filter(pl.col("feature_id") == feature_id)
        .drop("feature_id", "sae_id")
        .row(0, named=True)
    )
    assert record["activation_similarity"] == similarity

    examples = record["activation_examples"]
    embedded = read_activation_embeddings(outputs / "activation_embeddings.parquet")
    row = int(np.flatnonzero(embedded.feature_id == feature_id)[0])
    sampled = embedded.prompt_id[embedded.offsets[row] : embedded.offsets[row + 1]].tolist()
    assert [example["prompt_id"] for example in examples] == sampled  # the examples shown are the ones embedded
    for example in examples:
        assert len(example["activations"]) == len(example["tokens"])
        assert example["activations"][example["max_position"]] == pytest.approx(example["max_activation"], rel=1e-6)
        start, stop = example["window"]
        assert start <= example["max_position"] < stop <= len(example["tokens"])
    assert [example["max_activation"] for example in examples] == sorted(
        (example["max_activation"] for example in examples), reverse=True
    )


def test_unexplained_features_still_have_neighbours_and_examples(atlas, outputs):
    explained = set(pl.read_parquet(outputs / "features.parquet")["feature_id"].to_list())
    feature_id = next(index for index in range(512) if index not in explained)
    record = atlas.feature(feature_id)
    assert record["explanations"] == []
    assert len(record["decoder_neighbours"]) == 10 and record["activation_examples"]


def test_unknown_feature(atlas):
    with pytest.raises(FeatureNotFound):
        atlas.feature(10**6)


def test_features_filters_sorts_and_pages(atlas):
    everything = atlas.features(limit=None)
    assert everything.columns == list(COLUMNS) and everything.height == 240  # 80 latents x 3 explainers
    explainer = atlas.explainers[1]
    page, total = atlas.query_features(
        explainer=explainer,
        filters={"fuzz": (0.7, None), "detection": (None, 0.99)},
        sort="detection",
        descending=True,
        limit=5,
        offset=2,
    )
    matching = everything.filter(
        (pl.col("explainer") == explainer) & (pl.col("fuzz") >= 0.7) & (pl.col("detection") <= 0.99)
    )
    assert total == matching.height > 7
    assert page.height == 5
    assert page["detection"].to_list() == sorted(matching["detection"].to_list(), reverse=True)[2:7]

    scorer = atlas.scorers[0]
    by_scorer = atlas.features(scorer=scorer, limit=None)
    features = pl.read_parquet(atlas.output_dir / "features.parquet")
    first = by_scorer.row(0, named=True)
    expected = next(
        entry
        for entry in features.filter(
            (pl.col("feature_id") == first["feature_id"])
            & (pl.col("llm_explainer").cast(pl.String) == first["explainer"])
        )["scores"][0]
        if entry["scorer"] == scorer
    )
    assert first["fuzz"] == expected["fuzz"] and first["detection"] == expected["detection"]

    assert atlas.features(contains="such as", limit=None)["explanation_text"].str.contains("such as").all()


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ({"sort": "nope"}, "cannot sort by"),
        ({"explainer": "nobody"}, "unknown explainer"),
        ({"scorer": "nobody"}, "unknown scorer"),
        ({"filters": {"nope": (0, 1)}}, "cannot filter on"),
    ],
)
def test_bad_queries_say_what_is_wrong(atlas, query, fragment):
    with pytest.raises(QueryError, match=fragment):
        atlas.features(**query)


@pytest.mark.parametrize("metric", METRICS)
def test_histograms(atlas, metric):
    histogram = atlas.histogram(metric, bins=7)
    assert len(histogram["edges"]) == 8 and len(histogram["counts"]) == 7
    assert sum(histogram["counts"]) == histogram["count"] and histogram["count"] + histogram["missing"] == 240
    with pytest.raises(QueryError):
        atlas.histogram("nonsense")


def test_search_finds_explanations_of_the_concept(atlas, small_corpus):
    truth = (
        pl.read_parquet(small_corpus.ground_truth)
        .select("feature_id", "explanations")
        .explode("explanations")
        .unnest("explanations")
    )
    described = set(truth["described"].explode().drop_nulls().to_list())
    concepts = [concept for concept in CONCEPTS if concept.name in described][:6]
    assert len(concepts) == 6
    for concept in concepts:
        hits = atlas.search(concept.descriptions[0], k=5)
        assert hits.height == 5 and hits["similarity"].is_sorted(descending=True)
        about = truth.filter(pl.col("described").list.contains(concept.name))
        keys = set(zip(about["feature_id"].to_list(), about["explainer"].to_list(), strict=True))
        top = set(zip(hits["feature_id"].to_list(), hits["explainer"].to_list(), strict=True))
        assert keys & top, concept.name
    assert atlas.search("months", k=3, explainer=atlas.explainers[0])["explainer"].unique().to_list() == [
        atlas.explainers[0]
    ]


def test_stats(atlas):
    stats = atlas.stats()
    assert stats["features"] == 80 and stats["rows"] == 240
    assert len(stats["explainers"]) == 3 and len(stats["scorers"]) == 2
    assert set(stats["files"]) == {
        "features.parquet",
        "explanation_embeddings.parquet",
        "activation_examples.parquet",
        "activation_embeddings.parquet",
        "activation_example_similarity.parquet",
    }
    assert len(stats["mean_scores"]) == 6


def test_missing_optional_files_degrade_gracefully(outputs, tmp_path, embedder):
    copy = tmp_path / "out"
    copy.mkdir()
    for name in ("features.parquet", "explanation_embeddings.parquet"):
        shutil.copy(outputs / name, copy / name)
    atlas = Atlas(copy, embedder=embedder)
    feature_id = explained_feature(outputs)
    record = atlas.feature(feature_id)
    assert record["activation_examples"] == [] and record["activation_similarity"] is None
    assert len(record["decoder_neighbours"]) == 10  # from features.parquet itself
    assert atlas.features(limit=None)["activation_similarity"].null_count() == 240
    assert atlas.histogram("activation_similarity")["count"] == 0
    assert atlas.stats()["mean_activation_similarity"] is None
    with pytest.raises(FeatureNotFound):
        atlas.feature(511 if feature_id != 511 else 510)  # unexplained and nothing else known


def test_not_an_output_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"features\.parquet"):
        Atlas(tmp_path)


def test_prompts_are_rebuilt_when_the_prompt_table_is_missing(outputs, tmp_path, atlas):
    copy = shutil.copytree(outputs, tmp_path / "out", ignore=shutil.ignore_patterns(".cache", "prompts.parquet"))
    assert not (copy / "stages" / "prompts.parquet").exists()
    feature_id = explained_feature(outputs)
    rebuilt = Atlas(copy, embedder=atlas.embedder).feature(feature_id)["activation_examples"]
    assert [example["tokens"] for example in rebuilt] == [
        example["tokens"] for example in atlas.feature(feature_id)["activation_examples"]
    ]


def test_delphi_classification_metrics_and_firing_frequency_reach_the_table(atlas, outputs):
    table = atlas.features(limit=None)
    for name in ("fuzz_balanced_accuracy", "detection_precision", "detection_recall", "fuzz_f1"):
        values = table[name].drop_nulls()
        assert values.len() > 0.9 * table.height and values.is_between(0, 1).all(), name
    # no probabilities in these runs (log_probs off): no probability AUC
    assert table["fuzz_probability_auc"].null_count() == table.height
    # synth logs each latent's firing count (its activation pairs) over prompts × ctx tokens
    examples = pl.read_parquet(outputs / "activation_examples.parquet", columns=["feature_id", "num_activations"])
    fired = examples.group_by("feature_id").agg(pl.col("num_activations").sum()).sort("feature_id")
    expected = dict(zip(fired["feature_id"].to_list(), (fired["num_activations"] / (600 * 64)).to_list(), strict=True))
    for feature, frequency in table.select("feature_id", "firing_frequency").unique().rows():
        assert frequency == pytest.approx(expected.get(feature, 0.0)), feature


def test_scores_per_activation_quantile_reach_the_feature(atlas, outputs):
    feature = explained_feature(outputs)
    item = atlas.feature(feature)["explanations"][0]
    rows = item["by_quantile"]
    methods = {row["method"] for row in rows}
    assert {"fuzz", "detection", "simulation", "embedding"} <= methods
    assert {row["scorer"] for row in rows} == {metrics["scorer"] for metrics in item["metrics"]}
    fuzz = [row for row in rows if row["method"] == "fuzz"]
    # synth draws 10 quantiles of 5 activating examples per latent (delphi's default)
    assert sorted({row["quantile"] for row in fuzz}) == list(range(10))
    assert all(row["score"] is None or 0 <= row["score"] <= 1 for row in fuzz)
    # the page unnests its latent's rows itself: the same rows as the comparison's whole table
    whole = atlas._quantiles.table.get()[0].filter(feature_id=feature, explainer=item["explainer"])
    assert len(rows) == whole.height and {
        (row["scorer"], row["method"], row["quantile"], row["score"], row["examples"]) for row in rows
    } == set(whole.select("scorer", "method", "quantile", "score", "examples").rows())
    # the pooled simulation group apart from the study's mean over every group
    table = atlas.features(limit=None)
    assert table["simulation_overall"].drop_nulls().len() > 0.8 * table.height
