"""``sae-atlas validate``: check an output directory against the contract.

Schemas as in DESIGN.md §2 (contract columns first, in order, with their types), and the
invariants consumers rely on: one row per key, decoder neighbours sorted and never self, cosines in
[-1, 1], every feature row backed by an explanation-embedding row, one ``sae_id`` everywhere, and
sidecars that agree with their files. Every check is a vectorised Polars expression; the two big
files (activation examples and embeddings) are checked a batch at a time, keeping only compact keys,
so memory does not grow with them.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from sae_atlas import layout
from sae_atlas.schema import STAGE_SCHEMAS, contract_columns, schema_differences
from sae_atlas.vector_storage import DTYPES, SCALES_COLUMN, activation_embeddings_from_frame, dtype_of

REQUIRED = (layout.FEATURES, layout.EXPLANATION_EMBEDDINGS)
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
    name = layout.FEATURES
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
            validation.fail(name, f"{orphans} rows have no {layout.EXPLANATION_EMBEDDINGS} row")


def _check_explanation_embeddings(validation: Validation, frame: pl.DataFrame) -> None:
    name = layout.EXPLANATION_EMBEDDINGS
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


def _pair_keys(feature_id: np.ndarray, prompt_id: np.ndarray) -> np.ndarray:
    return (feature_id.astype(np.uint64) << np.uint64(32)) | prompt_id.astype(np.uint64)


def _repeated(keys: list[np.ndarray]) -> tuple[int, np.ndarray]:
    """How many keys repeat an earlier one, and the distinct keys (sorted)."""
    joined = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    distinct = np.unique(joined)
    return len(joined) - len(distinct), distinct


def _check_activation_examples(validation: Validation, path: Path) -> np.ndarray:
    """Check activation_examples.parquet a batch at a time; return its (feature, prompt) keys."""
    name = layout.ACTIVATION_EXAMPLES
    keys, counted, wrong_max, outside = [], 0, 0, 0
    for batch in layout.read_in_row_groups(
        path, ["feature_id", "prompt_id", "num_activations", "max_activation", "prompt_tokens", "activation_pairs"]
    ):
        frame = batch.select(
            "feature_id",
            "prompt_id",
            "num_activations",
            "max_activation",
            pl.col("prompt_tokens").list.len().alias("tokens"),
            pl.col("activation_pairs").list.len().alias("pairs"),
            pl.col("activation_pairs").list.eval(pl.element().struct.field("activation_value")).list.max().alias("top"),
            pl.col("activation_pairs").list.eval(pl.element().struct.field("token_position")).list.max().alias("last"),
        )
        keys.append(_pair_keys(frame["feature_id"].to_numpy(), frame["prompt_id"].to_numpy()))
        counted += _count(frame, pl.col("num_activations") != pl.col("pairs"))
        wrong_max += _count(frame, (pl.col("max_activation") - pl.col("top")).abs() > TOLERANCE)
        outside += _count(frame, pl.col("last") >= pl.col("tokens"))
    duplicated, distinct = _repeated(keys)
    if duplicated:
        validation.fail(name, f"{duplicated} rows repeat a (feature_id, prompt_id) key; expected one row per key")
    if counted:
        validation.fail(name, "num_activations differs from the number of activation pairs")
    if wrong_max:
        validation.fail(name, "max_activation differs from the largest activation value")
    if outside:
        validation.fail(name, f"{outside} rows have a token position outside their prompt")
    return distinct


def _expected_schema(name: str, actual: pl.Schema, validation: Validation) -> pl.Schema:
    """The contract columns of ``name``; activation embeddings may be stored in float16 / int8."""
    expected = contract_columns(name)
    if name != layout.ACTIVATION_EMBEDDINGS or "embeddings" not in actual:
        return expected
    try:
        dtype = dtype_of(actual)
    except (ValueError, AttributeError):
        return expected  # reported as a type mismatch by the schema comparison
    if dtype == "int8" and SCALES_COLUMN not in actual:
        validation.fail(name, f"int8 embeddings need an {SCALES_COLUMN!r} column")
    return pl.Schema({**expected, "embeddings": pl.List(pl.List(DTYPES[dtype]))})


def _check_activation_embeddings(validation: Validation, path: Path, examples: np.ndarray | None) -> pl.DataFrame:
    """Check activation_embeddings.parquet a batch of features at a time; return each feature's
    number of vectors. ``examples``: the (feature, prompt) keys of activation_examples.parquet."""
    name = layout.ACTIVATION_EMBEDDINGS
    columns = pq.read_schema(path).names
    features, counts, misaligned, off, strays = [], [], 0, 0, 0
    for frame in layout.read_in_row_groups(
        path, [c for c in ("feature_id", "prompt_ids", "embeddings", SCALES_COLUMN) if c in columns], 2_048
    ):
        lengths = frame.select(
            prompts=pl.col("prompt_ids").list.len(),
            vectors=pl.col("embeddings").list.len(),
            **({"scales": pl.col(SCALES_COLUMN).list.len()} if SCALES_COLUMN in frame.columns else {}),
        )
        features.append(frame["feature_id"].to_numpy())
        counts.append(lengths["vectors"].to_numpy())
        wrong = _count(lengths, pl.col("prompts") != pl.col("vectors"))
        if "scales" in lengths.columns:
            wrong += _count(lengths, pl.col("scales") != pl.col("vectors"))
        misaligned += wrong
        if wrong:
            continue
        embeddings = activation_embeddings_from_frame(frame)
        if len(embeddings.vectors):
            norms = np.abs(np.linalg.norm(embeddings.vectors, axis=1) - 1.0)
            off += int((norms > TOLERANCE).sum())
        if examples is not None and len(embeddings.prompt_id):
            sampled = _pair_keys(np.repeat(embeddings.feature_id, embeddings.counts()), embeddings.prompt_id)
            position = np.minimum(np.searchsorted(examples, sampled), max(len(examples) - 1, 0))
            strays += int((examples[position] != sampled).sum()) if len(examples) else len(sampled)
    feature_ids = np.concatenate(features) if features else np.zeros(0, np.uint32)
    duplicated = len(feature_ids) - len(np.unique(feature_ids))
    if duplicated:
        validation.fail(name, f"{duplicated} rows repeat a (feature_id) key; expected one row per key")
    if misaligned:
        validation.fail(name, f"{misaligned} rows have prompt_ids that do not align with their embeddings")
    if off:
        validation.fail(name, f"{off} vectors are not unit-norm within {TOLERANCE} after dequantising")
    if strays:
        validation.fail(name, f"{strays} embedded prompts have no {layout.ACTIVATION_EXAMPLES} row")
    return pl.DataFrame(
        {
            "feature_id": feature_ids,
            "sampled": np.concatenate(counts).astype(np.uint32) if counts else np.zeros(0, np.uint32),
        }
    )


def _check_activation_similarity(validation: Validation, frame: pl.DataFrame, counted: pl.DataFrame | None) -> None:
    name = layout.ACTIVATION_SIMILARITY
    _unique_keys(validation, name, frame, ["feature_id"])
    statistics = ["mean_pairwise_similarity", "min_pairwise_similarity", "max_pairwise_similarity"]
    outside = sum(_count(frame, ~pl.col(column).is_between(-1.0 - TOLERANCE, 1.0 + TOLERANCE)) for column in statistics)
    outside += _count(frame, ~pl.col("std_pairwise_similarity").is_between(0.0, 1.0 + TOLERANCE))
    if outside:
        validation.fail(name, f"{outside} statistics are outside [-1, 1]")
    few = pl.col("num_examples_sampled") < 2
    columns = [*statistics, "std_pairwise_similarity"]
    wrong_nulls = _count(frame, pl.any_horizontal([pl.col(c).is_null() != few for c in columns]))
    if wrong_nulls:
        validation.fail(name, f"{wrong_nulls} rows have null statistics with 2+ examples or values with fewer")
    if counted is not None:
        joined = frame.join(
            counted.with_columns(pl.col("feature_id").cast(frame.schema["feature_id"])), on="feature_id", how="left"
        )
        mismatched = _count(joined, pl.col("sampled").is_null() | (pl.col("sampled") != pl.col("num_examples_sampled")))
        if mismatched:
            validation.fail(
                name, f"{mismatched} rows disagree with {layout.ACTIVATION_EMBEDDINGS} on num_examples_sampled"
            )


def _read_schema(validation: Validation, name: str, path: Path) -> pl.Schema | None:
    """The schema of a file being checked (counted as checked); None, with a violation, when the
    file is not readable Parquet."""
    validation.checked.append(name)
    try:
        return pl.read_parquet_schema(path)
    except Exception as error:  # any unreadable file is a violation, whatever the reader raised
        validation.fail(name, f"unreadable Parquet file ({error})")
        return None


def _check_stage_outputs(validation: Validation, output_dir: Path) -> None:
    """Every stage output present has its schema's leading columns, in order, with their types."""
    for name, expected in STAGE_SCHEMAS.items():
        path = output_dir / name
        if not path.exists():
            continue
        schema = _read_schema(validation, name, path)
        if schema is None:
            continue
        for difference in schema_differences(schema, expected):
            validation.fail(name, difference)


def validate(output_dir: str | Path) -> Validation:
    """Check every master file in ``output_dir``; the result lists each violation in one line."""
    output_dir = Path(output_dir)
    validation = Validation(output_dir)
    if not output_dir.is_dir():
        validation.fail(str(output_dir), "not a directory")
        return validation
    sae_ids: dict[str, set[str]] = {}
    frames: dict[str, pl.DataFrame] = {}
    example_keys: np.ndarray | None = None
    embedded: Path | None = None
    counted: pl.DataFrame | None = None
    for name in layout.MASTER_FILES:
        path = output_dir / name
        if not path.exists():
            if name in REQUIRED:
                validation.fail(name, "missing")
            continue
        schema = _read_schema(validation, name, path)
        if schema is None:
            continue
        differences = schema_differences(schema, _expected_schema(name, schema, validation))
        for difference in differences:
            validation.fail(name, difference)
        if differences:
            continue
        sae_ids[name] = set(
            pl.scan_parquet(path).select(pl.col("sae_id").cast(pl.String).unique()).collect().to_series().to_list()
        )
        sidecar = layout.read_sidecar(path)
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        if sidecar is None:
            validation.fail(name, "sidecar (.metadata.json) is missing or unreadable")
        elif sidecar.get("rows") != rows:
            validation.fail(name, f"sidecar says {sidecar.get('rows')} rows, the file has {rows}")
        if name == layout.ACTIVATION_EXAMPLES:
            example_keys = _check_activation_examples(validation, path)
        elif name == layout.ACTIVATION_EMBEDDINGS:
            embedded = path
        else:
            frames[name] = pl.read_parquet(path)

    if layout.EXPLANATION_EMBEDDINGS in frames:
        _check_explanation_embeddings(validation, frames[layout.EXPLANATION_EMBEDDINGS])
    if layout.FEATURES in frames:
        _check_features(validation, frames[layout.FEATURES], frames.get(layout.EXPLANATION_EMBEDDINGS))
    if embedded is not None:
        counted = _check_activation_embeddings(validation, embedded, example_keys)
    if layout.ACTIVATION_SIMILARITY in frames:
        _check_activation_similarity(validation, frames[layout.ACTIVATION_SIMILARITY], counted)

    _check_stage_outputs(validation, output_dir)
    _check_labels(validation, output_dir)
    distinct = set().union(*sae_ids.values()) if sae_ids else set()
    if len(distinct) > 1:
        listing = "; ".join(f"{name}: {', '.join(sorted(ids))}" for name, ids in sae_ids.items())
        validation.fail("sae_id", f"differs between files ({listing})")
    return validation


def _check_labels(validation: Validation, output_dir: Path) -> None:
    """The label store, when there is one, opened read-only: readable and intact."""
    path = output_dir / layout.LABELS
    if not path.exists():
        return
    validation.checked.append(layout.LABELS)
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            result = connection.execute("PRAGMA quick_check").fetchone()[0]
            connection.execute("SELECT count(*) FROM labels").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as error:
        validation.fail(layout.LABELS, f"cannot be read ({error})")
        return
    if result != "ok":
        validation.fail(layout.LABELS, f"damaged ({result})")
