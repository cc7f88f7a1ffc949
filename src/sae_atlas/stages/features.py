"""Stage 3, ``features``: one row per (feature, explainer) with everything known about it.

Joins the explanation embeddings (stage 2), the score table (stage 1) and the decoder neighbours
(stage 0b). Cross-explainer semantic similarity is computed for all features at once as a batched
product of unit vectors ([features, explainers, dim] · [features, explainers, dim]), in blocks of
features so that memory stays bounded at any width.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import CONTRACT_SCORE_FIELDS, FEATURES, SCORER_SCORES, SEMANTIC_NEIGHBOUR
from sae_atlas.stage import Plan, Product, Stage, StageContext

FEATURE_BLOCK = 8192


def _rank(names: list[str]) -> dict[str, int]:
    return {name: position for position, name in enumerate(dict.fromkeys(names))}


def semantic_similarity(explanations: pl.DataFrame, explainers: list[str]) -> pl.DataFrame:
    """``feature_id``, ``llm_explainer`` and the list of cosines to every other explainer's text.

    A pair involving a sentinel explanation (null embedding) gets a null cosine.
    """
    rank = _rank(explainers)
    frame = explanations.select(
        "feature_id",
        pl.col("llm_explainer").cast(pl.String),
        pl.col("llm_explainer").cast(pl.String).replace_strict(rank, return_dtype=pl.Int64).alias("rank"),
        "embedding",
    )
    features, feature_index = np.unique(frame["feature_id"].to_numpy(), return_inverse=True)
    explainer_index = frame["rank"].to_numpy()
    n_features, n_explainers = len(features), len(rank)
    has_row = np.zeros((n_features, n_explainers), dtype=bool)
    has_row[feature_index, explainer_index] = True
    has_vector = np.zeros_like(has_row)
    present = frame["embedding"].is_not_null().to_numpy()
    has_vector[feature_index[present], explainer_index[present]] = True
    dimension = 0
    if present.any():
        dimension = len(frame["embedding"].filter(pl.Series(present))[0])
    vectors = (
        frame["embedding"].filter(pl.Series(present)).list.to_array(dimension).to_numpy().astype(np.float32)
        if dimension
        else np.zeros((0, 0), dtype=np.float32)
    )
    slot_of_vector = np.full((n_features, n_explainers), -1, dtype=np.int64)
    slot_of_vector[feature_index[present], explainer_index[present]] = np.arange(int(present.sum()))

    cosine = np.full((n_features, n_explainers, n_explainers), np.nan, dtype=np.float32)
    for start in range(0, n_features, FEATURE_BLOCK):
        stop = min(start + FEATURE_BLOCK, n_features)
        block = np.zeros((stop - start, n_explainers, max(dimension, 1)), dtype=np.float32)
        slots = slot_of_vector[start:stop]
        filled = slots >= 0
        if dimension:
            block[filled] = vectors[slots[filled]]
        products = np.einsum("fed,fgd->feg", block, block)
        both = has_vector[start:stop, :, None] & has_vector[start:stop, None, :]
        cosine[start:stop] = np.where(both, np.clip(products, -1.0, 1.0), np.nan)

    # One entry per (row, other explainer that explained the same feature).
    feature, own, other = np.nonzero(has_row[:, :, None] & has_row[:, None, :])
    keep = own != other
    feature, own, other = feature[keep], own[keep], other[keep]
    names = np.array(list(rank), dtype=object)
    pairs = pl.DataFrame(
        {
            "feature_id": features[feature].astype(np.uint32),
            "llm_explainer": names[own].tolist() if len(own) else [],
            "explainer": names[other].tolist() if len(other) else [],
            "cosine_similarity": cosine[feature, own, other],
        },
        schema={
            "feature_id": pl.UInt32,
            "llm_explainer": pl.String,
            "explainer": pl.String,
            "cosine_similarity": pl.Float32,
        },
    ).with_columns(pl.col("cosine_similarity").fill_nan(None))
    return pairs.group_by(["feature_id", "llm_explainer"], maintain_order=True).agg(
        semantic_similarity=pl.struct(pl.col("explainer").cast(pl.Categorical()), "cosine_similarity")
    )


def scores_by_scorer(scores: pl.DataFrame, scorers: list[str]) -> pl.DataFrame:
    """``feature_id``, ``llm_explainer`` and one struct per scorer with a column per method."""
    rank = _rank(scorers)
    wide = (
        scores.filter(pl.col("method").cast(pl.String).is_in(CONTRACT_SCORE_FIELDS))
        .with_columns(
            pl.col("llm_explainer").cast(pl.String),
            pl.col("llm_scorer").cast(pl.String),
            pl.col("method").cast(pl.String),
        )
        .pivot(
            on="method", index=["feature_id", "llm_explainer", "llm_scorer"], values="score", aggregate_function="first"
        )
    )
    for method in CONTRACT_SCORE_FIELDS:
        if method not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(method))
    return (
        wide.with_columns(_scorer_rank=pl.col("llm_scorer").replace_strict(rank, default=len(rank)))
        .sort(["feature_id", "llm_explainer", "_scorer_rank"])
        .group_by(["feature_id", "llm_explainer"], maintain_order=True)
        .agg(scores=pl.struct(pl.col("llm_scorer").alias("scorer"), *CONTRACT_SCORE_FIELDS).cast(SCORER_SCORES))
    )


def build_features(
    *,
    explanations: pl.DataFrame,
    scores: pl.DataFrame,
    decoder: pl.DataFrame | None,
    runs: pl.DataFrame,
) -> tuple[pl.DataFrame, dict]:
    """Assemble ``features.parquet`` and its statistics.

    ``explanations`` is the stage-2 table, ``scores`` the stage-1 table, ``decoder`` the stage-0b
    table (None when no decoder was given: empty neighbour lists), and ``runs`` lists every source
    in config order with ``data_source``, ``llm_explainer``, ``llm_scorer`` and
    ``explanation_method``.
    """
    explainers = runs["llm_explainer"].to_list()
    explainer_rank = _rank(explainers)
    methods = dict(zip(runs["data_source"].to_list(), runs["explanation_method"].to_list(), strict=True))
    base = explanations.with_columns(
        pl.col("llm_explainer").cast(pl.String),
        explanation_method=pl.col("data_source").cast(pl.String).replace_strict(methods, default=None),
    )
    semantic = semantic_similarity(explanations, explainers)
    by_scorer = scores_by_scorer(scores, runs["llm_scorer"].to_list())
    keys = ["feature_id", "llm_explainer"]
    table = base.join(semantic, on=keys, how="left").join(by_scorer, on=keys, how="left")

    decoder_type = FEATURES["decoder_similarity"]
    if decoder is not None:
        table = table.join(decoder, on="feature_id", how="left")
        without_neighbours = int(table["decoder_similarity"].is_null().sum())
    else:
        table = table.with_columns(decoder_similarity=pl.lit(None, dtype=decoder_type))
        without_neighbours = table.height
    table = (
        table.with_columns(
            pl.col("decoder_similarity").fill_null(pl.lit([], dtype=decoder_type)),
            pl.col("semantic_similarity").fill_null(pl.lit([], dtype=pl.List(SEMANTIC_NEIGHBOUR))),
            pl.col("scores").fill_null(pl.lit([], dtype=pl.List(SCORER_SCORES))),
            _explainer_rank=pl.col("llm_explainer").replace_strict(explainer_rank, default=len(explainer_rank)),
        )
        .sort(["feature_id", "_explainer_rank"])
        .select([pl.col(name).cast(dtype) for name, dtype in FEATURES.items()])
    )
    statistics = {
        "rows": table.height,
        "features": table["feature_id"].n_unique(),
        "explainers": table["llm_explainer"].n_unique(),
        "rows_without_scores": int((table["scores"].list.len() == 0).sum()),
        "rows_without_decoder_neighbours": without_neighbours,
        "sentinel_explanations": int((~table["explanation_ok"]).sum()),
    }
    return table, statistics


def duplicate_pairs(runs: pl.DataFrame) -> list[tuple[str, str, str, str]]:
    """(kept source, ignored source, explainer, scorer) for every source whose explainer and scorer
    an earlier source already has: features.parquet holds one row per (feature, explainer) with one
    score entry per scorer, so only the first such source's explanations and scores reach it."""
    seen: dict[tuple[str, str], str] = {}
    duplicates = []
    for source, explainer, scorer in runs.select("data_source", "llm_explainer", "llm_scorer").rows():
        first = seen.setdefault((explainer, scorer), source)
        if first != source:
            duplicates.append((first, source, explainer, scorer))
    return duplicates


def plan(context: StageContext) -> Plan:
    runs = context.runs_table()

    def execute(problems: Problems) -> Product:
        paths = {run.name: run.path for run in context.runs()}
        for kept, ignored, explainer, scorer in duplicate_pairs(runs):
            problems.add(
                paths.get(ignored, ignored),
                f"source {ignored!r} has the same explainer ({explainer}) and scorer ({scorer}) as {kept!r}: "
                f"features.parquet and compare use {kept!r}'s explanations and scores, {ignored!r}'s stay in "
                "stages/scores.parquet only; name a different scorer or explainer in its [[sources]] to keep both",
                kind="invalid",
            )
        table, statistics = build_features(
            explanations=context.read("explanation_embeddings"),
            scores=context.read("scores"),
            decoder=context.read("decoder_similarity") if context.has("decoder_similarity") else None,
            runs=runs,
        )
        table = table.with_columns(pl.lit(context.sae_id).cast(pl.Categorical()).alias("sae_id"))
        return Product(data=table, rows=table.height, statistics=statistics)

    return Plan(key={"runs": runs.to_dicts()}, execute=execute)


STAGE = Stage(
    name="features",
    output=layout.FEATURES,
    version=1,
    plan=plan,
    reads=("scores", "explanation_embeddings"),
    optional_reads=("decoder_similarity",),
    config=("sources",),
    description="one row per (feature, explainer): text, decoder neighbours, agreement, scores per scorer",
)
