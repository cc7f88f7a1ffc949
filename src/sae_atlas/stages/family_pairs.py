"""Pairs of decoder neighbours worth a look, each with the numbers behind it.

Every pair of latents one of which is among the other's top-k decoder neighbours (the graph of
:mod:`sae_atlas.stages.families`) is checked against three rules:

==========================  ====================================================================
near-duplicate decoders     decoder cosine ≥ :data:`NEAR_DUPLICATE`: two latents writing almost
                            the same direction (a dictionary that learned one feature twice)
same words                  for an explainer that explained both (usably): explanation-embedding
                            cosine ≥ :data:`SAME_WORDS`. The explainer did not tell apart two
                            latents whose decoders differ; one row per explainer
split candidate             decoder cosine ≥ :data:`SPLIT_DECODER`; both latents have an activation
                            pattern; the narrower one (higher token concentration, by at least
                            :data:`SPLIT_MARGIN`) has its top token among the broader one's five
                            top tokens; and some explainer's two explanations are related
                            (cosine ≥ :data:`RELATED`) but not the same words: a narrower and a
                            broader version of one concept
==========================  ====================================================================

Explanation cosines are kept to :data:`DECIMALS` decimals: a vector's last bits depend on the
batch the embedding cache first saw it in, and a pair must not change kind with them.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_FAMILY_PAIRS
from sae_atlas.stage import Plan, Product, Stage, StageContext
from sae_atlas.stages.families import neighbour_edges

NEAR_DUPLICATE = 0.9
SAME_WORDS = 0.95
SPLIT_DECODER = 0.4
SPLIT_MARGIN = 0.2
RELATED = 0.5
DECIMALS = 4
PAIRS_PER_BLOCK = 1 << 16
KINDS = ("same words", "split candidate", "near-duplicate decoders")


def explanation_vectors(embeddings: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """(rows: feature_id, explainer, row; vectors [rows, dimensions]) of the usable explanations of
    ``explanation_embeddings.parquet`` (feature_id, llm_explainer, embedding, explanation_ok), one
    per (feature, explainer)."""
    usable = (
        embeddings.filter(pl.col("explanation_ok"))
        .select(
            pl.col("feature_id").cast(pl.UInt32),
            explainer=pl.col("llm_explainer").cast(pl.String),
            embedding="embedding",
        )
        .unique(["feature_id", "explainer"], keep="first", maintain_order=True)
    )
    if usable.height == 0:
        return usable.select("feature_id", "explainer", row=pl.lit(0, pl.UInt32)).clear(), np.zeros((0, 0), np.float32)
    width = usable["embedding"].list.len().max()
    vectors = usable["embedding"].list.to_array(int(width)).to_numpy().astype(np.float32, copy=False)
    rows = usable.select("feature_id", "explainer", row=pl.int_range(pl.len(), dtype=pl.UInt32))
    return rows, vectors


def explanation_cosines(edges: pl.DataFrame, rows: pl.DataFrame, vectors: np.ndarray) -> pl.DataFrame:
    """(source, target, explainer, explanation_cosine) for each edge and each explainer that
    explained both ends, in blocks of :data:`PAIRS_PER_BLOCK` pairs (two gathered blocks of vectors,
    never all pairs' at once)."""
    pairs = (
        edges.select("source", "target")
        .join(rows.rename({"feature_id": "source", "row": "source_row"}), on="source")
        .join(rows.rename({"feature_id": "target", "row": "target_row"}), on=["target", "explainer"])
    )
    pairs = pairs.sort("source", "target", "explainer")
    left, right = pairs["source_row"].to_numpy(), pairs["target_row"].to_numpy()
    cosines = np.empty(len(left), dtype=np.float32)
    for start in range(0, len(left), PAIRS_PER_BLOCK):
        stop = start + PAIRS_PER_BLOCK
        cosines[start:stop] = np.einsum("ij,ij->i", vectors[left[start:stop]], vectors[right[start:stop]])
    return pairs.select("source", "target", "explainer").with_columns(
        explanation_cosine=pl.Series(np.round(cosines, DECIMALS), dtype=pl.Float32)
    )


def _number(value: pl.Expr) -> pl.Expr:
    return value.round(2).cast(pl.String)


def find_pairs(
    edges: pl.DataFrame, cosines: pl.DataFrame, patterns: pl.DataFrame | None, families: pl.DataFrame
) -> pl.DataFrame:
    """The flagged pairs (:data:`STAGE_FAMILY_PAIRS`) of ``edges`` (:func:`neighbour_edges`), from
    the explanation ``cosines`` (:func:`explanation_cosines`), the activation ``patterns``
    (feature_id, top_token, top_tokens, concentration; None without activations) and ``families``
    (feature_id, family_id)."""
    duplicates = edges.filter(pl.col("cosine") >= NEAR_DUPLICATE).select(
        "source",
        "target",
        kind=pl.lit(KINDS[2]),
        explainer=pl.lit(None, pl.String),
        decoder_cosine="cosine",
        explanation_cosine=pl.lit(None, pl.Float32),
        narrower_id=pl.lit(None, pl.UInt32),
        evidence=pl.concat_str(pl.lit("decoder cosine "), _number(pl.col("cosine")), pl.lit(f" ≥ {NEAR_DUPLICATE}")),
    )
    same = (
        cosines.filter(pl.col("explanation_cosine") >= SAME_WORDS)
        .join(edges, on=["source", "target"])
        .select(
            "source",
            "target",
            kind=pl.lit(KINDS[0]),
            explainer="explainer",
            decoder_cosine="cosine",
            explanation_cosine="explanation_cosine",
            narrower_id=pl.lit(None, pl.UInt32),
            evidence=pl.concat_str(
                pl.lit("explanations by "),
                pl.col("explainer"),
                pl.lit(" at cosine "),
                _number(pl.col("explanation_cosine")),
                pl.lit(f" ≥ {SAME_WORDS}; decoders at cosine "),
                _number(pl.col("cosine")),
            ),
        )
    )
    parts = [same, duplicates]
    if patterns is not None:
        parts.append(split_candidates(edges, cosines, patterns))
    table = pl.concat(parts, how="vertical_relaxed")
    family = families.select(pl.col("feature_id").cast(pl.UInt32), "family_id")
    table = table.join(family, left_on="source", right_on="feature_id", how="left").join(
        family.rename({"family_id": "neighbour_family"}), left_on="target", right_on="feature_id", how="left"
    )
    table = table.with_columns(
        feature_id="source", neighbour_id="target", same_family=pl.col("family_id") == pl.col("neighbour_family")
    )
    order = pl.col("kind").replace_strict(KINDS, list(range(len(KINDS))))
    table = table.sort(order, "feature_id", "neighbour_id", "explainer", nulls_last=True)
    return table.select(list(STAGE_FAMILY_PAIRS)).cast(dict(STAGE_FAMILY_PAIRS))  # type: ignore[arg-type]


def split_candidates(edges: pl.DataFrame, cosines: pl.DataFrame, patterns: pl.DataFrame) -> pl.DataFrame:
    """The split candidates among ``edges`` (the rule of the module's docstring)."""
    latent = patterns.select(
        pl.col("feature_id").cast(pl.UInt32), "top_token", "top_tokens", pl.col("concentration").cast(pl.Float32)
    ).drop_nulls(["top_token", "concentration"])
    related = (
        cosines.group_by("source", "target")
        .agg(explanation_cosine=pl.col("explanation_cosine").max())
        .filter((pl.col("explanation_cosine") >= RELATED) & (pl.col("explanation_cosine") < SAME_WORDS))
    )
    close = edges.filter(pl.col("cosine") >= SPLIT_DECODER).join(related, on=["source", "target"])
    close = close.join(latent.rename(lambda name: f"a_{name}"), left_on="source", right_on="a_feature_id").join(
        latent.rename(lambda name: f"b_{name}"), left_on="target", right_on="b_feature_id"
    )
    a_narrower = pl.col("a_concentration") >= pl.col("b_concentration")
    pick = lambda a, b: pl.when(a_narrower).then(pl.col(a)).otherwise(pl.col(b))  # noqa: E731
    close = close.with_columns(
        narrower_id=pl.when(a_narrower).then(pl.col("source")).otherwise(pl.col("target")),
        broader_id=pl.when(a_narrower).then(pl.col("target")).otherwise(pl.col("source")),
        narrow_token=pick("a_top_token", "b_top_token"),
        narrow_concentration=pick("a_concentration", "b_concentration"),
        broad_concentration=pick("b_concentration", "a_concentration"),
        broad_tokens=pick("b_top_tokens", "a_top_tokens"),
    )
    found = close.filter(
        (pl.col("narrow_concentration") - pl.col("broad_concentration") >= SPLIT_MARGIN)
        & pl.col("broad_tokens").list.contains(pl.col("narrow_token"))
    )
    return found.select(
        "source",
        "target",
        kind=pl.lit(KINDS[1]),
        explainer=pl.lit(None, pl.String),
        decoder_cosine="cosine",
        explanation_cosine="explanation_cosine",
        narrower_id="narrower_id",
        evidence=pl.concat_str(
            pl.lit("#"),
            pl.col("narrower_id").cast(pl.String),
            pl.lit(" fires on “"),
            pl.col("narrow_token"),
            pl.lit("” (concentration "),
            _number(pl.col("narrow_concentration")),
            pl.lit("), one of #"),
            pl.col("broader_id").cast(pl.String),
            pl.lit("'s top tokens (concentration "),
            _number(pl.col("broad_concentration")),
            pl.lit("); decoders at cosine "),
            _number(pl.col("cosine")),
            pl.lit(", explanations at "),
            _number(pl.col("explanation_cosine")),
        ),
    )


def plan(context: StageContext) -> Plan:
    def execute(problems: Problems) -> Product:
        edges = neighbour_edges(context.read("decoder_similarity"))
        embeddings = context.read(
            "explanation_embeddings", ["feature_id", "llm_explainer", "embedding", "explanation_ok"]
        )
        rows, vectors = explanation_vectors(embeddings)
        del embeddings
        cosines = explanation_cosines(edges, rows, vectors)
        del vectors
        patterns = context.read("activation_patterns") if context.has("activation_patterns") else None
        table = find_pairs(edges, cosines, patterns, context.read("families", ["feature_id", "family_id"]))
        statistics = {"neighbour_pairs": edges.height, "explained_pairs": cosines.height} | {
            kind: int((table["kind"] == kind).sum()) for kind in KINDS
        }
        notes = [] if patterns is not None else ["no activations: split candidates need activation patterns"]
        return Product(data=table, rows=table.height, statistics=statistics, notes=notes)

    key = {"near_duplicate": NEAR_DUPLICATE, "same_words": SAME_WORDS, "split": [SPLIT_DECODER, SPLIT_MARGIN, RELATED]}
    return Plan(key=key, execute=execute)


STAGE = Stage(
    name="family_pairs",
    output=layout.FAMILY_PAIRS,
    version=1,
    plan=plan,
    reads=("decoder_similarity", "explanation_embeddings", "families"),
    optional_reads=("activation_patterns",),
    description="pairs of decoder neighbours worth a look: same words, split candidates, near-duplicates",
)
