"""Reader for delphi run directories: ``run_config.json``, explanations and per-example score files.

Handles the quirks of every delphi generation (raw-formats.md §0, §1): ``<hook>_latent<N>.txt`` and
legacy ``<module>_feature<N>.txt`` names, ``--`` for ``/`` in score file names, unpadded latent ids,
score directories at any depth, sentinel explanations, null batches, ``"nan"`` strings, Gen 1/2
records with ``-1`` predictions, and surprisal / intruder / example-embedding directories.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from sae_atlas import score_methods
from sae_atlas.config import SourceConfig
from sae_atlas.problems import Problems, latent_out_of_range
from sae_atlas.score_methods import RECORD_COLUMNS
from sae_atlas.scored_examples import (
    EVIDENCE_COLUMNS,
    SEQUENCE_COLUMNS,
    ExampleStore,
    parse_evidence,
    simulation_sequences,
)
from sae_atlas.sources import files

# Matched whole (``fullmatch``) and with ASCII digits only: a name ending in a newline, or with
# full-width digits, is not a latent's file.
LATENT_FILE = re.compile(r"(?P<hook>.+)_(?:latent|feature)(?P<latent>[0-9]+)\.txt", re.ASCII)
SENTINEL_EXPLANATIONS = frozenset({"Explanation could not be parsed.", "No explanation found"})
# run_config.json fields that change what a score means (raw-formats.md §1.2, §1.5): compared runs
# should agree on them. Older generations name the context length ``ctx_len``.
SCORE_SETTINGS = (
    "explainer_model",
    "explainer_provider",
    "explainer",
    "model",
    "sparse_model",
    "hookpoints",
    "fuzz_type",
    "num_examples_per_scorer_prompt",
    "log_probs",
    "filter_bos",
    "seed",
    "sampler_cfg.n_examples_train",
    "sampler_cfg.n_examples_test",
    "sampler_cfg.n_quantiles",
    "sampler_cfg.train_type",
    "sampler_cfg.test_type",
    "sampler_cfg.ratio_top",
    "constructor_cfg.example_ctx_len",
    "constructor_cfg.min_examples",
    "constructor_cfg.n_non_activating",
    "constructor_cfg.center_examples",
    "constructor_cfg.non_activating_source",
    "constructor_cfg.neighbours_type",
    "cache_cfg.dataset_repo",
    "cache_cfg.dataset_split",
    "cache_cfg.cache_ctx_len",
    "cache_cfg.n_tokens",
)
FIRING_COUNTS = Path("log") / "hookpoint_firing_counts.pt"
MISSING_EXPLANATION = "No explanation found"
DEFAULT_EXPLANATION_METHOD = "quantiles"  # delphi's SamplerConfig.train_type default


@dataclass(frozen=True)
class LatentFile:
    """One per-latent file of a run."""

    latent: int
    hook: str
    path: Path


@dataclass
class DelphiRun:
    """What :func:`discover_run` found in one run directory (or, for a source of another
    ``kind``, its reader: :mod:`sae_atlas.sources.neuronpedia` keeps its explanations read in
    ``texts``, its batch files in ``batch_files``)."""

    name: str
    path: Path
    explainer: str
    scorer: str
    explanation_method: str
    sae_id: str | None
    hookpoint: str | None
    explanations: list[LatentFile] = field(default_factory=list)
    scores: dict[str, list[LatentFile]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # run_config fields that change scores
    file_hook: str | None = None  # the hookpoint the per-latent file names use
    kind: str = "delphi"
    batch_files: list[Path] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)


def _walk_files(root: Path, problems: Problems, run: Path) -> list[Path]:
    """All files under ``root`` (hidden ones too: legacy names can start with a dot) that lie inside
    the ``run`` directory; a directory named like a per-latent file is reported, since its latent's
    file is then missing."""
    found, directories = files.walk(root, problems, within=run)
    for directory in directories:
        if LATENT_FILE.fullmatch(directory.name):
            problems.add(directory, "is a directory, not a per-latent file; skipped", kind="unreadable")
    return found


def _layer_number(hook: str) -> int | None:
    match = re.search(r"(\d+)", hook)
    return int(match.group(1)) if match else None


def _hooks_match(file_hook: str, config_hook: str) -> bool:
    """Loose join of a resolved file hook to a configured hookpoint (raw-formats.md §1.9)."""
    if file_hook == config_hook or file_hook.endswith("." + config_hook):
        return True
    file_layer, config_layer = _layer_number(file_hook), _layer_number(config_hook)
    return file_layer is not None and file_layer == config_layer


def read_run_config(path: Path, problems: Problems) -> dict | None:
    """``run_config.json`` of any delphi generation, or None when absent or unreadable."""
    if not path.exists():
        return None
    raw = files.read_bytes(path, problems, what="run config file")
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        problems.add(path, f"not valid JSON ({error})")
        return None
    if not isinstance(data, dict):
        problems.add(path, f"expected a JSON object, got {type(data).__name__}")
        return None
    return data


def _config_string(data: dict, key: str, path: Path, problems: Problems) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        problems.add(path, f"{key} should be a string, got {type(value).__name__}; ignored")
        return None
    return value


def _hookpoints(data: dict, path: Path, problems: Problems) -> list[str]:
    value = data.get("hookpoints")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(hook, str) for hook in value):
        problems.add(path, "hookpoints should be a list of strings; ignored")
        return []
    return value


def _latent_files(root: Path, files: list[Path], problems: Problems) -> list[tuple[str, int, Path]]:
    found = []
    prefix = len(str(root).rstrip(os.sep)) + 1  # every file is under root: its path relative to it
    for path in files:
        relative = str(path)[prefix:].replace(os.sep, "/")
        match = LATENT_FILE.fullmatch(relative)
        if match is None:
            problems.add(path, "not a per-latent file (<hook>_latent<N>.txt); skipped", kind="foreign")
            continue
        found.append((match.group("hook"), int(match.group("latent")), path))
    return found


def discover_run(source: SourceConfig, problems: Problems) -> DelphiRun:
    """Find the run config, explanation files and score files of one delphi run directory."""
    run = describe_run(source, problems)
    list_run_files(run, problems)
    return run


def score_settings(run_config: dict) -> dict:
    """The :data:`SCORE_SETTINGS` of a run config (None where it does not say)."""
    settings = {}
    for key in SCORE_SETTINGS:
        value = run_config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if key == "cache_cfg.cache_ctx_len" and value is None:
            cache = run_config.get("cache_cfg")
            value = cache.get("ctx_len") if isinstance(cache, dict) else None
        settings[key] = value if isinstance(value, str | int | float | bool | list) or value is None else str(value)
    return settings


def read_firing_counts(run: DelphiRun, problems: Problems) -> np.ndarray | None:
    """Tokens each latent fired on, from ``log/hookpoint_firing_counts.pt`` (a ``torch.save``d
    ``{hookpoint: LongTensor[num_latents]}``), or None when the run has none."""
    path = run.path / FIRING_COUNTS
    if not path.exists():
        return None
    raw = files.read_bytes(path, problems, what="firing counts")
    if raw is None:
        return None
    import io

    import torch

    try:
        counts = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises many kinds for a damaged file
        problems.add(path, f"not a readable torch file ({type(error).__name__}: {str(error).splitlines()[0]})")
        return None
    if not isinstance(counts, dict) or not all(isinstance(value, torch.Tensor) for value in counts.values()):
        problems.add(path, "expected a dict of hookpoint -> tensor of firing counts")
        return None
    key = run.file_hook if run.file_hook in counts else (next(iter(counts)) if len(counts) == 1 else None)
    if key is None:
        problems.add(path, f"no firing counts for hookpoint {run.file_hook!r} (has: {', '.join(map(str, counts))})")
        return None
    values = counts[key].reshape(-1)
    if values.dtype.is_floating_point or (values < 0).any():
        problems.add(path, f"firing counts of {key!r} are not non-negative integers")
        return None
    return values.numpy().astype(np.uint64)


def describe_run(source: SourceConfig, problems: Problems) -> DelphiRun:
    """Who explained and scored a run, and for which SAE: the config and ``run_config.json`` only.

    Cheap (no directory walk); :func:`list_run_files` finds the per-latent files.
    """
    root = Path(source.path)
    config_path = root / "run_config.json"
    run_config = read_run_config(config_path, problems) if root.is_dir() else None
    run_config = run_config or {}

    explainer_model = _config_string(run_config, "explainer_model", config_path, problems)
    explainer = source.explainer or explainer_model
    scorer = source.scorer or explainer_model
    if explainer is None or scorer is None:
        what = "no run_config.json" if not config_path.exists() else "run_config.json has no explainer_model"
        if root.is_dir():
            problems.add(
                config_path,
                f"{what} and the config names no explainer/scorer; using the source name {source.name!r}",
                kind="missing",
            )
        explainer = explainer or source.name
        scorer = scorer or source.name

    sampler = run_config.get("sampler_cfg")
    train_type = sampler.get("train_type") if isinstance(sampler, dict) else None
    hookpoints = _hookpoints(run_config, config_path, problems)
    sparse_model = _config_string(run_config, "sparse_model", config_path, problems)
    sae_id = f"{sparse_model}/{hookpoints[0]}" if sparse_model and hookpoints else None

    run = DelphiRun(
        name=source.name,
        path=root,
        explainer=explainer,
        scorer=scorer,
        explanation_method=train_type if isinstance(train_type, str) else DEFAULT_EXPLANATION_METHOD,
        sae_id=sae_id,
        hookpoint=hookpoints[0] if hookpoints else None,
        settings=score_settings(run_config),
    )
    if not root.is_dir():
        problems.add(root, "source directory does not exist", kind="missing")
    return run


def list_run_files(run: DelphiRun, problems: Problems, *, width: int | None = None) -> None:
    """Fill ``run.explanations`` and ``run.scores`` from the run directory; with ``width`` (the
    SAE's number of latents), files of latents beyond it are reported and skipped."""
    root = run.path
    if not root.is_dir():
        return
    explanation_dir, score_dir = root / "explanations", root / "scores"
    explanations = _latent_files(explanation_dir, _walk_files(explanation_dir, problems, root), problems)
    scores: dict[str, list[tuple[str, int, Path]]] = {}
    by_directory: dict[Path, list[Path]] = {}
    for path in _walk_files(score_dir, problems, root):
        by_directory.setdefault(path.parent, []).append(path)
    for path in by_directory.pop(score_dir, []):
        problems.add(path, "score file outside a <method>/ directory; skipped", kind="foreign")
    for method_dir in sorted(by_directory):
        files = by_directory[method_dir]
        method = score_methods.method_of_directory(method_dir.name)
        if method in score_methods.SKIPPED:
            run.notes.append(f"{method_dir}: {len(files)} files skipped ({score_methods.SKIPPED[method]})")
            continue
        if method not in score_methods.METHODS:
            run.notes.append(f"{method_dir}: {len(files)} files skipped (unknown scorer directory)")
            continue
        found = _latent_files(method_dir, files, problems)
        # Score files write "/" in the hookpoint as "--" (raw-formats.md §1.5).
        found = [(hook.replace("--", "/"), latent, path) for hook, latent, path in found]
        scores.setdefault(method, []).extend(found)

    if not explanations and not any(scores.values()):
        problems.add(root, "no explanation or score files found (empty run directory?)", kind="missing")

    # One config describes one SAE: keep the files of the hook that matches the run's hookpoint.
    hooks = Counter(hook for hook, _, _ in explanations)
    for found in scores.values():
        hooks.update(hook for hook, _, _ in found)
    primary = None
    if hooks:
        matching = [hook for hook in hooks if run.hookpoint and _hooks_match(hook, run.hookpoint)]
        primary = max(matching or hooks, key=lambda hook: (hooks[hook], hook))
        run.file_hook = primary
        others = sorted(set(hooks) - {primary})
        if others:
            run.notes.append(f"{root}: files of other hookpoints skipped ({', '.join(others)}); using {primary!r}")

    def keep(found: list[tuple[str, int, Path]]) -> list[LatentFile]:
        entries: dict[int, LatentFile] = {}
        for hook, latent, path in found:
            if hook != primary:
                continue
            refused = latent_out_of_range(latent, width)
            if refused:
                problems.add(path, f"{refused}; skipped", latent=latent, kind="invalid")
                continue
            if latent in entries:
                problems.add(
                    path,
                    f"second file for latent {latent} (first: {entries[latent].path.name})",
                    latent=latent,
                    kind="duplicate",
                )
                continue
            entries[latent] = LatentFile(latent, hook, path)
        return [entries[latent] for latent in sorted(entries)]

    run.explanations = keep(explanations)
    run.scores = {method: keep(found) for method, found in sorted(scores.items())}


def resolve_sae_id(configured: str | None, runs: list[DelphiRun], problems: Problems) -> str:
    """The one canonical ``sae_id``: the config's, else the first run's ``sparse_model/hookpoint``."""
    derived = [(run, run.sae_id) for run in runs if run.sae_id]
    if configured:
        return configured
    if not derived:
        problems.add(
            runs[0].path / "run_config.json" if runs else "sae-atlas.toml",
            "no sae_id in the config and none derivable from run_config.json; using 'unknown'",
            kind="missing",
        )
        return "unknown"
    first = derived[0][1]
    for run, sae_id in derived[1:]:
        if sae_id != first:
            problems.add(
                run.path / "run_config.json",
                f"sae_id {sae_id!r} differs from {first!r} of the first source; using the first",
                kind="inconsistent",
            )
    return first


def parse_explanation(raw: bytes) -> str:
    """Decode one explanation file: a JSON string literal, or plain text for hand-written files.

    Raises ValueError with a one-line reason for truncated JSON or a JSON value that is not a string.
    """
    text = raw.decode("utf-8-sig").strip()
    if not text:
        raise ValueError("empty explanation file")
    if text[0] in '"[{' or text in ("null", "true", "false") or re.fullmatch(r"-?\d+(\.\d+)?", text):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"truncated or invalid JSON string ({error})") from None
        if not isinstance(value, str):
            raise ValueError(f"expected a JSON string, got {type(value).__name__}")
        return value.strip()
    return text


def read_explanation_files(entries: list[LatentFile], problems: Problems) -> tuple[list[int], list[str]]:
    """The latent and text of each readable explanation file of ``entries``."""
    latents, texts = [], []
    for entry in entries:
        raw = files.read_bytes(entry.path, problems, what="explanation file", latent=entry.latent)
        if raw is None:
            continue
        try:
            text = parse_explanation(raw)
        except (ValueError, UnicodeDecodeError) as error:
            problems.add(entry.path, str(error), latent=entry.latent)
            continue
        latents.append(entry.latent)
        texts.append(text)
    return latents, texts


def explanations_frame(run: DelphiRun, latents: list[int], texts: list[str]) -> pl.DataFrame:
    """One row per explained latent of ``run`` (``feature_id``, ``explanation_text``,
    ``explanation_ok``) from the texts read.

    Latents that have score files but no explanation file were scored by delphi with the sentinel
    ``"No explanation found"``; they get a row with that text so their scores are kept.
    """
    explained = set(latents)
    scored = sorted({entry.latent for files in run.scores.values() for entry in files} - explained)
    latents = [*latents, *scored]
    texts = [*texts, *[MISSING_EXPLANATION] * len(scored)]
    frame = pl.DataFrame(
        {"feature_id": latents, "explanation_text": texts},
        schema={"feature_id": pl.UInt32, "explanation_text": pl.String},
    )
    return frame.with_columns(explanation_ok=~pl.col("explanation_text").is_in(list(SENTINEL_EXPLANATIONS))).sort(
        "feature_id"
    )


def read_explanations(run: DelphiRun, problems: Problems) -> pl.DataFrame:
    """Every explanation of ``run`` (:func:`explanations_frame` of all its files)."""
    return explanations_frame(run, *read_explanation_files(run.explanations, problems))


# ---------------------------------------------------------------------------------------------
# Score files


@dataclass
class ScoreRecords:
    """Per-example values of every score file of one run.

    ``files`` has one row per readable score file (``method``, ``feature_id``, ``n_records``), so
    that an empty ``[]`` file still yields a row with no score; ``records`` has one row per record
    (``method``, ``feature_id``, the columns of :data:`score_methods.RECORD_COLUMNS` and of
    :data:`scored_examples.EVIDENCE_COLUMNS`: its position, verdict and the text of its example);
    ``sequences`` one row per sequence of the simulation files (``feature_id`` and
    :data:`scored_examples.SEQUENCE_COLUMNS`).
    """

    files: pl.DataFrame
    records: pl.DataFrame
    sequences: pl.DataFrame


def _load_records(entry: LatentFile, problems: Problems) -> list[dict] | None:
    raw = files.read_bytes(entry.path, problems, what="score file", latent=entry.latent)
    if raw is None:
        return None
    try:
        records = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        problems.add(entry.path, f"truncated or invalid JSON ({error})", latent=entry.latent)
        return None
    if not isinstance(records, list):
        problems.add(entry.path, f"expected a JSON array of records, got {type(records).__name__}", latent=entry.latent)
        return None
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            problems.add(
                entry.path, f"record {position} is a {type(record).__name__}, not an object", latent=entry.latent
            )
            return None
    return records


def read_score_files(
    method: str,
    entries: list[LatentFile],
    problems: Problems,
    examples: ExampleStore | None = None,
    *,
    source: str = "",
) -> ScoreRecords:
    """Parse the score files ``entries`` of one method of run ``source`` with that method's
    parser (:func:`read_score_batch` of those files)."""
    return read_score_batch([(source, method, entry) for entry in entries], problems, examples)


def read_score_batch(
    files: list[tuple[str, str, LatentFile]], problems: Problems, examples: ExampleStore | None = None
) -> ScoreRecords:
    """Parse score files of any runs and methods (``files``: data_source, method, file), each with
    its method's parser, into one table each (a ``data_source`` column last); the examples of their
    records go to ``examples`` (shared by the calls of a block of latents)."""
    examples = ExampleStore() if examples is None else examples
    listing = {"method": [], "feature_id": [], "n_records": [], "data_source": []}
    columns: dict[str, list] = {
        "method": [],
        "feature_id": [],
        **{name: [] for name in RECORD_COLUMNS},
        **{name: [] for name in EVIDENCE_COLUMNS},
        "data_source": [],
    }
    sequences: dict[str, list] = {"feature_id": [], **{name: [] for name in SEQUENCE_COLUMNS}, "data_source": []}
    for source, method, entry in files:
        records = _load_records(entry, problems)
        if records is None:
            continue
        n = len(records)
        for name, value in (
            ("method", method),
            ("feature_id", entry.latent),
            ("n_records", n),
            ("data_source", source),
        ):
            listing[name].append(value)
        for name, value in (("method", method), ("feature_id", entry.latent), ("data_source", source)):
            columns[name].extend([value] * n)
        parsed = _parse_checked(score_methods.METHODS[method], records, entry, problems)
        evidence = parse_evidence(records, method, entry.latent, source, examples)
        for name, values in (*parsed.items(), *evidence.items()):
            columns[name].extend(values)
        unknown = _without_example(method, evidence["example_text"])
        if method == "simulation":
            scored = simulation_sequences(records, entry.latent, source, examples)
            count = len(scored["record"])
            sequences["feature_id"].extend([entry.latent] * count)
            sequences["data_source"].extend([source] * count)
            for name, values in scored.items():
                sequences[name].extend(values)
            unknown = sum(text is None for text in scored["example_text"])
        if unknown:
            problems.add(
                entry.path,
                f"{unknown} record(s) without a readable example (str_tokens of strings, or text); their verdicts "
                "are kept, without the example",
                latent=entry.latent,
            )
    keys = {"method": pl.String, "feature_id": pl.UInt32}
    return ScoreRecords(
        files=pl.DataFrame(listing, schema={**keys, "n_records": pl.UInt32, "data_source": pl.String}),
        records=pl.DataFrame(columns, schema={**keys, **RECORD_COLUMNS, **EVIDENCE_COLUMNS, "data_source": pl.String}),
        sequences=pl.DataFrame(
            sequences, schema={"feature_id": pl.UInt32, **SEQUENCE_COLUMNS, "data_source": pl.String}
        ),
    )


def _without_example(method: str, texts: list) -> int:
    """How many records of a classifier or embedding file lack a readable example. An intruder
    or example_embedding record is judged on a whole sample: the example kept (its intruder, its
    query) is a pointer for the reader, and older or hand-made samples without it are not bad."""
    return sum(text is None for text in texts) if method in ("fuzz", "detection", "embedding") else 0


def _parse_checked(score_method, records: list[dict], entry: LatentFile, problems: Problems) -> dict:
    """The method's record columns, outcomes outside its range reported and counted as failed."""
    parsed = score_method.parse(records)
    outside = score_method.out_of_range(parsed["outcome"])
    if outside:
        problems.add(
            entry.path,
            f"{len(outside)} {score_method.outcome_name} value(s) outside {list(score_method.outcome_range)} "
            f"(e.g. {parsed['outcome'][outside[0]]:g}); counted as failed",
            latent=entry.latent,
            kind="invalid",
        )
        for index in outside:
            parsed["outcome"][index] = None
    return parsed


def read_score_records(run: DelphiRun, problems: Problems) -> ScoreRecords:
    """Parse every score file of ``run``, each with the parser of its method."""
    parts = [read_score_files(method, entries, problems, source=run.name) for method, entries in run.scores.items()]
    if not parts:
        return read_score_files("fuzz", [], problems)
    return ScoreRecords(
        files=pl.concat([part.files for part in parts]),
        records=pl.concat([part.records for part in parts]),
        sequences=pl.concat([part.sequences for part in parts]),
    )
