"""What the scores stage read from each block of score files, kept so that a later run re-reads
only the files that changed.

A study's score files are rewritten a few at a time (a scorer re-run on some latents, a fixed
file), but the stage's fingerprint covers all of them: without this cache, changing one file
re-read every file of every run. Everything the stage takes from a score file depends on that file
alone (a file is one run × method × latent, and every aggregate is per file), except which copy of
an example is kept when several runs scored it, and that choice has a rule that does not depend on
the order of reading (:class:`sae_atlas.scored_examples.ExampleStore`). So a block is rebuilt from
its cached part for the unchanged files and a fresh read of the others, and equals a full read.

A block is cached under ``.cache/scores/v<stage version>/<block digest>/`` (the digest of its files'
run, method, latent and path) as five files: ``files.parquet`` (each file's size and modification
time, what "unchanged" means, as for every fingerprint here, and its record count, null when it
could not be read), ``aggregates.parquet``, ``records.parquet`` and ``examples.parquet`` (the
block's rows of the two stage files, the examples with the run and method each came from) and
``problems.json``. A cache that cannot be read is ignored (the block is read whole); deleting
``.cache/scores`` is always safe.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import polars as pl

from sae_atlas.problems import Problem
from sae_atlas.scored_examples import pick_examples
from sae_atlas.stage import digest
from sae_atlas.stages.score_evidence import with_texts

FILE_KEY = ["data_source", "method", "feature_id"]
STAMPED_FILE_COLUMNS = {
    "data_source": pl.String,
    "method": pl.String,
    "feature_id": pl.UInt32,
    "path": pl.String,
    "size": pl.Int64,
    "modified": pl.Int64,
    "n_records": pl.UInt32,
}
TABLES = ("files", "aggregates", "records", "examples")


@dataclass
class BlockRead:
    """What a block's score files gave: each file (:data:`STAMPED_FILE_COLUMNS`), the per-file aggregates,
    the evidence rows (with their example's text), the examples and the problems; ``files_read``
    counts the files read from disk this time."""

    files: pl.DataFrame
    aggregates: pl.DataFrame
    evidence: pl.DataFrame
    examples: pl.DataFrame
    problems: list[Problem] = field(default_factory=list)
    files_read: int = 0


def block_digest(files: list[tuple[str, str, object]]) -> str:
    """The identity of a block: its files' run, method, latent and path."""
    return digest(sorted((source, method, entry.latent, str(entry.path)) for source, method, entry in files))


@dataclass
class CachedBlock:
    """A block as cached: its rows of the stage files as they were written (:func:`save_block`)."""

    files: pl.DataFrame
    aggregates: pl.DataFrame
    records: pl.DataFrame
    examples: pl.DataFrame
    problems: list[Problem]


def load_block(directory: Path | None) -> CachedBlock | None:
    """A cached block, or None when there is none or it cannot be read."""
    if directory is None or not directory.is_dir():
        return None
    try:
        tables = {name: pl.read_parquet(directory / f"{name}.parquet") for name in TABLES}
        problems = [Problem(**item) for item in orjson.loads((directory / "problems.json").read_bytes())]
    except (OSError, ValueError, TypeError, pl.exceptions.PolarsError):
        return None
    return CachedBlock(**tables, problems=problems)


def save_block(directory: Path | None, block: BlockRead, records: pl.DataFrame, examples: pl.DataFrame) -> None:
    """Cache ``block``, its evidence as ``records`` and ``examples`` (:func:`number_evidence`:
    the records point to their example by id, not by a text repeated on every record). Written
    beside, then moved in place: a crash leaves the old block or none. A cache that cannot be
    written only costs the next run a full read of the block."""
    if directory is None:
        return
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    tables = {"files": block.files, "aggregates": block.aggregates, "records": records, "examples": examples}
    try:
        partial.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            table.write_parquet(partial / f"{name}.parquet")
        (partial / "problems.json").write_bytes(orjson.dumps([problem.to_dict() for problem in block.problems]))
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


def unchanged_files(cached: CachedBlock | None, files: pl.DataFrame) -> pl.DataFrame:
    """The keys (:data:`FILE_KEY`) of ``files`` (this run's, with their stamps) whose cached read
    can be reused: same path, size and modification time."""
    if cached is None:
        return pl.DataFrame(schema={name: STAMPED_FILE_COLUMNS[name] for name in FILE_KEY})
    same = ["path", "size", "modified"]
    return files.join(cached.files.select(*FILE_KEY, *same), on=[*FILE_KEY, *same], how="inner").select(FILE_KEY)


def merge_blocks(cached: CachedBlock, kept: pl.DataFrame, fresh: BlockRead) -> tuple[BlockRead, set[int]]:
    """The block from the cached reads of the ``kept`` files and the ``fresh`` read of the others,
    and the latents whose examples cannot be settled so (an example the cache had from a re-read
    file that its new version no longer holds, though unchanged files still point to it: only a
    read of that latent's other files can say which copy to keep)."""

    def keep(table: pl.DataFrame, key: list[str]) -> pl.DataFrame:
        return table.join(kept.rename(dict(zip(FILE_KEY, key, strict=True))), on=key, how="semi")

    kept_evidence, kept_examples = with_texts(keep(cached.records, FILE_KEY), cached.examples)
    evidence = pl.concat([kept_evidence, fresh.evidence], how="diagonal_relaxed")
    examples = pick_examples(
        pl.concat(
            [keep(kept_examples, ["origin_source", "origin_method", "feature_id"]), fresh.examples],
            how="diagonal_relaxed",
        )
    )
    missing = evidence.filter(pl.col("example_text").is_not_null()).join(
        examples, on=["feature_id", "example_text"], how="anti"
    )
    kept_paths = set(keep(cached.files, FILE_KEY)["path"].to_list())
    block = BlockRead(
        files=pl.concat([keep(cached.files, FILE_KEY), fresh.files]),
        aggregates=pl.concat([keep(cached.aggregates, FILE_KEY), fresh.aggregates], how="vertical_relaxed"),
        evidence=evidence,
        examples=examples.join(
            evidence.select("feature_id", "example_text"), on=["feature_id", "example_text"], how="semi"
        ),
        problems=sorted(
            [problem for problem in cached.problems if problem.file in kept_paths] + fresh.problems,
            key=lambda problem: problem.file,
        ),
        files_read=fresh.files_read,
    )
    return block, set(missing["feature_id"].to_list())


def prune_blocks(root: Path, *, keep: Path, blocks: set[str]) -> None:
    """Remove the cached blocks no task of this run used, and the caches of other stage versions."""
    if not root.is_dir():
        return
    for directory in root.iterdir():
        if directory != keep:
            shutil.rmtree(directory, ignore_errors=True)
    if keep.is_dir():
        for directory in keep.iterdir():
            if directory.name not in blocks:
                shutil.rmtree(directory, ignore_errors=True)
