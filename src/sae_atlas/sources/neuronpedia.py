"""Neuronpedia's published explanations as an explainer of a study.

A source of ``kind = "neuronpedia"`` is one source directory of a Neuronpedia export
(``<model>/<source>/``, the layout of Neuronpedia's ``export-data.py`` and of ``sae-atlas export
neuronpedia``): its ``explanations/batch-*.jsonl.gz`` hold one Explanation row per line (``index``,
``layer``, ``description``, ``explanationModelName``, …). The source's ``explainer`` picks the
explanation model whose rows it takes, so a study can set Neuronpedia's labels beside its own
explainers. It has no scores.

Rows are checked as they are read, each bad one reported in one line naming the file and line and
the rest kept: a line that is not JSON, an index that is not a latent id, a latent outside the SAE
(ids that do not match the canonical SAE, SAELens#549), a row of another layer. A latent with
several explanations by the chosen model keeps the first (Neuronpedia allows several).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import orjson

from sae_atlas.config import SourceConfig
from sae_atlas.problems import Problems, latent_out_of_range
from sae_atlas.sources import files
from sae_atlas.sources.delphi import DelphiRun

BATCHES = "explanations"


def describe_run(source: SourceConfig, problems: Problems) -> DelphiRun:
    """The source as a run: the chosen explanation model explains, nothing scores."""
    root = Path(source.path)
    if not root.is_dir():
        problems.add(root, "source directory does not exist", kind="missing")
    return DelphiRun(
        name=source.name,
        path=root,
        explainer=source.explainer,
        scorer=source.scorer or "unscored",
        explanation_method="neuronpedia",
        sae_id=None,
        hookpoint=None,
        kind="neuronpedia",
    )


def list_run_files(run: DelphiRun, problems: Problems, *, width: int | None = None) -> None:
    """Read the source's explanation batches into ``run.texts`` (latent → text)."""
    directory = run.path / BATCHES
    if not directory.is_dir():
        if run.path.is_dir():
            problems.add(directory, "no explanations/ directory of batch-*.jsonl.gz files", kind="missing")
        return
    run.batch_files = sorted(directory.glob("batch-*.jsonl.gz"), key=lambda path: (len(path.name), path.name))
    if not run.batch_files:
        problems.add(directory, "no batch-*.jsonl.gz files", kind="missing")
    counts = {"other models": 0, "other layers": 0, "repeated": 0}
    seen: dict[str, set] = {"models": set(), "layers": set()}
    for path in run.batch_files:
        _read_batch(path, run, problems, width, counts, seen)
    if run.batch_files and not run.texts and (counts["other models"] or counts["other layers"]):
        problems.add(
            directory,
            f"no explanation of layer {run.path.name!r} by {run.explainer!r}: the batches hold models "
            f"{', '.join(sorted(map(str, seen['models'])))} and layers {', '.join(sorted(map(str, seen['layers'])))}",
            kind="missing",
        )
    if counts["other models"]:
        run.notes.append(f"{directory}: {counts['other models']:,} explanations by other models than {run.explainer!r}")
    if counts["other layers"]:
        run.notes.append(f"{directory}: {counts['other layers']:,} explanations of other layers than {run.path.name!r}")
    if counts["repeated"]:
        run.notes.append(
            f"{directory}: {counts['repeated']:,} further explanations of a latent by the model; first kept"
        )


def _read_batch(path: Path, run: DelphiRun, problems: Problems, width: int | None, counts: dict, seen: dict) -> None:
    raw = files.read_bytes(path, problems, what="Neuronpedia batch")
    if raw is None:
        return
    try:
        text = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        problems.add(path, f"not a readable gzip file ({error})")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            problems.add(path, f"not a JSON line ({error})", line=number)
            continue
        if not isinstance(row, dict):
            problems.add(path, f"expected an Explanation object, got {type(row).__name__}", line=number)
            continue
        seen["models"].add(row.get("explanationModelName"))
        seen["layers"].add(row.get("layer"))
        if row.get("explanationModelName") != run.explainer:
            counts["other models"] += 1
            continue
        if row.get("layer") != run.path.name:
            counts["other layers"] += 1
            continue
        index, description = row.get("index"), row.get("description")
        if not (isinstance(index, str) and index.isascii() and index.isdigit()):
            problems.add(path, f"index {index!r} is not a latent id", line=number)
            continue
        latent = int(index)
        refused = latent_out_of_range(latent, width)
        if refused:
            problems.add(path, f"{refused}; skipped", line=number, latent=latent, kind="invalid")
            continue
        if not isinstance(description, str):
            problems.add(path, f"description is {type(description).__name__}, not text", line=number, latent=latent)
            continue
        if latent in run.texts:
            counts["repeated"] += 1
            continue
        run.texts[latent] = description.strip()
