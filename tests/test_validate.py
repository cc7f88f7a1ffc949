"""sae-atlas validate: each contract violation is caught and named."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from sae_atlas.validate import validate


@pytest.fixture
def output(small_run, tmp_path):
    config, _ = small_run
    return shutil.copytree(config.output_dir, tmp_path / "out", ignore=shutil.ignore_patterns(".cache"))


def rewrite(path, transform):
    frame = transform(pl.read_parquet(path))
    frame.write_parquet(path)


def test_valid_output_passes(output):
    result = validate(output)
    assert result.ok and len(result.checked) == 5 + 13  # the master files and the stage outputs


def test_stage_outputs_are_checked_like_the_master_files(output):
    rewrite(output / "stages" / "scores.parquet", lambda f: f.drop("n_failed"))
    rewrite(
        output / "stages" / "decoder_similarity.parquet", lambda f: f.with_columns(pl.col("feature_id").cast(pl.Int64))
    )
    violations = validate(output).violations
    assert "stages/scores.parquet: column 'n_failed' is missing" in violations
    assert "stages/decoder_similarity.parquet: column 'feature_id' is Int64, expected UInt32" in violations


def test_missing_required_file(output):
    (output / "features.parquet").unlink()
    assert "features.parquet: missing" in validate(output).violations


def test_retyped_or_dropped_columns(output):
    rewrite(output / "features.parquet", lambda f: f.with_columns(pl.col("feature_id").cast(pl.Int32)))
    rewrite(output / "explanation_embeddings.parquet", lambda f: f.drop("llm_explainer"))
    violations = validate(output).violations
    assert "features.parquet: column 'feature_id' is Int32, expected Int64" in violations
    assert "explanation_embeddings.parquet: column 'llm_explainer' is missing" in violations


def test_duplicate_rows_and_self_neighbours(output):
    def corrupt(frame):
        first = frame.head(1)
        self_link = first.with_columns(
            pl.lit(
                [{"feature_id": int(first["feature_id"][0]), "cosine_similarity": 0.5}],
                dtype=frame.schema["decoder_similarity"],
            ).alias("decoder_similarity")
        )
        return pl.concat([self_link, frame])

    rewrite(output / "features.parquet", corrupt)
    violations = " | ".join(validate(output).violations)
    assert "repeat a (feature_id, llm_explainer) key" in violations
    assert "decoder neighbours are the feature itself" in violations
    assert "sidecar says" in violations


def test_unsorted_neighbours_and_out_of_range_cosines(output):
    def corrupt(frame):
        return frame.with_columns(
            pl.col("decoder_similarity").list.reverse(),
            pl.col("semantic_similarity").list.eval(
                pl.struct(
                    pl.element().struct.field("explainer"),
                    (pl.element().struct.field("cosine_similarity") * 3).alias("cosine_similarity"),
                )
            ),
        )

    rewrite(output / "features.parquet", corrupt)
    violations = " | ".join(validate(output).violations)
    assert "out of order" in violations
    assert "semantic similarities are outside [-1, 1]" in violations


def test_different_sae_ids_and_non_unit_vectors(output):
    rewrite(
        output / "explanation_embeddings.parquet",
        lambda f: f.with_columns(
            pl.lit("other/sae").cast(pl.Categorical()).alias("sae_id"), pl.col("embedding").list.eval(pl.element() * 2)
        ),
    )
    violations = " | ".join(validate(output).violations)
    assert "sae_id: differs between files" in violations
    assert "not unit-norm" in violations


def test_activation_examples_invariants(output):
    rewrite(
        output / "activation_examples.parquet",
        lambda f: f.with_columns(pl.col("num_activations") + 1, pl.col("prompt_tokens").list.head(1)),
    )
    violations = " | ".join(validate(output).violations)
    assert "num_activations differs" in violations
    assert "token position outside their prompt" in violations


def test_orphan_feature_rows(output):
    rewrite(output / "explanation_embeddings.parquet", lambda f: f.tail(-2))
    assert any("no explanation_embeddings.parquet row" in v for v in validate(output).violations)


def test_activation_embedding_invariants(output):
    rewrite(
        output / "activation_embeddings.parquet",
        lambda f: f.with_columns(
            pl.col("prompt_ids").list.head(1), pl.col("embeddings").list.eval(pl.element().list.eval(pl.element() * 2))
        ),
    )
    violations = " | ".join(validate(output).violations)
    assert "do not align with their embeddings" in violations


def test_activation_embeddings_must_be_unit_norm_and_sampled_from_examples(output):
    rewrite(
        output / "activation_embeddings.parquet",
        lambda f: f.with_columns(
            pl.col("embeddings").list.eval(pl.element().list.eval(pl.element() * 2)),
            pl.col("prompt_ids").list.eval(pl.element() + 100_000),
        ),
    )
    violations = " | ".join(validate(output).violations)
    assert "not unit-norm" in violations
    assert "have no activation_examples.parquet row" in violations


def test_activation_similarity_invariants(output):
    rewrite(
        output / "activation_example_similarity.parquet",
        lambda f: f.with_columns(pl.col("max_pairwise_similarity") * 3, pl.col("num_examples_sampled") + 1),
    )
    violations = " | ".join(validate(output).violations)
    assert "statistics are outside [-1, 1]" in violations
    assert "disagree with activation_embeddings.parquet" in violations
