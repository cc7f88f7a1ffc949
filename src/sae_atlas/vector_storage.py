"""How activation-embedding vectors are stored (``[output] embedding_dtype``) and read back.

- ``float32`` (default): the contract's ``List(List(Float32))``.
- ``float16``: half the size; the stage-5 statistics move by ~1e-4.
- ``int8``: a quarter of the size. Each vector is stored as int8 components ``q`` plus one scale
  (an ``embedding_scales`` column added after the contract columns) chosen as ``1 / ‖q‖``, so the
  dequantised vector ``q · scale`` is exactly unit length and dot products stay cosines.

Every reader goes through :func:`read_activation_embeddings`, which dequantises transparently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

DTYPES = {"float32": pl.Float32, "float16": pl.Float16, "int8": pl.Int8}
SCALES_COLUMN = "embedding_scales"


def quantise(vectors: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored components of unit ``vectors`` [n, d], and the per-vector scales for int8."""
    if dtype == "float32":
        return np.ascontiguousarray(vectors, dtype=np.float32), None
    if dtype == "float16":
        return vectors.astype(np.float16), None
    if dtype == "int8":
        peak = np.abs(vectors).max(axis=1, keepdims=True)
        peak[peak == 0] = 1.0
        stored = np.rint(vectors / peak * 127.0).astype(np.int8)
        norms = np.linalg.norm(stored.astype(np.float32), axis=1)
        scales = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        return stored, scales
    raise ValueError(f"unknown embedding dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def dequantise(stored: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Float32 vectors back from their stored form."""
    vectors = stored.astype(np.float32)
    if scales is not None:
        vectors *= scales[:, None]
    return vectors


def dtype_of(schema: pl.Schema) -> str:
    """The ``embedding_dtype`` an activation-embeddings file was written with."""
    inner = schema["embeddings"].inner.inner
    for name, dtype in DTYPES.items():
        if inner == dtype:
            return name
    raise ValueError(f"embeddings are stored as {inner}, not one of {', '.join(DTYPES)}")


@dataclass
class ActivationEmbeddings:
    """Every feature's sampled embeddings, flat: feature i owns rows offsets[i]:offsets[i+1]."""

    feature_id: np.ndarray
    offsets: np.ndarray
    prompt_id: np.ndarray
    vectors: np.ndarray  # float32 [n, d]
    dtype: str

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def read_activation_embeddings(path: str | Path) -> ActivationEmbeddings:
    """Read ``activation_embeddings.parquet`` with float32 vectors, whatever the stored dtype."""
    frame = pl.read_parquet(path)
    return activation_embeddings_from_frame(frame)


def activation_embeddings_from_frame(frame: pl.DataFrame) -> ActivationEmbeddings:
    """:func:`read_activation_embeddings` for a table already in memory."""
    dtype = dtype_of(frame.schema)
    counts = frame["embeddings"].list.len().to_numpy().astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    flat = frame["embeddings"].explode().drop_nulls()
    dimension = int(flat.list.len().max() or 0)
    stored = flat.list.to_array(dimension).to_numpy() if len(flat) else np.zeros((0, dimension), np.float32)
    scales = None
    if dtype == "int8":
        scales = frame[SCALES_COLUMN].explode().drop_nulls().to_numpy().astype(np.float32)
    prompt_ids = frame["prompt_ids"].explode().drop_nulls().to_numpy().astype(np.uint32)
    return ActivationEmbeddings(
        feature_id=frame["feature_id"].to_numpy().astype(np.uint32),
        offsets=offsets,
        prompt_id=prompt_ids,
        vectors=dequantise(stored, scales),
        dtype=dtype,
    )
