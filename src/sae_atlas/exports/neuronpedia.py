"""``sae-atlas export neuronpedia``: an output directory as files Neuronpedia's own importer loads.

The importer is ``apps/webapp/app/api/admin/import/route.ts`` with ``lib/db/import.ts`` and
``lib/utils/s3.ts`` (hijohnnylin/neuronpedia ``ebb8426``). It reads, under ``<model>/<source>/``::

    model.jsonl                       the Model row (required: the route reads it outside any try)
    sourceset.jsonl                   the SourceSet row (required too)
    source.jsonl                      the Source row
    features/batch-<k>.jsonl.gz       one Neuron per latent: decoder neighbours as topkCosSimIndices /
                                      topkCosSimValues, firing frequency (every latent's delphi
                                      count) as frac_nonzero, the largest sampled activation as
                                      maxActApprox
    activations/batch-<k>.jsonl.gz    one Activation per example stage 4 sampled: the prompt's tokens
                                      and values (3 decimals, as Neuronpedia stores them), its bin
    explanations/batch-<k>.jsonl.gz   one Explanation per (latent, explainer), sentinels left out

Rows follow ``utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py`` field for field, except
where the database's columns differ from those dataclasses (the importer inserts only the keys of a
file's first line that are columns of the table, with ``jsonb_to_recordset``): the explanation's
``triggeredByUserId`` (the dataclass says ``triggeredById``, which no column holds) and the
activation's ``zIndices`` as ``[]`` (the importer turns an array into ``zKIndices``/``zQIndices``).
Batch k holds latents k·1024 … k·1024 + 1023, as ``export-data.py`` batches them.

What the importer does with rows it already has decides what a re-export can do: every insert is
``ON CONFLICT DO NOTHING`` (Model, SourceSet and Source are created only when absent). Ids are
therefore content-addressed (an unchanged row has the same id, a changed one a new id), a manifest
of the rows written is kept beside the files, and a re-export says what changed since the last one
into the same directory: Neuronpedia would keep the old features and add changed explanations and
examples beside the old ones, so the export writes ``delete-before-reimport.sql`` and says to run
it first (or to export under a new source id, ``<layer>-<set>__v2``).

What cannot be supplied: logit tables and histograms (``pos_str``/``neg_str``,
``freq_hist_*``, ``logits_hist_*``: sae-atlas has no unembedding), DFA values, vectors, and the
explanations' ``embedding`` (Neuronpedia's are OpenAI text-embedding-3-large at 256 dimensions; a
vector from another model would rank nonsense in its search): they are left empty. Neuronpedia's
scores (``scoreV1``/``scoreV2``) are its own scorer's; delphi's are not written into them.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from sae_atlas import __version__, layout
from sae_atlas.config import SamplingConfig
from sae_atlas.query.atlas import Atlas
from sae_atlas.sampling import assign_bins

BATCH_FEATURES = 1024
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the user Neuronpedia's seed creates ("bot")
DEFAULT_EXPLANATION_TYPE = "eleuther_acts_top20"  # Neuronpedia's type for EleutherAI's explainer
SOURCE_ID = re.compile(r"[0-9]+-[A-Za-z0-9._-]+(?:__[A-Za-z0-9._-]+)?", re.ASCII)  # "<layer>-<set>[__suffix]"
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)  # a leading "." would leave ``out``
ID_LENGTH = 25  # cuid length, as FastPseudoCuid makes them
MANIFEST = "sae-atlas-export.parquet"
DELETE_SQL = "delete-before-reimport.sql"
# Models whose shape sae-atlas knows (layers, MLP neurons per layer, d_model, owner), by Neuronpedia
# model id; a Gemma Scope sae_id names its model in its release.
KNOWN_MODELS = {
    "gemma-2-2b": (26, 9216, 2304, "Google"),
    "gemma-2-9b": (42, 14336, 3584, "Google"),
    "gemma-2-27b": (46, 36864, 4608, "Google"),
    "pythia-70m": (6, 2048, 512, "EleutherAI"),
    "pythia-70m-deduped": (6, 2048, 512, "EleutherAI"),
    "gpt2-small": (12, 3072, 768, "OpenAI"),
    "llama3.1-8b": (32, 14336, 4096, "Meta"),
}
GEMMA_SCOPE = re.compile(r"gemma-scope-(2b|9b|27b)")


class ExportError(ValueError):
    """The export cannot be made as asked; the message is one line."""


@dataclass(frozen=True)
class Target:
    """Where the export goes in Neuronpedia and what its Model and SourceSet rows say; the ``None``
    fields are derived (:func:`resolve`)."""

    model_id: str
    source: str
    creator_id: str = DEFAULT_CREATOR_ID
    explanation_type: str = DEFAULT_EXPLANATION_TYPE
    layers: int | None = None
    neurons_per_layer: int | None = None
    dimension: int | None = None
    owner: str | None = None
    creator_name: str | None = None
    description: str | None = None
    explainer_names: dict[str, str] = field(default_factory=dict)  # local explainer → registered name

    @property
    def set_name(self) -> str:
        return self.source.split("-", 1)[1].split("__", 1)[0]


def record_id(*parts) -> str:
    """A cuid-shaped id of a row's identity and content: the same for an unchanged row in every
    export, a new one when its content changed."""
    return "c" + hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=12).hexdigest()[: ID_LENGTH - 1]


def resolve(target: Target, sae_id: str | None) -> Target:
    """``target`` with the model's shape and owner filled in from what sae-atlas knows of the model
    (its Neuronpedia id, or the model a Gemma Scope ``sae_id`` names); a one-line error for what
    stays unknown."""
    if not SOURCE_ID.fullmatch(target.source):
        raise ExportError(
            f"source {target.source!r} is not a Neuronpedia source id <layer>-<set name> (e.g. 30-gemmascope-res-16k)"
        )
    if not MODEL_ID.fullmatch(target.model_id):
        raise ExportError(
            f"model id {target.model_id!r} is not a Neuronpedia model id "
            "(a letter or digit, then letters, digits, . _ -)"
        )
    known = KNOWN_MODELS.get(target.model_id)
    scope = GEMMA_SCOPE.search(sae_id or "")
    if known is None and scope is not None:
        known = KNOWN_MODELS[f"gemma-2-{scope.group(1)}"]
    layers, neurons, dimension, owner = known or (None, None, None, None)
    repository_owner = (sae_id or "").partition("/")[0] or None
    filled = {
        "layers": target.layers if target.layers is not None else layers,
        "neurons_per_layer": target.neurons_per_layer if target.neurons_per_layer is not None else neurons,
        "dimension": target.dimension if target.dimension is not None else dimension,
        "owner": target.owner or owner or repository_owner,
    }
    missing = [name for name in ("layers", "neurons_per_layer", "owner") if filled[name] is None]
    if missing:
        options = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ExportError(
            f"Neuronpedia's Model row needs {', '.join(missing)}, which sae-atlas does not know for model "
            f"{target.model_id!r}: pass {options} (known: {', '.join(sorted(KNOWN_MODELS))})"
        )
    return Target(**{**target.__dict__, **filled, "creator_name": target.creator_name or filled["owner"]})


def explanation_model_names(target: Target, explainers: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each explainer's ``explanationModelName``: its mapping, else the last component of its name
    (as Neuronpedia's batch-autointerp.py writes them); and the names no mapping gave, which a
    maintainer must register as ExplanationModelType rows before importing."""
    short = {explainer: explainer.split("/")[-1] for explainer in explainers}
    unknown = sorted(set(target.explainer_names) - set(explainers) - set(short.values()))
    if unknown:
        raise ExportError(
            f"--explainer-name maps {', '.join(unknown)}, which explained nothing here (explainers: "
            f"{', '.join(sorted(explainers))})"
        )
    names, unmapped = {}, []
    for explainer in explainers:
        mapped = target.explainer_names.get(explainer, target.explainer_names.get(short[explainer]))
        names[explainer] = mapped or short[explainer]
        if mapped is None:
            unmapped.append(short[explainer])
    return names, sorted(set(unmapped))


# -- rows -----------------------------------------------------------------------------------------


def model_row(target: Target, created_at: str) -> dict:
    """db_models/model.py's ``Model``, field for field (the route creates it with these keys)."""
    return {
        "id": target.model_id,
        "instruct": target.model_id.endswith("-it"),
        "creatorId": target.creator_id,
        "displayNameShort": target.model_id,
        "displayName": target.model_id,
        "tlensId": None,
        "dimension": target.dimension,
        "visibility": "PUBLIC",
        "defaultSourceSetName": None,
        "defaultSourceId": None,
        "inferenceEnabled": False,  # no inference server holds this SAE
        "layers": target.layers,
        "neuronsPerLayer": target.neurons_per_layer,
        "createdAt": created_at,
        "owner": target.owner,
        "updatedAt": created_at,
        "website": None,
    }


def source_set_row(target: Target, sae_id: str | None, created_at: str) -> dict:
    """db_models/source_set.py's ``SourceSet``, field for field."""
    return {
        "modelId": target.model_id,
        "name": target.set_name,
        "creatorId": target.creator_id,
        "hasDashboards": True,
        "visibility": "PUBLIC",
        "description": target.description or f"{sae_id or target.set_name} (exported by sae-atlas)",
        "type": "",
        "creatorName": target.creator_name,
        "urls": [],
        "creatorEmail": None,
        "releaseName": None,
        "defaultOfModelId": None,
        "defaultRange": 1,
        "defaultShowBreaks": True,
        "showDfa": False,
        "showCorrelated": False,
        "showHeadAttribution": False,
        "showUmap": False,
        "createdAt": created_at,
    }


def source_row(atlas: Atlas, target: Target, created_at: str) -> dict:
    """db_models/source.py's ``Source``, field for field."""
    prompts = layout.read_prompt_tokens(atlas.output_dir) if (atlas.output_dir / layout.PROMPTS).exists() else None
    repository, _, folder = (atlas.sae_id or "").partition("/")
    repository_name, _, folder = folder.partition("/")
    return {
        "id": target.source,
        "modelId": target.model_id,
        "setName": target.set_name,
        "creatorId": target.creator_id,
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
    index: int, neighbours: tuple[list, list], target: Target, created_at: str, *, max_activation: float,
    frequency: float | None,
) -> dict:  # fmt: skip
    """db_models/feature.py's ``Feature`` (the Neuron table), field for field."""
    return {
        "modelId": target.model_id,
        "layer": target.source,
        "index": str(index),
        "creatorId": target.creator_id,
        "createdAt": created_at,
        "maxActApprox": round(float(max_activation), 3),  # as the values are stored
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": None,  # a steering default belongs to features with a vector
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
        "frac_nonzero": float(frequency) if frequency is not None else 0.0,
        "freq_hist_data_bar_heights": [],
        "freq_hist_data_bar_values": [],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
        "sourceSetName": target.set_name,
    }


def activation_row(
    example: dict, group: tuple[float, float, float], index: int, target: Target, created_at: str
) -> dict:
    """db_models/activation.py's ``Activation``, field for field, for one sampled example;
    ``group``: its bin's (binMin, binMax, binContains)."""
    values = [round(float(value), 3) for value in example["activations"]]
    peak = max(values) if values else 0.0
    return {
        "id": record_id(target.model_id, target.source, index, example["prompt_id"], values),
        "tokens": example["tokens"],
        "index": str(index),
        "layer": target.source,
        "modelId": target.model_id,
        "maxValue": peak,
        "maxValueTokenIndex": values.index(peak) if values else 0,
        "minValue": min(values) if values else 0.0,
        "values": values,
        "creatorId": target.creator_id,
        "dataSource": None,
        "dataIndex": str(example["prompt_id"]),  # the prompt, so an example can be traced back
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "createdAt": created_at,
        "lossValues": [],
        "logitContributions": None,
        "binMin": group[0],
        "binMax": group[1],
        "binContains": group[2],
        "qualifyingTokenIndex": example["max_position"],
        "zIndices": [],  # no attention heads: the importer's zKIndices / zQIndices stay empty
        "zValues": [],
    }


def explanation_row(index: int, name: str, text: str, target: Target, created_at: str) -> dict:
    """db_models/explanation.py's ``Explanation``, with the column ``triggeredByUserId``."""
    return {
        "id": record_id(target.model_id, target.source, index, name, text),
        "modelId": target.model_id,
        "layer": target.source,
        "index": str(index),
        "description": text,
        "authorId": target.creator_id,
        "embedding": None,  # Neuronpedia's search embeds with its own model (module docstring)
        "triggeredByUserId": None,
        "typeName": target.explanation_type,
        "explanationModelName": name,
        "notes": None,
        "createdAt": created_at,
    }


# -- what the rows are made of ----------------------------------------------------------------------


def firing_frequencies(output_dir: Path, explained: pl.DataFrame) -> dict[int, float]:
    """Each latent's firing frequency: from ``stages/firing.parquet`` (delphi's counts cover every
    latent of the SAE; the first run in config order that has one), else, for an output written
    before that file, the explained latents' frequency in ``explained``."""
    path = output_dir / layout.FIRING
    if path.exists():
        table = pl.read_parquet(path, columns=["feature_id", "firing_frequency"]).drop_nulls()
    else:
        table = explained.select("feature_id", "firing_frequency").drop_nulls()
    first = table.unique("feature_id", keep="first", maintain_order=True)
    return dict(zip(first["feature_id"].to_list(), first["firing_frequency"].to_list(), strict=True))


def sampling_quantiles(output_dir: Path) -> int:
    """How many bins stage 4 sampled from (the run's config, kept in the sidecars)."""
    sidecar = layout.read_sidecar(output_dir / layout.FEATURES) or {}
    sampling = (sidecar.get("config") or {}).get("sampling") or {}
    quantiles = sampling.get("quantiles")
    return quantiles if isinstance(quantiles, int) and quantiles >= 1 else SamplingConfig().quantiles


def activation_groups(output_dir: Path, latents: np.ndarray, quantiles: int) -> dict[tuple[int, int], tuple]:
    """Neuronpedia's (binMin, binMax, binContains) of each (latent, sampling bin), bin 0 the
    lowest as stage 4 numbers them (sae_atlas.sampling): the top bin is Neuronpedia's top group
    (binMin and binContains -1, binMax the latent's largest activation); every other bin is its
    interval of peak activations, contiguous with the next, and the share of the latent's
    activating prompts in it (SAEDashboard counts activating tokens; the prompts are what sae-atlas
    has)."""
    path = output_dir / layout.ACTIVATION_EXAMPLES
    if not path.exists() or not len(latents):
        return {}
    values = (
        pl.scan_parquet(path)
        .filter(pl.col("feature_id").is_between(int(latents.min()), int(latents.max())))
        .select("feature_id", value=pl.col("max_activation").cast(pl.Float64))
        .collect()
    )
    binned, inner = assign_bins(values, "value", quantiles)
    bounds = binned.select("feature_id", "_count", "_low", "_high", *inner).unique("feature_id")
    counts = binned.group_by("feature_id", "quantile").agg(count=pl.len())
    edges = [pl.col("_low"), *(pl.col(edge) for edge in inner), pl.col("_high")]
    table = counts.join(bounds, on="feature_id").with_columns(
        lower=pl.coalesce(
            [pl.when(pl.col("quantile") == position).then(edge) for position, edge in enumerate(edges[:-1])]
        ),
        upper=pl.coalesce(
            [pl.when(pl.col("quantile") == position).then(edge) for position, edge in enumerate(edges[1:])]
        ),
    )
    groups = {}
    for latent, position, count, total, high, lower, upper in table.select(
        "feature_id", "quantile", "count", "_count", "_high", "lower", "upper"
    ).iter_rows():
        if position == quantiles - 1:
            groups[latent, position] = (-1.0, round(high, 3), -1.0)
        else:
            groups[latent, position] = (round(lower, 3), round(upper, 3), count / total)
    return groups


def _batches(latents: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for batch in np.unique(latents // BATCH_FEATURES):
        yield int(batch), latents[(latents // BATCH_FEATURES) == batch]


def _gzip_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    layout.write_atomic_bytes(path, gzip.compress(body, compresslevel=5))


def _digest(row: dict) -> str:
    """A row's content, its write time aside."""
    return record_id(*(f"{key}={value}" for key, value in sorted(row.items()) if key != "createdAt"))


def export(atlas: Atlas, out: Path, target: Target) -> dict:
    """Write the Neuronpedia export of ``atlas`` under ``out/<model_id>/<source>/``; returns the
    counts, the explanation model names a maintainer must register (``unmapped``) and what changed
    since an earlier export into the same directory (``changed``)."""
    target = resolve(target, atlas.sae_id)
    root = Path(out) / target.model_id / target.source
    layout.refuse_output_files(root / "source.jsonl")
    features = atlas.features(limit=None)
    explanations = features.filter(pl.col("explanation_ok")).select("feature_id", "explainer", "explanation_text")
    names, unmapped = explanation_model_names(target, sorted(explanations["explainer"].unique().to_list()))
    # UTC with its offset: Prisma, which creates the Model, SourceSet and Source rows, reads only
    # ISO-8601 times that carry one (PostgreSQL takes them too, for the batch rows)
    created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    for name, row in (
        ("model.jsonl", model_row(target, created_at)),
        ("sourceset.jsonl", source_set_row(target, atlas.sae_id, created_at)),
        ("source.jsonl", source_row(atlas, target, created_at)),
    ):
        layout.write_atomic_bytes(root / name, orjson.dumps(row) + b"\n")

    frequency = firing_frequencies(atlas.output_dir, features)
    latents = np.unique(
        np.concatenate(
            [
                atlas.latents_with_neighbours(),
                explanations["feature_id"].to_numpy(),
                atlas.sampled_latents(),
                np.fromiter(frequency, dtype=np.int64, count=len(frequency)),
            ]
        )
    ).astype(np.int64)
    quantiles = sampling_quantiles(atlas.output_dir)
    counts = {"features": 0, "activations": 0, "explanations": 0, "batches": 0}
    manifest: list[tuple[str, str, str]] = []  # (kind, key, digest)
    written: set[Path] = set()
    for batch, members in _batches(latents):
        groups = activation_groups(atlas.output_dir, members, quantiles)
        feature_rows, activation_rows = _feature_rows(atlas, members, frequency, groups, target, created_at)
        in_batch = explanations.filter(pl.col("feature_id") // BATCH_FEATURES == batch)
        explanation_rows = [
            explanation_row(index, names[explainer], text, target, created_at)
            for index, explainer, text in in_batch.rows()
        ]
        name = f"batch-{batch}.jsonl.gz"
        for kind, rows in (
            ("features", feature_rows),
            ("activations", activation_rows),
            ("explanations", explanation_rows),
        ):
            if rows or kind == "features":
                _gzip_lines(root / kind / name, rows)
                written.add(root / kind / name)
            counts[kind] += len(rows)
        manifest += [("feature", row["index"], _digest(row)) for row in feature_rows]
        manifest += [("activation", row["id"], row["index"]) for row in activation_rows]
        manifest += [("explanation", row["id"], row["index"]) for row in explanation_rows]
        counts["batches"] += 1
    # An earlier export into the same directory may have had other batches: they would be imported
    # beside this one's.
    for kind in ("features", "activations", "explanations"):
        for stale in sorted((root / kind).glob("batch-*.jsonl.gz")):
            if stale not in written:
                stale.unlink()
    table = pl.DataFrame(manifest, schema={"kind": pl.String, "key": pl.String, "digest": pl.String}, orient="row")
    changed = _changes(root / MANIFEST, table)
    layout.write_atomic_bytes(root / DELETE_SQL, delete_statements(target).encode())
    table.write_parquet(root / MANIFEST)
    return {"directory": str(root), **counts, "unmapped": unmapped, "changed": changed}


def _changes(previous_path: Path, current: pl.DataFrame) -> dict[str, int]:
    """What an import of ``current`` would not do to a database that holds the earlier export of
    ``previous_path``: features whose content changed (kept as they were), and activations and
    explanations the earlier export had and this one has not (left beside the new ones)."""
    if not previous_path.exists():
        return {}
    try:
        previous = pl.read_parquet(previous_path)
    except (OSError, pl.exceptions.PolarsError):
        return {}
    features = previous.filter(pl.col("kind") == "feature").join(
        current.filter(pl.col("kind") == "feature"), on=["kind", "key"], how="inner"
    )
    gone = previous.filter(pl.col("kind") != "feature").join(current, on=["kind", "key"], how="anti")
    return {
        "features": int((features["digest"] != features["digest_right"]).sum()),
        "activations": int((gone["kind"] == "activation").sum()),
        "explanations": int((gone["kind"] == "explanation").sum()),
    }


def delete_statements(target: Target) -> str:
    """SQL that removes this source's features, activations and explanations from Neuronpedia's
    database, so that an import of a changed export replaces them (its importer never updates)."""
    model, source = (value.replace("'", "''") for value in (target.model_id, target.source))
    where = f"\"modelId\" = '{model}' AND \"layer\" = '{source}'"
    return (
        "-- Neuronpedia's importer inserts with ON CONFLICT DO NOTHING: run this on its database before\n"
        "-- importing a changed export of this source.\n"
        "BEGIN;\n"
        f'DELETE FROM "Explanation" WHERE {where};\n'
        f'DELETE FROM "Activation" WHERE {where};\n'
        f'DELETE FROM "Neuron" WHERE {where};\n'
        "COMMIT;\n"
    )


def _feature_rows(
    atlas: Atlas, members: np.ndarray, frequency: dict, groups: dict, target: Target, created_at: str
) -> tuple[list, list]:
    """The feature rows (with decoder neighbours) and activation rows of one batch's latents."""
    features, activations = [], []
    for index in members.tolist():
        examples = atlas.feature_examples(index)
        neighbours = atlas.neighbours_of(index)
        features.append(
            feature_row(
                index,
                ([row["feature_id"] for row in neighbours], [round(row["cosine_similarity"], 6) for row in neighbours]),
                target,
                created_at,
                max_activation=max((example["max_activation"] for example in examples), default=0.0),
                frequency=frequency.get(index),
            )
        )
        activations.extend(
            activation_row(
                example, groups.get((index, example["quantile"]), (None, None, None)), index, target, created_at
            )
            for example in examples
        )
    return features, activations
