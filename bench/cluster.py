"""Stage 4 on Ray against the local engine, on the reference corpus, all in one run.

    python bench/cluster.py                  # the first 2,048 latents: about 15 minutes on 2 cores
    python bench/cluster.py --latents 16384  # all of them: about 80 minutes

Four runs of stage 4 (`activation_embeddings`, the default float32 model, empty embedding cache
each, the same activation_examples.parquet: the reference corpus's, cut to its first ``--latents``
latents, since all 16,384 take 26 minutes per run at one thread): the local engine with 1 and with 2 torch threads, and
`engine = "ray"` (a Ray instance of its own, no address) with 1 actor × 1 thread and 2 actors × 1
thread. Each runs in a fresh process; the figure is the stage's own time from its sidecar (Ray's
start-up, before the stage, is given beside it as the process's wall time). Targets: 2 actors ≥
1.8 × the speed of 1 actor; Ray ≤ 1.10 × local at the same number of threads.

Results go to the "ray" section of docs/benchmarks.md and bench/out/cluster.json.
"""

from __future__ import annotations

import argparse
import os
import shutil

import orjson
import polars as pl

from common import CLI, OUT, measured, reference_corpus, update_section
from sae_atlas.layout import read_sidecar
from sae_atlas.stages.activation_examples import ROW_GROUP_ROWS

RUNS = {
    "local, 1 thread": ({"engine": "local"}, 1),
    "local, 2 threads": ({"engine": "local"}, 2),
    "Ray, 1 actor × 1 thread": ({"engine": "ray", "embedding_actors": 1, "cpus_per_actor": 1}, None),
    "Ray, 2 actors × 1 thread": ({"engine": "ray", "embedding_actors": 2, "cpus_per_actor": 1}, None),
}


def configured(root, name: str, execution: dict):
    """A copy of the corpus config writing to ``root/name``, with ``[execution]`` as given."""
    text = (root / "sae-atlas.toml").read_text().replace('output_dir = "master"', f'output_dir = "{name}"')
    text += "\n[execution]\n" + "".join(f"{key} = {orjson.dumps(value).decode()}\n" for key, value in execution.items())
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latents", type=int, default=2048, help="stage 4 over the first N latents")
    latents = parser.parse_args().latents
    root = reference_corpus()
    base = root / "ray-base"
    shutil.rmtree(base, ignore_errors=True)
    measured([*CLI, "run", str(configured(root, "ray-base", {})), "--only", "activation_examples"])
    examples = base / "activation_examples.parquet"
    kept = pl.read_parquet(examples).filter(pl.col("feature_id") < latents)
    kept.write_parquet(examples, row_group_size=ROW_GROUP_ROWS, statistics=True)
    results = {}
    for label, (execution, threads) in RUNS.items():
        name = "ray-" + "".join(char if char.isalnum() else "-" for char in label.lower())
        output = root / name
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(base, output, ignore=shutil.ignore_patterns(".cache"))
        environment = dict(os.environ)
        if threads:
            # torch reads this at start-up; the actors set their own threads from cpus_per_actor
            environment["OMP_NUM_THREADS"] = str(threads)
        config = configured(root, name, execution)
        wall, peak = measured([*CLI, "run", str(config), "--only", "activation_embeddings"], env=environment)
        sidecar = read_sidecar(output / "activation_embeddings.parquet")
        results[label] = {
            "stage_seconds": sidecar["timing"]["seconds"],
            "wall": wall,
            "peak_rss": peak,
            "texts_encoded": sidecar["statistics"]["texts_encoded"],
            "windows": sidecar["statistics"]["windows"],
        }
        print(label, results[label], flush=True)
        shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    (OUT / "cluster.json").write_bytes(orjson.dumps({"latents": latents, "runs": results}, option=orjson.OPT_INDENT_2))
    update_section("ray", section(results, latents))


def section(results: dict, latents: int) -> str:
    local_1, local_2 = results["local, 1 thread"], results["local, 2 threads"]
    ray_1, ray_2 = results["Ray, 1 actor × 1 thread"], results["Ray, 2 actors × 1 thread"]
    speedup = ray_1["stage_seconds"] / ray_2["stage_seconds"]
    ratio_1 = ray_1["stage_seconds"] / local_1["stage_seconds"]
    ratio_2 = ray_2["stage_seconds"] / local_2["stage_seconds"]
    rows = [
        f"| {label} | {record['texts_encoded']:,} | {record['stage_seconds']:.0f} s | "
        f"{record['texts_encoded'] / record['stage_seconds']:.0f} | {record['wall']:.0f} s |"
        for label, record in results.items()
    ]
    verdict = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
    return "\n".join(
        [
            "## Stage 4 on Ray against the local engine",
            "",
            f"Stage 4 over the first {latents:,} latents of the reference corpus (16,384 latents, 24,571 prompts; "
            "the default float32 model, an empty embedding cache each time, the same activation examples), each "
            "run in a fresh process; *stage* is the sidecar's time, *process* adds start-up (Ray's included). Ray "
            "runs start an instance of their own (no address).",
            "",
            "| engine | texts encoded | stage | texts/s | process |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"- 2 actors against 1: **×{speedup:.2f}** the speed (target ≥ 1.8; {verdict(speedup >= 1.8)});",
            f"- Ray against local at the same threads: 1 thread **×{ratio_1:.2f}** the time, 2 threads "
            f"**×{ratio_2:.2f}** (target ≤ 1.10; {verdict(ratio_1 <= 1.1)}, {verdict(ratio_2 <= 1.1)}).",
            "",
            "On two cores the driver (window selection, tokenising to form the batches, receiving vectors) shares "
            "the cores with the two actors; on a cluster it runs beside them.",
        ]
    )


if __name__ == "__main__":
    main()
