"""The scores stage's evidence: every record of the fuzz, detection and embedding files, as
``stages/score_records.parquet``, and the examples they scored, once per latent, as
``stages/score_examples.parquet``.

The records are kept while the stage reads the score files (no second pass over the raw files).
Every run of a study scores the same examples of a latent (delphi's seeded sampler), so an example
(a latent and its tokens) is stored once and every record points to it by ``example_id``: that is
how the feature page lines up the runs, one row per example and one column per run.
"""

from __future__ import annotations

import polars as pl

from sae_atlas.schema import STAGE_SCORE_EXAMPLES, STAGE_SCORE_RECORDS
from sae_atlas.score_methods import EVIDENCE_METHODS

# Tokens are joined with a character no tokenizer emits, to compare examples as one string.
SEPARATOR = "\x1f"


def evidence_rows(records: pl.DataFrame) -> pl.DataFrame:
    """The records of one chunk that are evidence (``records``: read_score_files' records with
    ``data_source``), with what the two tables need."""
    return records.filter(pl.col("method").is_in(EVIDENCE_METHODS)).select(
        "feature_id",
        "data_source",
        "method",
        "record",
        "activating",
        "quantile",
        "prediction",
        "probability",
        correct=pl.when(pl.col("method") != "embedding").then(pl.col("outcome") == 1.0),
        outcome="outcome",
        str_tokens="str_tokens",
        token_activations="token_activations",
    )


def build_score_evidence(parts: list[pl.DataFrame]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(records, examples) of a block of latents from its evidence rows (:func:`evidence_rows`; every
    run of those latents). An example id numbers the distinct token lists of one latent in text
    order, so (feature_id, example_id) depends only on that latent's data."""
    if not parts:
        return pl.DataFrame(schema=STAGE_SCORE_RECORDS), pl.DataFrame(schema=STAGE_SCORE_EXAMPLES)
    rows = pl.concat(parts)
    # The embedding scorer keeps an example as one string: the same example as the token list
    # whose concatenation it is, when another method of the latent has that list.
    tokenised = (
        rows.filter(pl.col("str_tokens").list.len() > 1)
        .select(
            "feature_id",
            _plain=pl.col("str_tokens").list.join(""),
            _tokens="str_tokens",
            _activations="token_activations",
        )
        .unique(["feature_id", "_plain"], keep="first", maintain_order=True)
    )
    keyed = (
        rows.with_columns(_plain=pl.when(pl.col("str_tokens").list.len() == 1).then(pl.col("str_tokens").list.first()))
        .join(tokenised, on=["feature_id", "_plain"], how="left")
        .with_columns(
            str_tokens=pl.coalesce("_tokens", "str_tokens"),
            token_activations=pl.coalesce("_activations", "token_activations"),
        )
        .with_columns(_text=pl.col("str_tokens").list.join(SEPARATOR))
    )
    examples = (
        keyed.filter(pl.col("_text").is_not_null())
        .sort("feature_id", "_text", pl.col("token_activations").is_null(), "data_source", "method", "record")
        .unique(["feature_id", "_text"], keep="first", maintain_order=True)
        .with_columns(example_id=pl.int_range(pl.len()).over("feature_id"))
        .select("feature_id", "example_id", "_text", "str_tokens", activations="token_activations")
    )
    records = (
        keyed.join(examples.select("feature_id", "_text", "example_id"), on=["feature_id", "_text"], how="left")
        .sort("feature_id", "data_source", "method", "record")
        .select([pl.col(name).cast(dtype) for name, dtype in STAGE_SCORE_RECORDS.items()])
    )
    examples = examples.select([pl.col(name).cast(dtype) for name, dtype in STAGE_SCORE_EXAMPLES.items()])
    return records, examples
