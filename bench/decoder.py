"""The decoder stage's neighbour search against its floor, at the study's decoder shape.

    python bench/decoder.py                 # 16,384 × 3,584 (Gemma Scope 9B, 16k): about 2 minutes
    python bench/decoder.py --features 32768

Stage: ``top_k_neighbours`` as the stage runs it (one BLAS thread per block, blocks on parallel
threads, exact ties). Floor: a bare blocked NumPy matmul at the process's default BLAS threads +
argpartition top-k (no ties settled), over the same unit rows. Each is timed three times,
alternating, in one process; the figures are the fastest of each. Rewrites the "decoder" section
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import update_section
from sae_atlas.engine import available_cores
from sae_atlas.stages.decoder_similarity import normalise_rows, top_k_neighbours

TARGET = 1.2
REPEATS = 3


def floor(unit: np.ndarray, k: int = 10, block_rows: int = 512) -> float:
    """Seconds of a blocked matmul at the default BLAS threads + argpartition top-k over unit rows."""
    started = time.perf_counter()
    block = np.empty((block_rows, len(unit)), dtype=np.float32)
    for start in range(0, len(unit), block_rows):
        stop = min(start + block_rows, len(unit))
        np.matmul(unit[start:stop], unit.T, out=block[: stop - start])
        np.argpartition(-block[: stop - start], k + 1, axis=1)[:, : k + 1]
    return time.perf_counter() - started


def stage(unit: np.ndarray, k: int = 10) -> float:
    started = time.perf_counter()
    top_k_neighbours(unit, k, device="cpu")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=3584)
    options = parser.parse_args()
    unit = normalise_rows(np.random.default_rng(0).standard_normal((options.features, options.d_model), np.float32))
    floors, stages = [], []
    for _ in range(REPEATS):
        floors.append(floor(unit))
        stages.append(stage(unit))
        print(f"floor {floors[-1]:.1f} s, stage {stages[-1]:.1f} s", flush=True)
    ratio = min(stages) / min(floors)
    verdict = "ok" if ratio <= TARGET else "MISSED"
    update_section(
        "decoder",
        f"""## Decoder neighbours against a bare blocked matmul

{options.features:,} × {options.d_model:,} float32 decoder, top-10, {available_cores()} cores; fastest of {REPEATS}
runs of each, alternating in one process. The stage computes each 512-row block with one BLAS thread
and runs blocks on parallel threads, so its output does not depend on the thread count; the floor is
one blocked matmul at the default BLAS threads + argpartition (no ties settled).

| | seconds (each run) | fastest |
|---|---|---:|
| floor: blocked matmul + argpartition | {", ".join(f"{value:.1f}" for value in floors)} | {min(floors):.1f} |
| stage: `top_k_neighbours` | {", ".join(f"{value:.1f}" for value in stages)} | {min(stages):.1f} |

Stage / floor: **×{ratio:.2f}** (target ≤ {TARGET}; {verdict}).""",
    )
    print(f"stage / floor ×{ratio:.2f}")


if __name__ == "__main__":
    main()
