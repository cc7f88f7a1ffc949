"""Stage 0a, ``activation_examples``: one row per (feature, prompt) with activations.

The output repeats each prompt's tokens for every feature that fires on it (the contract's
schema), which at reference scale means ~70 M token strings. The reader delivers the records a
block of features at a time, sorted (:mod:`sae_atlas.sources.activations`), and the stage turns each
block into record batches that the runner streams into the Parquet file: memory is bounded by the
block, at any number of records. The file is sorted by feature, in row groups whose statistics let
a reader fetch one feature's rows without scanning the rest.
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
from sae_atlas.sources.activations import ACTIVATION_PAIR_TYPE, ActivationRecords, ActivationStream
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
# schema.STAGE_PROMPTS, in Arrow's (32-bit offset) types
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


def build_prompts(prompts: pa.ListArray) -> pa.Table:
    """``stages/prompts.parquet``: each prompt's tokens once, for fast look-ups by prompt id."""
    return pa.table(
        {"prompt_id": pa.array(np.arange(len(prompts), dtype=np.uint32)), "prompt_tokens": prompts},
        schema=PROMPTS_SCHEMA,
    )


def stream_examples(
    stream: ActivationStream, sae_id: str, statistics: dict, rows_per_batch: int = ROWS_PER_BATCH
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``activation_examples.parquet`` from every block of ``stream``, counting
    into ``statistics`` as they go."""
    statistics.update(records=0, features=0, prompts=len(stream.prompts), activation_pairs=0)
    for block in stream:
        statistics["records"] += len(block)
        statistics["features"] += len(np.unique(block.feature_id))
        statistics["activation_pairs"] += int(block.offsets[-1])
        yield from build_activation_examples(block, sae_id, rows_per_batch)


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
        stream = activation_source.stream_activations(
            settings.format, path, settings.tokenizer, problems, width=width, scratch=context.scratch()
        )

        def unusable() -> Unusable:
            problems.add(path, "no usable activation records", kind="missing")
            return Unusable(f"no usable activation records in {path}")

        if stream.records == 0:
            raise unusable()
        statistics: dict = {}

        def batches() -> Iterator[pa.RecordBatch]:
            yield from stream_examples(stream, context.sae_id, statistics, ROW_GROUP_ROWS)
            if statistics["records"] == 0:  # every record was refused
                raise unusable()

        return Product(
            data=batches(),
            rows=None,
            statistics=statistics,
            schema=ARROW_SCHEMA,
            row_group_size=ROW_GROUP_ROWS,
            extra={layout.PROMPTS: build_prompts(stream.prompts)},
            notes=stream.notes,
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
