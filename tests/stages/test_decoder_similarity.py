"""Stage 0b: exact top-k decoder neighbours, in row blocks."""

from __future__ import annotations

import numpy as np
import pytest

from sae_atlas.stages.decoder_similarity import neighbours_table, top_k_neighbours


def brute_force(weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(weights, axis=1, keepdims=True)
    unit = weights / np.where(norms == 0, 1, norms)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    ids = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in similarity])
    return ids, np.take_along_axis(similarity, ids, axis=1)


@pytest.fixture
def weights():
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(300, 16)).astype(np.float32)
    matrix[10] = matrix[20] = matrix[30] = matrix[40] = matrix[5]  # four-way tie straddling k = 3
    matrix[7] = 0.0  # a dead latent
    return matrix


@pytest.mark.parametrize("block_rows", [1, 7, 64, 512])
def test_matches_brute_force_with_ties_at_the_boundary(weights, block_rows):
    ids, cosines = top_k_neighbours(weights, 3, block_rows=block_rows)
    expected_ids, expected_cosines = brute_force(weights.astype(np.float64), 3)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(cosines, expected_cosines, atol=1e-5)
    assert ids[5].tolist() == [10, 20, 30]  # ties go to the lower feature ids
    assert ids.dtype == np.uint32 and cosines.dtype == np.float32


def test_more_ties_than_spare_candidates_are_settled_exactly():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(120, 8)).astype(np.float32)
    matrix[60:100] = matrix[50]  # 41 identical rows: 40 ties at cosine 1 for each of them
    ids, _cosines = top_k_neighbours(matrix, 3, block_rows=32)
    assert ids[50].tolist() == [60, 61, 62]
    assert ids[99].tolist() == [50, 60, 61]
    expected_ids, _ = brute_force(matrix.astype(np.float64), 3)
    np.testing.assert_array_equal(ids, expected_ids)


def test_never_self_and_cosines_within_bounds(weights):
    ids, cosines = top_k_neighbours(weights, 10, block_rows=32)
    assert not (ids == np.arange(len(weights))[:, None]).any()
    assert (cosines <= 1.0).all() and (cosines >= -1.0).all()
    assert (np.diff(cosines, axis=1) <= 0).all()


def test_torch_device_path_gives_the_same_neighbours(weights):
    numpy_ids, numpy_cosines = top_k_neighbours(weights, 5, block_rows=50)
    # "cpu:0" is a torch device string: the code path CUDA takes, run on the CPU.
    torch_ids, torch_cosines = top_k_neighbours(weights, 5, block_rows=50, device="cpu:0")
    np.testing.assert_array_equal(numpy_ids, torch_ids)
    np.testing.assert_allclose(numpy_cosines, torch_cosines, atol=1e-6)


def test_k_is_capped_by_the_width():
    ids, cosines = top_k_neighbours(np.eye(3, dtype=np.float32), 10)
    assert ids.shape == (3, 2)
    assert ids[0].tolist() == [1, 2] and cosines[0].tolist() == [0.0, 0.0]


def test_table_has_one_sorted_list_per_latent(weights):
    table = neighbours_table(*top_k_neighbours(weights, 4))
    assert table.height == len(weights)
    assert table["feature_id"].to_list() == list(range(len(weights)))
    first = table.row(5, named=True)["decoder_similarity"]
    assert [entry["feature_id"] for entry in first][:3] == [10, 20, 30]
