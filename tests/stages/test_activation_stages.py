"""Stages 4 and 5: windows, embedding chunks in every storage dtype, pairwise statistics."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from sae_atlas.schema import ACTIVATION_EXAMPLE_SIMILARITY
from sae_atlas.stages.activation_embeddings import embed_windows, feature_chunks, select_windows
from sae_atlas.stages.activation_similarity import pairwise_statistics
from sae_atlas.vector_storage import ActivationEmbeddings, activation_embeddings_from_frame, dequantise, quantise


def pairs(*items):
    return [{"token_position": position, "activation_value": value} for position, value in items]


def test_windows_centre_on_the_first_largest_activation():
    prompts = pl.Series([[f"▁w{index}" for index in range(60)], ["▁short", "▁prompt", "."]])
    examples = pl.DataFrame(
        {
            "feature_id": [4, 4, 9],
            "prompt_id": [0, 1, 0],
            "max_activation": [5.0, 2.0, 3.0],
            "activation_pairs": [pairs((10, 5.0), (40, 5.0)), pairs((1, 2.0)), pairs((59, 3.0))],
        },
        schema_overrides={
            "activation_pairs": pl.List(pl.Struct({"token_position": pl.UInt32, "activation_value": pl.Float32}))
        },
    )
    windows = select_windows(examples, prompts, quantiles=4, per_quantile=5, window=8)
    rows = windows.select("feature_id", "prompt_id", "centre", "window_start", "window_stop", "text").rows()
    assert rows == [
        (4, 0, 10, 6, 14, "w6 w7 w8 w9 w10 w11 w12 w13"),  # tie at 5.0: the lower position wins
        (4, 1, 1, 0, 3, "short prompt."),
        (9, 0, 59, 52, 60, "w52 w53 w54 w55 w56 w57 w58 w59"),  # shifted inside the prompt
    ]


def test_chunks_never_split_a_feature():
    windows = pl.DataFrame({"feature_id": np.repeat(np.arange(50), np.arange(50) % 7 + 1)})
    chunks = list(feature_chunks(windows, rows=20))
    assert sum(chunk.height for chunk in chunks) == windows.height
    seen = [set(chunk["feature_id"]) for chunk in chunks]
    assert all(not (a & b) for a, b in itertools.pairwise(seen))


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-7), ("float16", 1e-3), ("int8", 2e-2)])
def test_embedding_chunks_in_every_storage_dtype(fresh_embedder, dtype, tolerance):
    windows = pl.DataFrame(
        {
            "feature_id": [1, 1, 2],
            "prompt_id": [7, 3, 5],
            "text": ["months of the year", "the end of the road", "months of the year"],
        }
    )
    table = embed_windows(windows, sae_id="sae", embed=fresh_embedder.embed, dtype=dtype)
    assert table["prompt_ids"].to_list() == [[7, 3], [5]]
    reference = fresh_embedder.embed(windows["text"].to_list())
    stored = activation_embeddings_from_frame(table)
    assert stored.dtype == dtype
    np.testing.assert_allclose(stored.vectors, reference, atol=tolerance)
    np.testing.assert_allclose(np.linalg.norm(stored.vectors, axis=1), 1.0, atol=1e-3)


def test_int8_scales_make_dequantised_vectors_unit_length():
    vectors = np.random.default_rng(0).normal(size=(500, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stored, scales = quantise(vectors, "int8")
    back = dequantise(stored, scales)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(back * vectors, axis=1)) > 0.999


def brute_force(vectors: np.ndarray, counts: list[int]) -> list[tuple]:
    rows, start = [], 0
    for count in counts:
        block = vectors[start : start + count]
        start += count
        if count < 2:
            rows.append((count, None, None, None, None))
            continue
        similarities = [float(block[i] @ block[j]) for i in range(count) for j in range(i + 1, count)]
        rows.append((count, np.mean(similarities), np.std(similarities), min(similarities), max(similarities)))
    return rows


def test_pairwise_statistics_match_a_loop_and_give_nulls_below_two():
    rng = np.random.default_rng(5)
    counts = [0, 1, 2, 5, 20, 3, 1, 17]
    vectors = rng.normal(size=(sum(counts), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = ActivationEmbeddings(
        feature_id=np.arange(len(counts), dtype=np.uint32) * 3,
        offsets=np.concatenate(([0], np.cumsum(counts))),
        prompt_id=np.arange(sum(counts), dtype=np.uint32),
        vectors=vectors,
        dtype="float32",
    )
    table = pairwise_statistics(embeddings, sae_id="sae")
    assert table.schema == ACTIVATION_EXAMPLE_SIMILARITY
    assert table["feature_id"].to_list() == [0, 3, 6, 9, 12, 15, 18, 21]
    for actual, expected in zip(table.drop("feature_id", "sae_id").rows(), brute_force(vectors, counts), strict=True):
        assert actual[0] == expected[0]
        for got, want in zip(actual[1:], expected[1:], strict=True):
            assert (got is None and want is None) or abs(got - want) < 1e-5


def test_blocks_of_whole_features_select_the_windows_all_features_at_once_do():
    from sae_atlas.stages.activation_embeddings import whole_features

    rng = np.random.default_rng(1)
    prompts = pl.Series([[f"▁w{index}" for index in range(30)] for _ in range(50)])
    rows = [
        (feature, prompt, pairs(*((int(p), float(rng.uniform(0.1, 9))) for p in sorted(rng.choice(30, 2, False)))))
        for feature in range(40)
        for prompt in sorted(rng.choice(50, int(rng.integers(1, 30)), replace=False).tolist())
    ]
    examples = pl.DataFrame(
        {
            "feature_id": [row[0] for row in rows],
            "prompt_id": [row[1] for row in rows],
            "activation_pairs": [row[2] for row in rows],
        },
        schema_overrides={
            "feature_id": pl.UInt32,
            "prompt_id": pl.UInt32,
            "activation_pairs": pl.List(pl.Struct({"token_position": pl.UInt32, "activation_value": pl.Float32})),
        },
    ).with_columns(
        max_activation=pl.col("activation_pairs").list.eval(pl.element().struct.field("activation_value")).list.max()
    )
    # frames of arbitrary sizes, cutting features in two
    frames = [examples.slice(start, 37) for start in range(0, examples.height, 37)]
    blocks = list(whole_features(iter(frames)))
    assert pl.concat(blocks).equals(examples)
    firsts = [block["feature_id"][0] for block in blocks]
    lasts = [block["feature_id"][-1] for block in blocks]
    assert len(blocks) > 3  # no feature is cut between two blocks:
    assert all(previous < following for previous, following in zip(lasts, firsts[1:], strict=False))
    options = {"quantiles": 4, "per_quantile": 5, "window": 8}
    at_once = select_windows(examples, prompts, **options)
    by_block = pl.concat([select_windows(block, prompts, **options) for block in blocks])
    assert by_block.equals(at_once)
