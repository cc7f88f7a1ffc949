"""Shared fixtures: one real embedding model per session, and small synthetic corpora."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_atlas.config import load_config
from sae_atlas.embedding import Embedder
from sae_atlas.pipeline import Pipeline
from sae_atlas.synth import SynthOptions, synthesize

FIXTURES = Path(__file__).parent / "fixtures" / "raw-formats"
PYTHIA_RUN = FIXTURES / "results" / "pythia-demo"

# Large enough for every concept to have several latents, small enough to run in seconds.
SMALL = SynthOptions(features=512, explained=80, explainers=3, scorers=2, prompts=600, ctx=64, d_model=128, seed=7)


@pytest.fixture(scope="session")
def embedder(tmp_path_factory) -> Embedder:
    """The builtin model, loaded once for the whole session."""
    return Embedder(cache_dir=tmp_path_factory.mktemp("embedding-cache"))


@pytest.fixture
def fresh_embedder(embedder, tmp_path) -> Embedder:
    """The session's model with an empty cache and zeroed statistics."""
    return Embedder(cache_dir=tmp_path / "cache", backend=embedder.backend)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("small-corpus"), SMALL)


@pytest.fixture(scope="session")
def small_run(small_corpus, embedder):
    """The pipeline run once over the small corpus: (config, report)."""
    config = load_config(small_corpus.config)
    report = Pipeline(config, embedder=embedder).run()
    return config, report
