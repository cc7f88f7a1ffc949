"""The content-addressed embedding cache: text key → vector, per model namespace.

Each run that embeds new texts adds one segment: a directory holding ``keys.npy`` (sorted 16-byte
keys) and ``vectors.npy`` (float32, in key order), written under a temporary name and renamed, so
concurrent runs never clash and a crash never leaves a half segment. A lookup binary-searches each
segment's keys (memory-mapped) and reads only the vectors it needs (the vector file is mapped for
that one read and released, so a fully cached run does not keep gigabytes of vectors resident): it
costs O(keys asked × log(cache size)) whatever the cache's size, and nothing is loaded up front.
Past :data:`MAX_CACHE_SEGMENTS`, the smallest segments are merged (size-tiered, so each vector is
rewritten O(log n) times) by streaming through them in key order, a chunk at a time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae_atlas.layout import temporary_path

MAX_CACHE_SEGMENTS = 16
MERGED_PER_COMPACTION = 8
MERGE_CHUNK_ROWS = 65_536
SEGMENT_GLOB = "segment-*"
LEGACY_GLOB = "segment-*.parquet"  # sae-atlas ≤ 0.1 wrote Parquet segments; they are converted once
KEY = np.dtype("S16")
KEYS_FILE, VECTORS_FILE = "keys.npy", "vectors.npy"


def text_key(text: str) -> bytes:
    """The cache key of a text: 16 bytes of BLAKE2b over its UTF-8 encoding."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _keys_array(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=KEY) if keys else np.zeros(0, dtype=KEY)


@dataclass
class Segment:
    """One segment: its sorted keys (memory-mapped) and where its vectors are."""

    path: Path
    keys: np.ndarray  # S16, sorted
    dimension: int

    @staticmethod
    def open(path: Path) -> Segment:
        keys = np.load(path / KEYS_FILE, mmap_mode="r")
        vectors = np.load(path / VECTORS_FILE, mmap_mode="r")
        if keys.dtype != KEY or vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"{path}: keys and vectors do not match")
        return Segment(path, keys, vectors.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, asked: np.ndarray) -> np.ndarray:
        """For each of ``asked`` (S16 keys), its row here, or -1."""
        if not len(self.keys):
            return np.full(len(asked), -1, dtype=np.int64)
        rows = np.searchsorted(self.keys, asked)
        inside = rows < len(self.keys)
        hit = np.zeros(len(asked), dtype=bool)
        hit[inside] = self.keys[rows[inside]] == asked[inside]
        return np.where(hit, rows, -1)

    def take(self, rows: np.ndarray | slice) -> np.ndarray:
        """The vectors of ``rows``, read through a mapping released straight after."""
        vectors = np.load(self.path / VECTORS_FILE, mmap_mode="r")
        try:
            return np.array(vectors[rows], dtype=np.float32)
        finally:
            del vectors


class _VectorWriter:
    """A ``.npy`` file of ``rows`` × ``dimension`` float32 written a chunk at a time."""

    def __init__(self, path: Path, rows: int, dimension: int):
        self.handle = path.open("wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_2_0(self.handle, {**header, "shape": (rows, dimension)})

    def write(self, vectors: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())

    def close(self) -> None:
        self.handle.close()


def _publish(directory: Path, target: Path) -> None:
    os.replace(directory, target)


class EmbeddingCache:
    """Vectors by text key, in segments under one directory per model namespace (see the module
    docstring)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._open: dict[Path, Segment] = {}

    def _new_path(self) -> Path:
        return self.directory / f"segment-{time.time_ns()}-{uuid.uuid4().hex[:8]}"

    def segments(self) -> list[Segment]:
        """The segments present now (another process may have added or merged some), oldest first."""
        if not self.directory.is_dir():
            return []
        self._convert_legacy()
        present = sorted(path for path in self.directory.glob(SEGMENT_GLOB) if path.is_dir())
        segments = []
        for path in present:
            segment = self._open.get(path)
            if segment is None:
                try:
                    segment = Segment.open(path)
                except (OSError, ValueError):
                    continue  # merged away meanwhile, or damaged: a cache miss, never an error
                self._open[path] = segment
            segments.append(segment)
        for gone in set(self._open) - set(present):
            del self._open[gone]
        return segments

    def lookup(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask, vectors of the found keys in the order of ``keys``)."""
        found = np.zeros(len(keys), dtype=bool)
        if not keys:
            return found, None
        asked = _keys_array(keys)
        vectors: np.ndarray | None = None
        for segment in reversed(self.segments()):  # newest first
            missing = np.flatnonzero(~found)
            if not len(missing):
                break
            rows = segment.find(asked[missing])
            hits = rows >= 0
            if not hits.any():
                continue
            try:
                taken = segment.take(rows[hits])
            except (OSError, ValueError):
                continue  # merged away between listing and reading: a miss
            if vectors is None:
                vectors = np.zeros((len(keys), segment.dimension), dtype=np.float32)
            vectors[missing[hits]] = taken
            found[missing[hits]] = True
        return found, (vectors[found] if vectors is not None else None)

    def store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Add a segment with ``vectors`` under ``keys``."""
        if not keys:
            return
        stored = _keys_array(keys)
        order = np.argsort(stored, kind="stable")
        self._write([(stored[order], np.asarray(vectors, dtype=np.float32)[order])], len(keys), vectors.shape[1])
        self._compact()

    def _write(self, chunks, rows: int, dimension: int) -> None:
        """Write a segment from (keys, vectors) chunks in key order, and publish it atomically."""
        target = self._new_path()
        temporary = temporary_path(target)
        temporary.mkdir(parents=True)
        try:
            writer = _VectorWriter(temporary / VECTORS_FILE, rows, dimension)
            keys = []
            try:
                for chunk_keys, chunk_vectors in chunks:
                    keys.append(chunk_keys)
                    writer.write(chunk_vectors)
            finally:
                writer.close()
            np.save(temporary / KEYS_FILE, np.concatenate(keys) if keys else np.zeros(0, dtype=KEY))
            _publish(temporary, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _compact(self) -> None:
        segments = self.segments()
        if len(segments) <= MAX_CACHE_SEGMENTS:
            return
        self.merge(sorted(segments, key=len)[:MERGED_PER_COMPACTION])

    def merge(self, segments: list[Segment]) -> None:
        """Replace ``segments`` by one: their keys merged in order (a key in several keeps one
        vector), the vectors copied a chunk at a time."""
        if len(segments) < 2:
            return
        keys = np.concatenate([np.asarray(segment.keys) for segment in segments])
        source = np.repeat(np.arange(len(segments)), [len(segment) for segment in segments])
        row = np.concatenate([np.arange(len(segment)) for segment in segments])
        order = np.argsort(keys, kind="stable")
        keys, source, row = keys[order], source[order], row[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        keys, source, row = keys[first], source[first], row[first]
        dimension = segments[0].dimension

        def chunks():
            for start in range(0, len(keys), MERGE_CHUNK_ROWS):
                stop = min(start + MERGE_CHUNK_ROWS, len(keys))
                block = np.empty((stop - start, dimension), dtype=np.float32)
                for index, segment in enumerate(segments):
                    chosen = np.flatnonzero(source[start:stop] == index)
                    if len(chosen):
                        # each source is in key order: its rows in this chunk lie between the first and
                        # the last (gaps only where a key was kept from another source); one read
                        rows = row[start:stop][chosen]
                        block[chosen] = segment.take(slice(int(rows[0]), int(rows[-1]) + 1))[rows - rows[0]]
                yield keys[start:stop], block

        self._write(chunks(), len(keys), dimension)
        for segment in segments:
            self._open.pop(segment.path, None)
            shutil.rmtree(segment.path, ignore_errors=True)

    def _convert_legacy(self) -> None:
        """Turn Parquet segments of earlier versions into one segment of the current format."""
        legacy = sorted(self.directory.glob(LEGACY_GLOB))
        if not legacy:
            return
        keys, vectors = [], []
        for path in legacy:
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowException):
                continue
            column = table["vector"].combine_chunks()
            keys.extend(table["key"].to_pylist())
            vectors.append(column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size))
        if keys:
            stored = _keys_array(keys)
            order = np.argsort(stored, kind="stable")
            merged = np.concatenate(vectors)
            self._write([(stored[order], merged[order])], len(stored), merged.shape[1])
        for path in legacy:
            path.unlink(missing_ok=True)
