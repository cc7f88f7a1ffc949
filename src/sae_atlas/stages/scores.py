"""Stage 1, ``scores``: one row per feature × explainer × scorer × method.

Each score file's records are parsed by its method's parser and aggregated per latent by its
method's aggregator (:mod:`sae_atlas.score_methods`). A score file holds one latent's records, so
files are read and aggregated in independent chunks (on the run's engine: every core, or a
cluster); this stage joins the per-latent results to the file listing and the runs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from sae_atlas import layout, score_methods
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_FIRING, STAGE_SCORE_EXAMPLES, STAGE_SCORE_RECORDS, STAGE_SCORES
from sae_atlas.score_methods import AGGREGATE_COLUMNS
from sae_atlas.scored_examples import EVIDENCE_COLUMNS, ExampleStore
from sae_atlas.sources import delphi
from sae_atlas.stage import Parts, Plan, Product, Stage, StageContext, file_stamps, fingerprint_files
from sae_atlas.stages.score_cache import (
    FILE_KEY,
    STAMPED_FILE_COLUMNS,
    BlockRead,
    CachedBlock,
    block_digest,
    load_block,
    merge_blocks,
    prune_blocks,
    save_block,
    unchanged_files,
)
from sae_atlas.stages.score_evidence import evidence_rows, number_evidence

KEYS = ["data_source", "method", "feature_id"]
GROUP = score_methods.GROUP
BY_QUANTILE = pl.List(score_methods.QUANTILE_SCORE)
FILE_COLUMNS = {"data_source": pl.String, "method": pl.String, "feature_id": pl.UInt32, "n_examples": pl.UInt32}


def _conform(part: pl.DataFrame, columns: dict) -> pl.DataFrame:
    """``part`` with exactly ``columns``, absent ones null, so the parts can be concatenated."""
    return part.select(
        [
            pl.col(name).cast(dtype) if name in part.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in columns.items()
        ]
    )


def aggregate_records(records: pl.DataFrame) -> pl.DataFrame:
    """Every method's records aggregated by that method's aggregator, one row per
    (data_source, method, feature_id), with the method's per-quantile breakdown."""
    parts = []
    for (method,), group in records.partition_by("method", as_dict=True, maintain_order=True).items():
        score_method = score_methods.METHODS[method]
        part = _conform(score_method.aggregate(group), AGGREGATE_COLUMNS)
        if score_method.by_quantile is not None:
            breakdown = (
                score_method.by_quantile(group)
                .sort("quantile")
                .group_by(GROUP)
                .agg(by_quantile=pl.struct("quantile", "score", "examples"))
            )
            part = part.join(breakdown, on=GROUP, how="left")
        parts.append(
            _conform(part, {**AGGREGATE_COLUMNS, "by_quantile": BY_QUANTILE}).with_columns(
                method=pl.lit(method, pl.String)
            )
        )
    if not parts:
        return pl.DataFrame(schema={**AGGREGATE_COLUMNS, "by_quantile": BY_QUANTILE, "method": pl.String})
    return pl.concat(parts)


def build_scores(*, files: pl.DataFrame, records: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """Aggregate per-example score records into the ``stages/scores.parquet`` table.

    ``files`` has one row per readable score file (``data_source``, ``method``, ``feature_id``,
    ``n_records``), ``records`` one row per record (``data_source``, ``method``, ``feature_id`` and
    the record columns), and ``runs`` maps ``data_source`` to ``llm_explainer`` and ``llm_scorer``.
    """
    return join_scores(files=files, aggregates=aggregate_records(records), runs=runs)


FIRING_COLUMNS = dict(STAGE_FIRING)


def firing_table(data_source: str, counts: np.ndarray, n_tokens) -> pl.DataFrame:
    """One run's firing count per latent, and that count over the tokens its cache holds."""
    tokens = n_tokens if isinstance(n_tokens, int) and n_tokens > 0 else None
    return pl.DataFrame(
        {
            "data_source": [data_source] * len(counts),
            "feature_id": np.arange(len(counts), dtype=np.uint32),
            "firing_count": counts,
        },
        schema={name: dtype for name, dtype in FIRING_COLUMNS.items() if name != "firing_frequency"},
    ).with_columns(firing_frequency=pl.col("firing_count") / tokens if tokens else pl.lit(None, pl.Float64))


def join_scores(
    *, files: pl.DataFrame, aggregates: pl.DataFrame, runs: pl.DataFrame, firing: pl.DataFrame | None = None
) -> pl.DataFrame:
    """The ``stages/scores.parquet`` table from the file listing and the per-latent aggregates
    (one row per ``data_source``, ``method``, ``feature_id``), with each run's firing counts."""
    table = (
        _conform(files.rename({"n_records": "n_examples"}), FILE_COLUMNS)
        .join(
            _conform(aggregates, {**AGGREGATE_COLUMNS, "by_quantile": BY_QUANTILE, "method": pl.String}),
            on=KEYS,
            how="left",
        )
        .join(runs.with_columns(pl.col("data_source").cast(pl.String)), on="data_source", how="left")
        .join(
            _conform(firing, FIRING_COLUMNS) if firing is not None else pl.DataFrame(schema=FIRING_COLUMNS),
            on=["data_source", "feature_id"],
            how="left",
        )
        .with_columns(pl.col("n_failed").fill_null(0))
    )
    source_order = {name: position for position, name in enumerate(runs["data_source"].cast(pl.String))}
    return (
        table.with_columns(_source_order=pl.col("data_source").replace_strict(source_order, return_dtype=pl.UInt32))
        .sort(["feature_id", "_source_order", "method"])
        .select([pl.col(name).cast(dtype) for name, dtype in STAGE_SCORES.items()])
    )


# Files per task: a block's reads and aggregations are a few calls over many files (per-call
# overhead dominates small blocks), and a block's records with their examples stay well under 1 GB.
FILES_PER_TASK = 1000


@dataclass(frozen=True)
class ScoreTask:
    """The score files of one block of latents, of every run and method: a latent's records are
    all in one task, so its examples are matched across runs there, and the evidence streams out
    in latent order. ``cache``: where blocks are cached (:mod:`.score_cache`), if anywhere."""

    files: list[tuple[str, str, delphi.LatentFile]]  # (data_source, method, file)
    cache: Path | None = None
    stamps: tuple = ()  # each file's (size, modification time), as the plan took them


def score_tasks(runs: list, cache: Path | None = None, stamps: dict | None = None) -> list[ScoreTask]:
    """Blocks of consecutive latents holding about :data:`FILES_PER_TASK` files each (``stamps``:
    :func:`file_stamps` of the files, taken here when not given)."""
    files = sorted(
        (
            (entry.latent, run.name, method, entry)
            for run in runs
            for method, entries in run.scores.items()
            for entry in entries
        ),
        key=lambda item: item[0],
    )
    stamps = file_stamps(entry.path for *_, entry in files) if stamps is None else stamps
    latents = sorted({latent for latent, *_ in files})
    per_latent = max(1, len(files) // max(len(latents), 1))
    block = max(1, FILES_PER_TASK // per_latent)
    tasks, start = [], 0
    for first in range(0, len(latents), block):
        last = latents[min(first + block, len(latents)) - 1]
        stop = start
        while stop < len(files) and files[stop][0] <= last:
            stop += 1
        chosen = [(source, method, entry) for _, source, method, entry in files[start:stop]]
        tasks.append(ScoreTask(chosen, cache, tuple(stamps[entry.path] for _, _, entry in chosen)))
        start = stop
    return tasks


def _stamped(files: list[tuple[str, str, delphi.LatentFile]], stamps: tuple) -> pl.DataFrame:
    """Each file's key, path and (size, modification time), taken before it is read."""
    return pl.DataFrame(
        {
            "data_source": [source for source, _, _ in files],
            "method": [method for _, method, _ in files],
            "feature_id": [entry.latent for _, _, entry in files],
            "path": [str(entry.path) for _, _, entry in files],
            "size": [size for size, _ in stamps],
            "modified": [modified for _, modified in stamps],
        },
        schema={name: dtype for name, dtype in STAMPED_FILE_COLUMNS.items() if name != "n_records"},
    )


def read_block(files: list[tuple[str, str, delphi.LatentFile]], stamped: pl.DataFrame) -> BlockRead:
    """Read and aggregate score files of a block: each file's record count, the per-file
    aggregates, the evidence rows and the examples (run in a worker process). ``stamped``: the
    files' stamps (:func:`_stamped`), taken before they are read."""
    problems, examples = Problems(), ExampleStore()
    # in the examples' order (run, method): the first copy seen is then mostly the one kept
    read = delphi.read_score_batch(sorted(files, key=lambda item: item[:2]), problems, examples)
    sequences = read.sequences if read.sequences.height else None
    return BlockRead(
        files=stamped.join(read.files, on=FILE_KEY, how="left").select(
            [pl.col(name).cast(dtype) for name, dtype in STAMPED_FILE_COLUMNS.items()]
        ),
        # one aggregation per block: each method's aggregator over every run's records at once
        aggregates=aggregate_records(read.records.drop(*EVIDENCE_COLUMNS)),
        evidence=evidence_rows(read.records, sequences),
        examples=examples.table(),
        problems=sorted(problems.items, key=lambda problem: problem.file),
        files_read=len(files),
    )


def merged_block(task: ScoreTask, cached: CachedBlock | None, stamped: pl.DataFrame, kept: pl.DataFrame) -> BlockRead:
    """A block from the cached reads of its ``kept`` files and a fresh read of the others (all
    of them without a cache)."""
    if cached is None or kept.is_empty():
        return read_block(task.files, stamped)
    for _attempt in range(2):
        keys = set(kept.iter_rows())
        changed = [item for item in task.files if (item[0], item[1], item[2].latent) not in keys]
        stamps = stamped.join(kept, on=FILE_KEY, how="anti")
        block, unsettled = merge_blocks(cached, kept, read_block(changed, stamps))
        if not unsettled:
            break
        kept = kept.filter(~pl.col("feature_id").is_in(list(unsettled)))
    return block


def score_chunk(
    task: ScoreTask,
) -> tuple[pl.DataFrame, pl.DataFrame, tuple[pl.DataFrame, pl.DataFrame], int, list, int]:
    """One block: its file listing, per-latent aggregates, evidence (records, examples), record
    count, problems and the number of files read from disk (run in a worker process). A block
    whose files all are as cached is the cache, as it was written."""
    directory = task.cache / block_digest(task.files) if task.cache is not None else None
    cached = load_block(directory)
    stamped = _stamped(task.files, task.stamps)
    kept = unchanged_files(cached, stamped)
    if cached is not None and kept.height == len(task.files):
        block = BlockRead(cached.files, cached.aggregates, None, None, cached.problems)
        records, examples = cached.records, cached.examples
    else:
        block = merged_block(task, cached, stamped, kept)
        records, examples = number_evidence(block.evidence, block.examples)
        save_block(directory, block, records, examples)
    listing = block.files.filter(pl.col("n_records").is_not_null()).select(*LISTING_COLUMNS)
    count = int(listing["n_records"].sum() or 0)
    examples = examples.select([pl.col(name).cast(dtype) for name, dtype in STAGE_SCORE_EXAMPLES.items()])
    return listing, block.aggregates, (records, examples), count, block.problems, block.files_read


LISTING_COLUMNS = {"method": pl.String, "feature_id": pl.UInt32, "n_records": pl.UInt32, "data_source": pl.String}


def plan(context: StageContext) -> Plan:
    runs_with_files = context.listed_runs()
    files = [entry.path for run in runs_with_files for entries in run.scores.values() for entry in entries]
    files += [run.path / "run_config.json" for run in runs_with_files]
    files += [run.path / delphi.FIRING_COUNTS for run in runs_with_files]
    stamps = file_stamps(files)
    runs = context.runs_table()

    def execute(problems: Problems) -> Product:
        statistics: dict = {}

        def stream():
            listings, aggregates = [], []
            counts = {"records": 0, "evidence_records": 0, "evidence_examples": 0, "score_files_read_from_disk": 0}
            cache = context.output_dir / layout.SCORE_CACHE / f"v{STAGE.version}"
            tasks = score_tasks(runs_with_files, cache, stamps)
            # read beside the blocks: loading torch for them takes seconds the driver has to spare
            reader = ThreadPoolExecutor(1)
            firing = reader.submit(_firing_tables, runs_with_files)
            reader.shutdown(wait=False)
            for listing, aggregated, (records, examples), count, found, read in context.map(score_chunk, tasks):
                problems.extend(found)
                listings.append(listing)
                aggregates.append(aggregated)
                counts["records"] += count
                counts["evidence_records"] += records.height
                counts["evidence_examples"] += examples.height
                counts["score_files_read_from_disk"] += read
                yield Parts(extra={layout.SCORE_RECORDS: records, layout.SCORE_EXAMPLES: examples})
            prune_blocks(cache.parent, keep=cache, blocks={block_digest(task.files) for task in tasks})
            tables, found = firing.result()
            problems.extend(found)
            firing_counts = pl.concat(tables) if tables else pl.DataFrame(schema=STAGE_FIRING)
            table = _scores_table(listings, aggregates, firing_counts, runs_with_files, runs, statistics)
            statistics.update(counts)
            yield Parts(output=table, extra={layout.FIRING: firing_counts.select(STAGE_FIRING.names())})

        return Product(
            data=stream(),
            rows=None,
            statistics=statistics,
            notes=[note for run in runs_with_files for note in run.notes],
            schemas={
                layout.SCORE_RECORDS: STAGE_SCORE_RECORDS.to_arrow(),
                layout.SCORE_EXAMPLES: STAGE_SCORE_EXAMPLES.to_arrow(),
                layout.FIRING: STAGE_FIRING.to_arrow(),
            },
        )

    return Plan(
        key={"inputs": fingerprint_files(files, stamps), "runs": runs.to_dicts()},
        execute=execute,
        problems=context.discovery_problems("scores"),
    )


def _firing_tables(runs_with_files: list) -> tuple[list[pl.DataFrame], list]:
    """Each run's firing counts (:func:`firing_table`) where it has them, and the problems met."""
    problems = Problems()
    tables = [
        firing_table(run.name, counts, run.settings.get("cache_cfg.n_tokens"))
        for run in runs_with_files
        if (counts := delphi.read_firing_counts(run, problems)) is not None
    ]
    return tables, problems.items


def _scores_table(listings, aggregates, firing, runs_with_files, runs, statistics: dict) -> pl.DataFrame:
    """The stage's own output once every block is read: listings and aggregates joined to the runs
    and their ``firing`` counts (every latent's, :data:`STAGE_FIRING`; ``statistics`` filled in)."""
    listing = pl.concat(listings) if listings else pl.DataFrame(schema=LISTING_COLUMNS)
    aggregated = (
        pl.concat(aggregates) if aggregates else pl.DataFrame(schema={**AGGREGATE_COLUMNS, "method": pl.String})
    )
    table = join_scores(files=listing, aggregates=aggregated, runs=runs, firing=firing)
    statistics.update(
        {
            "score_files_read": listing.height,
            "rows_by_method": dict(table.group_by(pl.col("method").cast(pl.String)).len().iter_rows()),
            "rows_without_score": int(table["score"].is_null().sum()),
            "runs_with_firing_counts": firing["data_source"].n_unique(),
            # what each run's scores depend on, for the comparability check of `sae-atlas compare`
            "run_settings": {run.name: run.settings for run in runs_with_files},
        }
    )
    return table


STAGE = Stage(
    name="scores",
    output=layout.SCORES,
    version=6,
    extra_outputs=(layout.SCORE_RECORDS, layout.SCORE_EXAMPLES, layout.FIRING),
    plan=plan,
    config=("sources",),
    description="per-latent fuzz, detection, simulation, embedding and intruder scores of every run",
)
