"""Activation records partitioned by feature range: how the readers sort inputs of any size by
feature with memory bounded by a budget, not by the number of records.

Records arrive in whatever order their file has them. Each is put in the bucket of its feature
range (``feature // bucket_features``); buckets live in memory until the buffered pairs outgrow
the budget, then the whole buffer is written to the scratch directory, bucket after bucket, with
an index of where each bucket starts (a distribution sort's first pass). Reading back yields one
bucket at a time, in feature order, its records in arrival order, gathered from memory-mapped
slices of every flush, so the caller sorts a block of features and never the whole input. Inputs
that fit the budget never touch the disk.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUCKET_FEATURES = 8192
MEMORY_PAIRS = 8_000_000  # ~100 MB of buffered records before they are written out


@dataclass
class RecordChunk:
    """Records in columnar form: record ``i`` has pairs ``counts[i]`` long, consecutive in
    ``positions`` / ``values``; ``line`` is where it came from (0 when the format has no lines)."""

    feature: np.ndarray  # uint32
    prompt: np.ndarray  # uint32
    line: np.ndarray  # int64
    counts: np.ndarray  # int64
    positions: np.ndarray  # uint32
    values: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.feature)

    @staticmethod
    def concatenate(chunks: list[RecordChunk]) -> RecordChunk:
        return RecordChunk(*(np.concatenate([getattr(chunk, name) for chunk in chunks]) for name in FIELDS))

    def take(self, records: np.ndarray) -> RecordChunk:
        """The chunk of ``records`` (indices, in the order given), pairs included."""
        starts = np.concatenate(([0], np.cumsum(self.counts)))[:-1]
        counts = self.counts[records]
        pair_index = np.repeat(starts[records] - np.concatenate(([0], np.cumsum(counts)))[:-1], counts) + np.arange(
            int(counts.sum())
        )
        return RecordChunk(
            self.feature[records],
            self.prompt[records],
            self.line[records],
            counts,
            self.positions[pair_index],
            self.values[pair_index],
        )


FIELDS = ("feature", "prompt", "line", "counts", "positions", "values")


@dataclass
class _Flush:
    """One buffer written out: ``directory/<field>.npy``, bucket ``buckets[i]`` holding records
    ``record_starts[i]:record_starts[i+1]`` and pairs ``pair_starts[i]:pair_starts[i+1]``."""

    directory: Path
    buckets: np.ndarray
    record_starts: np.ndarray
    pair_starts: np.ndarray

    def read(self, bucket: int) -> RecordChunk | None:
        index = int(np.searchsorted(self.buckets, bucket))
        if index == len(self.buckets) or self.buckets[index] != bucket:
            return None
        records = slice(self.record_starts[index], self.record_starts[index + 1])
        pairs = slice(self.pair_starts[index], self.pair_starts[index + 1])
        columns = {}
        for name in FIELDS:
            array = np.load(self.directory / f"{name}.npy", mmap_mode="r")
            columns[name] = np.array(array[pairs if name in PAIR_FIELDS else records])
        return RecordChunk(**columns)


PAIR_FIELDS = ("positions", "values")


class FeatureBuckets:
    """Record chunks by feature range; see the module docstring.

    ``scratch`` is where buffers are written when they outgrow memory (a temporary directory is
    made when it is None); :meth:`close` removes what was written.
    """

    def __init__(
        self,
        scratch: Path | None = None,
        *,
        bucket_features: int = BUCKET_FEATURES,
        memory_pairs: int = MEMORY_PAIRS,
    ):
        self.bucket_features = bucket_features
        self.memory_pairs = memory_pairs
        self._scratch = Path(scratch) if scratch is not None else None
        self._own_scratch = scratch is None
        self._memory: dict[int, list[RecordChunk]] = {}
        self._flushed: list[_Flush] = []
        self._buffered_pairs = 0
        self.records = 0
        self.flushes = 0  # how many times the buffer went to disk

    def add(self, chunk: RecordChunk) -> None:
        """Put ``chunk``'s records in their buckets (spilling to disk when over budget)."""
        if not len(chunk):
            return
        self.records += len(chunk)
        bucket = (chunk.feature // self.bucket_features).astype(np.int64)
        if bucket.min() == bucket.max():
            self._memory.setdefault(int(bucket[0]), []).append(chunk)
        else:
            order = np.argsort(bucket, kind="stable")
            edges = np.flatnonzero(np.diff(bucket[order])) + 1
            for records in np.split(order, edges):
                self._memory.setdefault(int(bucket[records[0]]), []).append(chunk.take(records))
        self._buffered_pairs += int(chunk.counts.sum())
        if self._buffered_pairs > self.memory_pairs:
            self._flush()

    def _directory(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="sae-atlas-buckets-"))
        directory = self._scratch / f"flush-{self.flushes:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def _flush(self) -> None:
        directory = self._directory()
        buckets = np.array(sorted(self._memory), dtype=np.int64)
        merged = [RecordChunk.concatenate(self._memory[int(bucket)]) for bucket in buckets]
        whole = RecordChunk.concatenate(merged)
        for name in FIELDS:
            np.save(directory / f"{name}.npy", getattr(whole, name))
        self._flushed.append(
            _Flush(
                directory,
                buckets,
                np.concatenate(([0], np.cumsum([len(chunk) for chunk in merged]))),
                np.concatenate(([0], np.cumsum([int(chunk.counts.sum()) for chunk in merged]))),
            )
        )
        self._memory.clear()
        self._buffered_pairs = 0
        self.flushes += 1

    def buckets(self) -> Iterator[RecordChunk]:
        """Each non-empty bucket's records in arrival order, buckets in feature order; what was
        written to disk is removed once every bucket has been read."""
        on_disk = set().union(*(flush.buckets.tolist() for flush in self._flushed)) if self._flushed else set()
        for bucket in sorted({*self._memory, *on_disk}):
            chunks = [part for flush in self._flushed if (part := flush.read(bucket)) is not None]
            chunks.extend(self._memory.pop(bucket, []))
            yield RecordChunk.concatenate(chunks)
        self.close()

    def close(self) -> None:
        """Forget every record and remove the files written."""
        self._memory.clear()
        for flush in self._flushed:
            shutil.rmtree(flush.directory, ignore_errors=True)
        self._flushed.clear()
        if self._own_scratch and self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
