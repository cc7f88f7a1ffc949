"""A 2-D map of every latent, from the decoder-neighbour graph the run already has.

UMAP (McInnes et al., ``umap-learn``) takes each latent's top-k decoder neighbours as its
precomputed nearest neighbours (distance = 1 − cosine), builds its fuzzy neighbour graph from them
and lays that graph out in two dimensions: O(n·k), never an n × n matrix, so a million latents
need what ten decoder neighbours each take. The layout starts from the graph's spectral embedding
when the graph is connected (the global arrangement then follows the graph), from seeded random
points otherwise, and runs on one thread with the configured seed: the same neighbours and seed
give the same coordinates, bit for bit.

The map depends on the decoder alone, so explanations or scores that change never redo it.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_LATENT_MAP
from sae_atlas.stage import Plan, Product, Stage, StageContext

MIN_DIST = 0.1  # UMAP's spacing of close points: small keeps families tight, as on Neuronpedia's maps
NEGATIVE_SAMPLES = 5


def neighbour_arrays(neighbours: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feature ids, neighbour positions [n, k+1], distances [n, k+1]) of the decoder stage's
    table: each latent first (distance 0), then its neighbours; ``k`` is the shortest list, the
    neighbours outside the table are left out (a latent is its own neighbour in their place)."""
    ids = neighbours["feature_id"].cast(pl.Int64).to_numpy()
    exploded = neighbours.select(
        pl.int_range(pl.len()).alias("row"),
        ids=pl.col("decoder_similarity").list.eval(pl.element().struct.field("feature_id")),
        cosines=pl.col("decoder_similarity").list.eval(pl.element().struct.field("cosine_similarity")),
    ).explode("ids", "cosines")
    position = pl.DataFrame({"ids": ids, "at": np.arange(len(ids))}).with_columns(pl.col("ids").cast(pl.UInt32))
    exploded = exploded.join(position, on="ids", how="left", maintain_order="left").drop_nulls("at")
    k = int(exploded.group_by("row").len()["len"].min() or 0) if exploded.height else 0
    indices = np.repeat(np.arange(len(ids))[:, None], k + 1, axis=1)
    distances = np.zeros((len(ids), k + 1), dtype=np.float32)
    if k:
        kept = exploded.with_columns(rank=pl.int_range(pl.len()).over("row")).filter(pl.col("rank") < k)
        rows, ranks = kept["row"].to_numpy(), kept["rank"].to_numpy() + 1
        indices[rows, ranks] = kept["at"].to_numpy()
        distances[rows, ranks] = np.clip(1.0 - kept["cosines"].to_numpy(), 0.0, 2.0)
    return ids, indices, distances


def layout_map(neighbours: pl.DataFrame, *, seed: int, epochs: int) -> pl.DataFrame:
    """(feature_id, x, y) for every latent of the decoder stage's table, by UMAP over its
    neighbours (:data:`STAGE_LATENT_MAP`)."""
    from scipy.sparse.csgraph import connected_components
    from umap.umap_ import find_ab_params, fuzzy_simplicial_set, simplicial_set_embedding

    ids, indices, distances = neighbour_arrays(neighbours)
    n = len(ids)
    if n < 3 or indices.shape[1] < 2:  # nothing to lay out: the latents on a line
        x = np.arange(n, dtype=np.float32)
        return pl.DataFrame({"feature_id": ids, "x": x, "y": np.zeros(n, dtype=np.float32)}).cast(
            dict(STAGE_LATENT_MAP)  # type: ignore[arg-type]
        )
    random = np.random.RandomState(seed)
    graph, _, _ = fuzzy_simplicial_set(
        np.zeros((n, 1), dtype=np.float32),
        indices.shape[1],
        random,
        "euclidean",
        knn_indices=indices,
        knn_dists=distances,
    )
    components, _ = connected_components(graph, directed=False)
    a, b = find_ab_params(1.0, MIN_DIST)
    coordinates, _ = simplicial_set_embedding(
        None,
        graph,
        2,
        1.0,
        a,
        b,
        1.0,
        NEGATIVE_SAMPLES,
        epochs,
        "spectral" if components == 1 else "random",
        np.random.RandomState(seed),
        "euclidean",
        {},
        False,
        {},
        False,
        parallel=False,
    )
    coordinates = np.asarray(coordinates, dtype=np.float32)
    return pl.DataFrame({"feature_id": ids, "x": coordinates[:, 0], "y": coordinates[:, 1]}).cast(
        dict(STAGE_LATENT_MAP)  # type: ignore[arg-type]
    )


def plan(context: StageContext) -> Plan:
    settings = context.config.families

    def execute(problems: Problems) -> Product:
        table = layout_map(context.read("decoder_similarity"), seed=settings.seed, epochs=settings.map_epochs)
        return Product(data=table, rows=table.height, statistics={"latents": table.height})

    return Plan(key={"min_dist": MIN_DIST, "negative_samples": NEGATIVE_SAMPLES}, execute=execute)


STAGE = Stage(
    name="latent_map",
    output=layout.LATENT_MAP,
    version=1,
    plan=plan,
    reads=("decoder_similarity",),
    config=("families.seed", "families.map_epochs"),
    description="a 2-D map of every latent: UMAP over the decoder-neighbour graph",
)
