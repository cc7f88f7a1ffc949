"""``sae-atlas export neuronpedia``: an output directory as a Neuronpedia export.

The layout and every field follow the neuronpedia repository's own utilities (hijohnnylin/neuronpedia
``ebb8426``): ``utils/neuronpedia-utils/neuronpedia_utils/db_models/{feature,activation,explanation,
source}.py`` for the fields and their order, ``convert-saedashboard-to-neuronpedia-export.py`` for the
layout (``features/`` and ``activations/batch-<k>.jsonl.gz``, gzip level 5, orjson lines, naive ISO
times) and ``batch-autointerp.py`` for explanations (``explanationModelName`` is the last path
component of the model name)::

    <out>/<model-id>/<source>/
      source.jsonl                      the Source row
      features/batch-<k>.jsonl.gz       one Feature per latent: decoder neighbours as
                                        topkCosSimIndices / topkCosSimValues, firing frequency as
                                        frac_nonzero, the largest sampled activation as maxActApprox
      activations/batch-<k>.jsonl.gz    one Activation per example stage 4 sampled: the prompt's
                                        tokens and dense values (3 decimals, as Neuronpedia stores
                                        them), its quantile bin's range as binMin / binMax
      explanations/batch-<k>.jsonl.gz   one Explanation per (latent, explainer), sentinels left out

Batch k holds latents k·1024 … k·1024 + 1023, as ``export-data.py`` batches them; each batch is
encoded and written before the next, so only one batch's JSON is ever in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from sae_atlas import __version__, layout
from sae_atlas.query.atlas import Atlas

BATCH_FEATURES = 1024
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the utilities' default creator
DEFAULT_EXPLANATION_TYPE = "eleuther_acts_top20"  # Neuronpedia's type for EleutherAI's explainer
SOURCE_ID = re.compile(r"[0-9]+-[A-Za-z0-9._-]+(?:__[A-Za-z0-9._-]+)?", re.ASCII)  # "<layer>-<set>[__suffix]"
ID_LENGTH = 25  # cuid length, as FastPseudoCuid makes them


class ExportError(ValueError):
    """The export cannot be made as asked; the message is one line."""


def record_id(*parts) -> str:
    """A cuid-shaped id that is the same for the same record in every export (so a re-export
    updates rather than duplicates)."""
    return "c" + hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=12).hexdigest()[: ID_LENGTH - 1]


def _gzip_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    layout.write_atomic_bytes(path, gzip.compress(body, compresslevel=5))


def source_row(atlas: Atlas, *, model_id: str, source: str, creator_id: str, created_at: str) -> dict:
    """db_models/source.py's ``Source``, field for field."""
    prompts = layout.read_prompt_tokens(atlas.output_dir) if (atlas.output_dir / layout.PROMPTS).exists() else None
    repository, _, folder = (atlas.sae_id or "").partition("/")
    repository_name, _, folder = folder.partition("/")
    return {
        "id": source,
        "modelId": model_id,
        "setName": source.split("-", 1)[1].split("__", 1)[0],
        "creatorId": creator_id,
        "hasDashboards": True,
        "inferenceEnabled": False,
        "inferenceHosts": [],
        "saelensConfig": None,
        "saelensRelease": None,
        "saelensSaeId": None,
        "hfRepoId": f"{repository}/{repository_name}" if repository and repository_name else None,
        "hfFolderId": folder or None,
        "visibility": "PUBLIC",
        "defaultOfModelId": None,
        "hasUmap": False,
        "hasUmapLogSparsity": False,
        "hasUmapClusters": False,
        "num_prompts": len(prompts) if prompts is not None else None,
        "num_tokens_in_prompt": int(prompts.list.len().max()) if prompts is not None and len(prompts) else None,
        "dataset": None,
        "notes": f"exported by sae-atlas {__version__} from {atlas.sae_id}",
        "createdAt": created_at,
    }


def feature_row(
    index: int, neighbours: tuple[list, list], *, model_id: str, source: str, creator_id: str, created_at: str,
    max_activation: float, frequency: float | None,
) -> dict:  # fmt: skip
    """db_models/feature.py's ``Feature``, field for field."""
    return {
        "modelId": model_id,
        "layer": source,
        "index": str(index),
        "creatorId": creator_id,
        "createdAt": created_at,
        "maxActApprox": max_activation,
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": 10,
        "hookName": None,
        "topkCosSimIndices": neighbours[0],
        "topkCosSimValues": neighbours[1],
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "neg_str": [],
        "neg_values": [],
        "pos_str": [],
        "pos_values": [],
        "frac_nonzero": frequency or 0,
        "freq_hist_data_bar_heights": [],
        "freq_hist_data_bar_values": [],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
        "sourceSetName": source.split("-", 1)[1].split("__", 1)[0],
    }


def activation_row(
    example: dict, bins: tuple[float, float], *, index: int, model_id: str, source: str, creator_id: str,
    created_at: str,
) -> dict:  # fmt: skip
    """db_models/activation.py's ``Activation``, field for field, for one sampled example."""
    values = [round(float(value), 3) for value in example["activations"]]
    peak = max(values) if values else 0.0
    return {
        "id": record_id(model_id, source, index, example["prompt_id"]),
        "tokens": example["tokens"],
        "index": str(index),
        "layer": source,
        "modelId": model_id,
        "maxValue": peak,
        "maxValueTokenIndex": values.index(peak) if values else 0,
        "minValue": min(values) if values else 0.0,
        "values": values,
        "creatorId": creator_id,
        "dataSource": None,
        "dataIndex": str(example["prompt_id"]),  # the prompt, so an example can be traced back
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "createdAt": created_at,
        "lossValues": [],
        "logitContributions": None,
        "binMin": bins[0],
        "binMax": bins[1],
        "binContains": None,
        "qualifyingTokenIndex": example["max_position"],
        "zIndices": None,
        "zValues": None,
    }


def explanation_row(
    index: int, explainer: str, text: str, *, model_id: str, source: str, creator_id: str, type_name: str,
    created_at: str,
) -> dict:  # fmt: skip
    """db_models/explanation.py's ``Explanation``, field for field."""
    return {
        "id": record_id(model_id, source, index, explainer),
        "modelId": model_id,
        "layer": source,
        "index": str(index),
        "description": text,
        "authorId": creator_id,
        "embedding": None,
        "triggeredById": None,
        "typeName": type_name,
        "explanationModelName": explainer.split("/")[-1],
        "notes": None,
        "createdAt": created_at,
    }


def _batches(latents: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for batch in np.unique(latents // BATCH_FEATURES):
        yield int(batch), latents[(latents // BATCH_FEATURES) == batch]


def export(
    atlas: Atlas,
    out: Path,
    *,
    model_id: str,
    source: str,
    creator_id: str = DEFAULT_CREATOR_ID,
    explanation_type: str = DEFAULT_EXPLANATION_TYPE,
) -> dict:
    """Write the Neuronpedia export of ``atlas`` under ``out/<model_id>/<source>/``; returns counts."""
    if not SOURCE_ID.fullmatch(source):
        raise ExportError(
            f"source {source!r} is not a Neuronpedia source id <layer>-<set name> (e.g. 30-gemmascope-res-16k)"
        )
    # A leading letter or digit: "." and ".." would put the files beside or above ``out``.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_id, re.ASCII):
        raise ExportError(
            f"model id {model_id!r} is not a Neuronpedia model id (a letter or digit, then letters, digits, . _ -)"
        )
    root = Path(out) / model_id / source
    layout.refuse_output_files(root / "source.jsonl")
    created_at = datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")
    common = {"model_id": model_id, "source": source, "creator_id": creator_id, "created_at": created_at}
    layout.write_atomic_bytes(root / "source.jsonl", orjson.dumps(source_row(atlas, **common)) + b"\n")

    explanations = (
        atlas.features(limit=None)
        .filter(pl.col("explanation_ok"))
        .select("feature_id", "explainer", "explanation_text", "firing_frequency")
    )
    frequency = dict(explanations.group_by("feature_id").agg(pl.col("firing_frequency").drop_nulls().first()).rows())
    latents = np.unique(
        np.concatenate(
            [atlas.latents_with_neighbours(), explanations["feature_id"].to_numpy(), atlas.sampled_latents()]
        )
    ).astype(np.int64)
    counts = {"features": 0, "activations": 0, "explanations": 0, "batches": 0}
    written: set[Path] = set()
    for batch, members in _batches(latents):
        features, activations = _feature_rows(atlas, members, frequency, common)
        batch_explanations = explanations.filter(
            (pl.col("feature_id") >= batch * BATCH_FEATURES) & (pl.col("feature_id") < (batch + 1) * BATCH_FEATURES)
        )
        described = [
            explanation_row(index, explainer, text, type_name=explanation_type, **common)
            for index, explainer, text, _ in batch_explanations.rows()
        ]
        name = f"batch-{batch}.jsonl.gz"
        for kind, rows in (("features", features), ("activations", activations), ("explanations", described)):
            if rows or kind == "features":
                _gzip_lines(root / kind / name, rows)
                written.add(root / kind / name)
        counts["features"] += len(features)
        counts["activations"] += len(activations)
        counts["explanations"] += len(described)
        counts["batches"] += 1
    # An earlier export into the same directory may have had other batches: they would be imported
    # beside this one's.
    for kind in ("features", "activations", "explanations"):
        for stale in sorted((root / kind).glob("batch-*.jsonl.gz")):
            if stale not in written:
                stale.unlink()
    return {"directory": str(root), **counts}


def _feature_rows(atlas: Atlas, members: np.ndarray, frequency: dict, common: dict) -> tuple[list, list]:
    """The feature rows (with decoder neighbours) and activation rows of one batch's latents."""
    features, activations = [], []
    for index in members.tolist():
        examples = atlas.feature_examples(index)
        bins = _bins(examples)
        neighbours = atlas.neighbours_of(index)
        features.append(
            feature_row(
                index,
                (
                    [row["feature_id"] for row in neighbours],
                    [round(row["cosine_similarity"], 6) for row in neighbours],
                ),
                max_activation=max((example["max_activation"] for example in examples), default=0.0),
                frequency=frequency.get(index),
                **common,
            )
        )
        activations.extend(
            activation_row(example, bins[example["quantile"]], index=index, **common) for example in examples
        )
    return features, activations


def _bins(examples: list[dict]) -> dict[int, tuple[float | None, float | None]]:
    """Each sampling bin's range of maximum activations among the feature's sampled examples."""
    bins: dict[int, list[float]] = {}
    for example in examples:
        bins.setdefault(example["quantile"], []).append(example["max_activation"])
    return {quantile: (round(min(values), 3), round(max(values), 3)) for quantile, values in bins.items()}
