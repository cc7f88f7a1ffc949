"""Outputs do not depend on where or how widely the work runs: BLAS threads, cores, engines.

OpenBLAS splits a float32 product between its threads in a way that changes the last bits of the
sums, for some kernels (``OPENBLAS_CORETYPE=Haswell`` is one, on any x86-64 CPU with AVX2). Each
case runs the decoder stage in a fresh process under that kernel, with the BLAS thread count, the
cores the process may use (so the block threads of the local engine and the workers of a Ray
instance of its own) and the engine set as a user could set them, and compares the files' bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_atlas.embedding import Embedder

pytestmark = pytest.mark.slow

PYTHIA_RUN = Path(__file__).parent / "fixtures" / "raw-formats" / "results" / "pythia-demo"

# Runs the decoder stage in this process's own setting; prints the digest of its neighbour columns.
DECODER_STAGE = """
import hashlib, os, sys
import polars as pl
from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline

cores, config_path = int(sys.argv[1]), sys.argv[2]
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
config = load_config(config_path)
report = Pipeline(config).run(["decoder_similarity"])
assert [outcome.status for outcome in report.outcomes] == ["ran"], report.outcomes
table = pl.read_parquet(config.output_dir / "stages" / "decoder_similarity.parquet")
neighbours = table.explode("decoder_similarity")["decoder_similarity"].struct.unnest()
digest = hashlib.sha256(neighbours["feature_id"].to_numpy().tobytes())
digest.update(neighbours["cosine_similarity"].to_numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    """A 2,048 × 3,584 decoder (Gemma Scope 9B's d_model), the shape the thread split was measured on."""
    path = tmp_path_factory.mktemp("determinism") / "params.npz"
    np.savez(path, W_dec=np.random.default_rng(0).standard_normal((2048, 3584), dtype=np.float32))
    return path


def run_decoder_stage(decoder: Path, output: Path, *, blas_threads: int, cores: int, engine: str) -> str:
    config = output.with_suffix(".toml")
    config.write_text(
        f'sae_id = "pythia/layers.3.mlp"\noutput_dir = "{output}"\n[[sources]]\npath = "{PYTHIA_RUN}"\n'
        f'[decoder]\npath = "{decoder}"\ntop_k = 10\ndevice = "cpu"\n[execution]\nengine = "{engine}"\n'
    )
    environment = {key: value for key, value in os.environ.items() if not key.endswith("_NUM_THREADS")}
    environment |= {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": str(blas_threads)}
    environment |= {"RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", DECODER_STAGE, str(cores), str(config)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.ray
def test_decoder_neighbours_do_not_depend_on_blas_threads_cores_or_engine(decoder, tmp_path):
    cases = [("local", 1, 1), ("local", 2, 2), ("local", 2, 1), ("ray", 2, 1), ("ray", 2, 2)]
    digests = {
        (engine, blas, cores): run_decoder_stage(
            decoder, tmp_path / f"{engine}-{blas}-{cores}", blas_threads=blas, cores=cores, engine=engine
        )
        for engine, blas, cores in cases
    }
    assert len(set(digests.values())) == 1, digests


# Embeds TEXTS in a fresh process at the given torch threads; prints the digest of the vectors.
EMBED_ELSEWHERE = """
import hashlib, sys, torch
from sae_atlas.embedding import Embedder
sys.path.insert(0, sys.argv[3])
from test_determinism import TEXTS

torch.set_num_threads(int(sys.argv[1]))
vectors = Embedder(cache_dir=sys.argv[2], quantize=sys.argv[4], threads=int(sys.argv[1])).embed(TEXTS)
print(hashlib.sha256(vectors.tobytes()).hexdigest())
"""
TEXTS = [f"sentence {index} is about {topic}" for index, topic in enumerate(["birds", "dates in May", "code"] * 50)]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_embeddings_do_not_depend_on_the_process_or_its_threads(tmp_path, quantize):
    """The same texts embedded here and in fresh processes at one and two torch threads: the same
    bytes. (int8: each process runs the ONNX model the first one exported into the shared cache,
    as Ray's actors run the bytes the driver exported.)"""
    here = Embedder(cache_dir=tmp_path / "cache", quantize=quantize).embed(TEXTS)
    assert np.unique(here[:, 0]).size > 100
    for threads in (1, 2):
        # a cache of its own for the vectors, the same one for the exported model
        cache = tmp_path / f"cache-{threads}"
        if quantize == "int8":
            cache.mkdir()
            (cache / "onnx").symlink_to(tmp_path / "cache" / "onnx")
        done = subprocess.run(
            [sys.executable, "-c", EMBED_ELSEWHERE, str(threads), str(cache), str(Path(__file__).parent), quantize],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == hashlib.sha256(here.tobytes()).hexdigest(), threads
