"""The ``sae-atlas`` command line (Typer). Each command is a thin layer over the package API; any
failure ends with exit code 1 and a one-line cause on stderr."""

from __future__ import annotations

import functools
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from sae_atlas import __version__, layout
from sae_atlas.exports import tables

app = typer.Typer(
    name="sae-atlas",
    help="Turn SAE interpretability results (delphi runs, activations, decoder weights) into Parquet files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)
MAX_PROBLEMS_SHOWN = 20


class CommandError(Exception):
    """A failure the user can act on; printed as one line."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail_cleanly(command):
    """Turn failures into one ``error: …`` line on stderr and exit code 1: never a traceback.

    An exception nobody expected is still one line, naming its type; ``SAE_ATLAS_TRACEBACK=1``
    shows the traceback instead, for a bug report.
    """
    from sae_atlas.config import ConfigError
    from sae_atlas.pipeline import PipelineError
    from sae_atlas.problems import StrictModeError

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except StrictModeError as error:
            errors.print(f"[red]error[/red] (--strict): {escape(str(error))}", highlight=False, soft_wrap=True)
        except (CommandError, ConfigError, PipelineError, ValueError, OSError) as error:
            errors.print(f"[red]error[/red]: {escape(_one_line(error))}", highlight=False, soft_wrap=True)
        except Exception as error:
            if os.environ.get("SAE_ATLAS_TRACEBACK"):
                raise
            errors.print(
                f"[red]error[/red]: unexpected {type(error).__name__}: {escape(_one_line(error))} "
                "(SAE_ATLAS_TRACEBACK=1 shows where)",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(1)

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"sae-atlas {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """sae-atlas: analysis-ready Parquet files from SAE interpretability studies."""


class _EmbeddingProgress:
    """A rich progress bar (rate, ETA) per stage that embeds texts."""

    def __init__(self):
        self.progress = Progress(
            TextColumn("  [bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.progress.start()
            self.tasks[stage] = self.progress.add_task(f"embedding ({stage})", total=total, rate="")
            self.started[stage] = time.perf_counter()
        elapsed = time.perf_counter() - self.started[stage]
        rate = f"{done / elapsed:,.0f} texts/s" if elapsed > 0 else ""
        self.progress.update(self.tasks[stage], completed=done, total=total, rate=rate)
        if done >= total:
            self.progress.remove_task(self.tasks.pop(stage))
            if not self.tasks:
                self.progress.stop()


def _print_report(report) -> None:
    from sae_atlas.pipeline import iter_problems

    table = Table(title=f"sae-atlas run → {report.output_dir}", title_justify="left")
    for column in ("stage", "status", "rows", "seconds", "problems", "note"):
        table.add_column(column, justify="right" if column in ("rows", "seconds", "problems") else "left")
    colours = {"ran": "green", "unchanged": "cyan", "skipped": "yellow", "failed": "red"}
    for outcome in report.outcomes:
        table.add_row(
            outcome.name,
            f"[{colours.get(outcome.status, 'white')}]{outcome.status}[/]",
            f"{outcome.rows:,}" if outcome.rows is not None else "",
            f"{outcome.seconds:.1f}" if outcome.status == "ran" else "",
            str(len(outcome.problems)) if len(outcome.problems) else "",
            escape(outcome.reason) if outcome.status != "ran" else "",
        )
    console.print(table)
    problems = list(iter_problems(report))
    if problems:
        console.print(
            f"[yellow]{len(problems)} input problem(s)[/yellow] (kept going; details in "
            f"{report.output_dir / 'run_report.json'} and the sidecars):",
            highlight=False,
        )
        for line in problems[:MAX_PROBLEMS_SHOWN]:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        if len(problems) > MAX_PROBLEMS_SHOWN:
            console.print(f"  … and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    console.print(f"done in {report.seconds:.1f} s")


def run_pipeline(
    config_path: Path, *, only=None, force=False, strict=False, embedder=None, engine=None, ray_address=None
):
    """Load a config, run the pipeline with progress output, print and return the report.
    ``engine`` / ``ray_address`` override the config's ``[execution]``."""
    from sae_atlas.config import load_config
    from sae_atlas.pipeline import Pipeline

    config = load_config(config_path)
    overrides = {"engine": engine} if engine else {}
    if ray_address is not None:
        if not ray_address.strip():
            raise CommandError("--ray-address '': an empty address; leave the option out to run without a cluster")
        overrides |= {"engine": "ray", "address": ray_address}
    if overrides:
        execution = config.execution.model_validate(config.execution.model_dump() | overrides)
        config = config.model_copy(update={"execution": execution})
    pipeline = Pipeline(
        config,
        strict=strict,
        force=force,
        embedder=embedder,
        log=lambda message: console.print(message, style="dim", markup=False, highlight=False),
        progress=_EmbeddingProgress(),
    )
    report = pipeline.run(only)
    _print_report(report)
    failed = [outcome for outcome in report.outcomes if outcome.status == "failed"]
    if failed:
        raise CommandError(f"stage {failed[0].name} failed: {failed[0].reason}")
    return report


def _numbers(option: str, text: str | None) -> tuple[float, ...] | None:
    """A comma-separated option's numbers (None when not given)."""
    if not text:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise CommandError(f"{option} {text!r} is not a list of numbers") from None


@app.command()
@_fail_cleanly
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the corpus to.")],
    features: Annotated[int, typer.Option(help="SAE width (number of latents).")] = 1024,
    explained: Annotated[int, typer.Option(help="Latents explained and scored.")] = 64,
    explainers: Annotated[int, typer.Option(help="Explainer LLMs (1–6).")] = 3,
    scorers: Annotated[int, typer.Option(help="Scorer LLMs (1–6).")] = 2,
    prompts: Annotated[int, typer.Option(help="Prompts in the activation dataset.")] = 1000,
    ctx: Annotated[int, typer.Option(help="Tokens per prompt.")] = 127,
    d_model: Annotated[int, typer.Option("--d-model", help="Decoder dimension.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed; the corpus is a function of it.")] = 0,
    activation_format: Annotated[
        str, typer.Option(help="jsonl, delphi, or both (the same records in both formats).")
    ] = "jsonl",
    decoder_format: Annotated[str, typer.Option(help="npz, saelens or sparsify.")] = "npz",
    explainer_quality: Annotated[
        str | None,
        typer.Option(help="Hit rate of each explainer, comma-separated (e.g. 0.9,0.7,0.7): a planted difference."),
    ] = None,
    identical_texts: Annotated[
        float,
        typer.Option(help="Share of latents where every explainer writes the first one's text, word for word."),
    ] = 0.0,
    scorer_reliability: Annotated[
        str | None,
        typer.Option(
            help="How far each scorer follows the explanation's quality, comma-separated (1: fully, 0: coin flips)."
        ),
    ] = None,
    plant_patterns: Annotated[
        bool,
        typer.Option(
            "--plant-patterns",
            help="Plant lexical, mixed, contextual and diffuse latents, and explanations that name or miss the token.",
        ),
    ] = False,
    plant_families: Annotated[
        bool,
        typer.Option(
            "--plant-families",
            help="Plant near-duplicate decoders and pairs of distinct latents explained in the same words.",
        ),
    ] = False,
) -> None:
    """Write a synthetic corpus in the real raw formats, with a ground truth and a ready config."""
    from sae_atlas.synth import SynthOptions, synthesize

    quality = _numbers("--explainer-quality", explainer_quality)
    reliability = _numbers("--scorer-reliability", scorer_reliability)
    options = SynthOptions(
        features,
        explained,
        explainers,
        scorers,
        prompts,
        ctx,
        d_model,
        seed,
        activation_format,
        decoder_format,
        explainer_quality=quality,
        identical_texts=identical_texts,
        scorer_reliability=reliability,
        plant_patterns=plant_patterns,
        plant_families=plant_families,
    )
    started = time.perf_counter()
    result = synthesize(out, options, progress=lambda message: console.print(message, style="dim", markup=False))
    console.print(
        f"synthetic corpus in [bold]{result.root}[/bold] ({len(result.sources)} delphi runs, "
        f"{result.activation_records:,} activation records) in {time.perf_counter() - started:.1f} s\n"
        f"next: [bold]sae-atlas run {result.config}[/bold]",
        highlight=False,
    )


@app.command()
@_fail_cleanly
def run(
    config: Annotated[Path, typer.Argument(help="Path to sae-atlas.toml.")],
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this stage (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run stages even when unchanged.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first malformed input.")] = False,
    engine: Annotated[str | None, typer.Option("--engine", help="local or ray (overrides [execution] engine).")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="Join this Ray cluster: auto, host:6379 or ray://host:10001 (implies --engine ray)."
        ),
    ] = None,
) -> None:
    """Run the pipeline described by CONFIG; unchanged stages are skipped."""
    run_pipeline(config, only=only, force=force, strict=strict, engine=engine, ray_address=ray_address)


@app.command()
@_fail_cleanly
def validate(output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")]) -> None:
    """Check the Parquet files in OUTPUT_DIR against the schemas and invariants."""
    from sae_atlas.validate import validate as check

    result = check(output_dir)
    for name in result.checked:
        console.print(f"checked {name}", highlight=False)
    if not result.ok:
        for violation in result.violations:
            errors.print(f"[red]✗[/red] {escape(violation)}", highlight=False, soft_wrap=True)
        raise CommandError(f"{len(result.violations)} violation(s) in {output_dir}")
    console.print(f"[green]✓[/green] {output_dir} is valid", highlight=False)


def _table_cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else escape(str(value))


def _frame_table(frame: pl.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(column, justify="right" if frame[column].dtype.is_numeric() else "left")
    for row in frame.iter_rows():
        table.add_row(*[_table_cell(value) for value in row])
    return table


def print_summary(output_dir: Path) -> None:
    """Rows per file, mean scores per explainer × scorer × method, mean cross-explainer similarity."""
    from sae_atlas.query.scores import read_scores
    from sae_atlas.query.summary import mean_scores, mean_semantic_similarity, rows_per_file

    console.print(_frame_table(rows_per_file(output_dir), "rows per file"))
    features = pl.read_parquet(output_dir / layout.FEATURES).with_columns(pl.col("llm_explainer").cast(pl.String))
    explainers = list(dict.fromkeys(features["llm_explainer"].to_list()))
    scores = read_scores(output_dir, features, explainers)
    console.print(_frame_table(mean_scores(scores), "mean score per explainer × scorer × method"))
    console.print(_frame_table(mean_semantic_similarity(features), "mean cross-explainer semantic similarity"))


@app.command()
@_fail_cleanly
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to put the demo corpus and outputs.")] = Path("demo"),
) -> None:
    """Synthesise a small corpus, run the pipeline on it and print a summary."""
    from sae_atlas.synth import SynthOptions, synthesize

    started = time.perf_counter()
    options = SynthOptions(features=1024, explained=96, explainers=3, scorers=2, prompts=800, ctx=127, d_model=256)
    result = synthesize(
        directory, options, progress=lambda message: console.print(f"synth: {message}", style="dim", markup=False)
    )
    report = run_pipeline(result.config)
    print_summary(report.output_dir)
    console.print(f"demo finished in {time.perf_counter() - started:.1f} s", highlight=False)
    program = sys.argv[0] if sys.argv and sys.argv[0].endswith("sae-atlas") else "sae-atlas"
    output = os.path.relpath(report.output_dir)
    console.print(
        f"\nbrowse it: [bold]{escape(shlex.join([program, 'serve', output]))}[/bold]  then open http://127.0.0.1:8000/",
        highlight=False,
        soft_wrap=True,
    )


def _print_json(value) -> None:
    import orjson

    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())


def _open_atlas(output_dir: Path):
    from sae_atlas.query.atlas import Atlas

    return Atlas(output_dir)


def _short(name: str) -> str:
    """A model name without its organisation, for narrow table columns; rich markup in it is
    shown as text (names come from the study's files)."""
    return escape(name.rsplit("/", 1)[-1])


def _highlighted(example: dict) -> Text:
    """An activation example's window with tokens shaded by activation (the value on the token)."""
    start, stop = example["window"]
    peak = example["max_activation"]
    peak = peak if math.isfinite(peak) and peak > 0 else 1e-9
    text = Text()
    for token, value in zip(example["tokens"][start:stop], example["activations"][start:stop], strict=True):
        shown = token.replace("▁", " ").replace("<0x0A>", "⏎")
        if math.isfinite(value) and value > 0:
            level = int(80 + 175 * min(value / peak, 1.0))
            text.append(shown, style=f"bold black on rgb(255,{255 - level // 2},{255 - level})")
        else:
            text.append(shown)
    return text


VERDICT_MARKS = {"correct": "[green]✓[/green]", "wrong": "[red]✗[/red]", "failed": "[yellow]![/yellow]", None: "–"}


def _print_evidence(data: dict, as_json: bool) -> None:
    """The evidence page's rows: one per example, one verdict column per run."""
    if as_json:
        _print_json(data)
        return
    for section in data["methods"]:
        counts = section["counts"]
        table = Table(
            title=f"{section['method']}: {len(section['examples'])} of {section['total']} examples; scorers disagree "
            f"on {counts['disagree']}, every run misses {counts['all_miss']}, failed {counts['failed']}",
            title_justify="left",
        )
        table.add_column("example", overflow="fold")
        table.add_column("kind")
        for run in data["runs"]:
            table.add_column(f"{_short(run['explainer'])[:10]}·{_short(run['scorer'])[:10]}", justify="center")
        for example in section["examples"]:
            kind = (
                f"act. q{example['quantile']}"
                if example["activating"]
                else "non-act."
                if example["activating"] is False
                else "–"
            )
            table.add_row(
                escape("".join(example["str_tokens"])),
                kind,
                *(VERDICT_MARKS[verdict] for verdict in example["verdicts"]),
            )
        console.print(table)


@app.command()
@_fail_cleanly
def show(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    feature_id: Annotated[int, typer.Argument(help="The latent to show.")],
    examples: Annotated[int, typer.Option(help="Activation examples to print.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full record as JSON.")] = False,
    evidence: Annotated[
        bool, typer.Option("--evidence", help="What the scorers saw: every scored example with each run's verdict.")
    ] = False,
    show_only: Annotated[
        str, typer.Option("--show", help="With --evidence: all, disagree, all_miss or failed.")
    ] = "all",
) -> None:
    """Everything about one latent: explanations, scores, agreement, neighbours, examples."""
    from sae_atlas.query.atlas import FeatureNotFound

    atlas = _open_atlas(output_dir)
    if evidence:
        _print_evidence(atlas.evidence(feature_id, show=show_only), as_json)
        return
    try:
        record = atlas.feature(feature_id)
    except FeatureNotFound:
        raise CommandError(f"feature {feature_id} is not in {output_dir}") from None
    if as_json:
        _print_json(record)
        return
    from sae_atlas.metrics import HEADLINE_SCORE_METRICS

    console.print(f"[bold]feature {record['feature_id']}[/bold]  {escape(str(record['sae_id']))}")
    explanations = Table(title="explanations", title_justify="left", show_lines=True)
    # Only the headline score metrics some scorer has a value for: a run without intruder files shows
    # none (--json has every metric).
    shown = [
        metric
        for metric in HEADLINE_SCORE_METRICS
        if any(row[metric.name] is not None for item in record["explanations"] for row in item["metrics"])
    ]
    heading = f"scores ({' / '.join(metric.label for metric in shown)})" if shown else "scores"
    for column in ("explainer", "explanation", heading, "agreement"):
        explanations.add_column(column, overflow="fold")
    for item in record["explanations"]:
        scores = "\n".join(
            f"{_short(row['scorer'])}: "
            + " / ".join("–" if row[metric.name] is None else f"{row[metric.name]:.2f}" for metric in shown)
            for row in item["metrics"]
        )
        agreement = "\n".join(
            f"{_short(entry['explainer'])}: "
            + ("–" if entry["cosine_similarity"] is None else f"{entry['cosine_similarity']:.2f}")
            for entry in item["semantic_similarity"]
        )
        text = Text(item["explanation_text"])
        if not item["explanation_ok"]:
            text.append("  (sentinel)", style="dim")
        explanations.add_row(_short(item["explainer"]), text, scores, agreement)
    console.print(explanations)
    if record["decoder_neighbours"]:
        neighbours = Table(title="decoder neighbours", title_justify="left")
        for column in ("feature", "cosine", "explanation"):
            neighbours.add_column(column, overflow="fold")
        for entry in record["decoder_neighbours"]:
            first = next((item["text"] for item in entry["explanations"] if item["ok"]), "")
            neighbours.add_row(str(entry["feature_id"]), f"{entry['cosine_similarity']:.3f}", escape(first))
        console.print(neighbours)
    similarity = record["activation_similarity"]
    if similarity:
        numbers = ", ".join(
            f"{key.split('_')[0]} {value:.3f}"
            for key, value in similarity.items()
            if key != "num_examples_sampled" and value is not None
        )
        console.print(f"activation windows: {similarity['num_examples_sampled']} sampled; pairwise cosine {numbers}")
    _print_diagnosis(record["diagnosis"])
    _print_family(record.get("family"))
    for example in record["activation_examples"][:examples]:
        console.print(
            f"[dim]prompt {example['prompt_id']} · quantile {example['quantile']} · "
            f"max {example['max_activation']:.2f}[/dim]"
        )
        console.print(_highlighted(example))


def _print_family(family: dict | None) -> None:
    """The latent's family and its pairs worth a look, as the feature page shows them."""
    if not family:
        return
    name = f" “{family['family_name']}”" if family["family_name"] else ""
    line = f"family {family['family_id']}{name}: {family['family_size']:,} latents"
    if family["subfamily_size"] != family["family_size"]:
        line += f"; subfamily {family['subfamily_id']} of {family['subfamily_size']:,}"
    console.print(escape(line), highlight=False, soft_wrap=True)
    for pair in family["pairs"]:
        console.print(f"  {escape(pair['kind'])} with {pair['neighbour_id']}: {escape(pair['evidence'])}",
                      highlight=False, soft_wrap=True)  # fmt: skip


def _print_diagnosis(diagnosis: dict) -> None:
    """The latent's pattern and each explanation's cause, as the feature page's diagnosis shows them."""
    pattern = diagnosis["pattern"]
    if pattern:
        top = f"top token {pattern['top_token']!r} {pattern['top_token_coverage']:.0%}" if pattern["top_token"] else ""
        coherence = "–" if pattern["coherence"] is None else f"{pattern['coherence']:.2f}"
        console.print(
            f"pattern: [bold]{pattern['pattern'] or 'undecided'}[/bold] ({escape(top)} of {pattern['tokens']} "
            f"activating tokens; coherence {coherence})"
        )
    if diagnosis["note"]:
        console.print(f"[dim]{escape(diagnosis['note'])}[/dim]")
    for explainer, row in sorted(diagnosis["explanations"].items()):
        if row["cause"]:
            console.print(f"{_short(explainer)}: [bold]{row['cause']}[/bold]: {escape(row['cause_evidence'])}")


@app.command()
@_fail_cleanly
def search(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    text: Annotated[str, typer.Argument(help="What the latents should be about.")],
    k: Annotated[int, typer.Option("--k", help="Number of results.", min=1, max=1000)] = 10,
    explainer: Annotated[str | None, typer.Option(help="Only this explainer's explanations.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Semantic search over the explanations, with the model that embedded them."""
    hits = _open_atlas(output_dir).search(text, k, explainer=explainer)
    if as_json:
        _print_json(hits.to_dicts())
        return
    table = Table(title=escape(f"closest explanations to {text!r}"), title_justify="left")
    for column in ("similarity", "feature", "explainer", "explanation"):
        table.add_column(column, overflow="fold")
    for row in hits.iter_rows(named=True):
        table.add_row(
            f"{row['similarity']:.3f}",
            str(row["feature_id"]),
            _short(row["explainer"]),
            escape(row["explanation_text"]),
        )
    console.print(table)


@app.command()
@_fail_cleanly
def sql(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    query: Annotated[
        str,
        typer.Argument(
            help="One SELECT over the views features, explanation_embeddings, "
            "activation_examples, activation_embeddings, "
            "activation_example_similarity, scores."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    max_rows: Annotated[int, typer.Option(help="Rows to print in the table view.")] = 50,
) -> None:
    """Run one read-only SQL SELECT (DuckDB) over the output files."""
    from sae_atlas.sql import run_sql

    result = run_sql(output_dir, query)
    if as_json:
        _print_json(result.to_dicts())
        return
    table = Table(title=f"{result.height:,} row(s)", title_justify="left")
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.head(max_rows).iter_rows():
        table.add_row(*[escape(f"{value:.4g}" if isinstance(value, float) else str(value)) for value in row])
    console.print(table)
    if result.height > max_rows:
        console.print(f"… {result.height - max_rows:,} more (use --json or LIMIT)")


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _n(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _compare_settings(
    metric: list[str] | None,
    resamples: int,
    seed: int,
    confidence: float,
    latents: str = "common",
    exclude_identical: bool = False,
) -> dict:
    """The comparison's settings checked by the API's own query model: the same ranges and the same
    one-line message on either interface."""
    from sae_atlas.serve.parameters import compare_query_model, parse

    params = {
        "resamples": resamples,
        "seed": seed,
        "confidence": confidence,
        "latents": latents,
        "exclude_identical": exclude_identical,
    }
    query = parse(compare_query_model(), params)
    return {**query.arguments(), "metric_names": metric}


LatentsOption = Annotated[
    str,
    typer.Option(
        help="common: compare every metric on the latents every explainer × scorer run scored; all: on every "
        "latent with a value."
    ),
]
ExcludeIdenticalOption = Annotated[
    bool, typer.Option(help="Leave out the latents where two explainers wrote the same text.")
]


@app.command()
@_fail_cleanly
def compare(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    metric: Annotated[
        list[str] | None,
        typer.Option(help="A score metric to compare (repeatable; default: headline metrics and balanced accuracy)."),
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples (100 to 20,000).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling (0 to 2³²−1).")] = 0,
    confidence: Annotated[float, typer.Option(help="Coverage of the intervals (above 0.5, below 1).")] = 0.95,
    latents: LatentsOption = "common",
    exclude_identical: ExcludeIdenticalOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Which explainer explains better and how far each scorer can be trusted: the answer first
    (ranking, differences with clustered-bootstrap intervals, Holm over a fixed family), then
    comparability, means, per-scorer differences and scorer agreement."""
    from sae_atlas.serve.pages import with_people_and_diagnosis

    settings = _compare_settings(metric, resamples, seed, confidence, latents, exclude_identical)
    atlas = _open_atlas(output_dir)
    data = with_people_and_diagnosis(atlas, atlas.compare(**settings), settings)
    if as_json:
        _print_json(data)
        return
    _print_headline(data)
    for warning in data["comparability"]["warnings"]:
        console.print(
            f"[yellow]{warning['severity']}[/yellow]: {escape(warning['message'])}", soft_wrap=True, highlight=False
        )
    for item in data["small_samples"]:
        console.print(f"few latents, Student-t interval: {escape(item['where'])} ({item['latents']} latents)")
    _print_summary(data)
    _print_agreement(data)
    for pair in data["explainer_agreement"]:
        console.print(
            f"explanations of {_short(pair['first'])} and {_short(pair['second'])}: cosine median "
            f"{_n(pair['median'])} (quartiles {_n(pair['q1'])}–{_n(pair['q3'])}) over {pair['latents']:,} latents; "
            f"most different: latents {', '.join(str(row['feature_id']) for row in pair['disagreements'][:5])}",
            highlight=False,
            soft_wrap=True,
        )
    _print_diagnosis_rates(data.get("diagnosis"))
    _print_same_words(data.get("same_words"))
    _print_people(data.get("people"))


def _print_diagnosis_rates(rates: dict | None) -> None:
    """Which explainer is best on which kind of latent, and each explainer's causes."""
    if not rates:
        return
    for sentence in rates["sentences"]:
        console.print(escape(sentence), highlight=False, soft_wrap=True)
    for row in rates["rates"]:
        if row["quantity"] != "fuzz" and row["mean"]:
            what = {"names": "names the top token of lexical latents", "corroborated": "claims corroborated"}.get(
                row["quantity"], row["kind"]
            )
            console.print(
                f"  {_short(row['explainer'])}: {what} {_n(row['mean'])} [{_n(row['ci_low'])}, {_n(row['ci_high'])}]",
                highlight=False,
                soft_wrap=True,
            )


def _print_same_words(rates: dict | None) -> None:
    """How often each explainer explains distinct decoder neighbours in the same words."""
    if not rates:
        return
    console.print(
        f"decoder neighbours explained in the same words (cosine ≥ {rates['threshold']}; lower is better):",
        highlight=False,
    )
    for row in rates["explainers"]:
        console.print(
            f"  {_short(row['explainer'])}: {_n(row['rate'])} [{_n(row['low'])}, {_n(row['high'])}] "
            f"of {row['pairs']:,} pairs",
            highlight=False,
            soft_wrap=True,
        )


def _print_people(people: dict | None) -> None:
    """The scorers against people's labels, one line each."""
    if not people:
        return
    where = "random order" if people["unbiased"] else "not only the random order: shares describe the labelled"
    console.print(f"against people ({people['n']} labelled explanations; {where}):", highlight=False)
    for row in people["scorers"]:
        console.print(
            f"  {_short(row['scorer'])}: AUC good vs bad {_n(row['auc'])} "
            f"[{_n(row['auc_low'])}, {_n(row['auc_high'])}], "
            f"Spearman {_n(row['spearman'])} [{_n(row['spearman_low'])}, {_n(row['spearman_high'])}]",
            highlight=False,
            soft_wrap=True,
        )
    for row in people["explainers"]:
        console.print(
            f"  {_short(row['explainer'])}: {_n(row['share_good'])} good "
            f"[{_n(row['low'])}, {_n(row['high'])}] of {row['n']}",
            highlight=False,
            soft_wrap=True,
        )


def _print_headline(data: dict) -> None:
    """The answer: one sentence per two explainers adjacent in a ranking, and the tested differences."""
    for sentence in data["headline"]["sentences"]:
        console.print(escape(sentence), soft_wrap=True, highlight=False)
    if not data["headline"]["pairs"]:
        return
    level = f"{data['settings']['confidence']:.0%}"
    table = Table(
        title=f"headline: averaged over scorers, common latents, {level} clustered-bootstrap interval, "
        f"Holm over {data['headline']['family']}",
        title_justify="left",
    )
    for column in ("metric", "ahead − behind", "latents", "same text", "difference", "interval", "Holm p", "scorers"):
        table.add_column(column, no_wrap=column == "interval")
    for row in data["headline"]["pairs"]:
        difference = _n(row["mean_difference"])
        table.add_row(
            row["metric"],
            f"{_short(row['first'])} − {_short(row['second'])}",
            f"{row['latents']:,}",
            f"{row['identical_texts']:,}",
            f"[bold]{difference}[/bold]" if row["significant"] else difference,
            f"[{_n(row['ci_low'])}, {_n(row['ci_high'])}]",
            _p(row["holm_p"]),
            f"{row['scorers_agreeing']} of {len(row['per_scorer'])}",
        )
    console.print(table)


def _print_summary(data: dict) -> None:
    settings = data["settings"]
    over = "latents every run scored" if settings["latents"] == "common" else "every latent with a value"
    summary = Table(title=f"means over {over}, {settings['confidence']:.0%} interval", title_justify="left")
    for column in ("metric", "explainer", "scorer", "latents", "mean", "interval", "median"):
        numeric = column in ("latents", "mean", "median", "interval")
        summary.add_column(column, justify="right" if numeric else "left", no_wrap=numeric)
    order = {name: index for index, name in enumerate(settings["metrics"])}
    for row in sorted(data["summary"], key=lambda row: order[row["metric"]]):
        summary.add_row(
            row["metric"],
            _short(row["explainer"]),
            _short(row["scorer"]),
            f"{row['latents']:,}",
            _n(row["mean"]),
            f"[{_n(row['ci_low'])}, {_n(row['ci_high'])}]",
            _n(row["median"]),
        )
    console.print(summary)
    if data["paired"]:
        paired = Table(title="per scorer, first − second (exploratory: p not adjusted)", title_justify="left")
        for column in ("metric", "first − second", "scorer", "latents", "difference", "interval", "p", "W/T/L"):
            paired.add_column(column, no_wrap=column == "interval")
        for row in sorted(data["paired"], key=lambda row: order[row["metric"]]):
            paired.add_row(
                row["metric"],
                f"{_short(row['first'])} − {_short(row['second'])}",
                _short(row["scorer"]),
                f"{row['latents']:,}",
                _n(row["mean_difference"]),
                f"[{_n(row['ci_low'])}, {_n(row['ci_high'])}]",
                _p(row["wilcoxon_p"]),
                f"{row['wins']}/{row['ties']}/{row['losses']}",
            )
        console.print(paired)


def _print_agreement(data: dict) -> None:
    if len(data["scorers"]) < 2:
        console.print("one scorer: scorer agreement cannot be measured")
        return
    for row in data["scorer_reliability"]:
        console.print(
            f"Krippendorff's α of the {row['scorers']} scorers on {_short(row['explainer'])}'s {row['metric']}: "
            f"{_n(row['alpha'])} [{_n(row['ci_low'])}, {_n(row['ci_high'])}] over {row['latents']:,} latents",
            highlight=False,
        )
    agreement = Table(title="scorer agreement within each explainer", title_justify="left")
    for column in ("metric", "explainer", "scorers", "latents", "Spearman", "interval", "Kendall", "top decile"):
        agreement.add_column(column)
    for row in data["scorer_agreement"]:
        agreement.add_row(
            row["metric"],
            _short(row["explainer"]),
            f"{_short(row['first'])} · {_short(row['second'])}",
            f"{row['latents']:,}",
            _n(row["spearman"]),
            f"[{_n(row['spearman_low'])}, {_n(row['spearman_high'])}]",
            _n(row["kendall"]),
            f"{_n(row['top_decile_overlap'], 2)} (chance {_n(row['top_decile_chance'], 2)})",
        )
    console.print(agreement)


@app.command()
@_fail_cleanly
def report(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The report file to write.")],
    format: Annotated[str | None, typer.Option(help="html or md (default: from the file's suffix, else html).")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="A score metric to compare (repeatable).")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples (100 to 20,000).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling (0 to 2³²−1).")] = 0,
    latents: LatentsOption = "common",
    exclude_identical: ExcludeIdenticalOption = False,
) -> None:
    """Write the comparison as one self-contained HTML file (inline SVG and CSS, no network) or as
    Markdown tables, with the score distributions and the run's provenance."""
    from sae_atlas.exports.report import FORMATS, write_report
    from sae_atlas.serve.pages import with_people_and_diagnosis

    layout.refuse_output_files(output)
    suffixes = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}
    chosen = format or suffixes.get(output.suffix.lower())
    if chosen is None:
        raise CommandError(
            f"{output}: cannot tell the report format from the suffix {output.suffix or '(none)'!r}; "
            "name the file .html or .md, or give --format html|md"
        )
    if chosen not in FORMATS:
        raise CommandError(f"unknown report format {chosen!r}; formats are {', '.join(FORMATS)}")
    settings = _compare_settings(metric, resamples, seed, 0.95, latents, exclude_identical)
    atlas = _open_atlas(output_dir)
    write_report(atlas, with_people_and_diagnosis(atlas, atlas.compare(**settings), settings), output, chosen)
    console.print(f"wrote {output} ({chosen})", highlight=False)


export_app = typer.Typer(help="Write an output directory, or a filtered part of it, in another format.")
app.add_typer(export_app, name="export")


def _bounds(values: list[str] | None, option: str) -> dict[str, str]:
    """``METRIC=VALUE`` options as query parameters ``<metric>_min`` / ``<metric>_max``."""
    bounds = {}
    for value in values or []:
        metric, separator, number = value.partition("=")
        if not separator:
            raise CommandError(f"--{option} {value!r}: expected METRIC=VALUE (e.g. fuzz=0.8)")
        bounds[f"{metric}_{option}"] = number
    return bounds


@export_app.command("table")
@_fail_cleanly
def export_table(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help=f"The file to write: {tables.suffix_help()}.")],
    explainer: Annotated[str | None, typer.Option(help="Only this explainer's rows.")] = None,
    scorer: Annotated[str | None, typer.Option(help="Score columns from this scorer only (default: the mean).")] = None,
    contains: Annotated[str | None, typer.Option(help="Text the explanation contains.")] = None,
    minimum: Annotated[
        list[str] | None, typer.Option("--min", help="METRIC=VALUE: rows whose metric is at least VALUE (repeatable).")
    ] = None,
    maximum: Annotated[
        list[str] | None, typer.Option("--max", help="METRIC=VALUE: rows whose metric is at most VALUE (repeatable).")
    ] = None,
    sort: Annotated[str, typer.Option(help="Column to sort by.")] = "feature_id",
    order: Annotated[str, typer.Option(help="asc or desc.")] = "asc",
    labelled: Annotated[
        str, typer.Option(help="By people's labels: any, yes, no (none or stale), stale, or a verdict.")
    ] = "any",
) -> None:
    """Write the rows of the feature table the filters select (every match, as the index page's
    download does) to CSV, JSON Lines or Parquet, the format from the file's suffix."""
    from sae_atlas.exports import tables
    from sae_atlas.serve import pages
    from sae_atlas.serve.parameters import feature_query_model, parse

    chosen = tables.format_of(output)  # a bad suffix or a protected path fails before any work
    layout.refuse_output_files(output)
    atlas = _open_atlas(output_dir)
    params = {"sort": sort, "order": order, "format": chosen, "labelled": labelled}
    params.update({**_bounds(minimum, "min"), **_bounds(maximum, "max")})
    params.update(
        {key: value for key, value in (("explainer", explainer), ("scorer", scorer), ("contains", contains)) if value}
    )
    query = parse(feature_query_model(atlas.explainers, atlas.scorers), params)
    frame = pages.feature_export(atlas, query)
    chosen = tables.write(frame, output)
    console.print(f"wrote {frame.height:,} rows to {output} ({chosen})", highlight=False)


@export_app.command("neuronpedia")
@_fail_cleanly
def export_neuronpedia(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    model_id: Annotated[str, typer.Option("--model-id", help="Neuronpedia model id (e.g. gemma-2-9b).")],
    source: Annotated[str, typer.Option(help="Neuronpedia source id <layer>-<set> (e.g. 30-gemmascope-res-16k).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for exports/<model-id>/<source>/.")],
    explainer_name: Annotated[
        list[str] | None,
        typer.Option(
            "--explainer-name",
            help="LOCAL=REGISTERED: write explainer LOCAL (full or short name) as Neuronpedia's registered "
            "explanation model REGISTERED (repeatable).",
        ),
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help="The model's layers (known for Gemma 2, Pythia-70m, GPT-2).")
    ] = None,
    neurons_per_layer: Annotated[int | None, typer.Option(help="The model's MLP neurons per layer.")] = None,
    dimension: Annotated[int | None, typer.Option(help="The model's d_model.")] = None,
    owner: Annotated[
        str | None, typer.Option(help="Who made the model (default: known, or the sae_id's owner).")
    ] = None,
    creator_name: Annotated[str | None, typer.Option(help="The source set's creator (default: the owner).")] = None,
    description: Annotated[str | None, typer.Option(help="The source set's description.")] = None,
    creator_id: Annotated[str, typer.Option(help="Neuronpedia user id to credit.")] = "clkht01d40000jv08hvalcvly",
    explanation_type: Annotated[
        str, typer.Option(help="Neuronpedia explanation type name of delphi's explainer.")
    ] = "eleuther_acts_top20",
) -> None:
    """Write the model, source set, source, features (with decoder neighbours), sampled activation
    records and explanations in the files Neuronpedia's importer reads."""
    from sae_atlas.exports.neuronpedia import DELETE_SQL, ExportError, Target, export

    mapping = {}
    for item in explainer_name or []:
        local, equals, registered = item.partition("=")
        if not equals or not local.strip() or not registered.strip():
            raise ExportError(f"--explainer-name {item!r} is not LOCAL=REGISTERED")
        mapping[local.strip()] = registered.strip()
    target = Target(
        model_id=model_id,
        source=source,
        creator_id=creator_id,
        explanation_type=explanation_type,
        layers=layers,
        neurons_per_layer=neurons_per_layer,
        dimension=dimension,
        owner=owner,
        creator_name=creator_name,
        description=description,
        explainer_names=mapping,
    )
    counts = export(_open_atlas(output_dir), output, target)
    console.print(
        f"wrote {counts['directory']}: {counts['features']:,} features, {counts['activations']:,} activations, "
        f"{counts['explanations']:,} explanations in {counts['batches']:,} batch(es)",
        highlight=False,
        soft_wrap=True,
    )
    if counts["unmapped"]:
        console.print(
            f"register these explanation model names in Neuronpedia (ExplanationModelType) before importing, or map "
            f"them with --explainer-name LOCAL=REGISTERED: {', '.join(counts['unmapped'])} (one unknown name fails "
            "the whole explanations insert)",
            highlight=False,
            soft_wrap=True,
        )
    changed = {kind: count for kind, count in counts["changed"].items() if count}
    if changed:
        console.print(
            f"changed since the last export into this directory: "
            f"{', '.join(f'{count:,} {kind}' for kind, count in changed.items())}; Neuronpedia's importer keeps the "
            f"rows it has (ON CONFLICT DO NOTHING): run {DELETE_SQL} on its database first, or export under a new "
            f"source id ({source.split('__')[0]}__v2)",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@_fail_cleanly
def serve(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    host: Annotated[str, typer.Option(help="Interface to bind; the default is loopback only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    read_only: Annotated[bool, typer.Option("--read-only", help="Refuse every write (labels).")] = False,
    write_token: Annotated[
        str | None,
        typer.Option(
            envvar="SAE_ATLAS_WRITE_TOKEN",
            help="Token scripts send as Authorization: Bearer <token> to write labels; needed to write at all "
            "when bound beyond loopback.",
        ),
    ] = None,
) -> None:
    """Serve the outputs over HTTP: the JSON API (docs at /docs) and the feature browser."""
    from sae_atlas.serve.app import serve as run_server
    from sae_atlas.serve.label_routes import LOOPBACK

    atlas_dir = output_dir.resolve()
    _open_atlas(atlas_dir)  # fail here, with one line, if the directory is not an output directory
    writes = (
        "read-only" if read_only else "labels with the pages' token" + (" or the write token" if write_token else "")
    )
    if not read_only and host not in LOOPBACK and not write_token:
        writes = "read-only: bound beyond loopback without --write-token"
    console.print(
        f"serving {atlas_dir} on http://{host}:{port}/  (API docs: http://{host}:{port}/docs; writes: {writes}; "
        "Ctrl-C to stop)",
        highlight=False,
        soft_wrap=True,
    )
    run_server(atlas_dir, host=host, port=port, read_only=read_only, write_token=write_token)


def _labelling(output_dir: Path, *, read_only: bool = False):
    from sae_atlas.query.labelling import Labelling

    return Labelling(_open_atlas(output_dir), read_only=read_only)


@app.command()
@_fail_cleanly
def label(
    output_dir: Annotated[Path, typer.Argument(help="A sae-atlas output directory.")],
    feature_id: Annotated[int, typer.Argument(help="The latent.")],
    verdict: Annotated[str, typer.Option(help="good, partial, bad or unsure.")],
    explainer: Annotated[
        str | None, typer.Option(help="The explainer whose explanation is judged (default: the latent itself).")
    ] = None,
    cause: Annotated[
        list[str] | None, typer.Option("--cause", help="A cause from the vocabulary (repeatable).")
    ] = None,
    note: Annotated[str, typer.Option(help="A note.")] = "",
    author: Annotated[str | None, typer.Option(help="Who judges (default: $USER).")] = None,
) -> None:
    """Record a verdict on a latent, or on one explainer's explanation of it, in the output
    directory's label store (labels.sqlite; never touched by `run`)."""
    from pydantic import ValidationError

    from sae_atlas.label_store import LabelError, LabelIn
    from sae_atlas.serve.parameters import validation_message

    who = author or os.environ.get("USER") or "anonymous"
    try:
        item = LabelIn(
            feature_id=feature_id,
            explainer=explainer,
            verdict=verdict,
            causes=cause or [],
            note=note,
            author=who,
            origin="cli",
        )
    except ValidationError as error:
        raise LabelError(validation_message(error)) from None
    (label_id,) = _labelling(output_dir).add([item], author=who)
    console.print(f"labelled feature {feature_id}{f' ({explainer})' if explainer else ''}: {verdict} [{label_id}]")


@app.command()
@_fail_cleanly
def labels(
    arguments: Annotated[
        list[str], typer.Argument(help="OUTPUT_DIR (then -o FILE: export), or: import OUTPUT_DIR FILE", metavar="…")
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write every label row to this .csv, .jsonl or .parquet.")
    ] = None,
) -> None:
    """Export the label store's history (`labels OUT -o labels.csv`), or merge an export into
    another output directory (`labels import OUT FILE`; by label id, so importing twice changes
    nothing)."""
    from sae_atlas.exports import tables
    from sae_atlas.label_store import COLUMNS, LabelError
    from sae_atlas.query.labelling import as_table, from_table

    if arguments[:1] == ["import"]:
        if len(arguments) != 3:
            raise LabelError("usage: sae-atlas labels import OUTPUT_DIR FILE")
        source = Path(arguments[2])
        csv = tables.format_of(source) == "csv"
        frame = from_table(tables.read(source, pl.Schema({**COLUMNS, "causes": pl.String} if csv else COLUMNS)))
        added = _labelling(Path(arguments[1])).store.import_rows(frame)
        console.print(f"imported {added:,} new label row(s) of {frame.height:,} from {source}")
        return
    if len(arguments) != 1 or output is None:
        raise LabelError("usage: sae-atlas labels OUTPUT_DIR -o FILE, or sae-atlas labels import OUTPUT_DIR FILE")
    chosen = tables.format_of(output)
    layout.refuse_output_files(output)
    history = _labelling(Path(arguments[0]), read_only=True).store.history()
    tables.write(as_table(history, chosen), output)
    console.print(f"wrote {history.height:,} label row(s) to {output} ({chosen})", highlight=False)
