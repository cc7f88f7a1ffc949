"""A pipeline stage, declared once next to its code.

A stage module ends with one :class:`Stage` that says what the runner needs to know: the stage's
name, the file it writes, its version, the stage outputs it reads, the config keys its result
depends on, and its ``plan``. The runner (:mod:`sae_atlas.pipeline`) derives the order, the
fingerprints and skip-when-unchanged from these declarations and never names a stage.

``plan(context)`` is cheap: it looks at what the inputs are (file sizes and times, derived
settings) without reading them, and returns a :class:`Plan`. Only when the fingerprint changed does
the runner call ``Plan.execute``, which reads the inputs (raw files through the readers in
:mod:`sae_atlas.sources`, upstream outputs through ``context.read``), calls the stage's pure
function and returns a :class:`Product` for the runner to write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from sae_atlas.problems import Problem, Problems

if TYPE_CHECKING:
    from sae_atlas.config import AtlasConfig
    from sae_atlas.embedding import Embedder
    from sae_atlas.sources.delphi import DelphiRun

EmbedFunction = Callable[[Sequence[str]], np.ndarray]


def digest(value) -> str:
    """A short stable hash of JSON-ready ``value`` (keys sorted)."""
    return hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def file_stamps(paths: Iterable[Path]) -> dict[Path, tuple[int | None, int | None]]:
    """Size and modification time of every file, (None, None) where it cannot be read."""
    stamps = {}
    # sorted as strings: comparing Path objects costs seconds over a study's files
    for path in sorted({Path(path) for path in paths}, key=str):
        try:
            status = path.stat()
        except OSError:
            stamps[path] = (None, None)
            continue
        stamps[path] = (status.st_size, status.st_mtime_ns)
    return stamps


def fingerprint_files(paths: Iterable[Path], stamps: dict | None = None) -> dict:
    """Size and modification time of every file: cheap, and changes whenever a file is rewritten.
    ``stamps``: those :func:`file_stamps` already took, when the stage needs them itself.

    Content hashes would be exact but cost a full read of every input on every run.
    """
    stamps = file_stamps(paths) if stamps is None else stamps
    entries = sorted((str(path), size, modified) for path, (size, modified) in stamps.items())
    return {"files": len(entries), "bytes": sum(entry[1] or 0 for entry in entries), "digest": digest(entries)}


@dataclass
class Parts:
    """One step of a stream that feeds several outputs at once: a part of the stage's output and
    parts of its extra outputs (by ``layout`` name). A stage yields these when its extra outputs
    are too big to hold until the end."""

    output: pa.Table | pa.RecordBatch | pl.DataFrame | None = None
    extra: dict[str, pa.Table | pa.RecordBatch | pl.DataFrame] = field(default_factory=dict)


@dataclass
class Product:
    """What a stage produced, before the runner writes it.

    ``data`` is a table or an iterator of parts (streamed into the file, memory bounded by one
    part; an iterator may yield :class:`Parts` to stream extra outputs alongside). ``extra`` holds
    further outputs as whole tables, by ``layout`` name; ``schemas`` the schema of each streamed
    output that may get no part. ``statistics`` and ``notes`` may be filled in while the stream is
    consumed: the runner reads them after writing.
    """

    data: object
    rows: int | None
    statistics: dict
    schema: pa.Schema | None = None
    row_group_size: int | None = None
    extra: dict[str, pa.Table | pl.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schemas: dict[str, pa.Schema] = field(default_factory=dict)


@dataclass
class Plan:
    """A stage's fingerprint material and the work to do when it changed."""

    key: dict
    execute: Callable[[Problems], Product]
    # Problems found while planning (e.g. while listing input files), counted for this stage.
    problems: list[Problem] = field(default_factory=list)


class Skip(Exception):
    """The stage has nothing to do (e.g. its input is not configured); any previous output stays."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unusable(Skip):
    """The stage's input is configured but cannot be used: the previous output would be stale, so
    the runner removes it (and the outputs of every stage that reads it)."""


class StageContext(Protocol):
    """What the runner offers a stage's plan."""

    config: AtlasConfig
    output_dir: Path

    @property
    def sae_id(self) -> str: ...

    @property
    def sae_width(self) -> int | None:
        """The SAE's number of latents, when its decoder files or sae_id declare it."""

    def runs(self) -> list[DelphiRun]:
        """Every source's delphi run, described from its config (no directory walk)."""

    def listed_runs(self) -> list[DelphiRun]:
        """The runs with their per-latent files listed."""

    def runs_table(self) -> pl.DataFrame:
        """Every source in config order with the names the outputs use."""

    def discovery_problems(self, under: str) -> list[Problem]:
        """Problems found while listing the runs' ``under`` directories ("scores", "explanations")."""

    def path(self, name: str) -> Path:
        """The path of a ``layout`` name in the output directory."""

    def read(self, stage: str, columns: list[str] | None = None) -> pl.DataFrame:
        """The output of an upstream stage this stage declared in ``reads``/``optional_reads``."""

    def read_batches(self, stage: str, columns: list[str] | None = None, rows: int = 65_536) -> Iterator[pl.DataFrame]:
        """An upstream stage's output in order, about ``rows`` rows at a time (whole row groups)."""

    def scratch(self) -> Path:
        """A directory for this stage's temporary files, removed when the stage ends."""

    def map(self, function: Callable, tasks: Sequence) -> Iterator:
        """``function`` over ``tasks`` on the run's engine (every core, or a cluster), results in
        task order. ``function`` must be module-level and its tasks picklable."""

    def map_shared(self, function: Callable, shared, tasks: Sequence, *, gpus: float = 0) -> Iterator:
        """``function(shared, task)`` over ``tasks`` on the run's engine, ``shared`` (read-only)
        sent once; results in task order. ``gpus``: each task's share of a GPU, where there is one."""

    def prefetch_embeddings(self, stage: str, calls: Iterable[Sequence[str]]) -> None:
        """On an engine that embeds in one distributed job, encode now what the stage's ``embed``
        calls (``calls``: each one's texts, in order) would encode, batched as they would batch it;
        they then find every text cached. Elsewhere ``calls`` is not read."""

    def has(self, stage: str) -> bool:
        """Whether an upstream stage's output is there to read."""

    def prompt_tokens(self) -> pl.Series:
        """Each prompt's tokens, by prompt id (written with the activation examples)."""

    @property
    def embedder(self) -> Embedder: ...

    def embed(self, stage: str, total: int | None = None) -> EmbedFunction:
        """The embedder's ``embed``, reporting progress for ``stage`` over ``total`` texts."""


@dataclass(frozen=True)
class Stage:
    """A stage's declaration.

    ``reads`` are the stages whose outputs it needs; ``optional_reads`` those it uses when their
    output exists. ``config`` lists the config keys (``"activations"``, ``"embedding.model"``) its
    output depends on: they go into its fingerprint, as do its version, the sae_id, the
    fingerprints of what it reads and its plan's ``key``. ``settings`` lists the keys it reads that
    never change its output (where the work runs: ``"decoder.device"``). A stage can read only the
    config keys it declared in one of the two: nothing silently escapes the fingerprint.
    """

    name: str
    output: str
    version: int
    plan: Callable[[StageContext], Plan]
    reads: tuple[str, ...] = ()
    optional_reads: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    extra_outputs: tuple[str, ...] = ()
    description: str = ""
