"""`sae-atlas serve` under concurrent load, the load generator in a process of its own.

Two runs against one server (uvicorn, as `sae-atlas serve` starts it) over the complete reference
output of bench/activation_pipeline.py (or the output directory given):

1. 8 keep-alive clients × 300 requests of `/api/features/{id}` for random features;
2. 8 clients × 300 requests of mixed endpoints (feature look-ups, filtered tables, semantic search,
   feature pages, the index page), the mix a browsing session makes.

It also records how long after the server answers `/health` the first search takes (the model
loads in the background as the server starts). Results go to the "load" section of
docs/benchmarks.md. Target: `/api/features/{id}` p99 < 20 ms at 8 concurrent clients.

    python bench/load.py [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

from common import OUT, update_section
from queries import percentile, serve

CLIENTS = 8
REQUESTS = 300
# (endpoint label, share of requests) for the mixed run
MIX = (("feature", 0.55), ("table", 0.15), ("search", 0.10), ("feature page", 0.12), ("index page", 0.08))
SEARCHES = ("names of birds", "dates and months", "legal language", "code comments", "numbers in tables")


def request_plan(ids: list[int], mixed: bool, seed: int) -> list[tuple[str, str]]:
    """The (label, path) sequence one client requests."""
    rng = np.random.default_rng(seed)
    labels = [label for label, _ in MIX]
    shares = np.array([share for _, share in MIX])
    plan = []
    for _ in range(REQUESTS):
        label = str(rng.choice(labels, p=shares / shares.sum())) if mixed else "feature"
        feature = int(rng.choice(ids))
        path = {
            "feature": f"/api/features/{feature}",
            "table": f"/api/features?fuzz_min={rng.uniform(0.3, 0.8):.2f}&sort=detection&order=desc&limit=50",
            "search": f"/api/search?q={rng.choice(SEARCHES).replace(' ', '+')}&k=10",
            "feature page": f"/features/{feature}",
            "index page": "/?sort=detection&order=desc&limit=100",
        }[label]
        plan.append((label, path))
    return plan


def generate(url: str, ids_file: str, mixed: bool) -> None:
    """The load generator (run in its own process): prints {label: [seconds, ...]} as JSON."""
    ids = json.loads(Path(ids_file).read_text())
    latencies: dict[str, list[float]] = {}
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)
    failures: list[str] = []

    def client(number: int) -> None:
        try:
            run_client(number)
        except Exception as error:  # a thread's exception would otherwise vanish
            start.abort()
            failures.append(f"{type(error).__name__}: {error}")

    def run_client(number: int) -> None:
        mine: list[tuple[str, float]] = []
        with httpx.Client(base_url=url, timeout=60) as session:
            session.get("/health")
            start.wait()
            for label, path in request_plan(ids, mixed, seed=number):
                began = time.perf_counter()
                response = session.get(path)
                mine.append((label, time.perf_counter() - began))
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: HTTP {response.status_code}")
        with lock:
            for label, seconds in mine:
                latencies.setdefault(label, []).append(seconds)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"load generator failed: {failures[0]}")
    print(json.dumps(latencies))


def load(url: str, ids_file: Path, mixed: bool) -> dict[str, list[float]]:
    """Run the load generator in a separate process and collect its latencies."""
    command = [sys.executable, __file__, "--generate", url, str(ids_file), "mixed" if mixed else "features"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout)


def row(run: str, label: str, values: list[float]) -> str:
    return (
        f"| {run} | {label} | {len(values)} | {percentile(values, 0.5) * 1e3:.1f} ms | "
        f"{percentile(values, 0.99) * 1e3:.1f} ms |"
    )


def main(output_dir: Path) -> None:
    if not (output_dir / "features.parquet").exists():
        raise SystemExit(f"{output_dir}: no outputs; run bench/activation_pipeline.py first")
    ids = pl.read_parquet(output_dir / "features.parquet", columns=["feature_id"])["feature_id"].unique().to_list()
    ids_file = OUT / "load-ids.json"
    ids_file.write_text(json.dumps(ids))
    began = time.perf_counter()
    process, url = serve(output_dir)
    try:
        answering = time.perf_counter() - began
        began = time.perf_counter()
        httpx.get(url + "/api/search", params={"q": "first search"}, timeout=120)
        first_search = time.perf_counter() - began
        # warm the activation-example index and the connections, as a browsing session would
        for feature in ids[:20]:
            httpx.get(f"{url}/api/features/{feature}")
        runs = {"features only": load(url, ids_file, mixed=False), "mixed": load(url, ids_file, mixed=True)}
    finally:
        process.terminate()
        process.wait()
    lines = [row(run, label, values) for run, latencies in runs.items() for label, values in latencies.items()]
    feature_p99 = {run: percentile(latencies["feature"], 0.99) * 1e3 for run, latencies in runs.items()}
    print("\n".join(lines), flush=True)
    verdict = ", ".join(
        f"{run}: {value:.1f} ms ({'ok' if value < 20 else 'MISSED'})" for run, value in feature_p99.items()
    )
    body = "\n".join(
        [
            "## The server under load",
            "",
            f"`sae-atlas serve` over the complete int8 reference output ({len(ids):,} explained latents), "
            f"{CLIENTS} concurrent keep-alive clients × {REQUESTS} requests each, "
            "from a load generator in a separate process on the same 2-core machine (so client and server share "
            "the cores). *features only*: every request is `/api/features/{id}` for a random feature; *mixed*: "
            + ", ".join(f"{share:.0%} {label}" for label, share in MIX)
            + " (semantic search embeds its query with the model).",
            "",
            "| run | endpoint | requests | p50 | p99 |",
            "|---|---|---:|---:|---:|",
            *lines,
            "",
            f"Target `/api/features/{{id}}` p99 < 20 ms: {verdict}. The server answered `/health` "
            f"{answering:.1f} s after it was started; the first search, sent at once, took {first_search:.1f} s "
            f"(the model loads in the background from start-up; median search under load "
            f"{statistics.median(runs['mixed'].get('search', [0])) * 1e3:.0f} ms).",
        ]
    )
    update_section("load", body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        generate(sys.argv[2], sys.argv[3], sys.argv[4] == "mixed")
    else:
        main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else OUT / "reference" / "int8")
