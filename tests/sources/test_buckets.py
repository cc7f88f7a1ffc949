"""Feature buckets: records of any order come back grouped by feature range, in feature order, each
range in arrival order, whether they stayed in memory or went to disk."""

from __future__ import annotations

import numpy as np

from sae_atlas.sources.buckets import FeatureBuckets, RecordChunk


def chunk(features, lines, pairs_per_record=2) -> RecordChunk:
    features = np.asarray(features, dtype=np.int64)
    counts = np.full(len(features), pairs_per_record, dtype=np.int64)
    positions = np.arange(int(counts.sum()), dtype=np.uint32)
    return RecordChunk(
        features,
        features * 10,
        np.asarray(lines, dtype=np.int64),
        counts,
        positions,
        positions.astype(np.float32) / 2,
    )


def drained(buckets: FeatureBuckets) -> list[RecordChunk]:
    return list(buckets.buckets())


def test_records_come_back_by_feature_range_in_arrival_order(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.integers(0, 1000, 500)
    arrivals = [chunk(features[start : start + 50], np.arange(start, start + 50)) for start in range(0, 500, 50)]
    in_memory = FeatureBuckets(tmp_path / "a", bucket_features=100)
    on_disk = FeatureBuckets(tmp_path / "b", bucket_features=100, memory_pairs=30)
    for part in arrivals:
        in_memory.add(part)
        on_disk.add(part)
    assert in_memory.flushes == 0 and on_disk.flushes > 5
    assert any((tmp_path / "b").iterdir())
    memory_buckets, disk_buckets = drained(in_memory), drained(on_disk)
    assert len(memory_buckets) == len(set((features // 100).tolist()))
    assert [int(bucket.feature[0] // 100) for bucket in memory_buckets] == sorted(set((features // 100).tolist()))
    for from_memory, from_disk in zip(memory_buckets, disk_buckets, strict=True):
        assert len(set((from_memory.feature // 100).tolist())) == 1
        # arrival order within a range is the lines' order
        assert np.all(np.diff(from_memory.line) > 0)
        for name in ("feature", "prompt", "line", "counts", "positions", "values"):
            assert np.array_equal(getattr(from_memory, name), getattr(from_disk, name)), name
        # each record keeps its own pairs
        starts = np.concatenate(([0], np.cumsum(from_disk.counts)))[:-1]
        assert np.array_equal(from_disk.positions[starts + 1], from_disk.positions[starts] + 1)
    assert not list((tmp_path / "b").iterdir())  # what was written is gone once every bucket is read


def test_take_keeps_each_records_pairs():
    records = RecordChunk(
        np.array([5, 6, 7]),
        np.array([0, 1, 2]),
        np.array([1, 2, 3]),
        np.array([1, 3, 2]),
        np.arange(6, dtype=np.uint32),
        np.arange(6, dtype=np.float32),
    )
    taken = records.take(np.array([2, 0]))
    assert taken.feature.tolist() == [7, 5]
    assert taken.counts.tolist() == [2, 1]
    assert taken.positions.tolist() == [4, 5, 0]
