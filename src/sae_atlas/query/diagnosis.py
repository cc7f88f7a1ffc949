"""The diagnosis of an output, read back: each latent's activation pattern and each explanation's
claims and cause (:mod:`sae_atlas.stages.activation_patterns`, :mod:`sae_atlas.stages.diagnosis`),
for the feature table, the feature page and the comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.query.lazy import Lazy

# the diagnosis's metrics of the registry: columns of the feature table
TABLE_COLUMNS = ("names_top_tokens", "corroborated_share")
# per explanation, what the feature page shows of its diagnosis
EXPLANATION_FIELDS = (
    "claims",
    "corroborated_share",
    "names_top_token",
    "names_top_tokens",
    "false_positive_rate",
    "top_quantile_recall",
    "low_quantile_recall",
    "quantile_drop",
    "cause",
    "cause_evidence",
)
CLAIM_FIELDS = ("claim", "text", "quoted", "corroborated", "closest_explainer", "closest_cosine")
PATTERN_FIELDS = (
    "pattern",
    "examples",
    "tokens",
    "top_token",
    "top_token_coverage",
    "top_tokens",
    "concentration",
    "top_ngram",
    "top_ngram_coverage",
    "coverage_by_quantile",
    "coherence",
)
WHY_NOT = "no activations in this run: the pattern and the causes that need it are not computed"


def _read(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path).sort("feature_id") if path.exists() else None


class Diagnosis:
    """The two diagnosis files of ``output_dir``, read on first use (either may be missing: an
    output written before the diagnosis existed)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.patterns = Lazy(lambda: _read(self.output_dir / layout.ACTIVATION_PATTERNS), name="patterns")
        self.explanations = Lazy(lambda: _read(self.output_dir / layout.DIAGNOSIS), name="diagnosis")
        self.claims = Lazy(lambda: _read(self.output_dir / layout.CLAIMS), name="claims")

    def joined(self, table: pl.DataFrame) -> pl.DataFrame:
        """``table`` (one row per feature_id × explainer) with the registry's diagnosis metrics
        (:data:`TABLE_COLUMNS`), null where there is no diagnosis."""
        diagnosis = self.explanations.get()
        if diagnosis is None:
            return table.with_columns(pl.lit(None, pl.Float64).alias(name) for name in TABLE_COLUMNS)
        names = diagnosis.select(
            pl.col("feature_id").cast(table.schema["feature_id"]),
            "explainer",
            *(pl.col(name).cast(pl.Float64) for name in TABLE_COLUMNS),
        )
        return table.join(names, on=["feature_id", "explainer"], how="left", maintain_order="left")

    def of_feature(self, feature_id: int) -> dict:
        """A latent's pattern and its explanations' claims and causes (JSON-ready); ``note`` says
        why parts are missing."""
        patterns, diagnosis = self.patterns.get(), self.explanations.get()
        pattern = None
        if patterns is not None:
            rows = _rows_of(patterns, feature_id)
            pattern = {name: rows[0][name] for name in PATTERN_FIELDS} if rows else None
        by_explainer = {}
        if diagnosis is not None:
            by_explainer = {row["explainer"]: {name: row.get(name) for name in EXPLANATION_FIELDS} | {"claim_list": []}
                            for row in _rows_of(diagnosis, feature_id)}  # fmt: skip
        claims = self.claims.get()
        for row in _rows_of(claims, feature_id) if claims is not None else []:
            if row["explainer"] in by_explainer:
                by_explainer[row["explainer"]]["claim_list"].append({name: row[name] for name in CLAIM_FIELDS})
        note = None
        if diagnosis is None:
            note = "this output has no diagnosis: run `sae-atlas run` again to compute it"
        elif patterns is None:
            note = WHY_NOT
        return {"pattern": pattern, "explanations": by_explainer, "note": note}


def _rows_of(table: pl.DataFrame, feature_id: int) -> list[dict]:
    ids = table["feature_id"].to_numpy()
    low, high = np.searchsorted(ids, [feature_id, feature_id + 1])
    return table.slice(low, high - low).to_dicts()
