"""Wall time and peak memory of each core stage at reference scale (DESIGN.md §6).

Each stage runs alone in a fresh process (``sae-atlas run --only STAGE --force``) on the
reference-scale synthetic corpus, with an empty embedding cache, so the figures include start-up
and reading its inputs. Results go to the "stages" section of docs/benchmarks.md.

    python bench/pipeline_stages.py
"""

from __future__ import annotations

import shutil

import polars as pl

from common import CLI, gib, measured, reference_corpus, update_section

TARGETS = {  # issue targets on the 2-core reference machine: (seconds, bytes or None)
    "activation_examples": (30, 3 * 2**30),
    "decoder_similarity": (60, 2 * 2**30),
    "scores": (15, None),
    "explanation_embeddings": (20, None),
    "features": (1, None),
}


def main() -> None:
    root = reference_corpus()
    config = root / "sae-atlas.toml"
    output = root / "master"
    rows = []
    for stage, (seconds_target, memory_target) in TARGETS.items():
        shutil.rmtree(output / ".cache", ignore_errors=True)  # embed from scratch, not from the cache
        wall, peak = measured([*CLI, "run", str(config), "--only", stage, "--force"])
        sidecar = pl.read_json(next(output.rglob(f"*{stage}.parquet.metadata.json")))
        stage_seconds = sidecar["timing"][0]["seconds"]
        rows_written = sidecar["rows"][0]
        verdict = (
            "ok" if stage_seconds <= seconds_target and (memory_target is None or peak <= memory_target) else "MISSED"
        )
        target = f"< {seconds_target} s" + (f", < {gib(memory_target)}" if memory_target else "")
        rows.append(
            f"| {stage} | {rows_written:,} | {stage_seconds:.1f} s | {wall:.1f} s | {gib(peak)} | "
            f"{target} | {verdict} |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            "## Core stages at reference scale",
            "",
            "Corpus: `sae-atlas synth --features 16384 --explained 824 --explainers 3 --scorers 3 --prompts 24571 "
            "--ctx 127 --d-model 3584`. Each stage alone in a fresh process (`sae-atlas run --only STAGE --force`, "
            "empty embedding cache). *Stage* is the time the sidecar records (reading inputs, computing, writing); "
            "*process* adds interpreter start-up and imports; memory is the process's peak RSS.",
            "",
            "| stage | rows | stage | process | peak RSS | target | |",
            "|---|---:|---:|---:|---:|---|---|",
            *rows,
        ]
    )
    update_section("stages", body)


if __name__ == "__main__":
    main()
