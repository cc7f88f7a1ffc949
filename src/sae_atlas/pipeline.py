"""The pipeline runner: the one place that orders stages, times them, skips unchanged work and
writes outputs.

It knows stages only through their declarations (:class:`sae_atlas.stage.Stage`, registered in
:mod:`sae_atlas.stages`). For each stage, in an order derived from what each reads, it

1. checks that the stage outputs it reads exist (else: skipped or failed, with one line);
2. asks the stage's plan for its fingerprint material and computes the fingerprint from the
   stage's version, the sae_id, the config keys it declared, the fingerprints of the outputs it
   reads and the plan's key; a stage whose output's sidecar carries that fingerprint is skipped
   (unless ``force``);
3. runs the plan, collecting malformed-input problems instead of failing, and writes the product
   atomically (temp file + rename) together with a ``<name>.parquet.metadata.json`` sidecar
   derived from what was written.

A stage whose configured input turned out unusable removes its previous output (and so does every
stage that reads it), so a run never serves results of an input it could not read.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from sae_atlas import __version__, layout
from sae_atlas.config import AtlasConfig, ExecutionConfig
from sae_atlas.devices import DeviceError, check_device
from sae_atlas.embedding import Embedder
from sae_atlas.engine import Engine, LocalEngine
from sae_atlas.problems import Problem, Problems
from sae_atlas.sources import decoder, delphi
from sae_atlas.sources import runs as source_readers
from sae_atlas.stage import EmbedFunction, Parts, Product, Skip, Stage, Unusable, digest, fingerprint_files
from sae_atlas.stages import REGISTERED


class PipelineError(RuntimeError):
    """A run cannot go on (e.g. ``--only`` names an unknown stage, or declarations contradict)."""


def order_stages(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` in an order where every stage comes after the stages it reads; registration order
    breaks ties. Raises :class:`PipelineError` on a duplicate name, an unknown read or a cycle."""
    by_name: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in by_name:
            raise PipelineError(f"two stages are called {stage.name!r}")
        by_name[stage.name] = stage
    for stage in stages:
        unknown = [name for name in (*stage.reads, *stage.optional_reads) if name not in by_name]
        if unknown:
            raise PipelineError(f"stage {stage.name!r} reads {', '.join(unknown)}, which no stage writes")
    ordered: list[Stage] = []
    placed: set[str] = set()
    while len(ordered) < len(stages):
        ready = [
            stage
            for stage in stages
            if stage.name not in placed and all(name in placed for name in (*stage.reads, *stage.optional_reads))
        ]
        if not ready:
            waiting = ", ".join(stage.name for stage in stages if stage.name not in placed)
            raise PipelineError(f"stages read each other in a cycle: {waiting}")
        ordered.append(ready[0])
        placed.add(ready[0].name)
    return ordered


STAGES = tuple(stage.name for stage in order_stages(REGISTERED))
OUTPUTS = {stage.name: stage.output for stage in REGISTERED}


@dataclass
class StageOutcome:
    """What happened to one stage in one run."""

    name: str
    status: str  # "ran", "unchanged", "skipped" or "failed"
    reason: str = ""
    rows: int | None = None
    seconds: float = 0.0
    statistics: dict = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)
    notes: list[str] = field(default_factory=list)
    output: Path | None = None
    removed: bool = False  # the previous output was removed as stale

    def to_dict(self) -> dict:
        return {
            "stage": self.name,
            "status": self.status,
            "reason": self.reason,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "output": str(self.output) if self.output else None,
            "removed_previous_output": self.removed,
            "statistics": self.statistics,
            "problems": self.problems.summary(),
            "notes": self.notes,
        }


@dataclass
class RunReport:
    """Every stage's outcome, in pipeline order."""

    output_dir: Path
    outcomes: list[StageOutcome]
    seconds: float

    @property
    def problem_count(self) -> int:
        return len({(p.file, p.line, p.message) for outcome in self.outcomes for p in outcome.problems})

    def to_dict(self) -> dict:
        return {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sae_atlas_version": __version__,
            "output_dir": str(self.output_dir),
            "seconds": round(self.seconds, 3),
            "problems": self.problem_count,
            "stages": [outcome.to_dict() for outcome in self.outcomes],
        }


Logger = Callable[[str], None]
ProgressReporter = Callable[[str, int, int], None]


class RunContext:
    """The inputs every stage shares (runs, sae_id, embedding model), computed once per run."""

    def __init__(
        self,
        config: AtlasConfig,
        *,
        strict: bool,
        stages: Sequence[Stage],
        embedder: Embedder | None,
        progress: ProgressReporter | None,
        engine: Engine | None = None,
    ):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.strict = strict
        self.progress = progress
        self._stages = {stage.name: stage for stage in stages}
        self._embedder = embedder
        self._discovery: Problems | None = None
        self._runs: list[delphi.DelphiRun] | None = None
        self._listed = False
        self._sae_id: str | None = None
        self._width: tuple[int | None] | None = None
        self._engine: Engine | None = engine

    # -- the engine -----------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.config.execution)
        return self._engine

    def start_engine(self) -> None:
        """Start (or connect) the engine; a cluster that does not answer stops the run here,
        before anything is written."""
        try:
            self.engine.start()
        except (ConnectionError, ImportError, ValueError) as error:
            raise PipelineError(str(error)) from None

    def check_devices(self) -> None:
        """Every configured device is a torch device this run can use: checked before anything is
        read, not when a stage first needs it. On Ray the work runs on the cluster's devices, so
        only the spelling is checked here."""
        here = isinstance(self.engine, LocalEngine)
        settings = [("embedding.device", self.config.embedding.device)]
        if self.config.decoder is not None:
            settings.append(("decoder.device", self.config.decoder.device))
        try:
            for key, device in settings:
                check_device(device, key, available_here=here)
        except DeviceError as error:
            raise PipelineError(str(error)) from None

    def map(self, function: Callable, tasks: Sequence) -> Iterator:
        return self.engine.map(function, tasks)

    def map_shared(self, function: Callable, shared, tasks: Sequence, *, gpus: float = 0) -> Iterator:
        return self.engine.map_shared(function, shared, tasks, gpus=gpus)

    def prefetch_embeddings(self, stage: str, calls: Iterable[Sequence[str]]) -> None:
        if not self.engine.batch_inference:
            return  # texts are embedded as the stage streams them

        def callback(done: int, count: int) -> None:
            self.progress(stage, done, count)

        self.embedder.prefetch(calls, progress=callback if self.progress else None)

    def close(self) -> None:
        """Stop the engine's workers (a new run starts them again)."""
        if self._engine is not None:
            self._engine.close()

    # -- delphi runs ----------------------------------------------------------------------------

    def _describe(self) -> None:
        if self._runs is not None:
            return
        self._discovery = Problems(strict=self.strict)
        self._runs = [source_readers.describe_run(source, self._discovery) for source in self.config.sources]
        self._sae_id = delphi.resolve_sae_id(self.config.sae_id, self._runs, self._discovery)

    def runs(self) -> list[delphi.DelphiRun]:
        self._describe()
        return self._runs

    def listed_runs(self) -> list[delphi.DelphiRun]:
        if not self._listed:
            for run in self.runs():
                source_readers.list_run_files(run, self._discovery, width=self.sae_width)
            self._listed = True
        return self._runs

    @property
    def sae_id(self) -> str:
        self._describe()
        return self._sae_id

    @property
    def sae_width(self) -> int | None:
        """The SAE's number of latents, as the decoder's files or the sae_id declare it (None when
        nothing says): latents beyond it are refused wherever they appear."""
        if self._width is None:
            width = None
            if self.config.decoder is not None:
                width = decoder.declared_width(self.config.decoder.path, sae_id=self.sae_id)
            self._width = (width or decoder.width_from_text(self.sae_id),)
        return self._width[0]

    def runs_table(self) -> pl.DataFrame:
        runs = self.runs()
        columns = ("data_source", "llm_explainer", "llm_scorer", "explanation_method")
        return pl.DataFrame(
            {
                "data_source": [run.name for run in runs],
                "llm_explainer": [run.explainer for run in runs],
                "llm_scorer": [run.scorer for run in runs],
                "explanation_method": [run.explanation_method for run in runs],
            },
            schema=dict.fromkeys(columns, pl.String),
        )

    def discovery_problems(self, under: str) -> list[Problem]:
        """Discovery problems about one part of the run directories ("scores", "explanations")."""
        self.listed_runs()
        other = "explanations" if under == "scores" else "scores"
        picked = []
        for problem in self._discovery:
            parts = Path(problem.file).parts
            if other in parts and under not in parts:
                continue
            picked.append(problem)
        return picked

    # -- outputs --------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.output_dir / name

    def output_of(self, stage: str) -> Path:
        return self.output_dir / self._stages[stage].output

    def has(self, stage: str) -> bool:
        return self.output_of(stage).exists()

    def read(self, stage: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.output_of(stage), columns=columns)

    def read_batches(self, stage: str, columns: list[str] | None = None, rows: int = 65_536) -> Iterator[pl.DataFrame]:
        return layout.read_in_row_groups(self.output_of(stage), columns, rows)

    def prompt_tokens(self) -> pl.Series:
        return layout.read_prompt_tokens(self.output_dir)

    def fingerprint_of(self, stage: str) -> str:
        """The fingerprint of a stage's output: its sidecar's, else (a file written by another
        tool) one of the file itself."""
        output = self.output_of(stage)
        sidecar = layout.read_sidecar(output)
        if sidecar and sidecar.get("fingerprint"):
            return sidecar["fingerprint"]
        return digest(fingerprint_files([output]))

    # -- embedding ------------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            settings, execution = self.config.embedding, self.config.execution
            encoder = self.engine.text_encoder(execution)
            self._embedder = Embedder(
                settings.model,
                batch_size=settings.batch_size,
                # on a cluster the model runs where the actors are: on their GPUs when they have one
                device="cuda" if encoder is not None and execution.gpus_per_actor else settings.device,
                quantize=settings.quantize,
                cache_dir=self.config.embedding_cache_dir,
                encoder=encoder,
            )
        return self._embedder

    def embed(self, stage: str, total: int | None = None) -> EmbedFunction:
        """``embed`` for a stage, reporting progress over all its calls (``total`` texts)."""
        finished = 0

        def embed(texts):
            nonlocal finished
            grand_total = total or len(texts)
            before = finished

            def callback(done: int, count: int) -> None:
                self.progress(stage, before + round(done / max(count, 1) * len(texts)), grand_total)

            vectors = self.embedder.embed(texts, progress=callback if self.progress else None)
            finished += len(texts)
            if self.progress:
                self.progress(stage, finished, grand_total)
            return vectors

        return embed


class FencedConfig:
    """The part of the config one stage declared (``Stage.config`` and ``Stage.settings``): any
    other key read through it raises, as an undeclared stage output does."""

    def __init__(self, value, stage: str, allowed: tuple[str, ...], prefix: str = ""):
        self._value = value
        self._stage = stage
        self._allowed = allowed
        self._prefix = prefix

    def __getattr__(self, name: str):
        key = f"{self._prefix}.{name}" if self._prefix else name
        if any(key == allowed or key.startswith(allowed + ".") for allowed in self._allowed):
            return getattr(self._value, name)  # declared whole
        if not any(allowed.startswith(key + ".") for allowed in self._allowed):
            raise PipelineError(f"stage {self._stage!r} reads config key {key!r} without declaring it")
        value = getattr(self._value, name)  # a section some of whose keys are declared
        return None if value is None else FencedConfig(value, self._stage, self._allowed, key)


class StageView:
    """A stage's window on the run: the shared context, with reads limited to the stage outputs
    and config keys it declared, and a scratch directory of its own."""

    def __init__(self, context: RunContext, stage: Stage):
        self._context = context
        self._stage = stage
        self._readable = {*stage.reads, *stage.optional_reads}
        self._scratch: Path | None = None
        self.config = FencedConfig(context.config, stage.name, (*stage.config, *stage.settings))

    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = layout.temporary_path(self._context.output_dir / f"{self._stage.name}.scratch")
            self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    def remove_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    def _check(self, stage: str) -> None:
        if stage not in self._readable:
            raise PipelineError(f"stage {self._stage.name!r} reads {stage!r} without declaring it")

    def has(self, stage: str) -> bool:
        self._check(stage)
        return self._context.has(stage)

    def read(self, stage: str, columns: list[str] | None = None) -> pl.DataFrame:
        self._check(stage)
        return self._context.read(stage, columns)

    def read_batches(self, stage: str, columns: list[str] | None = None, rows: int = 65_536) -> Iterator[pl.DataFrame]:
        self._check(stage)
        return self._context.read_batches(stage, columns, rows)


def make_engine(execution: ExecutionConfig) -> Engine:
    """The engine ``[execution]`` names (not started)."""
    if execution.engine == "ray":
        try:
            from sae_atlas.ray_engine import RayEngine
        except ImportError as error:
            raise ImportError(f'engine = "ray" needs Ray: pip install "sae-atlas[ray]" ({error})') from None
        return RayEngine(execution)
    return LocalEngine()


def config_value(config: AtlasConfig, key: str):
    """The value at a dotted config key (``"embedding.model"``), None when unset."""
    value = config.public_dict()
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class Pipeline:
    """Runs the registered stages for one config.

    >>> Pipeline(load_config("sae-atlas.toml")).run()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: AtlasConfig,
        *,
        strict: bool = False,
        force: bool = False,
        embedder: Embedder | None = None,
        log: Logger | None = None,
        progress: ProgressReporter | None = None,
        stages: Sequence[Stage] = REGISTERED,
        engine: Engine | None = None,
    ):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.strict = strict
        self.force = force
        self.log = log or (lambda message: None)
        self.stages = order_stages(stages)
        self._by_name = {stage.name: stage for stage in self.stages}
        self.context = RunContext(
            config, strict=strict, stages=self.stages, embedder=embedder, progress=progress, engine=engine
        )

    @property
    def embedder(self) -> Embedder:
        return self.context.embedder

    @property
    def sae_id(self) -> str:
        return self.context.sae_id

    def output_path(self, stage: str) -> Path:
        return self.output_dir / self._by_name[stage].output

    # -- one stage ------------------------------------------------------------------------------

    def _remove_outputs(self, stage: Stage) -> bool:
        removed = layout.remove_output(self.output_dir / stage.output)
        for name in stage.extra_outputs:
            removed |= layout.remove_output(self.output_dir / name)
        return removed

    def _upstream_missing(self, stage: Stage, outcomes: dict[str, StageOutcome]) -> StageOutcome | None:
        """The outcome of a stage that cannot run because an output it reads is missing."""
        for name in stage.reads:
            if self.context.has(name):
                continue
            needed = self._by_name[name].output
            upstream = outcomes.get(name)
            if upstream is None:
                return StageOutcome(
                    stage.name, "failed", f"needs {needed}, which has not been produced (run stage {name!r})"
                )
            removed = upstream.removed and self._remove_outputs(stage)
            return StageOutcome(
                stage.name,
                "skipped",
                f"needs {needed}: {name} {upstream.status} ({upstream.reason})",
                notes=["previous output removed: the output it was built from is gone"] if removed else [],
                removed=upstream.removed,
            )
        return None

    def _unusable(self, stage: Stage, skip: Unusable, problems: Problems, started: float) -> StageOutcome:
        removed = self._remove_outputs(stage)
        return StageOutcome(
            stage.name,
            "skipped",
            skip.reason,
            problems=problems,
            seconds=time.perf_counter() - started,
            notes=["previous output removed: its input can no longer be used"] if removed else [],
            removed=True,
        )

    def _fingerprint(self, stage: Stage, plan_key: dict) -> tuple[str, dict]:
        key = {
            "stage": stage.name,
            "version": stage.version,
            "sae_id": self.context.sae_id,
            "config": {name: config_value(self.config, name) for name in stage.config},
            "upstream": {
                name: self.context.fingerprint_of(name) if self.context.has(name) else None
                for name in (*stage.reads, *stage.optional_reads)
            },
            "plan": plan_key,
        }
        return digest(key), key

    def _is_current(self, stage: Stage, fingerprint: str) -> dict | None:
        """The previous sidecar when the stage's outputs are all there with this fingerprint."""
        output = self.output_dir / stage.output
        previous = layout.read_sidecar(output)
        if self.force or previous is None or previous.get("fingerprint") != fingerprint or not output.exists():
            return None
        if not all((self.output_dir / name).exists() for name in stage.extra_outputs):
            return None
        return previous

    def _run_stage(self, stage: Stage, outcomes: dict[str, StageOutcome]) -> StageOutcome:
        missing = self._upstream_missing(stage, outcomes)
        if missing is not None:
            return missing
        view = StageView(self.context, stage)
        try:
            return self._plan_and_run(stage, view)
        finally:
            view.remove_scratch()

    def _plan_and_run(self, stage: Stage, view: StageView) -> StageOutcome:
        problems = Problems(strict=self.strict)
        started = time.perf_counter()
        try:
            plan = stage.plan(view)
        except Unusable as skip:
            return self._unusable(stage, skip, problems, started)
        except Skip as skip:
            return StageOutcome(stage.name, "skipped", skip.reason)
        fingerprint, key = self._fingerprint(stage, plan.key)
        previous = self._is_current(stage, fingerprint)
        if previous is not None:
            return StageOutcome(
                stage.name,
                "unchanged",
                "inputs, config and stage version unchanged",
                rows=previous.get("rows"),
                output=self.output_dir / stage.output,
            )
        problems.items.extend(plan.problems)
        try:
            product = plan.execute(problems)
            # A streamed product does its work while being written: it may still find its input
            # unusable then, and nothing of it is published.
            output, seconds, rows = self._write(
                stage, product, fingerprint=fingerprint, key=key, started=started, problems=problems
            )
        except Unusable as skip:
            return self._unusable(stage, skip, problems, started)
        except Skip as skip:
            return StageOutcome(
                stage.name, "skipped", skip.reason, problems=problems, seconds=time.perf_counter() - started
            )
        return StageOutcome(
            stage.name,
            "ran",
            rows=rows,
            seconds=seconds,
            statistics=product.statistics,
            problems=problems,
            notes=product.notes,
            output=output,
        )

    def _write_data(self, stage: Stage, product: Product) -> None:
        """The stage's output and extras, each published atomically once all of it is written."""
        compression = self.config.output.compression
        output = self.output_dir / stage.output
        if isinstance(product.data, pl.DataFrame | pa.Table):
            layout.write_parquet(output, product.data, compression=compression, row_group_size=product.row_group_size)
        else:
            streams = {
                stage.output: layout.ParquetStream(
                    output, compression=compression, schema=product.schema, row_group_size=product.row_group_size
                )
            }
            try:
                for part in product.data:
                    if not isinstance(part, Parts):
                        streams[stage.output].write(part)
                        continue
                    if part.output is not None:
                        streams[stage.output].write(part.output)
                    for name, extra in part.extra.items():
                        if name not in streams:
                            streams[name] = layout.ParquetStream(
                                self.output_dir / name, compression=compression, schema=product.schemas.get(name)
                            )
                        streams[name].write(extra)
                for name, schema in product.schemas.items():  # streamed outputs that got no part
                    streams.setdefault(
                        name, layout.ParquetStream(self.output_dir / name, compression=compression, schema=schema)
                    )
                # Extras first: once the stage's output is in place, everything it comes with is.
                for name in sorted(streams, key=lambda name: name == stage.output):
                    streams[name].commit()
            finally:
                for stream in streams.values():
                    stream.abort()
        for name, table in product.extra.items():
            layout.write_parquet(self.output_dir / name, table, compression=compression)

    def _write(
        self, stage: Stage, product: Product, *, fingerprint: str, key: dict, started: float, problems: Problems
    ) -> tuple[Path, float, int]:
        """Write the stage output, its extras and its sidecar; return the path, the stage's seconds
        (the write included: streamed stages do their work while being written) and the rows."""
        output = self.output_dir / stage.output
        self._write_data(stage, product)
        seconds = time.perf_counter() - started
        rows = pq.ParquetFile(output).metadata.num_rows
        schema = pl.read_parquet_schema(output)
        layout.write_sidecar(
            output,
            {
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "sae_atlas_version": __version__,
                "stage": stage.name,
                "stage_version": stage.version,
                "sae_id": self.context.sae_id,
                "rows": rows,
                "schema": {name: str(dtype) for name, dtype in schema.items()},
                "config": self.config.public_dict(),
                "fingerprint": fingerprint,
                "inputs": key,
                "timing": {"seconds": round(seconds, 3)},
                "statistics": product.statistics,
                "problems": problems.summary(),
                "notes": product.notes,
            },
        )
        return output, seconds, rows

    # -- a whole run ----------------------------------------------------------------------------

    def written_files(self) -> list[str]:
        """Every file and scratch directory a run writes, relative to the output directory."""
        outputs = [stage.output for stage in self.stages]
        sidecars = [name + layout.SIDECAR_SUFFIX for name in outputs]
        return [*outputs, *sidecars, layout.RUN_REPORT, *(f"{stage.name}.scratch" for stage in self.stages)]

    def run(self, only: Iterable[str] | None = None) -> RunReport:
        """Run every stage (or only those named), in pipeline order, and write ``run_report.json``."""
        only = list(only or [])
        unknown = sorted(set(only) - set(self._by_name))
        if unknown:
            raise PipelineError(
                f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(stage.name for stage in self.stages)}"
            )
        started = time.perf_counter()
        self.context.check_devices()
        self.context.start_engine()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        removed = layout.remove_stale_temporaries(
            self.output_dir, self.written_files(), caches=[self.config.embedding_cache_dir]
        )
        if removed:
            self.log(f"removed {len(removed)} temporary file(s) left by interrupted runs")
        outcomes: dict[str, StageOutcome] = {}
        try:
            for stage in self.stages:
                if only and stage.name not in only:
                    continue
                self.log(f"stage {stage.name} …")
                outcome = self._run_stage(stage, outcomes)
                outcomes[stage.name] = outcome
                self.log(describe(outcome))
        finally:
            self.context.close()
        report = RunReport(self.output_dir, list(outcomes.values()), time.perf_counter() - started)
        layout.write_atomic_bytes(
            self.output_dir / layout.RUN_REPORT, orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2)
        )
        return report


def describe(outcome: StageOutcome) -> str:
    """One line about a stage's outcome."""
    if outcome.status == "ran":
        line = f"{outcome.name}: wrote {outcome.rows:,} rows in {outcome.seconds:.1f} s"
    elif outcome.status == "unchanged":
        line = (
            f"{outcome.name}: unchanged, skipped ({outcome.rows:,} rows)"
            if outcome.rows is not None
            else f"{outcome.name}: unchanged, skipped"
        )
    else:
        line = f"{outcome.name}: {outcome.status}: {outcome.reason}"
    if len(outcome.problems):
        line += f"; {len(outcome.problems)} input problem(s)"
    return line


def iter_problems(report: RunReport) -> Iterator[str]:
    """Each distinct problem of a run, once, as a one-line message."""
    seen = set()
    for outcome in report.outcomes:
        for problem in outcome.problems:
            marker = (problem.file, problem.line, problem.message)
            if marker not in seen:
                seen.add(marker)
                yield str(problem)
