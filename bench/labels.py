"""Labels at scale: the triage queue's next explanation and label writes, with 131,072 latents × 3
explainers (393,216 explanations) in the queue.

    python bench/labels.py                      # 131,072 latents
    python bench/labels.py --features 16384

The atlas: `sae-atlas synth` + `run` of 512 latents, every one explained by 3 explainers and scored
by 3 scorers, its tables tiled to ``--features`` latents (feature ids shifted by 512 per copy): the
queue's cost depends on how many explanations it orders, not on what they say, and a real run of
393k explanations × 3 scorers would take hours to score here. `sae-atlas serve` answers over HTTP
(uvicorn, one process), as a user runs it.

Measured, in one run:
- next explanation: `GET /api/triage` right after a label was written (the queue loses that pair; the
  item carries everything the feature page shows), against its floor, `GET /api/features/{id}` of
  the same latents (the feature alone, no queue);
- label writes: 8 processes × 100 `POST /api/labels` at once, each request's latency; its floor, one
  process writing the same rows straight into SQLite (WAL, synchronous=FULL, a transaction each).
Targets (the labels issue): next explanation < 50 ms, a label write < 20 ms p99 at 8 writers.
Writes the "labels" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLI, OUT, update_section

BASE_LATENTS = 512
# the tables the atlas reads that are keyed by latent; the others are optional to it
TILED = ("features.parquet", "stages/scores.parquet", "stages/decoder_similarity.parquet")


def base_run() -> Path:
    """A run of 512 latents, all explained and scored (built once under bench/out)."""
    root = OUT / "labels-base"
    output = root / "master"
    if (output / "features.parquet").exists():
        return output
    shutil.rmtree(root, ignore_errors=True)
    options = ["--features", "512", "--explained", "512", "--explainers", "3", "--scorers", "3"]
    subprocess.run(
        [*CLI, "synth", str(root), *options, "--prompts", "400", "--ctx", "32", "--d-model", "64"], check=True
    )
    subprocess.run([*CLI, "run", str(root / "sae-atlas.toml")], check=True, stdout=subprocess.DEVNULL)
    return output


def tiled(base: Path, features: int) -> Path:
    """``base``'s latent tables repeated to ``features`` latents, each copy's ids shifted by 512."""
    output = OUT / f"labels-{features}"
    if (output / "features.parquet").exists():
        return output
    copies = features // BASE_LATENTS
    for name in TILED:
        table = pq.read_table(base / name)
        column = table.schema.get_field_index("feature_id")
        parts = []
        for copy in range(copies):
            shifted = pa.compute.add(table["feature_id"], pa.scalar(copy * BASE_LATENTS, table["feature_id"].type))
            parts.append(table.set_column(column, "feature_id", shifted))
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(parts), output / name)
    for sidecar in base.glob("*.metadata.json"):
        shutil.copy(sidecar, output / sidecar.name)
    return output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(output: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [*CLI, "serve", str(output), "--port", str(port), "--write-token", "tok"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.25)
    raise RuntimeError("the server did not start")


def writer(port: int, index: int, count: int, start: float, latencies) -> None:
    """One writer: ``count`` labels of latents of its own, one request each, from ``start``."""
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer tok"}, timeout=60
    ) as client:
        while time.time() < start:
            time.sleep(0.001)
        for label in range(count):
            body = {"feature_id": index * count + label, "verdict": "good", "note": f"{index}-{label}"}
            began = time.perf_counter()
            response = client.post("/api/labels", json=body)
            latencies.append(time.perf_counter() - began)
            assert response.status_code == 201, response.text


def concurrent_writes(port: int, writers: int = 8, count: int = 100) -> np.ndarray:
    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    latencies = manager.list()
    start = time.time() + 3  # every writer connected before the first request
    processes = [
        context.Process(target=writer, args=(port, index, count, start, latencies)) for index in range(writers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    values = np.array(list(latencies))
    manager.shutdown()
    assert len(values) == writers * count, "a writer failed"
    return values


def bare_sqlite_writes(count: int = 800) -> np.ndarray:
    """The floor of a label write: one row, one transaction, WAL and synchronous=FULL, no HTTP."""
    with tempfile.TemporaryDirectory() as directory:
        connection = sqlite3.connect(Path(directory) / "floor.sqlite", isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE labels (row INTEGER PRIMARY KEY, feature_id INTEGER, verdict TEXT, note TEXT)")
        times = []
        for index in range(count):
            began = time.perf_counter()
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO labels (feature_id, verdict, note) VALUES (?, 'good', ?)", (index, "n"))
            connection.execute("COMMIT")
            times.append(time.perf_counter() - began)
        connection.close()
    return np.array(times)


def next_explanations(client: httpx.Client, order: str, rounds: int = 50) -> tuple[np.ndarray, np.ndarray, float]:
    """Label the queue's head, then ask for the next, ``rounds`` times: the asks' latencies, the
    floor's (the same latents' feature JSON) and the first, cold ask (the queue ordered once)."""
    began = time.perf_counter()
    item = client.get("/api/triage", params={"order": order}).json()["item"]
    cold = time.perf_counter() - began
    asks, floors = [], []
    for _ in range(rounds):
        label = {"feature_id": item["feature_id"], "explainer": item["explainer"], "verdict": "bad"}
        assert client.post("/api/labels", json=label).status_code == 201
        began = time.perf_counter()
        item = client.get("/api/triage", params={"order": order}).json()["item"]
        asks.append(time.perf_counter() - began)
        began = time.perf_counter()
        client.get(f"/api/features/{item['feature_id']}").raise_for_status()
        floors.append(time.perf_counter() - began)
    return np.array(asks), np.array(floors), cold


def milliseconds(values: np.ndarray, quantile: float) -> str:
    return f"{np.percentile(values, quantile) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=131072)
    arguments = parser.parse_args()
    output = tiled(base_run(), arguments.features)
    (output / "labels.sqlite").unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(f"{output}/labels.sqlite{suffix}").unlink(missing_ok=True)
    port = free_port()
    server = serve(output, port)
    try:
        headers = {"Authorization": "Bearer tok"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120) as client:
            explanations = client.get("/api/stats").json()["rows"]
            rows = {}
            for order in ("scorer_disagreement", "random"):
                rows[order] = next_explanations(client, order)
        writes = concurrent_writes(port)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    floor = bare_sqlite_writes()
    lines = [
        f"| {order.replace('_', ' ')} | {milliseconds(asks, 50)} | {milliseconds(asks, 99)} | {cold:.2f} s "
        f"| {milliseconds(floors, 50)} |"
        for order, (asks, floors, cold) in rows.items()
    ]
    table = "\n".join(lines)
    body = f"""
`python bench/labels.py --features {arguments.features}`: {explanations:,} explanations
({arguments.features:,} latents × 3 explainers, 3 scorers; a synth run of 512 latents tiled), `sae-atlas serve`
over HTTP, one client.

The next explanation, `GET /api/triage` right after labelling the current one (50 rounds per order; target
< 50 ms). The first ask orders every explanation once; later asks drop the labelled pairs from that order.
The floor is `GET /api/features/{{id}}` of the same latents: the feature alone, without the queue.

| order | p50 | p99 | first ask | floor p50 |
|---|---|---|---|---|
{table}

Label writes, 8 processes × 100 `POST /api/labels` at once (target < 20 ms p99): p50
{milliseconds(writes, 50)}, p99 {milliseconds(writes, 99)}, max {milliseconds(writes, 100)}. Floor, one
process writing rows straight into SQLite (WAL, synchronous=FULL, one transaction each, no HTTP): p50
{milliseconds(floor, 50)}, p99 {milliseconds(floor, 99)}.
"""
    update_section(f"labels-{arguments.features}", body)
    print(body)


if __name__ == "__main__":
    main()
