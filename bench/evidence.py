"""Scorer evidence at scale: the scores stage keeping every record, against the same stage before it
kept them (the commit before the evidence landed), in the same run; the size of the two new files;
how fast a latent's evidence page answers.

    python bench/evidence.py                                   # the reference scale: 16,384 latents, 824 explained
    python bench/evidence.py --features 131072 --explained 16384

The corpus is `sae-atlas synth` at the study's shape for scores (3 explainers × 3 scorers) with few
prompts and a small d_model (the scores stage reads only the score files). Each code runs `sae-atlas
run --only scores` in a fresh process from an empty output, ``--repeats`` times alternating; the
figures are the medians, peak RSS the largest. Targets (the scorer-evidence issue): time < 1.5 ×
before, the two files < 150 MB at the reference scale, peak < 4 GiB at 131k, a latent's evidence
< 100 ms. Writes the "evidence-<features>" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, gib, measured, reference_corpus, update_section

BEFORE = "e6b9a66"  # the last commit before the scores stage kept its records


def source_tree(commit: str) -> Path:
    """The package's source at ``commit`` (a detached worktree under bench/out)."""
    tree = OUT / f"source-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree / "src"


def config_for(root: Path, output: str) -> Path:
    text = (root / "sae-atlas.toml").read_text()
    path = root / f"bench-{output}.toml"
    path.write_text(text.replace('output_dir = "master"', f'output_dir = "{output}"'))
    return path


def run_scores(root: Path, source: Path, name: str) -> tuple[float, int]:
    config = config_for(root, name)
    shutil.rmtree(root / name, ignore_errors=True)
    environment = {**os.environ, "PYTHONPATH": str(source)}
    return measured([sys.executable, "-m", "sae_atlas", "run", str(config), "--only", "scores"], env=environment)


def one_file_changed(root: Path) -> tuple[float, int, int]:
    """A re-run of the scores stage on out-now after one score file was rewritten (same content, a
    new modification time): (wall, peak RSS, files read from disk)."""
    path = next((root / "raw").glob("*/scores/fuzz/*.txt"))
    path.write_bytes(path.read_bytes())
    config = config_for(root, "out-now")
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    wall, peak = measured([sys.executable, "-m", "sae_atlas", "run", str(config), "--only", "scores"], env=environment)
    report = orjson.loads((root / "out-now" / "run_report.json").read_bytes())
    statistics_ = next(stage for stage in report["stages"] if stage["stage"] == "scores")["statistics"]
    return wall, peak, statistics_["score_files_read_from_disk"]


def evidence_latency(output: Path, samples: int = 200) -> tuple[float, float]:
    from sae_atlas.query.evidence import ScoreEvidence
    from sae_atlas.query.scores import run_settings

    # what Atlas.evidence does, without the master files this scores-only output lacks
    evidence, runs = ScoreEvidence(output), run_settings(output)[1]
    explained = pl.read_parquet(output / "stages/scores.parquet", columns=["feature_id"])["feature_id"].unique()
    chosen = np.random.default_rng(0).choice(explained.to_numpy(), size=min(samples, len(explained)), replace=False)
    times = []
    for feature in chosen:
        started = time.perf_counter()
        evidence.of_feature(int(feature), runs)
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def error_rates_cost(output: Path) -> tuple[float, int]:
    """What `compare` pays to read the records' error rates and example sets, in a fresh process."""
    code = f"from sae_atlas.query.anatomy import read_error_rates; read_error_rates({str(output)!r})"
    return measured([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--explained", type=int, default=824)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    root = reference_corpus(
        f"evidence-{arguments.features}",
        features=arguments.features,
        explained=arguments.explained,
        prompts=2000,
        ctx=64,
        **{"d-model": 64},
    )
    codes = {"before": source_tree(BEFORE), "now": ROOT / "src"}
    times: dict[str, list[float]] = {name: [] for name in codes}
    peaks: dict[str, int] = dict.fromkeys(codes, 0)
    for _ in range(arguments.repeats):
        for name, source in codes.items():
            wall, peak = run_scores(root, source, f"out-{name}")
            times[name].append(wall)
            peaks[name] = max(peaks[name], peak)
            print(f"{name}: {wall:.1f} s, {gib(peak)}", flush=True)
    output = root / "out-now"
    cache_bytes = sum(path.stat().st_size for path in (output / ".cache" / "scores").rglob("*") if path.is_file())
    again, again_peak, files_read = one_file_changed(root)
    sizes = {
        name: (output / "stages" / name).stat().st_size for name in ("score_records.parquet", "score_examples.parquet")
    }
    records = pl.scan_parquet(output / "stages/score_records.parquet").select(pl.len()).collect().item()
    p50, p95 = evidence_latency(output)
    rates_seconds, rates_peak = error_rates_cost(output)
    before, now = statistics.median(times["before"]), statistics.median(times["now"])
    total = sum(sizes.values())
    body = f"""
`python bench/evidence.py --features {arguments.features} --explained {arguments.explained}`: the scores stage of a
synthetic corpus of {arguments.features:,} latents, {arguments.explained:,} explained by 3 explainers and scored by 3
scorers ({records:,} records kept), in a fresh process from an empty output, {arguments.repeats} times each,
alternating; medians. "Now" is the stage as a user runs it today, with what made it faster since (listing a
run's files grouped by directory, one table per block rather than per run and method), which "before" lacks.

| scores stage | wall | peak RSS |
|---|---|---|
| before it kept the records ({BEFORE}) | {before:.1f} s | {gib(peaks["before"])} |
| now | {now:.1f} s (× {now / before:.2f}; target < 1.5) | {gib(peaks["now"])} (target < 4 GiB at 131k) |
| now, again after one score file changed | {again:.1f} s ({files_read} file read from disk) | {gib(again_peak)} |

The cache that makes the last row possible (`.cache/scores`) holds {cache_bytes / 2**20:.1f} MB. The re-run still
lists and stamps every score file, reads every block's cache and writes the stage's files whole: that, not
reading score files, is its time.

stages/score_records.parquet {sizes["score_records.parquet"] / 2**20:.1f} MB and stages/score_examples.parquet
{sizes["score_examples.parquet"] / 2**20:.1f} MB: {total / 2**20:.1f} MB together (target < 150 MB at 16,384 latents).
A latent's evidence (`Atlas.evidence`, both methods, every run; 200 random explained latents): p50
{p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms (target < 100 ms). Reading every record's error rates and
example sets for `compare` (streamed): {rates_seconds:.1f} s, peak {gib(rates_peak)}, in a fresh process.
"""
    update_section(f"evidence-{arguments.features}", body)
    print(body)


if __name__ == "__main__":
    main()
