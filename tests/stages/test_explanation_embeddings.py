"""Stage 2: one embedded explanation per (feature, explainer)."""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas.stages.explanation_embeddings import build_explanation_embeddings


def explanations(rows):
    return pl.DataFrame(
        rows,
        schema={
            "data_source": pl.String,
            "llm_explainer": pl.String,
            "feature_id": pl.UInt32,
            "explanation_text": pl.String,
            "explanation_ok": pl.Boolean,
        },
        orient="row",
    )


def test_first_source_gives_the_row_and_distinct_texts_are_embedded_once(fresh_embedder):
    frame = explanations(
        [
            ("a_e-x_s", "A", 1, "Names of calendar months", True),
            ("a_e-y_s", "A", 1, "Names of calendar months", True),  # same explainer, second scorer
            ("b_e-x_s", "B", 1, "Month names in dates", True),
            ("b_e-y_s", "B", 1, "Month names in dates", True),
            ("a_e-x_s", "A", 2, "No explanation found", False),  # scored without an explanation file ...
            ("a_e-y_s", "A", 2, "Colour words", True),  # ... but the other run has it
            ("b_e-x_s", "B", 2, "Explanation could not be parsed.", False),
            ("b_e-y_s", "B", 2, "Explanation could not be parsed.", False),
        ]
    )
    table, statistics = build_explanation_embeddings(frame, sae_id="sae", embed=fresh_embedder.embed)
    assert table.select(
        "feature_id", pl.col("llm_explainer").cast(pl.String), pl.col("data_source").cast(pl.String), "explanation_text"
    ).rows() == [
        (1, "A", "a_e-x_s", "Names of calendar months"),
        (1, "B", "b_e-x_s", "Month names in dates"),
        (2, "A", "a_e-y_s", "Colour words"),
        (2, "B", "b_e-x_s", "Explanation could not be parsed."),
    ]
    assert fresh_embedder.stats.distinct == 3 and fresh_embedder.stats.embedded == 3
    vectors = table["embedding"]
    assert vectors[3] is None  # sentinel: no vector, so it is never similar to anything
    norms = [np.linalg.norm(np.array(vectors[i])) for i in range(3)]
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert statistics["sentinel_explanations"] == 1
    assert statistics["texts_differing_between_sources"] == 1
    assert table["sae_id"].cast(pl.String).unique().to_list() == ["sae"]


def test_paraphrases_are_closer_than_different_concepts(fresh_embedder):
    frame = explanations(
        [
            ("s", "A", 1, "Names of calendar months", True),
            ("t", "B", 1, 'Month names appearing in dates, such as "March"', True),
            ("u", "C", 1, "Verbs of physical movement such as climbed or swam", True),
        ]
    )
    table, _ = build_explanation_embeddings(frame, sae_id="sae", embed=fresh_embedder.embed)
    vectors = np.array(table["embedding"].to_list())
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
