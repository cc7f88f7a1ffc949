"""Stage 3: the features table joins explanations, scores and decoder neighbours."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from sae_atlas.schema import FEATURES, STAGE_SCORES
from sae_atlas.stages.decoder_similarity import neighbours_table, top_k_neighbours
from sae_atlas.stages.features import build_features

RUNS = pl.DataFrame(
    {
        "data_source": ["a_e-x_s", "a_e-y_s", "b_e-x_s", "c_e-x_s"],
        "llm_explainer": ["A", "A", "B", "C"],
        "llm_scorer": ["X", "Y", "X", "X"],
        "explanation_method": ["quantiles", "quantiles", "top", "quantiles"],
    }
)


def unit(*values):
    vector = np.array(values, dtype=np.float32)
    return (vector / np.linalg.norm(vector)).tolist()


@pytest.fixture
def explanation_table():
    return pl.DataFrame(
        {
            "feature_id": [3, 3, 3, 9, 9],
            "sae_id": ["sae"] * 5,
            "data_source": ["a_e-x_s", "b_e-x_s", "c_e-x_s", "a_e-x_s", "b_e-x_s"],
            "llm_explainer": ["A", "B", "C", "A", "B"],
            "explanation_text": ["months", "month names", "Explanation could not be parsed.", "colours", "verbs"],
            "embedding": [unit(1, 0, 0), unit(1, 1, 0), None, unit(0, 0, 1), unit(0, 1, 1)],
            "explanation_ok": [True, True, False, True, True],
        },
        schema_overrides={"feature_id": pl.UInt32, "embedding": pl.List(pl.Float32)},
    )


@pytest.fixture
def score_table():
    rows = [
        (3, "a_e-x_s", "A", "X", "fuzz", 0.8),
        (3, "a_e-x_s", "A", "X", "detection", 0.9),
        (3, "a_e-y_s", "A", "Y", "fuzz", 0.7),
        (3, "a_e-y_s", "A", "Y", "simulation", 0.4),
        (3, "b_e-x_s", "B", "X", "embedding", 0.6),
        (3, "b_e-x_s", "B", "X", "intruder", 0.5),
    ]
    frame = pl.DataFrame(
        rows, schema=["feature_id", "data_source", "llm_explainer", "llm_scorer", "method", "score"], orient="row"
    )
    frame = frame.with_columns(n_examples=pl.lit(100), n_failed=pl.lit(0), variance=pl.lit(None, pl.Float64))
    # the stage table's other columns (classification metrics, firing counts) are empty here
    return frame.select(
        [
            pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in STAGE_SCORES.items()
        ]
    )


def test_features_table(explanation_table, score_table):
    rng = np.random.default_rng(0)
    decoder = neighbours_table(*top_k_neighbours(rng.normal(size=(12, 4)).astype(np.float32), 3))
    table, statistics = build_features(explanations=explanation_table, scores=score_table, decoder=decoder, runs=RUNS)
    assert table.schema == FEATURES
    assert table.select("feature_id", pl.col("llm_explainer").cast(pl.String)).rows() == [
        (3, "A"),
        (3, "B"),
        (3, "C"),
        (9, "A"),
        (9, "B"),
    ]
    rows = table.rows(named=True)

    semantic = [
        [(entry["explainer"], entry["cosine_similarity"]) for entry in row["semantic_similarity"]] for row in rows
    ]
    assert [name for name, _ in semantic[0]] == ["B", "C"]
    assert math.isclose(semantic[0][0][1], 1 / math.sqrt(2), rel_tol=1e-6)
    assert semantic[0][1][1] is None  # C's explanation is a sentinel
    assert [name for name, _ in semantic[2]] == ["A", "B"] and semantic[2][0][1] is None
    assert math.isclose(semantic[3][0][1], 1 / math.sqrt(2), rel_tol=1e-6)

    assert rows[0]["scores"] == [
        {"scorer": "X", "fuzz": 0.8, "simulation": None, "detection": 0.9, "embedding": None},
        {"scorer": "Y", "fuzz": 0.7, "simulation": 0.4, "detection": None, "embedding": None},
    ]
    assert rows[1]["scores"] == [{"scorer": "X", "fuzz": None, "simulation": None, "detection": None, "embedding": 0.6}]
    assert rows[3]["scores"] == []

    assert rows[1]["explanation_method"] == "top"
    assert len(rows[0]["decoder_similarity"]) == 3
    assert rows[0]["decoder_similarity"] == decoder.row(3, named=True)["decoder_similarity"]
    assert statistics["rows_without_scores"] == 3  # (3, C), (9, A), (9, B)
    assert statistics["sentinel_explanations"] == 1


def test_without_decoder_the_neighbour_lists_are_empty(explanation_table, score_table):
    table, statistics = build_features(explanations=explanation_table, scores=score_table, decoder=None, runs=RUNS)
    assert table["decoder_similarity"].list.len().to_list() == [0] * 5
    assert statistics["rows_without_decoder_neighbours"] == 5
