"""sae-atlas synth: determinism, the real formats, and a ground truth the pipeline recovers."""

from __future__ import annotations

import hashlib

import numpy as np
import orjson
import polars as pl
import pytest

from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline
from sae_atlas.synth import SynthOptions, synthesize

TINY = SynthOptions(features=128, explained=12, explainers=2, scorers=2, prompts=60, ctx=40, d_model=32, seed=3)


def digest_tree(root) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path):
    first = synthesize(tmp_path / "a", TINY)
    second = synthesize(tmp_path / "b", TINY)
    assert digest_tree(first.root) == digest_tree(second.root)
    third = synthesize(tmp_path / "c", SynthOptions(**{**TINY.__dict__, "seed": 4}))
    assert digest_tree(third.root) != digest_tree(first.root)


def test_corpus_is_in_the_real_delphi_layout(small_corpus):
    root = small_corpus.root
    config = load_config(small_corpus.config)
    assert [source.name for source in config.sources] == small_corpus.sources
    assert len(config.sources) == 6  # 3 explainers x 2 scorers
    run = root / "raw" / "llama_e-gwen_s"
    run_config = orjson.loads((run / "run_config.json").read_bytes())
    assert run_config["hookpoints"] == ["layer_30/width_512/average_l0_120"]
    assert run_config["explainer_model"] == "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
    # files are named after the resolved module, not the Gemma Scope hookpoint
    explanation = next((run / "explanations").glob("layers.30_latent*.txt"))
    assert isinstance(orjson.loads(explanation.read_bytes()), str)
    records = orjson.loads(next((run / "scores" / "fuzz").glob("*.txt")).read_bytes())
    assert set(records[0]) == {
        "str_tokens",
        "activations",
        "distance",
        "activating",
        "prediction",
        "probability",
        "correct",
    }
    negatives = [record for record in records if not record["activating"]]
    assert negatives and all(value == 0 and isinstance(value, int) for value in negatives[0]["activations"])
    groups = orjson.loads(next((run / "scores" / "simulation").glob("*.txt")).read_bytes())
    assert [group["distance"] for group in groups] == [*range(1, 11), 0]
    # explainers write the same text in every run they explain
    same = root / "raw" / "llama_e-llama_s" / "explanations" / explanation.name
    assert same.read_bytes() == explanation.read_bytes()
    prompts = orjson.loads((root / "raw" / "activation_examples" / "prompts.json").read_bytes())
    assert len(prompts) == 600 and all(len(prompt) == 64 for prompt in prompts)
    assert prompts[0][0] == "<bos>" and any(token.startswith("▁") for token in prompts[0])


def test_corpus_contains_delphi_quirks(small_corpus):
    raw = small_corpus.root / "raw"
    texts = [orjson.loads(path.read_bytes()) for path in raw.glob("*/explanations/*.txt")]
    records = [record for path in raw.glob("*/scores/fuzz/*.txt") for record in orjson.loads(path.read_bytes())]
    correlations = [
        group["ev_correlation_score"]
        for path in raw.glob("*/scores/simulation/*.txt")
        for group in orjson.loads(path.read_bytes())
    ]
    assert any(text == "Explanation could not be parsed." for text in texts)
    assert any(record["correct"] is None for record in records)
    assert "nan" in correlations


@pytest.mark.parametrize(("activation_format", "decoder_format"), [("delphi", "saelens"), ("delphi", "sparsify")])
def test_other_formats_run_through_the_pipeline(tmp_path, activation_format, decoder_format):
    options = SynthOptions(
        **{**TINY.__dict__, "activation_format": activation_format, "decoder_format": decoder_format}
    )
    corpus = synthesize(tmp_path, options)
    config = load_config(corpus.config)
    report = Pipeline(config).run(only=["activation_examples", "decoder_similarity"])
    assert [outcome.status for outcome in report.outcomes] == ["ran", "ran"]
    assert not any(len(outcome.problems) for outcome in report.outcomes)
    examples = pl.read_parquet(config.output_dir / "activation_examples.parquet")
    assert examples.height == corpus.activation_records
    assert int(examples["num_activations"].sum()) == corpus.activation_pairs
    assert (tmp_path / "raw" / "tokenizer.json").exists()
    assert not examples["prompt_tokens"].list.contains("<bos>").any()


# -- the ground truth, recovered by the pipeline ------------------------------------------------


@pytest.fixture(scope="module")
def truth(small_corpus):
    return pl.read_parquet(small_corpus.ground_truth)


@pytest.fixture(scope="module")
def features(small_run):
    config, _ = small_run
    return pl.read_parquet(config.output_dir / "features.parquet")


def test_top_decoder_neighbour_shares_a_concept(small_run, truth):
    config, _ = small_run
    neighbours = pl.read_parquet(config.output_dir / "stages" / "decoder_similarity.parquet")
    concepts = dict(zip(truth["feature_id"].to_list(), truth["concepts"].to_list(), strict=True))
    top = neighbours.select(
        "feature_id", pl.col("decoder_similarity").list.first().struct.field("feature_id").alias("top")
    )
    shared = [bool(set(concepts[a]) & set(concepts[b])) for a, b in top.rows()]
    assert len(shared) == 512
    assert np.mean(shared) >= 0.9


def hits(truth: pl.DataFrame) -> pl.DataFrame:
    return (
        truth.select("feature_id", "explanations")
        .explode("explanations")
        .unnest("explanations")
        .select("feature_id", pl.col("explainer").alias("llm_explainer"), "hit", "sentinel")
    )


def test_explainers_agree_more_when_both_hit_the_concept(features, truth):
    labelled = hits(truth)
    pairs = (
        features.select(
            pl.col("feature_id").cast(pl.UInt32), pl.col("llm_explainer").cast(pl.String), "semantic_similarity"
        )
        .explode("semantic_similarity")
        .select(
            "feature_id",
            "llm_explainer",
            pl.col("semantic_similarity").struct.field("explainer").cast(pl.String).alias("other"),
            pl.col("semantic_similarity").struct.field("cosine_similarity").alias("cosine"),
        )
        .drop_nulls("cosine")
        .join(labelled, on=["feature_id", "llm_explainer"])
        .join(
            labelled.rename({"llm_explainer": "other", "hit": "other_hit", "sentinel": "other_sentinel"}),
            on=["feature_id", "other"],
        )
    )
    both = pairs.filter(pl.col("hit") & pl.col("other_hit"))["cosine"]
    one_misses = pairs.filter(pl.col("hit") != pl.col("other_hit"))["cosine"]
    assert len(both) > 50 and len(one_misses) > 20
    assert both.mean() > one_misses.mean() + 0.15


def test_scores_are_higher_for_explanations_that_hit(features, truth):
    scored = (
        features.select(pl.col("feature_id").cast(pl.UInt32), pl.col("llm_explainer").cast(pl.String), "scores")
        .explode("scores")
        .unnest("scores")
        .join(hits(truth), on=["feature_id", "llm_explainer"])
    )
    for method in ("fuzz", "detection"):
        hit = scored.filter(pl.col("hit"))[method].mean()
        miss = scored.filter(~pl.col("hit"))[method].mean()
        assert hit > miss + 0.15, (method, hit, miss)


def test_single_concept_latents_have_more_coherent_examples(small_run, truth):
    config, _ = small_run
    similarity = pl.read_parquet(config.output_dir / "activation_example_similarity.parquet")
    labelled = similarity.join(truth.select("feature_id", "multi_concept"), on="feature_id").drop_nulls(
        "mean_pairwise_similarity"
    )
    single = labelled.filter(~pl.col("multi_concept"))["mean_pairwise_similarity"].to_numpy()
    multi = labelled.filter(pl.col("multi_concept"))["mean_pairwise_similarity"].to_numpy()
    assert len(single) > 100 and len(multi) > 30
    # AUC: the chance that a single-concept latent is more coherent than a multi-concept one
    auc = (single[:, None] > multi[None, :]).mean() + 0.5 * (single[:, None] == multi[None, :]).mean()
    assert auc >= 0.8
