"""Families, family pairs and the map at scale: 16,384 to 131,072 latents, 16,384 of them explained
by 3 explainers (the study's shape), and the exponent that projects a million.

    python bench/families.py

Inputs are drawn, not run: a decoder-neighbour graph of top-10 lists in which latents come in
concepts of about 50 (8 of 10 neighbours share the concept, cosines 0.3-0.9), explanation
vectors near their concept's (384 dimensions), an activation pattern per explained latent. The
three stages' cost depends on the graph and the vectors, not on how they were made. Each width runs
in a fresh process: read the inputs (the floor), then the map (UMAP), families (Leiden, names) and
pairs; peak RSS of that process. Targets (the families issue): < 10 min and < 4 GiB at 131k. Writes
the "families" section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, gib, update_section

EXPLAINED = 16_384
EXPLAINERS = ("explainer-a", "explainer-b", "explainer-c")
CONCEPT_SIZE = 50
K = 10


def inputs(features: int) -> Path:
    """The drawn inputs of ``features`` latents, written once."""
    import polars as pl

    output = OUT / f"families-{features}"
    if (output / "embeddings.parquet").exists():
        return output
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(features)
    concept = rng.integers(0, features // CONCEPT_SIZE, features)
    order = np.argsort(concept, kind="stable")
    counts = np.bincount(concept)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    neighbours = np.empty((features, K), dtype=np.int64)
    for column in range(K):
        same = order[starts[concept] + rng.integers(0, 1 << 30, features) % counts[concept]]
        neighbours[:, column] = np.where(rng.random(features) < 0.8, same, rng.integers(0, features, features))
    cosines = -np.sort(-rng.uniform(0.3, 0.9, (features, K)), axis=1)
    flat = pl.DataFrame(
        {
            "feature_id": np.repeat(np.arange(features), K).astype(np.uint32),
            "neighbour": neighbours.ravel().astype(np.uint32),
            "cosine": cosines.ravel().astype(np.float32),
        }
    )
    flat.group_by("feature_id", maintain_order=True).agg(
        decoder_similarity=pl.struct(feature_id="neighbour", cosine_similarity="cosine")
    ).write_parquet(output / "decoder.parquet")
    explained = np.sort(rng.choice(features, EXPLAINED, replace=False))
    directions = rng.standard_normal((features // CONCEPT_SIZE + 1, 384)).astype(np.float32)
    rows = []
    for explainer in EXPLAINERS:
        vectors = directions[concept[explained]] + 0.6 * rng.standard_normal((EXPLAINED, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows.append(
            pl.DataFrame(
                {
                    "feature_id": explained.astype(np.uint32),
                    "llm_explainer": explainer,
                    "explanation_text": [f"concept {value} words" for value in concept[explained]],
                    "embedding": vectors,
                    "explanation_ok": True,
                }
            ).with_columns(pl.col("embedding").arr.to_list())
        )
    pl.concat(rows).write_parquet(output / "embeddings.parquet")
    tokens = [[f"w{value}", f"w{value + 1}", f"w{value + 2}"] for value in concept[explained]]
    pl.DataFrame(
        {
            "feature_id": explained.astype(np.uint32),
            "top_token": [row[0] for row in tokens],
            "top_tokens": tokens,
            "concentration": rng.uniform(0.05, 0.9, EXPLAINED).astype(np.float32),
        }
    ).write_parquet(output / "patterns.parquet")
    return output


def measure(output: Path) -> dict:
    """In this process: read the inputs, run the three stages' functions; seconds and peak RSS."""
    import resource

    import polars as pl

    from sae_atlas.stages.families import build, neighbour_edges
    from sae_atlas.stages.family_pairs import explanation_cosines, explanation_vectors, find_pairs
    from sae_atlas.stages.latent_map import layout_map

    started = time.perf_counter()
    decoder = pl.read_parquet(output / "decoder.parquet")
    embeddings = pl.read_parquet(output / "embeddings.parquet")
    patterns = pl.read_parquet(output / "patterns.parquet")
    read = time.perf_counter() - started
    started = time.perf_counter()
    coordinates = layout_map(decoder, seed=0, epochs=200)
    map_seconds = time.perf_counter() - started
    started = time.perf_counter()
    explanations = embeddings.select(
        "feature_id", explainer="llm_explainer", explanation_text="explanation_text"
    ).unique(["feature_id", "explainer"])
    families = build(decoder, coordinates, explanations, resolution=1.0, max_family=100, seed=0)
    families_seconds = time.perf_counter() - started
    started = time.perf_counter()
    edges = neighbour_edges(decoder)
    rows, vectors = explanation_vectors(embeddings)
    pairs = find_pairs(edges, explanation_cosines(edges, rows, vectors), patterns, families)
    pairs_seconds = time.perf_counter() - started
    families.write_parquet(output / "families.parquet")
    return {
        "read": read,
        "map": map_seconds,
        "families": families_seconds,
        "pairs": pairs_seconds,
        "family_count": families["family_id"].n_unique(),
        "pair_count": pairs.height,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def first_paint(families: Path, tries: int = 3) -> tuple[float, float]:
    """Seconds from navigation to the map's points drawn in Chromium (median of ``tries``), for a
    map of ``families``' latents, and the floor: navigating to the feature table of the same server.
    The map is served over bench/labels.py's base run with ``families`` as its families file."""
    import shutil
    import socket
    import threading

    import httpx
    import polars as pl
    import uvicorn
    from playwright.sync_api import sync_playwright

    from labels import base_run
    from sae_atlas import Atlas, layout
    from sae_atlas.serve.app import create_app

    output = OUT / f"map-{families.parent.name}"
    if not (output / layout.FEATURES).exists():
        shutil.copytree(base_run(), output, dirs_exist_ok=True)
    shutil.copy(families, output / layout.FAMILIES)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Atlas(output), prepare=False), port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(url + "/health")
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    paints, floors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/map")  # the first request reads the families file: a server's start
        for _ in range(tries):
            started = time.perf_counter()
            page.goto(url + "/?limit=25")
            floors.append(time.perf_counter() - started)
            started = time.perf_counter()
            page.goto(url + "/map")
            page.wait_for_selector("canvas#map[data-ready='true']")
            paints.append(time.perf_counter() - started)
            drawn = page.locator("#map-status").inner_text()
            if not drawn.startswith(f"{pl.read_parquet(families).height:,} latents"):
                raise RuntimeError(f"the map drew {drawn!r}")
        browser.close()
    server.should_exit = True
    return float(np.median(paints)), float(np.median(floors))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(Path(sys.argv[2]))))
        return
    widths = (16_384, 32_768, 65_536, 131_072)
    results = {}
    for features in widths:
        output = inputs(features)
        environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
        result = subprocess.run(
            [sys.executable, __file__, "--measure", str(output)], capture_output=True, text=True, env=environment
        )
        if result.returncode:
            raise RuntimeError(result.stderr)
        results[features] = json.loads(result.stdout.strip().splitlines()[-1])
        print(features, results[features], flush=True)
    paint, floor = first_paint(OUT / f"families-{widths[-1]}" / "families.parquet")
    print("first paint", paint, "floor", floor, flush=True)
    totals = {width: figures["map"] + figures["families"] + figures["pairs"] for width, figures in results.items()}
    # the two largest widths: below them fixed costs (numba compiling UMAP, ~8 s) flatten the curve
    exponent = float(np.log(totals[widths[-1]] / totals[widths[-2]]) / np.log(widths[-1] / widths[-2]))
    million = totals[widths[-1]] * (1_048_576 / widths[-1]) ** exponent
    rows = "\n".join(
        f"| {width:,} | {figures['read']:.1f} s | {figures['map']:.1f} s | {figures['families']:.1f} s "
        f"| {figures['pairs']:.1f} s | {totals[width]:.1f} s | {figures['family_count']:,} | {gib(figures['peak'])} |"
        for width, figures in results.items()
    )
    body = f"""
## Families, pairs worth a look and the map at 131,072 latents

`python bench/families.py`: the map (`layout_map`, UMAP over the top-10 decoder neighbours, 200 epochs), the
families (`build`: Leiden, subfamilies of at most 100, names) and the pairs (`find_pairs` with the explanation
cosines of every explained neighbour pair) in a fresh process per width; {EXPLAINED:,} latents explained by 3
explainers (384-dimensional vectors). The graph is drawn: concepts of about {CONCEPT_SIZE} latents, 8 of 10
neighbours in the concept. The floor is reading the inputs. Target: < 10 min and < 4 GiB at 131k.

| latents | read (floor) | map | families | pairs | total | families found | peak |
|---|---|---|---|---|---|---|---|
{rows}

Measured exponent of the total in the width, between the two largest widths (below them fixed costs such as
numba compiling UMAP, about 8 s, flatten the curve): {exponent:.2f}; projected for 1,048,576 latents:
{million / 60:.1f} min.

The map page in Chromium (Playwright, headless, 1280 × 800) with {widths[-1]:,} latents: first paint (navigation to
every point drawn) {paint:.2f} s, median of 3, against {floor:.2f} s for the feature table of the same server (the
floor: a page with no map). Target: < 2 s.
"""
    update_section("families", body)
    print(body)


if __name__ == "__main__":
    main()
