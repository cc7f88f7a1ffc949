"""The output directory: what each file is called, how it is written, and how its sidecar is read.

Every module that reads or writes an output directory goes through here, so a file name is
written once. Writes are atomic (a temporary file in the same directory, then a rename): a crash
never leaves a half-written file, and a reader never sees one.

    master/
      features.parquet                       FEATURES
      explanation_embeddings.parquet         EXPLANATION_EMBEDDINGS
      activation_examples.parquet            ACTIVATION_EXAMPLES
      activation_embeddings.parquet          ACTIVATION_EMBEDDINGS
      activation_example_similarity.parquet  ACTIVATION_SIMILARITY
      stages/scores.parquet                  SCORES
      stages/decoder_similarity.parquet      DECODER_SIMILARITY
      stages/prompts.parquet                 PROMPTS
      stages/sampled_examples.parquet        SAMPLED_EXAMPLES
      stages/score_records.parquet           SCORE_RECORDS
      stages/score_examples.parquet          SCORE_EXAMPLES
      stages/firing.parquet                  FIRING
      stages/activation_patterns.parquet     ACTIVATION_PATTERNS
      stages/diagnosis.parquet               DIAGNOSIS
      stages/claims.parquet                  CLAIMS
      stages/latent_map.parquet              LATENT_MAP
      stages/families.parquet                FAMILIES
      stages/family_pairs.parquet            FAMILY_PAIRS
      <file>.metadata.json                   sidecars
      run_report.json                        RUN_REPORT
      .cache/embeddings/                     EMBEDDING_CACHE
      .cache/scores/                         SCORE_CACHE
      labels.sqlite (+ -wal, -shm)           LABELS: people's verdicts; never written by ``run``
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = "features.parquet"
EXPLANATION_EMBEDDINGS = "explanation_embeddings.parquet"
ACTIVATION_EXAMPLES = "activation_examples.parquet"
ACTIVATION_EMBEDDINGS = "activation_embeddings.parquet"
ACTIVATION_SIMILARITY = "activation_example_similarity.parquet"
SCORES = "stages/scores.parquet"
DECODER_SIMILARITY = "stages/decoder_similarity.parquet"
PROMPTS = "stages/prompts.parquet"
SAMPLED_EXAMPLES = "stages/sampled_examples.parquet"
SCORE_RECORDS = "stages/score_records.parquet"
SCORE_EXAMPLES = "stages/score_examples.parquet"
FIRING = "stages/firing.parquet"
ACTIVATION_PATTERNS = "stages/activation_patterns.parquet"
DIAGNOSIS = "stages/diagnosis.parquet"
CLAIMS = "stages/claims.parquet"
LATENT_MAP = "stages/latent_map.parquet"
FAMILIES = "stages/families.parquet"
FAMILY_PAIRS = "stages/family_pairs.parquet"
RUN_REPORT = "run_report.json"
EMBEDDING_CACHE = ".cache/embeddings"
SCORE_CACHE = ".cache/scores"
LABELS = "labels.sqlite"
SIDECAR_SUFFIX = ".metadata.json"

# The five files downstream consumers read, in the contract's order (DESIGN.md §2).
MASTER_FILES = (FEATURES, EXPLANATION_EMBEDDINGS, ACTIVATION_EXAMPLES, ACTIVATION_EMBEDDINGS, ACTIVATION_SIMILARITY)


def view_name(name: str) -> str:
    """The SQL view / short name of an output file: ``stages/scores.parquet`` → ``scores``."""
    return Path(name).name.removesuffix(".parquet")


# -- sidecars ------------------------------------------------------------------------------------


def sidecar_path(output: Path) -> Path:
    """Where the sidecar of ``output`` lives (``<name>.parquet.metadata.json``)."""
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def read_sidecar(output: Path) -> dict | None:
    """The sidecar of ``output``, or None when missing or unreadable."""
    try:
        data = orjson.loads(sidecar_path(output).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_sidecar(output: Path, sidecar: dict) -> None:
    """Write the sidecar of ``output`` atomically."""
    write_atomic_bytes(sidecar_path(output), orjson.dumps(sidecar, option=orjson.OPT_INDENT_2))


# -- what belongs to an output directory ---------------------------------------------------------

# Directories of an output directory whose every file is sae-atlas's own.
OWN_DIRECTORIES = ("stages", ".cache")


class ProtectedOutput(ValueError):
    """A command was asked to write over a file of an output directory."""


def own_files() -> set[str]:
    """The names at the top of an output directory that sae-atlas writes (beside OWN_DIRECTORIES)."""
    return {
        RUN_REPORT,
        *MASTER_FILES,
        *(name + SIDECAR_SUFFIX for name in MASTER_FILES),
        *(LABELS + suffix for suffix in ("", "-wal", "-shm", "-journal")),
    }


def is_output_directory(path: Path) -> bool:
    """Whether ``path`` holds a sae-atlas run's outputs (a run report or a master file's sidecar)."""
    return (path / RUN_REPORT).is_file() or any((path / (name + SIDECAR_SUFFIX)).is_file() for name in MASTER_FILES)


def refuse_output_files(target: Path) -> None:
    """Raise :class:`ProtectedOutput` when writing ``target`` would write over (or into) a file an
    output directory owns: a master file, a sidecar, the run report, anything under ``stages/`` or
    ``.cache/``. Checked on the path as given and with links
    resolved. Other files in an output directory (a report a user keeps beside it) may be written."""
    given = Path(os.path.abspath(target))
    for candidate in dict.fromkeys((given, given.resolve())):
        for parent in candidate.parents:
            if not is_output_directory(parent):
                continue
            relative = candidate.relative_to(parent)
            if relative.parts[0] in OWN_DIRECTORIES or relative.as_posix() in own_files():
                raise ProtectedOutput(
                    f"{target}: refusing to write over {relative.as_posix()} of the output directory {parent}; "
                    "choose a path outside it"
                )


# -- atomic writers ------------------------------------------------------------------------------


def temporary_path(path: Path) -> Path:
    """The temporary file ``path`` is written through: hidden, in the same directory (so the final
    rename is atomic), and named after the writing process (so concurrent writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory: Path, outputs: Iterable[str], caches: Iterable[Path] = ()) -> list[Path]:
    """Delete the temporary files and scratch directories of ``outputs`` (paths relative to
    ``directory``: the files a run writes) whose writing process is gone (a run killed mid-write),
    and those of the embedding cache's segments under ``caches``. Those of a live process (a
    concurrent run) are left alone, and so is every other file: a temporary-looking name that
    sae-atlas does not write is somebody else's. Returns what went."""
    candidates = []
    for name in outputs:
        path = Path(directory) / name
        if path.parent.is_dir():
            candidates.extend(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))
    for cache in caches:
        for segments in Path(cache).glob("*"):  # <cache>/<model>-<namespace>/.segment-….tmp-<pid>
            if segments.is_dir() and not segments.is_symlink():
                candidates.extend(segments.glob(".segment-*.tmp-*"))
    removed = []
    for path in sorted(set(candidates)):
        pid = path.name.rsplit(".tmp-", 1)[1]
        if not pid.isascii() or not pid.isdigit() or _alive(int(pid)) or not os.path.lexists(path):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _arrow(part: pl.DataFrame | pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    return part.to_arrow() if isinstance(part, pl.DataFrame) else part


class NothingToWrite(ValueError):
    """A streamed output produced no part and no schema was given."""


class ParquetStream:
    """A Parquet file written part by part and published atomically: parts go to a temporary file,
    which :meth:`commit` renames into place and :meth:`abort` removes. Memory is one part."""

    def __init__(
        self, path: Path, *, compression: str, schema: pa.Schema | None = None, row_group_size: int | None = None
    ):
        self.path = Path(path)
        self.temporary = temporary_path(self.path)
        self.compression = compression
        self.schema = schema
        self.row_group_size = row_group_size
        self._writer: pq.ParquetWriter | None = None

    def _open(self, schema: pa.Schema) -> pq.ParquetWriter:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.temporary, schema, compression=self.compression)
        return self._writer

    def write(self, part: pl.DataFrame | pa.Table | pa.RecordBatch) -> None:
        part = _arrow(part)
        writer = self._open(self.schema or part.schema)
        if isinstance(part, pa.Table):
            writer.write_table(part.cast(writer.schema), row_group_size=self.row_group_size)
        else:
            writer.write_batch(part, row_group_size=self.row_group_size)

    def commit(self) -> None:
        """Close the file and move it into place (an empty file of ``schema`` when no part came)."""
        if self._writer is None:
            if self.schema is None:
                self.abort()
                raise NothingToWrite(f"{self.path}: nothing to write and no schema given")
            self._open(self.schema)
        self._writer.close()
        self._writer = None
        os.replace(self.temporary, self.path)

    def abort(self) -> None:
        """Forget the parts written: remove the temporary file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.temporary.unlink(missing_ok=True)


def write_parquet(
    path: Path,
    data: pl.DataFrame | pa.Table | Iterable[pa.RecordBatch | pa.Table | pl.DataFrame],
    *,
    compression: str,
    schema: pa.Schema | None = None,
    row_group_size: int | None = None,
) -> None:
    """Write a table, or a stream of parts, atomically: a crash never leaves a half file.

    A stream is written part by part (memory bounded by one part); its schema is ``schema`` or
    that of its first part. An empty stream with a schema gives an empty file of that schema.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, pl.DataFrame | pa.Table):
        temporary = temporary_path(path)
        try:
            if isinstance(data, pl.DataFrame):
                data.write_parquet(temporary, compression=compression, statistics=True, row_group_size=row_group_size)
            else:
                pq.write_table(data, temporary, compression=compression, row_group_size=row_group_size)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return
    stream = ParquetStream(path, compression=compression, schema=schema, row_group_size=row_group_size)
    try:
        for part in data:
            stream.write(part)
        stream.commit()
    finally:
        stream.abort()


def remove_output(path: Path) -> bool:
    """Delete an output file and its sidecar; True when there was something to delete."""
    path = Path(path)
    existed = path.exists()
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)
    return existed


# -- the prompt table ----------------------------------------------------------------------------


def read_in_row_groups(path: Path, columns: list[str] | None = None, rows: int = 65_536):
    """``path`` as Polars frames of whole row groups, about ``rows`` rows each.

    Reads row groups rather than ``ParquetFile.iter_batches``: over nested list columns the latter
    keeps its decoded pages alive (4 GiB after 30 batches of activation_embeddings at 131k
    latents), while ``read_row_groups`` frees each read and stays flat."""
    parquet = pq.ParquetFile(path)
    groups: list[int] = []
    gathered = 0
    for group in range(parquet.num_row_groups):
        groups.append(group)
        gathered += parquet.metadata.row_group(group).num_rows
        if gathered >= rows:
            yield pl.from_arrow(parquet.read_row_groups(groups, columns=columns))
            groups, gathered = [], 0
    if groups:
        yield pl.from_arrow(parquet.read_row_groups(groups, columns=columns))


def row_group_ranges(path: Path, column: str) -> list[tuple[int, int]]:
    """(min, max) of ``column`` in each row group of a Parquet file, from its statistics (a row
    group without statistics spans every value)."""
    metadata = pq.ParquetFile(path).metadata
    index = metadata.schema.to_arrow_schema().get_field_index(column)
    ranges = []
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(index).statistics
        if statistics is not None and statistics.has_min_max:
            ranges.append((statistics.min, statistics.max))
        else:
            ranges.append((0, 2**64))
    return ranges


def read_prompt_tokens(output_dir: Path, prompt_ids: list[int] | None = None):
    """Each prompt's tokens, indexed by prompt id: from stages/prompts.parquet, else rebuilt from
    activation_examples.parquet (an output directory written by another tool). With
    ``prompt_ids``, only those prompts, as a {prompt id: tokens} mapping."""
    path = Path(output_dir) / PROMPTS
    if prompt_ids is not None:
        source = path if path.exists() else Path(output_dir) / ACTIVATION_EXAMPLES
        rows = (
            pl.scan_parquet(source)
            .select("prompt_id", "prompt_tokens")
            .filter(pl.col("prompt_id").is_in(prompt_ids))
            .unique("prompt_id")
            .collect()
        )
        return dict(zip(rows["prompt_id"].to_list(), rows["prompt_tokens"].to_list(), strict=True))
    if path.exists():
        return pl.read_parquet(path).sort("prompt_id")["prompt_tokens"]
    examples = pl.scan_parquet(Path(output_dir) / ACTIVATION_EXAMPLES)
    unique = examples.select("prompt_id", "prompt_tokens").unique("prompt_id").collect()
    size = int(unique["prompt_id"].max() or -1) + 1
    return (
        pl.DataFrame({"prompt_id": pl.arange(0, size, eager=True).cast(pl.UInt32)})
        .join(unique, on="prompt_id", how="left")
        .sort("prompt_id")["prompt_tokens"]
    )
