"""The pipeline runner: the one place that reads inputs, times stages, skips unchanged work and
writes outputs.

Stages (``sae_atlas.stages``) are pure functions over tables. For each stage the runner

1. checks that its optional input is configured (else: skipped, with one line);
2. computes a fingerprint of its input files (path, size, mtime), the config keys it depends on,
   the fingerprints of the stage outputs it reads and its own version, and skips the stage when the
   output's sidecar already carries that fingerprint (unless ``force``);
3. reads the raw inputs through the readers (``sae_atlas.sources``), collecting malformed-input
   problems instead of failing, calls the stage, and writes the result atomically (temp file +
   rename) together with a ``<name>.parquet.metadata.json`` sidecar derived from what was written.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from sae_atlas import __version__
from sae_atlas.config import AtlasConfig
from sae_atlas.embedding import Embedder
from sae_atlas.problems import Problems
from sae_atlas.sources import activations as activation_source
from sae_atlas.sources import decoder as decoder_source
from sae_atlas.sources import delphi
from sae_atlas.stages import (
    activation_embeddings,
    activation_examples,
    activation_similarity,
    decoder_similarity,
    explanation_embeddings,
    features,
    scores,
)
from sae_atlas.vector_storage import activation_embeddings_from_frame

STAGES = (
    "activation_examples",
    "decoder_similarity",
    "scores",
    "explanation_embeddings",
    "features",
    "activation_embeddings",
    "activation_similarity",
)
OUTPUTS = {
    "activation_examples": "activation_examples.parquet",
    "decoder_similarity": "stages/decoder_similarity.parquet",
    "scores": "stages/scores.parquet",
    "explanation_embeddings": "explanation_embeddings.parquet",
    "features": "features.parquet",
    "activation_embeddings": "activation_embeddings.parquet",
    "activation_similarity": "activation_example_similarity.parquet",
}
# Bump a stage's version whenever its output for the same input changes.
STAGE_VERSIONS = {
    "activation_examples": 1,
    "decoder_similarity": 1,
    "scores": 1,
    "explanation_embeddings": 1,
    "features": 1,
    "activation_embeddings": 1,
    "activation_similarity": 1,
}
PROMPTS_OUTPUT = "stages/prompts.parquet"
SIDECAR_SUFFIX = ".metadata.json"
REPORT_NAME = "run_report.json"
ACTIVATION_ROW_GROUP = 16_384


class PipelineError(RuntimeError):
    """A run cannot go on (e.g. ``--only`` asks for a stage whose inputs were never produced)."""


def read_prompt_tokens(output_dir: Path) -> pl.Series:
    """Each prompt's tokens, indexed by prompt id: from stages/prompts.parquet, else rebuilt from
    activation_examples.parquet (an output directory written by another tool)."""
    path = Path(output_dir) / PROMPTS_OUTPUT
    if path.exists():
        return pl.read_parquet(path).sort("prompt_id")["prompt_tokens"]
    examples = pl.scan_parquet(Path(output_dir) / OUTPUTS["activation_examples"])
    unique = examples.select("prompt_id", "prompt_tokens").unique("prompt_id").collect()
    size = int(unique["prompt_id"].max() or -1) + 1
    return (
        pl.DataFrame({"prompt_id": pl.arange(0, size, eager=True).cast(pl.UInt32)})
        .join(unique, on="prompt_id", how="left")
        .sort("prompt_id")["prompt_tokens"]
    )


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + SIDECAR_SUFFIX)


def read_sidecar(output: Path) -> dict | None:
    """The sidecar of ``output``, or None when missing or unreadable."""
    try:
        return orjson.loads(sidecar_path(output).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _digest(value) -> str:
    return hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def fingerprint_files(paths: Iterable[Path]) -> dict:
    """Size and modification time of every file: cheap, and changes whenever a file is rewritten."""
    entries = []
    for path in sorted({Path(path) for path in paths}):
        try:
            stat = path.stat()
        except OSError:
            entries.append((str(path), None, None))
            continue
        entries.append((str(path), stat.st_size, stat.st_mtime_ns))
    return {"files": len(entries), "bytes": sum(entry[1] or 0 for entry in entries), "digest": _digest(entries)}


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _arrow(part: pl.DataFrame | pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    return part.to_arrow() if isinstance(part, pl.DataFrame) else part


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
    that of its first part.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        if isinstance(data, pl.DataFrame):
            data.write_parquet(temporary, compression=compression, statistics=True, row_group_size=row_group_size)
        elif isinstance(data, pa.Table):
            pq.write_table(data, temporary, compression=compression, row_group_size=row_group_size)
        else:
            writer = None
            try:
                for part in data:
                    part = _arrow(part)
                    if writer is None:
                        writer = pq.ParquetWriter(temporary, schema or part.schema, compression=compression)
                    if isinstance(part, pa.Table):
                        writer.write_table(part.cast(writer.schema), row_group_size=row_group_size)
                    else:
                        writer.write_batch(part, row_group_size=row_group_size)
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                raise ValueError(f"{path}: nothing to write and no schema given")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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

    def to_dict(self) -> dict:
        return {
            "stage": self.name,
            "status": self.status,
            "reason": self.reason,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "output": str(self.output) if self.output else None,
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


@dataclass
class _Product:
    """A stage's result before it is written."""

    data: object
    rows: int
    statistics: dict
    schema: pa.Schema | None = None
    row_group_size: int | None = None
    extra: dict[str, pa.Table | pl.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Skip(Exception):
    def __init__(self, reason: str, status: str = "skipped"):
        super().__init__(reason)
        self.reason, self.status = reason, status


Logger = Callable[[str], None]


class Pipeline:
    """Runs the stages for one config.

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
        progress: Callable[[str, int, int], None] | None = None,
    ):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.strict = strict
        self.force = force
        self.log = log or (lambda message: None)
        self.progress = progress
        self._embedder = embedder
        self._discovery: Problems | None = None
        self._runs: list[delphi.DelphiRun] | None = None
        self._listed = False
        self._sae_id: str | None = None

    # -- shared inputs --------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            settings = self.config.embedding
            self._embedder = Embedder(
                settings.model,
                batch_size=settings.batch_size,
                device=settings.device,
                quantize=settings.quantize,
                cache_dir=self.config.embedding_cache_dir,
            )
        return self._embedder

    def _describe(self) -> None:
        if self._runs is not None:
            return
        self._discovery = Problems(strict=self.strict)
        self._runs = [delphi.describe_run(source, self._discovery) for source in self.config.sources]
        self._sae_id = delphi.resolve_sae_id(self.config.sae_id, self._runs, self._discovery)

    @property
    def runs(self) -> list[delphi.DelphiRun]:
        """Every source's run, described from its config (no directory walk)."""
        self._describe()
        return self._runs

    def listed_runs(self) -> list[delphi.DelphiRun]:
        """The runs with their per-latent files listed (walked once, on first use)."""
        if not self._listed:
            for run in self.runs:
                delphi.list_run_files(run, self._discovery)
            self._listed = True
        return self._runs

    @property
    def sae_id(self) -> str:
        self._describe()
        return self._sae_id

    def runs_table(self) -> pl.DataFrame:
        """Every source in config order with the names the outputs use."""
        return pl.DataFrame(
            {
                "data_source": [run.name for run in self.runs],
                "llm_explainer": [run.explainer for run in self.runs],
                "llm_scorer": [run.scorer for run in self.runs],
                "explanation_method": [run.explanation_method for run in self.runs],
            },
            schema={name: pl.String for name in ("data_source", "llm_explainer", "llm_scorer", "explanation_method")},
        )

    def _discovery_problems(self, under: str) -> list:
        """Discovery problems about one part of the run directories ("scores", "explanations")."""
        self.listed_runs()
        picked = []
        for problem in self._discovery:
            parts = Path(problem.file).parts
            other = "explanations" if under == "scores" else "scores"
            if other in parts and under not in parts:
                continue
            picked.append(problem)
        return picked

    def output_path(self, stage: str) -> Path:
        return self.output_dir / OUTPUTS[stage]

    # -- stage plans: (fingerprint inputs, executor) --------------------------------------------

    def _plan_activation_examples(self):
        settings = self.config.activations
        if settings is None:
            raise _Skip("no [activations] in the config")
        path = Path(settings.path)
        if settings.format == "jsonl":
            files = [path / "activations.jsonl", path / "prompts.json"]
        else:
            files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
            if settings.tokenizer:
                files.append(Path(settings.tokenizer))
        key = {
            "inputs": fingerprint_files(files),
            "activations": settings.model_dump(mode="json"),
            "sae_id": self.sae_id,
        }

        def execute(problems: Problems) -> _Product:
            records = activation_source.read_activations(settings.format, path, settings.tokenizer, problems)
            statistics = activation_examples.statistics(records)
            return _Product(
                data=activation_examples.build_activation_examples(records, self.sae_id, ACTIVATION_ROW_GROUP),
                rows=len(records),
                statistics=statistics,
                schema=activation_examples.ARROW_SCHEMA,
                row_group_size=ACTIVATION_ROW_GROUP,
                extra={PROMPTS_OUTPUT: activation_examples.build_prompts(records)},
                notes=records.notes,
            )

        return key, execute

    def _plan_decoder_similarity(self):
        settings = self.config.decoder
        if settings is None:
            raise _Skip("no [decoder] in the config")
        path = Path(settings.path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        key = {"inputs": fingerprint_files(files), "top_k": settings.top_k, "sae_id": self.sae_id}

        def execute(problems: Problems) -> _Product:
            try:
                weights = decoder_source.read_decoder(path, sae_id=self.sae_id)
            except decoder_source.DecoderError as error:
                problems.add(error.path, error.reason)
                raise _Skip(f"decoder weights unusable ({error})") from None
            device = _torch_device(settings.device)
            ids, cosines = decoder_similarity.top_k_neighbours(weights.weights, settings.top_k, device=device)
            table = decoder_similarity.neighbours_table(ids, cosines)
            statistics = {
                "d_sae": weights.d_sae,
                "d_model": int(weights.weights.shape[1]),
                "format": weights.format,
                "top_k": int(ids.shape[1]),
                "device": device,
            }
            return _Product(data=table, rows=table.height, statistics=statistics, notes=weights.notes)

        return key, execute

    def _plan_scores(self):
        runs_with_files = self.listed_runs()
        files = [entry.path for run in runs_with_files for entries in run.scores.values() for entry in entries]
        files += [run.path / "run_config.json" for run in runs_with_files]
        runs = self.runs_table()
        key = {"inputs": fingerprint_files(files), "runs": runs.to_dicts()}

        def execute(problems: Problems) -> _Product:
            parts: dict[str, list[pl.DataFrame]] = {}
            for run in runs_with_files:
                records = delphi.read_score_records(run, problems)
                for name in ("files", "classifier", "embedding", "simulation", "intruder"):
                    parts.setdefault(name, []).append(
                        getattr(records, name).with_columns(data_source=pl.lit(run.name, pl.String))
                    )
            tables = {name: pl.concat(frames) for name, frames in parts.items()}
            table = scores.build_scores(**tables, runs=runs)
            statistics = {
                "score_files_read": tables["files"].height,
                "records": sum(tables[name].height for name in ("classifier", "embedding", "simulation", "intruder")),
                "rows_by_method": dict(table.group_by(pl.col("method").cast(pl.String)).len().iter_rows()),
                "rows_without_score": int(table["score"].is_null().sum()),
            }
            notes = [note for run in runs_with_files for note in run.notes]
            return _Product(data=table, rows=table.height, statistics=statistics, notes=notes)

        return key, execute

    def _plan_explanation_embeddings(self):
        runs_with_files = self.listed_runs()
        files = [entry.path for run in runs_with_files for entry in run.explanations]
        files += [run.path / "run_config.json" for run in runs_with_files]
        # Latents scored without an explanation file get a sentinel row: the score listing matters.
        scored = sorted(
            {
                (run.name, entry.latent)
                for run in runs_with_files
                for entries in run.scores.values()
                for entry in entries
            }
        )
        settings = self.config.embedding
        key = {
            "inputs": fingerprint_files(files),
            "scored_latents": _digest(scored),
            "runs": self.runs_table().to_dicts(),
            "model": settings.model,
            "quantize": settings.quantize,
            "sae_id": self.sae_id,
        }

        def execute(problems: Problems) -> _Product:
            frames = []
            for run in runs_with_files:
                frames.append(
                    delphi.read_explanations(run, problems).with_columns(
                        data_source=pl.lit(run.name, pl.String), llm_explainer=pl.lit(run.explainer, pl.String)
                    )
                )
            explanations = pl.concat(frames)
            before = self.embedder.stats.to_dict()
            table, statistics = explanation_embeddings.build_explanation_embeddings(
                explanations, sae_id=self.sae_id, embed=self._embed_with_progress("explanation_embeddings")
            )
            after = self.embedder.stats.to_dict()
            statistics |= {
                "model": self.config.embedding.model,
                "texts_from_cache": after["from_cache"] - before["from_cache"],
                "texts_encoded": after["embedded"] - before["embedded"],
            }
            return _Product(data=table, rows=table.height, statistics=statistics)

        return key, execute

    def _plan_features(self):
        upstream = {name: self._upstream_fingerprint(name) for name in ("scores", "explanation_embeddings")}
        decoder_output = self.output_path("decoder_similarity")
        decoder_used = self.config.decoder is not None and decoder_output.exists()
        upstream["decoder_similarity"] = self._upstream_fingerprint("decoder_similarity") if decoder_used else None
        runs = self.runs_table()
        key = {"upstream": upstream, "runs": runs.to_dicts(), "sae_id": self.sae_id}

        def execute(problems: Problems) -> _Product:
            table, statistics = features.build_features(
                explanations=pl.read_parquet(self.output_path("explanation_embeddings")),
                scores=pl.read_parquet(self.output_path("scores")),
                decoder=pl.read_parquet(decoder_output) if decoder_used else None,
                runs=runs,
            )
            table = table.with_columns(pl.lit(self.sae_id).cast(pl.Categorical()).alias("sae_id"))
            return _Product(data=table, rows=table.height, statistics=statistics)

        return key, execute

    def _plan_activation_embeddings(self):
        if self.config.activations is None and not self.output_path("activation_examples").exists():
            raise _Skip("no [activations] in the config")
        sampling, settings = self.config.sampling, self.config.embedding
        dtype = self.config.output.embedding_dtype
        key = {
            "upstream": {"activation_examples": self._upstream_fingerprint("activation_examples")},
            "sampling": sampling.model_dump(mode="json"),
            "model": settings.model,
            "quantize": settings.quantize,
            "embedding_dtype": dtype,
            "sae_id": self.sae_id,
        }

        def execute(problems: Problems) -> _Product:
            examples = pl.read_parquet(
                self.output_path("activation_examples"),
                columns=["feature_id", "prompt_id", "max_activation", "activation_pairs"],
            )
            windows = activation_embeddings.select_windows(
                examples,
                read_prompt_tokens(self.output_dir),
                quantiles=sampling.quantiles,
                per_quantile=sampling.per_quantile,
                window=sampling.window,
            )
            del examples
            statistics = activation_embeddings.statistics(windows)
            embed = self._embed_with_progress("activation_embeddings", total=windows.height)
            before = self.embedder.stats.to_dict()

            def parts():
                dimension = None
                for chunk in activation_embeddings.feature_chunks(windows):
                    part = activation_embeddings.embed_windows(chunk, sae_id=self.sae_id, embed=embed, dtype=dtype)
                    dimension = dimension or len(part["embeddings"][0][0])
                    yield part
                after = self.embedder.stats.to_dict()
                statistics.update(
                    model=settings.model,
                    quantize=settings.quantize,
                    dimension=dimension,
                    embedding_dtype=dtype,
                    texts_encoded=after["embedded"] - before["embedded"],
                    texts_from_cache=after["from_cache"] - before["from_cache"],
                    seconds_encoding=round(after["seconds_encoding"] - before["seconds_encoding"], 3),
                )

            empty = activation_embeddings.empty_table(dtype)
            return _Product(
                data=parts(), rows=statistics["features"], statistics=statistics, schema=empty.to_arrow().schema
            )

        return key, execute

    def _plan_activation_similarity(self):
        if self.config.activations is None and not self.output_path("activation_embeddings").exists():
            raise _Skip("no [activations] in the config")
        key = {
            "upstream": {"activation_embeddings": self._upstream_fingerprint("activation_embeddings")},
            "sae_id": self.sae_id,
        }

        def execute(problems: Problems) -> _Product:
            embeddings = activation_embeddings_from_frame(pl.read_parquet(self.output_path("activation_embeddings")))
            table = activation_similarity.pairwise_statistics(embeddings, sae_id=self.sae_id)
            counts = table["num_examples_sampled"]
            statistics = {
                "features": table.height,
                "features_with_fewer_than_2_examples": int((counts < 2).sum()),
                "stored_dtype": embeddings.dtype,
                "mean_of_mean_pairwise_similarity": table["mean_pairwise_similarity"].mean(),
            }
            return _Product(data=table, rows=table.height, statistics=statistics)

        return key, execute

    # -- machinery ------------------------------------------------------------------------------

    def _upstream_fingerprint(self, stage: str) -> str:
        sidecar = read_sidecar(self.output_path(stage))
        if sidecar is None or not self.output_path(stage).exists():
            raise _Skip(f"needs {OUTPUTS[stage]}, which has not been produced (run stage {stage!r})", status="failed")
        return sidecar["fingerprint"]

    def _embed_with_progress(self, stage: str, total: int | None = None):
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

    def _write(
        self, stage: str, product: _Product, *, fingerprint: str, key: dict, started: float, problems: Problems
    ) -> tuple[Path, float]:
        """Write the stage output, its extras and its sidecar; return the path and the stage's
        seconds (the write included: streamed stages do their work while being written)."""
        output = self.output_path(stage)
        compression = self.config.output.compression
        write_parquet(
            output, product.data, compression=compression, schema=product.schema, row_group_size=product.row_group_size
        )
        for name, table in product.extra.items():
            write_parquet(self.output_dir / name, table, compression=compression)
        seconds = time.perf_counter() - started
        schema = pl.read_parquet_schema(output)
        sidecar = {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sae_atlas_version": __version__,
            "stage": stage,
            "stage_version": STAGE_VERSIONS[stage],
            "sae_id": self.sae_id,
            "rows": pq.ParquetFile(output).metadata.num_rows,
            "schema": {name: str(dtype) for name, dtype in schema.items()},
            "config": self.config.public_dict(),
            "fingerprint": fingerprint,
            "inputs": key,
            "timing": {"seconds": round(seconds, 3)},
            "statistics": product.statistics,
            "problems": problems.summary(),
            "notes": product.notes,
        }
        write_atomic_bytes(sidecar_path(output), orjson.dumps(sidecar, option=orjson.OPT_INDENT_2))
        return output, seconds

    def _run_stage(self, stage: str) -> StageOutcome:
        problems = Problems(strict=self.strict)
        started = time.perf_counter()
        try:
            key, execute = getattr(self, f"_plan_{stage}")()
        except _Skip as skip:
            return StageOutcome(stage, skip.status, skip.reason)
        fingerprint = _digest({"stage": stage, "version": STAGE_VERSIONS[stage], **key})
        output = self.output_path(stage)
        previous = read_sidecar(output)
        if not self.force and output.exists() and previous and previous.get("fingerprint") == fingerprint:
            return StageOutcome(
                stage,
                "unchanged",
                "inputs, config and stage version unchanged",
                rows=previous.get("rows"),
                output=output,
            )
        if stage == "scores":
            problems.items.extend(self._discovery_problems("scores"))
        elif stage == "explanation_embeddings":
            problems.items.extend(self._discovery_problems("explanations"))
        try:
            product = execute(problems)
        except _Skip as skip:
            return StageOutcome(
                stage, skip.status, skip.reason, problems=problems, seconds=time.perf_counter() - started
            )
        output, seconds = self._write(
            stage, product, fingerprint=fingerprint, key=key, started=started, problems=problems
        )
        return StageOutcome(
            stage,
            "ran",
            rows=product.rows,
            seconds=seconds,
            statistics=product.statistics,
            problems=problems,
            notes=product.notes,
            output=output,
        )

    def run(self, only: Iterable[str] | None = None) -> RunReport:
        """Run every stage (or only those named), in pipeline order, and write ``run_report.json``."""
        only = list(only or [])
        unknown = sorted(set(only) - set(STAGES))
        if unknown:
            raise PipelineError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        started = time.perf_counter()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        outcomes = []
        for stage in STAGES:
            if only and stage not in only:
                continue
            self.log(f"stage {stage} …")
            outcome = self._run_stage(stage)
            outcomes.append(outcome)
            self.log(describe(outcome))
        report = RunReport(self.output_dir, outcomes, time.perf_counter() - started)
        write_atomic_bytes(self.output_dir / REPORT_NAME, orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
        return report


def _torch_device(device: str) -> str:
    """The decoder-similarity device: a torch device on CUDA, else NumPy ("cpu")."""
    if device == "auto":
        try:
            import torch
        except ImportError:
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
