"""Query-layer latency at reference scale: opening an Atlas, feature(id), features() with a filter and
a sort, semantic search, and the HTTP API under 4 concurrent clients (plus the browser's index
page). Uses the complete int8 output of bench/activation_pipeline.py (run that first), and a
49,152-row features table (16,384 features x 3 explainers, the reference corpus' explanations
tiled over every latent) for the full-width table.

    python bench/queries.py
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import polars as pl

from common import OUT, update_section
from sae_atlas import Atlas

WIDE_ROWS = 16_384 * 3


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.array(values), share * 100))


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def wide_copy(source, target) -> None:
    """The reference output with features.parquet and explanation_embeddings tiled to every latent."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".cache"))
    # One mapping for every file, so the tiled rows of each file still line up with the others.
    explained = pl.read_parquet(source / "features.parquet")["feature_id"].unique().sort().to_list()
    for name in ("features.parquet", "explanation_embeddings.parquet", "stages/scores.parquet"):
        frame = pl.read_parquet(source / name)
        copies = []
        for copy in range(-(-16_384 // len(explained))):
            mapping = {old: copy * len(explained) + index for index, old in enumerate(explained)}
            shifted = frame.with_columns(
                pl.col("feature_id").replace_strict(mapping, default=None, return_dtype=frame.schema["feature_id"])
            ).drop_nulls("feature_id")
            copies.append(shifted)
        tiled = pl.concat(copies).filter(pl.col("feature_id") < 16_384).sort("feature_id", maintain_order=True)
        tiled.write_parquet(target / name)


def serve(output_dir) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "sae_atlas", "serve", str(output_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def hammer(url: str, paths: list[str], clients: int = 4, per_client: int = 500) -> list[float]:
    """Latencies of ``clients`` keep-alive clients requesting ``paths`` round robin at once."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        mine = []
        with httpx.Client(base_url=url) as session:
            for index in range(per_client):
                started = time.perf_counter()
                response = session.get(paths[(offset + index * clients) % len(paths)])
                mine.append(time.perf_counter() - started)
                assert response.status_code == 200
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(offset,)) for offset in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def measure_atlas(label: str, directory, rng) -> str:
    """One row of the in-process table."""
    started = time.perf_counter()
    atlas = Atlas(directory)
    opening = time.perf_counter() - started
    ids = rng.choice(atlas.features(limit=None)["feature_id"].unique().to_numpy(), 500)
    started = time.perf_counter()
    atlas.feature(int(ids[0]))  # the activation-example index is built on first use
    first = time.perf_counter() - started
    lookups = [timed(lambda feature=int(feature): atlas.feature(feature), 1)[0] for feature in ids]
    filters = {"fuzz": (0.6, None), "detection": (None, 0.95)}
    query = timed(lambda: atlas.features(filters=filters, sort="semantic_similarity", descending=True, limit=100), 50)
    atlas.search("warm up the model")
    searches = timed(lambda: atlas.search("names of birds and animals", 10), 30)
    return (
        f"| {label} | {opening:.2f} s | {first:.2f} s | {statistics.median(lookups) * 1e3:.2f} ms "
        f"({percentile(lookups, 0.99) * 1e3:.1f}) | {statistics.median(query) * 1e3:.1f} ms | "
        f"{statistics.median(searches) * 1e3:.1f} ms |"
    )


def measure_http(label: str, directory, rng) -> str:
    """One row of the HTTP table: a real server in its own process, 4 clients."""
    process, url = serve(directory)
    try:
        ids = pl.read_parquet(directory / "features.parquet")["feature_id"].unique().to_list()
        paths = [f"/api/features/{feature}" for feature in rng.choice(ids, 400)]
        hammer(url, paths[:40], per_client=20)  # warm: activation index, connections
        latencies = hammer(url, paths)
        index_page = [
            timed(lambda: httpx.get(url + "/?sort=detection&order=desc&fuzz_min=0.6"), 1)[0] for _ in range(20)
        ]
        deep_page = [timed(lambda: httpx.get(url + "/?offset=40000&limit=100"), 1)[0] for _ in range(20)]
    finally:
        process.terminate()
        process.wait()
    return (
        f"| {label} | {percentile(latencies, 0.5) * 1e3:.1f} ms | {percentile(latencies, 0.99) * 1e3:.1f} ms | "
        f"{len(latencies)} | {statistics.median(index_page) * 1e3:.0f} ms | "
        f"{statistics.median(deep_page) * 1e3:.0f} ms |"
    )


def main() -> None:
    reference = OUT / "reference" / "int8"
    if not (reference / "activation_example_similarity.parquet").exists():
        raise SystemExit("run bench/activation_pipeline.py first: it builds the complete reference output")
    wide = OUT / "reference" / "wide"
    wide_copy(reference, wide)
    rng = np.random.default_rng(0)
    outputs = (("reference (2,472 rows)", reference), (f"full width ({WIDE_ROWS:,} rows)", wide))
    lines = [measure_atlas(label, directory, rng) for label, directory in outputs]
    http_lines = [measure_http(label.split(" (")[0], directory, rng) for label, directory in outputs]
    print("\n".join(lines + http_lines), flush=True)

    body = "\n".join(
        [
            "## Queries (Atlas, HTTP API, browser)",
            "",
            "In-process `Atlas` over the complete int8 reference output, and over a copy whose features and "
            "explanations are tiled to every one of the 16,384 latents (49,152 rows). The first feature(id) builds the "
            "activation-example index (reads the sampled rows of activation_examples.parquet); the p50 is over "
            "500 random features after it; features() filters on two scores and sorts all rows; "
            "search after the model is loaded. Targets: open < 2 s, feature p50 < 1 ms, features < 20 ms, "
            "search < 50 ms.",
            "",
            "| output | open | first feature(id) | feature(id) p50 (p99) | features() filter + sort | search |",
            "|---|---:|---:|---:|---:|---:|",
            *lines,
            "",
            "`sae-atlas serve` (uvicorn, one worker) on loopback, 4 concurrent keep-alive clients requesting "
            "`/api/features/{id}` for random features (targets: p50 < 5 ms, p99 < 20 ms); and the browser's index "
            "page (filtered, sorted, 100 rows; and a deep page at offset 40,000), one request at a time.",
            "",
            "| output | p50 | p99 | requests | index page | deep page |",
            "|---|---:|---:|---:|---:|---:|",
            *http_lines,
        ]
    )
    update_section("queries", body)


if __name__ == "__main__":
    main()
