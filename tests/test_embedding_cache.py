"""The embedding cache's segments: sorted, looked up by binary search, compacted, and never an error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae_atlas.embedding_cache import MAX_CACHE_SEGMENTS, EmbeddingCache, text_key


def vectors_for(indices, dimension=4) -> np.ndarray:
    return np.stack([np.arange(dimension, dtype=np.float32) + index for index in indices])


def test_many_stores_stay_few_segments_and_every_vector_is_found(tmp_path):
    cache = EmbeddingCache(tmp_path)
    for batch in range(60):
        indices = range(batch * 7, batch * 7 + 7)
        cache.store([text_key(f"text {index}") for index in indices], vectors_for(indices))
    segments = [path for path in tmp_path.glob("segment-*") if path.is_dir()]
    assert 1 < len(segments) <= MAX_CACHE_SEGMENTS
    asked = [*range(0, 420, 13), 10_000]
    found, vectors = EmbeddingCache(tmp_path).lookup([text_key(f"text {index}") for index in asked])
    assert found.tolist() == [index < 420 for index in asked]
    np.testing.assert_array_equal(vectors, vectors_for([index for index in asked if index < 420]))


def test_a_merge_keeps_every_key_once_and_reads_back_in_chunks(tmp_path, monkeypatch):
    import sae_atlas.embedding_cache as module

    monkeypatch.setattr(module, "MERGE_CHUNK_ROWS", 5)  # the merged vectors are written in several chunks
    cache = EmbeddingCache(tmp_path)
    cache.store([text_key(f"t{index}") for index in range(10)], vectors_for(range(10)))
    cache.store([text_key(f"t{index}") for index in range(5, 20)], vectors_for(range(5, 20)))
    cache.merge(cache.segments())
    [merged] = cache.segments()
    assert len(merged) == 20
    assert list(merged.keys) == sorted(merged.keys)
    found, vectors = cache.lookup([text_key(f"t{index}") for index in (19, 0, 7)])
    assert found.all()
    np.testing.assert_array_equal(vectors, vectors_for([19, 0, 7]))


def test_damaged_segments_are_misses_and_legacy_segments_are_converted(tmp_path):
    legacy = pa.table(
        {
            "key": pa.array([text_key("old text")], pa.binary(16)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors_for([7]).ravel()), 4),
        }
    )
    pq.write_table(legacy, tmp_path / "segment-1-old.parquet")
    (tmp_path / "segment-2-broken").mkdir()
    (tmp_path / "segment-2-broken" / "keys.npy").write_bytes(b"not an array")
    cache = EmbeddingCache(tmp_path)
    found, vectors = cache.lookup([text_key("old text"), text_key("never stored")])
    assert found.tolist() == [True, False]
    np.testing.assert_array_equal(vectors, vectors_for([7]))
    assert not list(tmp_path.glob("*.parquet"))  # converted once
    cache.store([text_key("new text")], vectors_for([1]))
    assert cache.lookup([text_key("new text")])[0].tolist() == [True]
