"""Feature families: latents clustered from the decoder-neighbour graph, named by their explanations.

- **Graph**: every latent's top-k decoder neighbours, as undirected edges weighted by cosine (the
  larger of the two directions; a negative cosine counts as none). O(n·k) edges: a million latents
  at k = 10 are ten million edges, never an n × n matrix.
- **Families**: Leiden (``leidenalg`` over ``igraph``) maximising the RB configuration quality at
  ``[families] resolution``, with ``[families] seed``: a latent's family is the set of latents its
  decoder groups it with (feature splitting and absorption put a concept's latents together).
- **Subfamilies**: a family larger than ``[families] max_family`` is clustered again alone (its
  inner edges only, Leiden at the lowest resolution that splits it, again until every piece is
  within the limit: :func:`split_large`), so every subfamily stays readable; a smaller family is
  its own one subfamily. Subfamilies nest in families by construction.
- **Numbering**: families by size (largest first), then by their lowest feature id; subfamilies the
  same within their family, numbered across the study.
- **Names**: the three words of the members' explanations that most set the group apart: words of
  three letters or more, not English function words, counted once per latent; ranked by lift (the
  share of the group's explained latents that use the word minus the share over the study), among
  words at least two of its latents use (one, for a group of one) and more than the study does.
  Null for a group none of whose latents is explained.

The map's coordinates (:mod:`sae_atlas.stages.latent_map`) are joined in, so one file holds what
the map page draws.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_FAMILIES
from sae_atlas.stage import Plan, Product, Stage, StageContext

NAME_WORDS = 3
MAX_ROUNDS = 30
SPLIT_START = 0.25
GROWTH = 1.5
MIN_WORD_LETTERS = 3


def neighbour_edges(neighbours: pl.DataFrame) -> pl.DataFrame:
    """(source, target, cosine) with source < target, once per pair of latents: the larger cosine
    of the two directions, the pairs between latents of the table only."""
    ids = neighbours.select(pl.col("feature_id").cast(pl.UInt32))
    edges = neighbours.select(
        source=pl.col("feature_id").cast(pl.UInt32),
        neighbour=pl.col("decoder_similarity"),
    ).explode("neighbour")
    edges = edges.drop_nulls("neighbour").select(
        "source",
        target=pl.col("neighbour").struct.field("feature_id").cast(pl.UInt32),
        cosine=pl.col("neighbour").struct.field("cosine_similarity").cast(pl.Float32),
    )
    edges = edges.join(ids, left_on="target", right_on="feature_id", how="semi").filter(
        pl.col("source") != pl.col("target")
    )
    low, high = pl.min_horizontal("source", "target"), pl.max_horizontal("source", "target")
    return edges.group_by(source=low, target=high).agg(pl.col("cosine").max()).sort("source", "target")


def _leiden(n: int, sources: np.ndarray, targets: np.ndarray, weights: np.ndarray, **options) -> np.ndarray:
    """Leiden's membership of ``n`` vertices over weighted undirected edges (positions), the RB
    configuration model."""
    import igraph
    import leidenalg

    graph = igraph.Graph(n=n, edges=np.column_stack([sources, targets]).tolist(), directed=False)
    graph.es["weight"] = np.maximum(weights, 0.0).astype(float).tolist()
    partition = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition, weights="weight", **options)
    return np.asarray(partition.membership, dtype=np.int64)


def _numbered(groups: pl.DataFrame, within: list[str], column: str) -> pl.DataFrame:
    """``groups`` (feature_id, ``within`` columns, raw) with ``column``: each raw group numbered by
    size (largest first), then by its lowest feature id, after ``within``'s order."""
    order = (
        groups.group_by(*within, "raw")
        .agg(size=pl.len(), first=pl.col("feature_id").min())
        .sort([*within, "size", "first"], descending=[*([False] * len(within)), True, False])
        .with_columns(pl.int_range(pl.len(), dtype=pl.UInt32).alias(column))
    )
    return groups.join(order.select(*within, "raw", column, pl.col("size").alias(f"{column}_size")),
                       on=[*within, "raw"]).drop("raw")  # fmt: skip


def split_large(
    groups: np.ndarray, a: np.ndarray, b: np.ndarray, weights: np.ndarray, *, limit: int, seed: int
) -> np.ndarray:
    """Each vertex's piece of its group: groups of at most ``limit`` vertices stay whole; a larger
    one is clustered alone (Leiden over its inner edges, the configuration model), from resolution
    :data:`SPLIT_START` up by :data:`GROWTH` until it falls apart, and each piece still too large
    is split the same way (leidenalg's own ``max_comm_size`` does not hold the limit). A group no
    resolution splits is cut in runs of ``limit`` by vertex order. One Leiden call per large group
    and round: the loop is over the few large groups, never over latents."""
    pieces = groups.astype(np.int64).copy()
    for _ in range(MAX_ROUNDS):
        sizes = np.bincount(pieces)
        large = np.flatnonzero(sizes > limit)
        if not len(large):
            break
        inner = (pieces[a] == pieces[b]) & (sizes[pieces[a]] > limit)
        edge_group = np.where(inner, pieces[a], -1)
        order = np.argsort(edge_group, kind="stable")
        bounds = np.searchsorted(edge_group[order], np.concatenate([large, large + 1]))
        # each group's vertices as one slice (ascending within it): no scan of every vertex per group
        by_piece = np.argsort(pieces, kind="stable")
        spans = np.searchsorted(pieces[by_piece], np.concatenate([large, large + 1]))
        next_piece = pieces.max() + 1
        for index in range(len(large)):
            members = by_piece[spans[index] : spans[len(large) + index]]
            edges = order[bounds[index] : bounds[len(large) + index]]
            local = np.searchsorted(members, np.concatenate([a[edges], b[edges]])).reshape(2, -1)
            found = _split_one(len(members), local[0], local[1], weights[edges], limit=limit, seed=seed)
            pieces[members] = next_piece + found
            next_piece += int(found.max()) + 1
        pieces = np.unique(pieces, return_inverse=True)[1]
    return pieces


def _split_one(n: int, a: np.ndarray, b: np.ndarray, weights: np.ndarray, *, limit: int, seed: int) -> np.ndarray:
    """The pieces of one group of ``n`` vertices at the lowest resolution that splits it (pieces
    still above ``limit`` are split again by :func:`split_large`'s next round), else runs of
    ``limit``."""
    resolution = SPLIT_START
    for _ in range(MAX_ROUNDS):
        found = _leiden(n, a, b, weights, resolution_parameter=resolution, seed=seed)
        if found.max() > 0:
            return found
        resolution *= GROWTH
    return np.arange(n) // limit


def cluster(ids: np.ndarray, edges: pl.DataFrame, *, resolution: float, max_family: int, seed: int) -> pl.DataFrame:
    """(feature_id, family_id, family_size, subfamily_id, subfamily_size) for every latent of
    ``ids``, from :func:`neighbour_edges`."""
    ids = np.asarray(ids, dtype=np.int64)
    positions = pl.DataFrame({"feature_id": ids.astype(np.uint32), "at": np.arange(len(ids), dtype=np.int64)})
    located = edges.join(positions, left_on="source", right_on="feature_id").rename({"at": "a"})
    located = located.join(positions, left_on="target", right_on="feature_id").rename({"at": "b"})
    a, b, weights = located["a"].to_numpy(), located["b"].to_numpy(), located["cosine"].to_numpy()
    family = _leiden(len(ids), a, b, weights, resolution_parameter=resolution, seed=seed)
    table = _numbered(pl.DataFrame({"feature_id": ids.astype(np.uint32), "raw": family}), [], "family_id")
    family_at = positions.join(table, on="feature_id", how="left", maintain_order="left")["family_id"].to_numpy()
    raw = split_large(family_at, a, b, weights, limit=max_family, seed=seed)
    subfamilies = pl.DataFrame({"feature_id": ids.astype(np.uint32), "family_id": family_at.astype(np.uint32),
                                "raw": raw})  # fmt: skip
    subfamilies = _numbered(subfamilies, ["family_id"], "subfamily_id")
    return (
        table.rename({"family_id_size": "family_size"})
        .join(subfamilies.select("feature_id", "subfamily_id", subfamily_size="subfamily_id_size"), on="feature_id")
        .sort("feature_id")
    )


def _stop_words() -> list[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return sorted(ENGLISH_STOP_WORDS)


def group_names(members: pl.DataFrame, explanations: pl.DataFrame, group: str) -> pl.DataFrame:
    """(``group``, name) for each group of ``members`` (feature_id, ``group``) with an explained
    latent, from ``explanations`` (feature_id, explanation_text; usable ones): the rule of the
    module's docstring."""
    words = (
        explanations.select(
            pl.col("feature_id").cast(pl.UInt32),
            word=pl.col("explanation_text").fill_null("").str.to_lowercase().str.extract_all(r"\p{L}+"),
        )
        .explode("word")
        .filter(pl.col("word").str.len_chars() >= MIN_WORD_LETTERS)
        .filter(~pl.col("word").is_in(_stop_words()))
        .unique(["feature_id", "word"])
    )
    explained = explanations.select(pl.col("feature_id").cast(pl.UInt32)).unique()
    study = max(explained.height, 1)
    overall = words.group_by("word").agg(overall=pl.len() / study)
    grouped = members.select("feature_id", group).join(explained, on="feature_id", how="semi")
    sizes = grouped.group_by(group).agg(explained=pl.len())
    counts = words.join(grouped, on="feature_id").group_by(group, "word").agg(count=pl.len())
    ranked = (
        counts.join(sizes, on=group)
        .join(overall, on="word")
        .filter(pl.col("count") >= pl.min_horizontal(pl.lit(2), pl.col("explained")))
        .with_columns(lift=pl.col("count") / pl.col("explained") - pl.col("overall"))
        .filter(pl.col("lift") > 0)
        .sort([group, "lift", "count", "word"], descending=[False, True, True, False])
        .group_by(group, maintain_order=True)
        .head(NAME_WORDS)
    )
    return ranked.group_by(group, maintain_order=True).agg(name=pl.col("word").str.join(" · "))


def build(
    neighbours: pl.DataFrame,
    coordinates: pl.DataFrame,
    explanations: pl.DataFrame,
    *,
    resolution: float,
    max_family: int,
    seed: int,
) -> pl.DataFrame:
    """The families table (:data:`STAGE_FAMILIES`): ``neighbours`` the decoder stage's table,
    ``coordinates`` the map's, ``explanations`` (feature_id, explanation_text) the usable ones."""
    ids = neighbours["feature_id"].cast(pl.Int64).to_numpy()
    table = cluster(ids, neighbour_edges(neighbours), resolution=resolution, max_family=max_family, seed=seed)
    table = table.join(
        group_names(table, explanations, "family_id").rename({"name": "family_name"}), on="family_id", how="left"
    ).join(
        group_names(table, explanations, "subfamily_id").rename({"name": "subfamily_name"}),
        on="subfamily_id",
        how="left",
    )
    table = table.join(coordinates.with_columns(pl.col("feature_id").cast(pl.UInt32)), on="feature_id", how="left")
    return table.select(list(STAGE_FAMILIES)).cast(dict(STAGE_FAMILIES)).sort("feature_id")  # type: ignore[arg-type]


def usable_explanations(features: pl.DataFrame) -> pl.DataFrame:
    """(feature_id, explainer, explanation_text) of ``features.parquet``'s usable explanations,
    one per (feature, explainer)."""
    return (
        features.filter(pl.col("explanation_ok"))
        .select("feature_id", explainer=pl.col("llm_explainer").cast(pl.String), explanation_text="explanation_text")
        .unique(["feature_id", "explainer"], keep="first", maintain_order=True)
    )


def plan(context: StageContext) -> Plan:
    settings = context.config.families

    def execute(problems: Problems) -> Product:
        features = context.read("features", ["feature_id", "llm_explainer", "explanation_text", "explanation_ok"])
        table = build(
            context.read("decoder_similarity"),
            context.read("latent_map"),
            usable_explanations(features),
            resolution=settings.resolution,
            max_family=settings.max_family,
            seed=settings.seed,
        )
        statistics = {
            "latents": table.height,
            "families": table["family_id"].n_unique(),
            "subfamilies": table["subfamily_id"].n_unique(),
            "largest_family": int(table["family_size"].max() or 0),
        }
        return Product(data=table, rows=table.height, statistics=statistics)

    return Plan(key={"name_words": NAME_WORDS, "min_letters": MIN_WORD_LETTERS}, execute=execute)


STAGE = Stage(
    name="families",
    output=layout.FAMILIES,
    version=1,
    plan=plan,
    reads=("decoder_similarity", "latent_map", "features"),
    config=("families.resolution", "families.max_family", "families.seed"),
    description="feature families: Leiden over the decoder-neighbour graph, subfamilies, names",
)
