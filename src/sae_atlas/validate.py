"""``sae-atlas validate``: check an output directory against the contract.

Schemas as in DESIGN.md §2 (contract columns first, in order, with their types), and the
invariants consumers rely on: one row per key, decoder neighbours sorted and never self, cosines in
[-1, 1], every feature row backed by an explanation-embedding row, one ``sae_id`` everywhere, and
sidecars that agree with their files. Every check is a vectorised Polars expression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from sae_atlas.pipeline import read_sidecar
from sae_atlas.schema import MASTER_SCHEMAS, contract_columns, schema_differences

REQUIRED = ("features.parquet", "explanation_embeddings.parquet")
TOLERANCE = 1e-3


@dataclass
class Validation:
    """The outcome of validating one output directory."""

    output_dir: Path
    checked: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, file: str, message: str) -> None:
        self.violations.append(f"{file}: {message}")


def _count(frame: pl.DataFrame, condition: pl.Expr) -> int:
    return int(frame.select(condition.sum()).item() or 0)


def _unique_keys(validation: Validation, name: str, frame: pl.DataFrame, keys: list[str]) -> None:
    duplicated = frame.height - frame.select(keys).unique().height
    if duplicated:
        validation.fail(name, f"{duplicated} rows repeat a ({', '.join(keys)}) key; expected one row per key")


def _check_features(validation: Validation, frame: pl.DataFrame, embeddings: pl.DataFrame | None) -> None:
    name = "features.parquet"
    _unique_keys(validation, name, frame, ["feature_id", "llm_explainer"])
    neighbours = (
        frame.select("feature_id", "decoder_similarity")
        .with_row_index("row")
        .explode("decoder_similarity")
        .drop_nulls("decoder_similarity")
        .unnest("decoder_similarity", separator="_")
    )
    if neighbours.height:
        neighbours = neighbours.rename(
            {"decoder_similarity_feature_id": "neighbour", "decoder_similarity_cosine_similarity": "cosine"}
        )
        self_links = _count(neighbours, pl.col("neighbour").cast(pl.Int64) == pl.col("feature_id"))
        if self_links:
            validation.fail(name, f"{self_links} decoder neighbours are the feature itself")
        outside = _count(neighbours, ~pl.col("cosine").is_between(-1.0 - TOLERANCE, 1.0 + TOLERANCE))
        if outside:
            validation.fail(name, f"{outside} decoder cosines are outside [-1, 1]")
        previous = pl.col("cosine").shift(1).over("row")
        previous_id = pl.col("neighbour").shift(1).over("row")
        unsorted = _count(
            neighbours,
            (pl.col("cosine") > previous) | ((pl.col("cosine") == previous) & (pl.col("neighbour") < previous_id)),
        )
        if unsorted:
            validation.fail(name, f"{unsorted} decoder neighbours are out of order (descending cosine, then id)")
    semantic = frame.select(pl.col("semantic_similarity").explode().struct.field("cosine_similarity"))
    outside = _count(semantic, ~pl.col("cosine_similarity").is_between(-1.0 - TOLERANCE, 1.0 + TOLERANCE))
    if outside:
        validation.fail(name, f"{outside} semantic similarities are outside [-1, 1]")
    if embeddings is not None:
        keys = ["feature_id", "llm_explainer"]
        left = frame.select(pl.col("feature_id").cast(pl.Int64), pl.col("llm_explainer").cast(pl.String))
        right = embeddings.select(pl.col("feature_id").cast(pl.Int64), pl.col("llm_explainer").cast(pl.String))
        orphans = left.join(right, on=keys, how="anti").height
        if orphans:
            validation.fail(name, f"{orphans} rows have no explanation_embeddings.parquet row")


def _check_explanation_embeddings(validation: Validation, frame: pl.DataFrame) -> None:
    name = "explanation_embeddings.parquet"
    _unique_keys(validation, name, frame, ["feature_id", "llm_explainer"])
    vectors = frame.filter(pl.col("embedding").is_not_null())
    if vectors.height:
        dimensions = vectors["embedding"].list.len().unique()
        if len(dimensions) != 1:
            validation.fail(name, f"embeddings have {len(dimensions)} different dimensions")
        norms = vectors.select(
            (pl.col("embedding").list.eval(pl.element() * pl.element()).list.sum().sqrt() - 1.0).abs()
        ).to_series()
        off = int((norms > TOLERANCE).sum())
        if off:
            validation.fail(name, f"{off} embeddings are not unit-norm within {TOLERANCE}")


def _check_activation_examples(validation: Validation, path: Path) -> None:
    name = "activation_examples.parquet"
    frame = (
        pl.scan_parquet(path)
        .select(
            "feature_id",
            "prompt_id",
            "num_activations",
            "max_activation",
            pl.col("prompt_tokens").list.len().alias("tokens"),
            pl.col("activation_pairs").list.len().alias("pairs"),
            pl.col("activation_pairs").list.eval(pl.element().struct.field("activation_value")).list.max().alias("top"),
            pl.col("activation_pairs").list.eval(pl.element().struct.field("token_position")).list.max().alias("last"),
        )
        .collect()
    )
    _unique_keys(validation, name, frame, ["feature_id", "prompt_id"])
    if _count(frame, pl.col("num_activations") != pl.col("pairs")):
        validation.fail(name, "num_activations differs from the number of activation pairs")
    if _count(frame, (pl.col("max_activation") - pl.col("top")).abs() > TOLERANCE):
        validation.fail(name, "max_activation differs from the largest activation value")
    outside = _count(frame, pl.col("last") >= pl.col("tokens"))
    if outside:
        validation.fail(name, f"{outside} rows have a token position outside their prompt")


def validate(output_dir: str | Path) -> Validation:
    """Check every master file in ``output_dir``; the result lists each violation in one line."""
    output_dir = Path(output_dir)
    validation = Validation(output_dir)
    if not output_dir.is_dir():
        validation.fail(str(output_dir), "not a directory")
        return validation
    sae_ids: dict[str, set[str]] = {}
    frames: dict[str, pl.DataFrame] = {}
    for name in MASTER_SCHEMAS:
        path = output_dir / name
        if not path.exists():
            if name in REQUIRED:
                validation.fail(name, "missing")
            continue
        validation.checked.append(name)
        try:
            schema = pl.read_parquet_schema(path)
        except Exception as error:  # any unreadable file is a violation, whatever the reader raised
            validation.fail(name, f"unreadable Parquet file ({error})")
            continue
        differences = schema_differences(schema, contract_columns(name))
        for difference in differences:
            validation.fail(name, difference)
        if differences:
            continue
        sae_ids[name] = set(
            pl.scan_parquet(path).select(pl.col("sae_id").cast(pl.String).unique()).collect().to_series().to_list()
        )
        sidecar = read_sidecar(path)
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        if sidecar is None:
            validation.fail(name, "sidecar (.metadata.json) is missing or unreadable")
        elif sidecar.get("rows") != rows:
            validation.fail(name, f"sidecar says {sidecar.get('rows')} rows, the file has {rows}")
        if name == "activation_examples.parquet":
            _check_activation_examples(validation, path)
        elif name in ("features.parquet", "explanation_embeddings.parquet"):
            frames[name] = pl.read_parquet(path)

    if "explanation_embeddings.parquet" in frames:
        _check_explanation_embeddings(validation, frames["explanation_embeddings.parquet"])
    if "features.parquet" in frames:
        _check_features(validation, frames["features.parquet"], frames.get("explanation_embeddings.parquet"))

    distinct = set().union(*sae_ids.values()) if sae_ids else set()
    if len(distinct) > 1:
        listing = "; ".join(f"{name}: {', '.join(sorted(ids))}" for name, ids in sae_ids.items())
        validation.fail("sae_id", f"differs between files ({listing})")
    return validation
