"""What each explanation claims, and whether another explainer says the same.

An explanation is split into **claims** by rules a reader can check: each quoted span (“…”, "…",
'…') is a claim of its own (a quoted example); the rest is cut at sentence ends (. ; : ! ?), at
commas, at parentheses and before "such as", "e.g.", "including", "like", "often", "especially"
("trees and flowers" stays one claim); a leading or trailing "and" / "or" is dropped, and so are pieces of
fewer than :data:`MIN_LETTERS` letters or of function words alone ("and" between two quotes).

Each claim is embedded with the run's model (cached like every other text) and compared with the
claims of the same latent's other explainers: a claim is **corroborated** when one of theirs lies
within cosine :data:`CORROBORATED` of it (chosen on synth, where explainers that describe the
latent's concept share it and those that describe another do not; docs/notes.md). Per claim: the
closest other claim's explainer and cosine. Every pair of claims of a latent is compared at once,
for all latents together (no per-latent loop).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_CLAIMS
from sae_atlas.stage import EmbedFunction, Plan, Product, Stage, StageContext

CORROBORATED = 0.6
MIN_LETTERS = 3
DECIMALS = 4
PAIRS_PER_BLOCK = 1 << 16  # two gathered [block, dimensions] float32 arrays: 200 MB at 384 dimensions
_QUOTED = r"[\"“”'‘’]([^\"“”'‘’]{1,80})[\"“”'‘’]"
_BREAKS = r"[.;:!?()]|,|\s(?:such as|e\.g\.|including|like|often|especially)\s"
_CUT = "\x1f"
# a piece of nothing but function words is what the cuts left between two quotes: no claim
_FUNCTION_WORDS = r"^(?i)(?:(?:and|or|the|a|an|of|in|on|to|with|as|etc|for|by)\b\s*)+$"


def split_claims(explanations: pl.DataFrame) -> pl.DataFrame:
    """One row per claim of each usable explanation: feature_id, explainer, claim (its index in the
    explanation), text, quoted (a quoted example)."""
    usable = explanations.filter(pl.col("explanation_ok")).select(
        "feature_id", "explainer", text=pl.col("explanation_text").fill_null("")
    )
    quoted = usable.select(
        "feature_id", "explainer", part=pl.col("text").str.extract_all(_QUOTED), quoted=pl.lit(True)
    ).explode("part")
    quoted = quoted.with_columns(pl.col("part").str.strip_chars("\"“”'‘’ "))
    rest = usable.select(
        "feature_id",
        "explainer",
        part=pl.col("text").str.replace_all(_QUOTED, _CUT).str.replace_all(_BREAKS, _CUT).str.split(_CUT),
        quoted=pl.lit(False),
    ).explode("part")
    claims = (
        pl.concat([rest, quoted])
        .with_columns(pl.col("part").str.strip_chars(" \t\n-—–\"“”'‘’"))
        # "big cats and" "David", "and common function words": the joining word is no part of the claim
        .with_columns(pl.col("part").str.replace(r"(?i)\s+(?:and|or)$", "").str.replace(r"(?i)^(?:and|or)\s+", ""))
        .filter(pl.col("part").str.count_matches(r"\p{L}") >= MIN_LETTERS)
        .filter(~pl.col("part").str.contains(_FUNCTION_WORDS))
    )
    ordered = claims.with_row_index("_order").sort("feature_id", "explainer", "quoted", "_order")
    return ordered.select(
        pl.col("feature_id").cast(pl.Int64),
        "explainer",
        claim=pl.int_range(pl.len()).over("feature_id", "explainer").cast(pl.UInt16),
        text="part",
        quoted="quoted",
    )


def _pairs(feature_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (i, j), i ≠ j, of rows with the same feature (rows sorted by feature)."""
    starts = np.flatnonzero(np.r_[True, feature_ids[1:] != feature_ids[:-1]])
    sizes = np.diff(np.r_[starts, len(feature_ids)])
    counts = sizes * sizes
    first = np.repeat(starts, counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    size = np.repeat(sizes, counts)
    left, right = first + within // size, first + within % size
    keep = left != right
    return left[keep], right[keep]


def corroborate(claims: pl.DataFrame, vectors: np.ndarray) -> pl.DataFrame:
    """``claims`` (sorted by feature) with the closest claim of another explainer of the same
    latent: ``closest_explainer``, ``closest_cosine`` and ``corroborated``. ``vectors``: the
    claims' unit-length embeddings, row for row."""
    explainer_codes = claims["explainer"].cast(pl.Categorical).to_physical().to_numpy()
    left, right = _pairs(claims["feature_id"].to_numpy())
    other = explainer_codes[left] != explainer_codes[right]
    left, right = left[other], right[other]
    best = np.full(len(claims), -np.inf, dtype=np.float32)
    best_row = np.full(len(claims), -1, dtype=np.int64)
    for start in range(0, len(left), PAIRS_PER_BLOCK):
        i, j = left[start : start + PAIRS_PER_BLOCK], right[start : start + PAIRS_PER_BLOCK]
        cosine = np.einsum("ij,ij->i", vectors[i], vectors[j])
        # the best partner of each i: sort by (i, cosine) and keep each i's last
        order = np.lexsort((cosine, i))
        last = np.r_[i[order][1:] != i[order][:-1], True]
        chosen_i, chosen_cosine, chosen_j = i[order][last], cosine[order][last], j[order][last]
        better = chosen_cosine > best[chosen_i]
        best[chosen_i[better]] = chosen_cosine[better]
        best_row[chosen_i[better]] = chosen_j[better]
    # Cosines kept to 4 decimals, and judged so: a text's vector differs in its last bits with the
    # batch it was first encoded in (padding), and the embedding cache keeps whichever came first;
    # an engine or a cache must not change a claim's numbers.
    best = np.round(best, DECIMALS)
    found = pl.Series(best_row >= 0)
    # gathered in Polars: a NumPy array of strings and None is an object array, which an empty
    # table cannot cast
    closest = claims["explainer"].gather(pl.Series(np.maximum(best_row, 0), dtype=pl.Int64))
    return claims.with_columns(
        closest_explainer=pl.when(found).then(closest),
        closest_cosine=pl.when(found).then(pl.Series(best, dtype=pl.Float32)),
        corroborated=found & pl.Series(best >= CORROBORATED),
    )


def build_claims(explanations: pl.DataFrame, embed: EmbedFunction) -> pl.DataFrame:
    """Every claim of ``explanations`` (feature_id, explainer, explanation_text, explanation_ok),
    embedded and aligned across explainers (:data:`STAGE_CLAIMS`)."""
    claims = split_claims(explanations)
    texts = claims["text"].to_list()
    vectors = np.asarray(embed(texts), dtype=np.float32) if texts else np.zeros((0, 1), np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)
    return corroborate(claims, vectors).cast(dict(STAGE_CLAIMS))  # type: ignore[arg-type]


def plan(context: StageContext) -> Plan:
    def execute(problems: Problems) -> Product:
        features = context.read("features", ["feature_id", "llm_explainer", "explanation_text", "explanation_ok"])
        explanations = features.select(
            "feature_id", explainer=pl.col("llm_explainer").cast(pl.String), explanation_text="explanation_text",
            explanation_ok="explanation_ok",
        )  # fmt: skip
        table = build_claims(explanations, context.embed(STAGE.name))
        statistics = {
            "claims": table.height,
            "explanations": int(table.select(pl.struct("feature_id", "explainer").n_unique()).item())
            if table.height
            else 0,
            "corroborated": int(table["corroborated"].sum()),
        }
        return Product(data=table, rows=table.height, statistics=statistics)

    return Plan(key={"corroborated": CORROBORATED, "min_letters": MIN_LETTERS}, execute=execute)


STAGE = Stage(
    name="claims",
    output=layout.CLAIMS,
    version=1,
    plan=plan,
    reads=("features",),
    config=("embedding.model", "embedding.quantize"),
    description="each explanation's claims, embedded and aligned across explainers (corroborated or not)",
)
