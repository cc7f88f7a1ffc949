"""Stage 0a, ``activation_examples``: one row per (feature, prompt) with activations.

The output repeats each prompt's tokens for every feature that fires on it (the contract's
schema), which at reference scale means ~70 M token strings. The stage therefore yields record
batches that the runner streams into the Parquet file, so memory stays bounded by the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.sources import activations as activation_source
from sae_atlas.sources import files
from sae_atlas.sources.activations import ACTIVATION_PAIR_TYPE, ActivationRecords
from sae_atlas.stage import Plan, Product, Skip, Stage, StageContext, Unusable, fingerprint_files

ARROW_SCHEMA = pa.schema(
    [
        ("feature_id", pa.uint32()),
        ("sae_id", pa.dictionary(pa.uint32(), pa.string())),
        ("prompt_id", pa.uint32()),
        ("prompt_tokens", pa.list_(pa.string())),
        ("num_activations", pa.uint32()),
        ("max_activation", pa.float32()),
        ("activation_pairs", pa.list_(ACTIVATION_PAIR_TYPE)),
    ]
)
PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.uint32()), ("prompt_tokens", pa.list_(pa.string()))])
ROWS_PER_BATCH = 32_768
ROW_GROUP_ROWS = 16_384


def max_activations(records: ActivationRecords) -> np.ndarray:
    """Largest activation value of each record (records always hold at least one pair)."""
    if len(records) == 0:
        return np.zeros(0, dtype=np.float32)
    return np.maximum.reduceat(records.values, records.offsets[:-1]).astype(np.float32)


def build_activation_examples(
    records: ActivationRecords, sae_id: str, rows_per_batch: int = ROWS_PER_BATCH
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``activation_examples.parquet``, in (feature, prompt) order."""
    counts = np.diff(records.offsets).astype(np.uint32)
    maxima = max_activations(records)
    pairs = records.pairs()
    sae_dictionary = pa.array([sae_id], pa.string())
    for start in range(0, len(records), rows_per_batch):
        stop = min(start + rows_per_batch, len(records))
        prompt_ids = records.prompt_id[start:stop]
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(records.feature_id[start:stop], pa.uint32()),
                pa.DictionaryArray.from_arrays(pa.array(np.zeros(stop - start, np.uint32)), sae_dictionary),
                pa.array(prompt_ids, pa.uint32()),
                records.prompts.take(pa.array(prompt_ids)),
                pa.array(counts[start:stop], pa.uint32()),
                pa.array(maxima[start:stop], pa.float32()),
                pairs.slice(start, stop - start),
            ],
            schema=ARROW_SCHEMA,
        )


def build_prompts(records: ActivationRecords) -> pa.Table:
    """``stages/prompts.parquet``: each prompt's tokens once, for fast look-ups by prompt id."""
    return pa.table(
        {"prompt_id": pa.array(np.arange(len(records.prompts), dtype=np.uint32)), "prompt_tokens": records.prompts},
        schema=PROMPTS_SCHEMA,
    )


def statistics(records: ActivationRecords) -> dict:
    """Counts for the sidecar."""
    return {
        "records": len(records),
        "features": len(np.unique(records.feature_id)),
        "prompts": len(records.prompts),
        "activation_pairs": int(records.offsets[-1]) if len(records.offsets) else 0,
    }


def plan(context: StageContext) -> Plan:
    settings = context.config.activations
    if settings is None:
        raise Skip("no [activations] in the config")
    path = Path(settings.path)
    if settings.format == "jsonl":
        inputs = [path / "activations.jsonl", path / "prompts.json"]
    else:
        # Listing problems are reported when the cache is read; here they only make the list short.
        inputs = [p for p in files.list_directory(path, Problems()) if p.is_file()] if path.is_dir() else [path]
        if settings.tokenizer:
            inputs.append(Path(settings.tokenizer))
    width = context.sae_width

    def execute(problems: Problems) -> Product:
        records = activation_source.read_activations(
            settings.format, path, settings.tokenizer, problems, width=width
        )
        if len(records) == 0:
            problems.add(path, "no usable activation records", kind="missing")
            raise Unusable(f"no usable activation records in {path}")
        return Product(
            data=build_activation_examples(records, context.sae_id, ROW_GROUP_ROWS),
            rows=len(records),
            statistics=statistics(records),
            schema=ARROW_SCHEMA,
            row_group_size=ROW_GROUP_ROWS,
            extra={layout.PROMPTS: build_prompts(records)},
            notes=records.notes,
        )

    return Plan(key={"inputs": fingerprint_files(inputs), "sae_width": width}, execute=execute)


STAGE = Stage(
    name="activation_examples",
    output=layout.ACTIVATION_EXAMPLES,
    version=1,
    plan=plan,
    config=("activations",),
    extra_outputs=(layout.PROMPTS,),
    description="one row per (feature, prompt) with its activations, from the activation records",
)
