"""Stage 0b, ``decoder_similarity``: each latent's top-k neighbours by decoder cosine.

Rows are L2-normalised, then compared block by block (``block_rows`` latents against all), so the
d_sae × d_sae matrix never exists: memory is O(block_rows × d_sae) at any width. Self is excluded;
neighbours are sorted by descending cosine, ties broken by the lower feature id, exactly, even when
a tie straddles the k-th place.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas.schema import STAGE_DECODER_SIMILARITY

BLOCK_ROWS = 512


def normalise_rows(weights: np.ndarray) -> np.ndarray:
    """Unit-length rows as float32; all-zero (dead) rows stay zero, so their cosines are 0."""
    weights = np.array(weights, dtype=np.float32, copy=True)
    norms = np.linalg.norm(weights, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    weights /= norms
    return weights


def _select_top_k(similarities: np.ndarray, row_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of ``similarities`` (self already at -inf), ties by lower id."""
    candidates = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(similarities, candidates, axis=1)
    order = np.lexsort((candidates, -values), axis=1)
    ids = np.take_along_axis(candidates, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    # argpartition picks arbitrarily among values equal to the k-th: find rows where that matters.
    kth = values[:, -1:]
    tied = np.flatnonzero((similarities >= kth).sum(axis=1) > k)
    for row in tied:
        eligible = np.flatnonzero(similarities[row] >= kth[row, 0])
        ranked = eligible[np.lexsort((eligible, -similarities[row, eligible]))][:k]
        ids[row], values[row] = ranked, similarities[row, ranked]
    return ids, values


def _blocks_numpy(normalised: np.ndarray, k: int, block_rows: int):
    n = normalised.shape[0]
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        similarities = normalised[start:stop] @ normalised.T
        similarities[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        yield start, stop, *_select_top_k(similarities, np.arange(start, stop), k)


def _blocks_torch(normalised: np.ndarray, k: int, block_rows: int, device: str):
    import torch

    matrix = torch.from_numpy(normalised).to(device)
    n = matrix.shape[0]
    # Take a few spare candidates on the device, then settle ties exactly on the CPU.
    spare = min(k + 16, n - 1)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        similarities = matrix[start:stop] @ matrix.T
        rows = torch.arange(stop - start, device=matrix.device)
        similarities[rows, rows + start] = -torch.inf
        values, candidates = torch.topk(similarities, spare, dim=1)
        kth = values[:, k - 1 : k]
        tied = ((similarities >= kth).sum(dim=1) > spare).nonzero().flatten().cpu().numpy()
        values, candidates = values.cpu().numpy(), candidates.cpu().numpy()
        order = np.lexsort((candidates, -values), axis=1)[:, :k]
        ids = np.take_along_axis(candidates, order, axis=1)
        top = np.take_along_axis(values, order, axis=1)
        if len(tied):  # more ties than spare candidates: redo those rows in full
            full = similarities[torch.from_numpy(tied).to(matrix.device)].cpu().numpy()
            tied_ids, tied_values = _select_top_k(full, tied + start, k)
            ids[tied], top[tied] = tied_ids, tied_values
        yield start, stop, ids, top


def top_k_neighbours(
    weights: np.ndarray, k: int = 10, *, block_rows: int = BLOCK_ROWS, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [d_sae, k] uint32, cosines [d_sae, k] float32) of each row's nearest other rows.

    ``device`` "cpu" uses NumPy; any torch device ("cuda", "cuda:1", "torch-cpu" for testing the
    torch path) runs the matrix products there.
    """
    normalised = normalise_rows(weights)
    n = normalised.shape[0]
    k = max(0, min(k, n - 1))
    ids = np.zeros((n, k), dtype=np.uint32)
    cosines = np.zeros((n, k), dtype=np.float32)
    if k == 0:
        return ids, cosines
    blocks = (
        _blocks_numpy(normalised, k, block_rows)
        if device == "cpu"
        else _blocks_torch(normalised, k, block_rows, "cpu" if device == "torch-cpu" else device)
    )
    for start, stop, block_ids, block_values in blocks:
        ids[start:stop] = block_ids
        cosines[start:stop] = np.clip(block_values, -1.0, 1.0)
    return ids, cosines


def neighbours_table(ids: np.ndarray, cosines: np.ndarray) -> pl.DataFrame:
    """``stages/decoder_similarity.parquet``: one row per latent with its neighbour list."""
    n, k = ids.shape
    neighbours = pl.DataFrame(
        {"feature_id": ids.ravel(), "cosine_similarity": cosines.ravel()},
        schema={"feature_id": pl.UInt32, "cosine_similarity": pl.Float32},
    ).select(pl.struct("feature_id", "cosine_similarity"))
    lists = neighbours.to_series().reshape((n, k)).cast(STAGE_DECODER_SIMILARITY["decoder_similarity"])
    return pl.DataFrame(
        {"feature_id": np.arange(n, dtype=np.uint32), "decoder_similarity": lists},
        schema=STAGE_DECODER_SIMILARITY,
    )
