"""Stage 0b, ``decoder_similarity``: each latent's top-k neighbours by decoder cosine.

Rows are L2-normalised, then compared block by block (``block_rows`` latents against all), so the
d_sae × d_sae matrix never exists: memory is O(block_rows × d_sae) at any width. Self is excluded;
neighbours are sorted by descending cosine, ties broken by the lower feature id, exactly, even when
a tie straddles the k-th place.

The result is a function of the weights alone, not of where or how widely the work runs: each
block's product is computed by one BLAS thread (OpenBLAS splits a product between its threads in a
way that changes the last bits of the sums), and the parallelism is across blocks instead, whose
boundaries are fixed by ``BLOCK_ROWS``. So the local engine at any thread count and Ray at any
number of workers write byte-identical neighbours on machines whose BLAS picks the same kernel.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits

from sae_atlas import layout
from sae_atlas.devices import resolve_device
from sae_atlas.engine import available_cores
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_DECODER_SIMILARITY
from sae_atlas.sources import decoder as decoder_source
from sae_atlas.stage import Plan, Product, Skip, Stage, StageContext, Unusable, fingerprint_files

BLOCK_ROWS = 512
# Rows per engine task: locally the tasks run one after another (no cost); on a cluster they are
# spread over the workers, each reading the one shared copy of the normalised matrix.
ROWS_PER_TASK = 8192
# Candidates taken per row beyond k, so that ties at the k-th place can be settled exactly.
SPARE_CANDIDATES = 16


def non_finite_rows(weights: np.ndarray, block_rows: int = 8192) -> np.ndarray:
    """Indices of the rows holding a NaN or an infinity (checked in blocks: no full-size mask)."""
    bad = [
        start + np.flatnonzero(~np.isfinite(weights[start : start + block_rows]).all(axis=1))
        for start in range(0, len(weights), block_rows)
    ]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def normalise_rows(weights: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Unit-length rows as C-ordered float32; all-zero (dead) rows stay zero, so their cosines are
    0. With ``overwrite``, a float32 C-ordered writable ``weights`` is normalised in place (at
    131k × 3584 a copy is 1.9 GB)."""
    reusable = overwrite and weights.dtype == np.float32 and weights.flags.c_contiguous and weights.flags.writeable
    weights = weights if reusable else np.array(weights, dtype=np.float32, order="C", copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", weights, weights))
    norms[norms == 0] = 1.0
    weights /= norms[:, None]
    return weights


def _exact_row(similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one row by descending value, then ascending id (the slow path for heavy ties)."""
    order = np.lexsort((np.arange(len(similarities)), -similarities))[:k]
    return order, similarities[order]


def _select(similarities, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (ids, values) of every row of a torch tensor of similarities.

    ``torch.topk`` takes k + SPARE_CANDIDATES candidates (an order of magnitude faster than NumPy's
    argpartition here). They hold every value ≥ the k-th one unless the last candidate still ties
    with it: only those rows can have more tied values than candidates, and are redone exactly.
    """
    import torch

    spare = min(k + SPARE_CANDIDATES, similarities.shape[1])
    values, candidates = torch.topk(similarities, spare, dim=1)
    values, candidates = values.cpu().numpy(), candidates.cpu().numpy()
    crowded = np.flatnonzero(values[:, -1] >= values[:, k - 1]) if spare < similarities.shape[1] else []
    order = np.lexsort((candidates, -values), axis=1)[:, :k]
    ids = np.take_along_axis(candidates, order, axis=1)
    top = np.take_along_axis(values, order, axis=1)
    for row in crowded:
        ids[row], top[row] = _exact_row(similarities[int(row)].cpu().numpy(), k)
    return ids, top


def block_threads() -> int:
    """Threads that compute blocks side by side: the cores this process may use, or what an
    engine's task was granted (Ray sets ``OMP_NUM_THREADS`` to a task's CPUs)."""
    granted = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(granted)) if granted.isdigit() else available_cores()


def _cpu_blocks(normalised: np.ndarray, blocks: list[tuple[int, int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``_select`` of each block's similarities against all rows, products by one BLAS thread each.

    Each thread reuses one block buffer (512 × d_sae float32: 268 MB at 131k latents)."""
    import torch

    n = normalised.shape[0]
    buffers = threading.local()

    def one(block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        first, last = block
        if getattr(buffers, "block", None) is None:
            buffers.block = np.empty((blocks[0][1] - blocks[0][0], n), dtype=np.float32)
        similarities = buffers.block[: last - first]
        np.matmul(normalised[first:last], normalised.T, out=similarities)
        local = np.arange(last - first)
        similarities[local, local + first] = -np.inf
        return _select(torch.from_numpy(similarities), k)

    threads = min(block_threads(), len(blocks))
    # threadpool_limits is process-wide: it holds for every block thread until all are done.
    with threadpool_limits(limits=1, user_api="blas"):
        if threads <= 1:
            return [one(block) for block in blocks]
        with ThreadPoolExecutor(threads, thread_name_prefix="decoder-block") as pool:
            return list(pool.map(one, blocks))


def neighbour_rows(normalised: np.ndarray, rows: tuple[int, int, int, str, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, cosines, device) of the top-k neighbours of rows ``start:stop`` of ``normalised``.

    ``rows`` is ``(start, stop, k, device, block_rows)``; ``normalised`` (unit rows, read only) is
    compared block by block against all rows. On "cpu" the products are NumPy matmuls, one BLAS
    thread per block and blocks on parallel threads (see the module docstring); on any other torch
    device ("cuda", or "auto" where there is one) they run there. Selection is the same exact
    procedure on both. A module-level function of plain arguments: an engine may run row ranges
    as separate tasks (one copy of ``normalised`` shared).
    """
    import torch

    start, stop, k, device, block_rows = rows
    device = resolve_device(device)
    ids = np.zeros((stop - start, k), dtype=np.uint32)
    cosines = np.zeros((stop - start, k), dtype=np.float32)
    if k == 0 or stop <= start:
        return ids, cosines, device
    blocks = [(first, min(first + block_rows, stop)) for first in range(start, stop, block_rows)]
    if device == "cpu":
        selected = _cpu_blocks(normalised, blocks, k)
    else:
        matrix = torch.from_numpy(np.ascontiguousarray(normalised)).to(device)
        selected = []
        for first, last in blocks:
            similarities = matrix[first:last] @ matrix.T
            index = torch.arange(last - first, device=matrix.device)
            similarities[index, index + first] = -torch.inf
            selected.append(_select(similarities, k))
    for (first, last), (block_ids, block_values) in zip(blocks, selected, strict=True):
        ids[first - start : last - start] = block_ids
        cosines[first - start : last - start] = np.clip(block_values, -1.0, 1.0)
    return ids, cosines, device


def row_ranges(n: int, k: int, device: str, *, rows_per_task: int, block_rows: int = BLOCK_ROWS) -> list[tuple]:
    """The tasks of :func:`neighbour_rows` covering all ``n`` rows, ``rows_per_task`` each."""
    return [(start, min(start + rows_per_task, n), k, device, block_rows) for start in range(0, n, rows_per_task)]


def top_k_neighbours(
    weights: np.ndarray, k: int = 10, *, block_rows: int = BLOCK_ROWS, device: str = "cpu", overwrite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [d_sae, k] uint32, cosines [d_sae, k] float32) of each row's nearest other rows.

    With ``overwrite``, ``weights`` may be normalised in place rather than copied.
    """
    normalised = normalise_rows(weights, overwrite=overwrite)
    n = normalised.shape[0]
    ids, cosines, _ = neighbour_rows(normalised, (0, n, max(0, min(k, n - 1)), device, block_rows))
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


def plan(context: StageContext) -> Plan:
    settings = context.config.decoder
    if settings is None:
        raise Skip("no [decoder] in the config")
    path = Path(settings.path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]

    def execute(problems: Problems) -> Product:
        try:
            # the runs' configured hookpoint (no directory walk): chooses among a repository's SAEs
            hookpoint = next((run.hookpoint for run in context.runs() if run.hookpoint), None)
            weights = decoder_source.read_decoder(path, sae_id=context.sae_id, hookpoint=hookpoint)
        except decoder_source.DecoderError as error:
            problems.add(error.path, error.reason)
            raise Unusable(f"decoder weights unusable ({error})") from None
        bad = non_finite_rows(weights.weights)
        if len(bad):
            # Rule: a latent whose decoder row is not finite is treated as dead (cosine 0 with all).
            problems.add(
                weights.files[-1],
                f"decoder rows of {len(bad)} latent(s) hold NaN or infinite values (first: latent {bad[0]}); "
                "treated as dead latents (cosine 0)",
                latent=int(bad[0]),
                kind="invalid",
            )
            if not weights.weights.flags.writeable:
                weights.weights = weights.weights.copy()
            weights.weights[bad] = 0.0
        # The weights were read for this stage alone: normalise them in place, not in a copy.
        d_sae, d_model = weights.weights.shape
        normalised = normalise_rows(weights.weights, overwrite=True)
        del weights.weights
        k = max(0, min(settings.top_k, d_sae - 1))
        results = context.map_shared(
            neighbour_rows,
            normalised,
            row_ranges(d_sae, k, settings.device, rows_per_task=ROWS_PER_TASK),
            gpus=0 if settings.device == "cpu" else 1,
        )
        # On a cluster the object store holds the matrix now: drop ours (14 GiB at 1M latents).
        # Locally the tasks still hold it until they are done.
        del normalised
        parts = list(results)
        ids = np.concatenate([part[0] for part in parts]) if parts else np.zeros((0, k), np.uint32)
        cosines = np.concatenate([part[1] for part in parts]) if parts else np.zeros((0, k), np.float32)
        device = ",".join(sorted({part[2] for part in parts})) or resolve_device(settings.device)
        table = neighbours_table(ids, cosines)
        statistics = {
            "d_sae": int(d_sae),
            "d_model": int(d_model),
            "format": weights.format,
            "recognised_as": weights.version,
            "sae": weights.details,
            "top_k": int(ids.shape[1]),
            "device": device,
            "non_finite_rows": len(bad),
        }
        return Product(data=table, rows=table.height, statistics=statistics, notes=weights.notes)

    return Plan(key={"inputs": fingerprint_files(files)}, execute=execute)


STAGE = Stage(
    name="decoder_similarity",
    output=layout.DECODER_SIMILARITY,
    version=1,
    plan=plan,
    config=("decoder.path", "decoder.top_k"),
    settings=("decoder.device",),
    description="each latent's top-k neighbours by decoder cosine",
)
