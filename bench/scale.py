"""sae-atlas at scale: every stage's wall time and peak memory at a given SAE width (default
131,072 latents), beside the floors measured in the same run, and the scale-only figures
(fully cached re-run, incremental update, queries, validate).

    python bench/scale.py                      # 131,072 latents: about 1.5 hours on 2 cores
    python bench/scale.py --features 16384     # the other widths of docs/scaling.md
    python bench/scale.py --resume             # keep the phases an interrupted run finished

Each finished phase (a stage, the floors, the cached re-run, the queries, the incremental update)
is saved to bench/out/scale-<N>/progress.json with the commit it ran at, so an interrupted run can
be resumed; a fresh run starts from an empty progress file.

The corpus is `sae-atlas synth --features N --explained N/8 --explainers 3 --scorers 3 --prompts
24571 --ctx 127 --d-model 3584 --activation-format both` (the study's prompts and model width, an
eighth of the latents explained). The pipeline runs with `quantize = "int8"`, each stage in a
fresh process (`sae-atlas run --only STAGE`), from an empty output directory and cache, so each
figure is that stage's own wall time and peak RSS. Floors, in the same run: a bare blocked NumPy
matmul + top-k of the same W_dec; a bare encode with the same int8 model of a sample of the same
distinct window texts, scaled to all of them.

Results: bench/out/scale-<N>/results.json; the 131,072 run rewrites the "scale" section of
docs/benchmarks.md; every run regenerates docs/scaling.md from the results present (bench/scaling.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from common import CLI, OUT, gib, measured, update_section

STAGES = (
    "activation_examples",
    "decoder_similarity",
    "scores",
    "explanation_embeddings",
    "features",
    "activation_embeddings",
    "activation_similarity",
)
TARGET_SECONDS = 70 * 60
TARGET_RSS = 4 * 2**30
EXAMPLES_RSS = 1.5 * 2**30
NEW_LATENTS = 1000
ENCODE_SAMPLE = 20_000


def corpus(features: int) -> tuple[Path, dict]:
    """The corpus for ``features`` latents (built once; its synth time and peak RSS recorded)."""
    options = {
        "features": features,
        "explained": features // 8,
        "explainers": 3,
        "scorers": 3,
        "prompts": 24571,
        "ctx": 127,
        "d-model": 3584,
        "activation-format": "both",
        "seed": 0,
    }
    root = OUT / f"scale-{features}"
    marker = root / "synth.json"
    if marker.exists() and orjson.loads(marker.read_bytes())["options"] == options:
        return root, orjson.loads(marker.read_bytes())
    shutil.rmtree(root, ignore_errors=True)
    arguments = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    wall, peak = measured([*CLI, "synth", str(root), *arguments])
    record = {"options": options, "seconds": wall, "peak_rss": peak}
    marker.write_bytes(orjson.dumps(record))
    return root, record


def configured(root: Path, name: str, *, source: str = "sae-atlas.toml") -> Path:
    """A copy of the corpus config writing to ``root/name`` with the int8 model."""
    text = (root / source).read_text().replace('output_dir = "master"', f'output_dir = "{name}"')
    path = root / f"{name}.toml"
    path.write_text(text + 'quantize = "int8"\n')
    return path


def sidecar(output: Path, name: str) -> dict:
    return orjson.loads((output / f"{name}.metadata.json").read_bytes())


class Progress:
    """The phases of this width's run finished so far, saved after each (bench/out/scale-N/progress.json)."""

    def __init__(self, root: Path, resume: bool) -> None:
        self.path = root / "progress.json"
        self.phases = orjson.loads(self.path.read_bytes()) if resume and self.path.exists() else {}

    def __contains__(self, phase: str) -> bool:
        return phase in self.phases

    def __getitem__(self, phase: str):
        return self.phases[phase]["result"]

    def record(self, phase: str, result) -> None:
        self.phases[phase] = {"result": result, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M")}
        self.path.write_bytes(orjson.dumps(self.phases, option=orjson.OPT_INDENT_2))


def commit() -> str:
    here = Path(__file__).parent
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    return run.stdout.strip()


def run_stages(config: Path, output: Path, progress: Progress) -> dict:
    """Each stage in its own process, in pipeline order: wall, peak RSS, the sidecar's seconds."""
    from sae_atlas.pipeline import OUTPUTS

    results = {}
    for stage in STAGES:
        if f"stage:{stage}" in progress:
            results[stage] = progress[f"stage:{stage}"]
            continue
        wall, peak = measured([*CLI, "run", str(config), "--only", stage])
        record = sidecar(output, OUTPUTS[stage])
        results[stage] = {
            "wall": wall,
            "peak_rss": peak,
            "seconds": record["timing"]["seconds"],
            "rows": record["rows"],
            "statistics": record["statistics"],
        }
        progress.record(f"stage:{stage}", results[stage])
        print(f"{stage}: {wall:.0f} s, {gib(peak)}", flush=True)
    return results


def decoder_floor(path: Path) -> float:
    """A bare blocked NumPy matmul + argpartition top-k over the unit rows of W_dec (no ties
    settled, no table built): what the decoder stage cannot beat on this machine."""
    from decoder import floor

    with np.load(path) as archive:
        weights = archive["W_dec"]
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    return floor(weights)


def window_sample(output: Path, size: int, seed: int = 0) -> list[str]:
    """A random sample of the distinct window texts stage 4 embedded."""
    from sae_atlas.layout import read_prompt_tokens
    from sae_atlas.sampling import window_texts

    sampled = pl.read_parquet(output / "stages/sampled_examples.parquet", columns=["prompt_id", "max_position"])
    sampled = sampled.sample(min(3 * size, sampled.height), seed=seed)  # duplicates are common: draw extra
    windows = window_texts(sampled.rename({"max_position": "centre"}), read_prompt_tokens(output), 32)
    texts = windows["text"].unique().sort()
    return texts.sample(min(size, len(texts)), seed=seed).to_list()


def encode_floor(output: Path, texts: list[str]) -> float:
    """Seconds per text of a bare encode with the same int8 model: batches of 64 sorted by
    length (as sentence-transformers' encode does), tokenizer and ONNX Runtime only."""
    from sae_atlas.embedding import Embedder

    backend = Embedder(quantize="int8", cache_dir=output / ".cache" / "embeddings").backend
    ordered = sorted(texts, key=len, reverse=True)
    started = time.perf_counter()
    for start in range(0, len(ordered), 64):
        backend.encode(ordered[start : start + 64])
    return (time.perf_counter() - started) / len(ordered)


def add_new_latents(root: Path, count: int) -> int:
    """``count`` newly explained latents: explanation and score files of latents no run explained,
    copied from explained ones with their texts changed (so they must be embedded)."""
    runs = sorted(path for path in (root / "raw").iterdir() if path.is_dir() and (path / "explanations").is_dir())
    explained = sorted(
        int(path.stem.rsplit("latent", 1)[1]) for path in (runs[0] / "explanations").glob("*_latent*.txt")
    )
    taken = set(explained)
    width = int(orjson.loads((root / "synth.json").read_bytes())["options"]["features"])
    fresh = [latent for latent in range(width - 1, -1, -1) if latent not in taken][:count]
    added = 0
    for new, old in zip(fresh, explained, strict=False):
        for run in runs:
            for path in run.rglob(f"*_latent{old}.txt"):
                target = path.with_name(path.name.replace(f"_latent{old}.txt", f"_latent{new}.txt"))
                if path.parent.name == "explanations":
                    text = orjson.loads(path.read_bytes())
                    target.write_bytes(orjson.dumps(f"{text} (revised for latent {new})"))
                else:
                    shutil.copyfile(path, target)
        added += 1
    return added


def cached_rerun(config: Path) -> float:
    wall, _ = measured([*CLI, "run", str(config), "--only", "activation_embeddings", "--force"])
    return wall


def incremental(root: Path, config: Path, output: Path) -> dict:
    added = add_new_latents(root, NEW_LATENTS)
    wall, peak = measured([*CLI, "run", str(config)])
    report = orjson.loads((output / "run_report.json").read_bytes())
    statuses = {entry["stage"]: entry["status"] for entry in report["stages"]}
    encoded = sidecar(output, "explanation_embeddings.parquet")["statistics"]["texts_encoded"]
    return {"latents": added, "wall": wall, "peak_rss": peak, "statuses": statuses, "texts_encoded": encoded}


def queries(output: Path) -> dict:
    """Atlas and server latencies over the output, and validate's wall time."""
    import httpx

    from queries import serve
    from sae_atlas import Atlas

    started = time.perf_counter()
    atlas = Atlas(output)
    opening = time.perf_counter() - started
    ids = atlas.features(limit=None)["feature_id"].unique().to_numpy()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    atlas.feature(int(ids[0]))
    first = time.perf_counter() - started
    started = time.perf_counter()
    atlas.prepare(search=False)
    index_ready = time.perf_counter() - started
    lookups = []
    for feature in rng.choice(ids, 500):
        began = time.perf_counter()
        atlas.feature(int(feature))
        lookups.append(time.perf_counter() - began)
    filters = {"fuzz": (0.6, None), "detection": (None, 0.95)}
    table = []
    for _ in range(30):
        began = time.perf_counter()
        atlas.features(filters=filters, sort="semantic_similarity", descending=True, limit=100)
        table.append(time.perf_counter() - began)
    rows = atlas.features(limit=None).height
    began = time.perf_counter()
    process, url = serve(output)
    serve_open = time.perf_counter() - began
    try:
        httpx.get(url + "/?sort=detection&order=desc&fuzz_min=0.6", timeout=60)
        pages = []
        for _ in range(20):
            began = time.perf_counter()
            httpx.get(url + "/?sort=detection&order=desc&fuzz_min=0.6", timeout=60)
            pages.append(time.perf_counter() - began)
    finally:
        process.terminate()
        process.wait()
    validate_wall, validate_peak = measured([*CLI, "validate", str(output)])
    return {
        "rows": rows,
        "open": opening,
        "first_feature": first,
        "index_ready": index_ready,
        "feature_p50": statistics.median(lookups),
        "feature_p99": float(np.percentile(lookups, 99)),
        "features_query": statistics.median(table),
        "serve_ready": serve_open,
        "index_page": statistics.median(pages),
        "validate": validate_wall,
        "validate_peak_rss": validate_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=131_072)
    parser.add_argument("--resume", action="store_true", help="keep the phases an interrupted run finished")
    arguments = parser.parse_args()
    features = arguments.features
    root, synth = corpus(features)
    print(f"corpus: {synth['seconds']:.0f} s, {gib(synth['peak_rss'])}", flush=True)
    progress = Progress(root, arguments.resume)

    output = root / "run-int8"
    config = configured(root, "run-int8")
    if not progress.phases:
        shutil.rmtree(output, ignore_errors=True)
    stages = run_stages(config, output, progress)
    pipeline = sum(stage["wall"] for stage in stages.values())

    def phase(name: str, measure):
        if name not in progress:
            progress.record(name, measure())
        print(f"{name}: {progress[name]}", flush=True)
        return progress[name]

    def delphi_reader() -> dict:
        delphi_output = root / "delphi-reader"
        shutil.rmtree(delphi_output, ignore_errors=True)
        delphi_config = configured(root, "delphi-reader", source="sae-atlas-delphi.toml")
        wall, peak = measured([*CLI, "run", str(delphi_config), "--only", "activation_examples"])
        same = (
            pl.read_parquet(delphi_output / "activation_examples.parquet", columns=["feature_id", "prompt_id"]).height
            == stages["activation_examples"]["rows"]
        )
        shutil.rmtree(delphi_output, ignore_errors=True)
        return {"wall": wall, "peak_rss": peak, "same_rows": same}

    def floors() -> dict:
        decoder = decoder_floor(next((root / "raw" / "sae").rglob("params.npz")))
        per_text = encode_floor(output, window_sample(output, ENCODE_SAMPLE))
        distinct = stages["activation_embeddings"]["statistics"]["distinct_texts"]
        return {"decoder": decoder, "encode": per_text * distinct, "encode_texts_per_second": 1 / per_text}

    delphi = phase("delphi_reader", delphi_reader)
    floor = phase("floors", floors)
    cached = phase("cached_stage_4", lambda: cached_rerun(config))
    query = phase("queries", lambda: queries(output))
    update = phase("incremental", lambda: incremental(root, config, output))

    results = {
        "features": features,
        "date": time.strftime("%Y-%m-%d"),
        "synth": synth,
        "stages": stages,
        "pipeline_seconds": pipeline,
        "delphi_reader": delphi,
        "floors": floor,
        "cached_stage_4": cached,
        "incremental": update,
        "queries": query,
        "bench_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "phases": {name: {"commit": entry["commit"], "date": entry["date"]} for name, entry in progress.phases.items()},
    }
    (root / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if features == 131_072:
        update_section("scale", section(results))
    subprocess.run([sys.executable, str(Path(__file__).with_name("scaling.py"))], check=True)


def queries_paragraph(query: dict) -> str:
    p50, p99 = query["feature_p50"] * 1e3, query["feature_p99"] * 1e3
    return (
        f"Queries over the output ({query['rows']:,} rows): Atlas opens in {query['open']:.2f} s (< 2 s); the "
        f"first feature(id) {query['first_feature']:.2f} s (< 2 s; it reads only the row groups of its feature "
        f"while the example index loads in the background, ready {query['index_ready']:.1f} s later); "
        f"feature(id) p50 {p50:.2f} ms (p99 {p99:.1f}; < 1 ms); features() filter + sort "
        f"{query['features_query'] * 1e3:.1f} ms (< 20 ms); `serve` answers in {query['serve_ready']:.1f} s (< 2 s); "
        f"the index page {query['index_page'] * 1e3:.0f} ms (< 100 ms); `validate` {query['validate']:.0f} s "
        f"(< 2 min), peak RSS {gib(query['validate_peak_rss'])}."
    )


def measured_when(phases: dict) -> str:
    """When and at which commits the phases ran: a resumed run says so."""
    if not phases:
        return ""
    commits = sorted({entry["commit"] for entry in phases.values()})
    dates = sorted(entry["date"] for entry in phases.values())
    return f"Measured {dates[0]} – {dates[-1]} UTC at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}" + (
        "; the run was interrupted and resumed from its finished phases (`--resume`)." if len(commits) > 1 else "."
    )


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def section(results: dict) -> str:
    """The "scale" section of docs/benchmarks.md."""
    stages, floors, query, update = results["stages"], results["floors"], results["queries"], results["incremental"]
    synth, delphi, cached = results["synth"], results["delphi_reader"], results["cached_stage_4"]
    decoder_ratio = stages["decoder_similarity"]["seconds"] / floors["decoder"]
    encode_ratio = stages["activation_embeddings"]["seconds"] / floors["encode"]
    rows = []
    for stage in STAGES:
        record = stages[stage]
        limit = EXAMPLES_RSS if stage == "activation_examples" else TARGET_RSS
        rows.append(
            f"| {stage} | {record['rows']:,} | {record['seconds']:.0f} s | {record['wall']:.0f} s | "
            f"{gib(record['peak_rss'])} | < {gib(limit)} | {verdict(record['peak_rss'] < limit)} |"
        )
    statistics_4 = stages["activation_embeddings"]["statistics"]
    return "\n".join(
        [
            "## Scale: 131,072 latents",
            "",
            f"Corpus: `sae-atlas synth --features 131072 --explained 16384 --explainers 3 --scorers 3 --prompts 24571 "
            f"--ctx 127 --d-model 3584 --activation-format both`: {synth['seconds'] / 60:.1f} min, peak RSS "
            f"{gib(synth['peak_rss'])} (targets < 20 min, < 4 GiB; {verdict(synth['seconds'] < 1200)}). "
            f"{stages['activation_examples']['statistics']['records']:,} activation records, "
            f"{stages['activation_examples']['statistics']['activation_pairs']:,} pairs.",
            "",
            measured_when(results.get("phases", {})),
            "",
            "Each stage in a fresh process (`sae-atlas run --only STAGE`), in pipeline order, from an empty output "
            'directory and embedding cache, `quantize = "int8"`. *Stage* is the sidecar\'s time, *process* adds '
            "start-up; memory is the process's peak RSS.",
            "",
            "| stage | rows | stage | process | peak RSS | target | |",
            "|---|---:|---:|---:|---:|---|---|",
            *rows,
            f"| **whole pipeline** | | | **{results['pipeline_seconds'] / 60:.1f} min** | | < 70 min | "
            f"{verdict(results['pipeline_seconds'] < TARGET_SECONDS)} |",
            "",
            "Floors measured in the same run:",
            "",
            f"- decoder neighbours: stage {stages['decoder_similarity']['seconds']:.0f} s against a bare blocked NumPy "
            f"matmul + argpartition top-k of the same W_dec {floors['decoder']:.0f} s: **×{decoder_ratio:.2f}** "
            f"(target ≤ 1.2; {verdict(decoder_ratio <= 1.2)});",
            f"- stage 4: {stages['activation_embeddings']['seconds']:.0f} s for {statistics_4['windows']:,} windows, "
            f"{statistics_4['distinct_texts']:,} distinct texts; a bare encode with the same int8 model "
            f"({floors['encode_texts_per_second']:.0f} texts/s on {ENCODE_SAMPLE:,} of them, batches of 64 sorted by "
            f"length) scaled to all: {floors['encode']:.0f} s: **×{encode_ratio:.2f}** (target ≤ 1.1; "
            f"{verdict(encode_ratio <= 1.1)});",
            f"- the delphi-cache reader on the same records (five shards): {delphi['wall']:.0f} s, "
            f"peak RSS {gib(delphi['peak_rss'])}, same rows: {delphi['same_rows']}.",
            "",
            f"Fully cached re-run of stage 4 (`--only activation_embeddings --force`): **{cached:.0f} s** "
            f"(target < 2 min; {verdict(cached < 120)}).",
            "",
            f"Incremental: {update['latents']:,} newly explained latents (explanation and score files of every run) "
            f"added, then `sae-atlas run`: **{update['wall']:.0f} s** (target < 5 min; "
            f"{verdict(update['wall'] < 300)}), {update['texts_encoded']:,} texts embedded; stages: "
            + ", ".join(f"{stage} {status}" for stage, status in update["statuses"].items())
            + ".",
            "",
            queries_paragraph(query),
        ]
    )


if __name__ == "__main__":
    os.chdir(Path(__file__).parent)
    main()
