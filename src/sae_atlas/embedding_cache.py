"""The content-addressed embedding cache: text key → vector, per model namespace.

Each run that embeds new texts appends one Parquet segment (written atomically), so concurrent
runs never clash and a crash never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae_atlas.layout import temporary_path

# Merge cache segments once there are this many, so lookups stay one read per segment.
MAX_CACHE_SEGMENTS = 16


def text_key(text: str) -> bytes:
    """The cache key of a text: 16 bytes of BLAKE2b over its UTF-8 encoding."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class EmbeddingCache:
    """Vectors by text key, in Parquet segments under one directory per model namespace.

    Each run that embeds new texts appends one segment (written atomically), so concurrent runs
    never clash and a crash never leaves a half-written cache.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _segments(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("segment-*.parquet"))

    def lookup(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask, vectors of the found keys in the order of ``keys``)."""
        found = np.zeros(len(keys), dtype=bool)
        if not keys:
            return found, None
        position = {key: index for index, key in enumerate(keys)}
        vectors: np.ndarray | None = None
        for segment in self._segments():
            try:
                stored = pq.read_table(segment, columns=["key"])["key"].to_pylist()
            except (OSError, pa.ArrowException):
                continue  # an unreadable segment is simply a cache miss
            rows, targets = [], []
            for row, key in enumerate(stored):
                index = position.get(key)
                if index is not None and not found[index]:
                    rows.append(row)
                    targets.append(index)
                    found[index] = True
            if not rows:
                continue
            column = pq.read_table(segment, columns=["vector"])["vector"].combine_chunks()
            dimension = column.type.list_size
            block = column.values.to_numpy(zero_copy_only=False).reshape(-1, dimension)
            if vectors is None:
                vectors = np.zeros((len(keys), dimension), dtype=np.float32)
            vectors[targets] = block[rows]
        if vectors is not None:
            vectors = vectors[found]
        return found, vectors

    def store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Append a segment with ``vectors`` under ``keys``."""
        if not keys:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        dimension = vectors.shape[1]
        table = pa.table(
            {
                "key": pa.array(keys, type=pa.binary(16)),
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel()), dimension
                ),
            }
        )
        target = self.directory / f"segment-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        temporary = temporary_path(target)
        pq.write_table(table, temporary, compression="zstd")
        os.replace(temporary, target)
        self._compact()

    def _compact(self) -> None:
        segments = self._segments()
        if len(segments) <= MAX_CACHE_SEGMENTS:
            return
        tables = []
        for segment in segments:
            try:
                tables.append(pq.read_table(segment))
            except (OSError, pa.ArrowException):
                continue
        merged = pa.concat_tables(tables)
        target = self.directory / f"segment-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        temporary = temporary_path(target)
        pq.write_table(merged, temporary, compression="zstd")
        os.replace(temporary, target)
        for segment in segments:
            segment.unlink(missing_ok=True)
