"""The scores stage's evidence: every record of the fuzz, detection, embedding, intruder and
example_embedding files and every sequence of the simulation files, as
``stages/score_records.parquet``, and the examples they scored, once per latent, as
``stages/score_examples.parquet``.

The records are kept while the stage reads the score files (no second pass over the raw files).
Every run of a study scores the same examples of a latent (delphi's seeded sampler), so an example
(a latent and its text: the tokens concatenated, which is also what the embedding scorer keeps) is
stored once, and every record points to it by ``example_id``: that is how the feature page lines
up the runs, one row per example and one column per run.
"""

from __future__ import annotations

import polars as pl

from sae_atlas.schema import STAGE_SCORE_EXAMPLES, STAGE_SCORE_RECORDS
from sae_atlas.scored_examples import ACTIVATION_LIST, DECISION_METHODS, EVIDENCE_METHODS


def evidence_rows(records: pl.DataFrame, sequences: pl.DataFrame | None = None) -> pl.DataFrame:
    """The evidence of a block with what the records table needs: ``records`` (read_score_files'
    records with ``data_source``) of the :data:`EVIDENCE_METHODS`, and ``sequences`` (its
    simulation sequences with ``data_source``)."""
    rows = records.filter(pl.col("method").is_in(EVIDENCE_METHODS)).select(
        "feature_id",
        "data_source",
        "method",
        "record",
        "activating",
        "quantile",
        "prediction",
        "probability",
        correct=pl.when(pl.col("method").is_in(DECISION_METHODS)).then(pl.col("outcome") == 1.0),
        outcome="outcome",
        example_text="example_text",
        simulated_activations=pl.lit(None, ACTIVATION_LIST),
        true_activations=pl.lit(None, ACTIVATION_LIST),
    )
    if sequences is None or sequences.is_empty():
        return rows
    simulated = sequences.select(
        pl.col("feature_id"),
        pl.col("data_source"),
        method=pl.lit("simulation", pl.String),
        record="record",
        activating="activating",
        quantile="quantile",
        prediction=pl.lit(None, pl.Boolean),
        probability=pl.lit(None, pl.Float64),
        correct=pl.lit(None, pl.Boolean),
        outcome="outcome",
        example_text="example_text",
        simulated_activations="simulated_activations",
        true_activations="true_activations",
    )
    return pl.concat([rows, simulated.cast(dict(rows.schema))])


def number_evidence(rows: pl.DataFrame, examples: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(records, examples) of a block of latents: ``rows`` from :func:`evidence_rows` (every run of
    those latents), ``examples`` the block's distinct examples (``ExampleStore.table``). An example
    id numbers the examples of one latent in text order, so (feature_id, example_id) depends only
    on that latent's data. The examples keep their other columns (the records point to them by
    id, no longer by text)."""
    numbered = examples.sort("feature_id", "example_text").with_columns(
        example_id=pl.int_range(pl.len(), dtype=pl.UInt32).over("feature_id")
    )
    records = (
        rows.join(
            numbered.select("feature_id", "example_text", "example_id"), on=["feature_id", "example_text"], how="left"
        )
        .sort("feature_id", "data_source", "method", "record")
        .select([pl.col(name).cast(dtype) for name, dtype in STAGE_SCORE_RECORDS.items()])
    )
    return records, numbered.drop("example_text")


def build_score_evidence(rows: pl.DataFrame | None, examples: pl.DataFrame | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The two stage files' rows of a block (:func:`number_evidence`, the examples with the
    columns of ``stages/score_examples.parquet`` only)."""
    if rows is None or examples is None:
        return pl.DataFrame(schema=STAGE_SCORE_RECORDS), pl.DataFrame(schema=STAGE_SCORE_EXAMPLES)
    records, numbered = number_evidence(rows, examples)
    return records, numbered.select([pl.col(name).cast(dtype) for name, dtype in STAGE_SCORE_EXAMPLES.items()])


def with_texts(records: pl.DataFrame, examples: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`number_evidence` undone: the records and examples keyed by the example's text again
    (its tokens concatenated), for a block read back to be merged with fresh reads."""
    texts = examples.with_columns(example_text=pl.col("str_tokens").list.join(""))
    rows = records.join(
        texts.select("feature_id", "example_id", "example_text"), on=["feature_id", "example_id"], how="left"
    ).drop("example_id")
    return rows, texts.drop("example_id")
