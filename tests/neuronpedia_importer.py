"""A model of Neuronpedia's importer and of the tables it writes, to load exports into in tests.

Modelled on hijohnnylin/neuronpedia ``ebb8426``:

- ``apps/webapp/app/api/admin/import/route.ts``: ``model.jsonl``, ``sourceset.jsonl`` and
  ``source.jsonl`` are read outside any try (a missing one aborts the import before a row is
  stored); each of their rows is created with Prisma only when no row has its key (Prisma refuses
  an unknown field, a missing required one, a value of the wrong type, a time without an offset);
  then every ``features/``, ``activations/`` and ``explanations/`` batch, in the bucket's order;
- ``apps/webapp/lib/db/import.ts`` ``importJsonlString``: the columns are the keys of a batch's
  FIRST line that are columns of the table; each line gives those columns (NULL where it lacks
  one; other keys dropped), the rest take their defaults; one ``INSERT … SELECT FROM
  jsonb_to_recordset … ON CONFLICT DO NOTHING`` per batch, so a NULL in a NOT NULL column, a
  value PostgreSQL cannot cast or a broken foreign key fails the whole batch, and a row whose key
  exists is skipped; an activation's ``zIndices`` array becomes ``zKIndices``/``zQIndices``;
- the tables of ``apps/webapp/prisma/schema.prisma`` and its migrations: the columns below, with
  their type, NOT NULL and default, keys and foreign keys.
"""

from __future__ import annotations

import gzip
from datetime import datetime
from pathlib import Path

import orjson

TEXT, INT, FLOAT, BOOL, TIME, JSON, VECTOR, VISIBILITY = "text", "int", "float", "bool", "time", "json", "vector", "vis"


def column(kind: str, *, required: bool = False, default: bool = False, array: bool = False) -> tuple:
    return kind, required, default, array


ARRAY = {"array": True, "default": True}
NEURON = {
    "modelId": column(TEXT, required=True),
    "layer": column(TEXT, required=True),
    "index": column(TEXT, required=True),
    "sourceSetName": column(TEXT),
    "creatorId": column(TEXT),
    "createdAt": column(TIME, required=True, default=True),
    "maxActApprox": column(FLOAT, default=True),
    "hasVector": column(BOOL, required=True, default=True),
    "vector": column(FLOAT, **ARRAY),
    "vectorLabel": column(TEXT),
    "vectorDefaultSteerStrength": column(FLOAT, default=True),
    "hookName": column(TEXT),
    "topkCosSimIndices": column(INT, **ARRAY),
    "topkCosSimValues": column(FLOAT, **ARRAY),
    **{
        name: column(INT if name.endswith("indices") else FLOAT, **ARRAY)
        for name in (
            "neuron_alignment_indices",
            "neuron_alignment_values",
            "neuron_alignment_l1",
            "correlated_neurons_indices",
            "correlated_neurons_pearson",
            "correlated_neurons_l1",
            "correlated_features_indices",
            "correlated_features_pearson",
            "correlated_features_l1",
            "neg_values",
            "pos_values",
            "freq_hist_data_bar_heights",
            "freq_hist_data_bar_values",
            "logits_hist_data_bar_heights",
            "logits_hist_data_bar_values",
            "decoder_weights_dist",
        )
    },
    "neg_str": column(TEXT, **ARRAY),
    "pos_str": column(TEXT, **ARRAY),
    "frac_nonzero": column(FLOAT, required=True, default=True),
    "umap_cluster": column(INT),
    "umap_log_feature_sparsity": column(FLOAT),
    "umap_x": column(FLOAT),
    "umap_y": column(FLOAT),
}
ACTIVATION = {
    "id": column(TEXT, required=True),
    "tokens": column(TEXT, array=True),
    "dataIndex": column(TEXT),
    "index": column(TEXT, required=True),
    "layer": column(TEXT, required=True),
    "modelId": column(TEXT, required=True),
    "dataSource": column(TEXT),
    "maxValue": column(FLOAT, required=True),
    "maxValueTokenIndex": column(INT, required=True),
    "minValue": column(FLOAT, required=True),
    "values": column(FLOAT, array=True),
    "dfaValues": column(FLOAT, **ARRAY),
    "dfaTargetIndex": column(INT),
    "dfaMaxValue": column(FLOAT),
    "zQIndices": column(INT, **ARRAY),
    "zKIndices": column(INT, **ARRAY),
    "zValues": column(FLOAT, **ARRAY),
    "creatorId": column(TEXT, required=True),
    "createdAt": column(TIME, required=True, default=True),
    "lossValues": column(FLOAT, **ARRAY),
    "logitContributions": column(TEXT),
    "binMin": column(FLOAT),
    "binMax": column(FLOAT),
    "binContains": column(FLOAT),
    "qualifyingTokenIndex": column(INT),
}
EXPLANATION = {
    "id": column(TEXT, required=True),
    "modelId": column(TEXT, required=True),
    "layer": column(TEXT, required=True),
    "index": column(TEXT, required=True),
    "embedding": column(VECTOR),
    "description": column(TEXT, required=True),
    "authorId": column(TEXT, required=True),
    "triggeredByUserId": column(TEXT),
    "notes": column(TEXT),
    "scoreV1": column(FLOAT, required=True, default=True),
    "scoreV2": column(FLOAT),
    "umap_x": column(FLOAT, default=True),
    "umap_y": column(FLOAT, default=True),
    "umap_cluster": column(INT, default=True),
    "umap_log_feature_sparsity": column(FLOAT, default=True),
    "typeName": column(TEXT),
    "explanationModelName": column(TEXT),
    "createdAt": column(TIME, required=True, default=True),
    "updatedAt": column(TIME, required=True, default=True),
}
# Prisma's models (every field it accepts in a create; required: no default and not optional)
MODEL = {
    "id": column(TEXT, required=True),
    "displayNameShort": column(TEXT, default=True),
    "displayName": column(TEXT, default=True),
    "creatorId": column(TEXT, required=True),
    "tlensId": column(TEXT),
    "openRouterId": column(TEXT),
    "dimension": column(INT),
    "thinking": column(BOOL, default=True),
    "visibility": column(VISIBILITY, default=True),
    "defaultSourceSetName": column(TEXT),
    "defaultSourceId": column(TEXT),
    "defaultGraphSourceSetName": column(TEXT),
    "inferenceEnabled": column(BOOL, default=True),
    "instruct": column(BOOL, default=True),
    "layers": column(INT, required=True),
    "neuronsPerLayer": column(INT, required=True),
    "createdAt": column(TIME, default=True),
    "owner": column(TEXT, required=True),
    "updatedAt": column(TIME, default=True),
    "website": column(TEXT),
}
SOURCE_SET = {
    "modelId": column(TEXT, required=True),
    "name": column(TEXT, required=True),
    "hasDashboards": column(BOOL, default=True),
    "allowInferenceSearch": column(BOOL, default=True),
    "visibility": column(VISIBILITY, default=True),
    "description": column(TEXT, required=True),
    "type": column(TEXT, default=True),
    "creatorName": column(TEXT, required=True),
    "urls": column(TEXT, array=True),
    "creatorEmail": column(TEXT),
    "creatorId": column(TEXT, required=True),
    "releaseName": column(TEXT),
    "defaultOfModelId": column(TEXT),
    "defaultRange": column(INT, default=True),
    "defaultShowBreaks": column(BOOL, default=True),
    "showDfa": column(BOOL, default=True),
    "showCorrelated": column(BOOL, default=True),
    "showHeadAttribution": column(BOOL, default=True),
    "showUmap": column(BOOL, default=True),
    "createdAt": column(TIME, default=True),
}
SOURCE = {
    "id": column(TEXT, required=True),
    "modelId": column(TEXT, required=True),
    "hasDashboards": column(BOOL, default=True),
    "inferenceEnabled": column(BOOL, default=True),
    "saelensConfig": column(JSON),
    "saelensRelease": column(TEXT),
    "saelensSaeId": column(TEXT),
    "hfRepoId": column(TEXT),
    "hfFolderId": column(TEXT),
    "visibility": column(VISIBILITY, default=True),
    "defaultOfModelId": column(TEXT),
    "setName": column(TEXT, required=True),
    "creatorId": column(TEXT, required=True),
    "hasUmap": column(BOOL, default=True),
    "hasUmapLogSparsity": column(BOOL, default=True),
    "hasUmapClusters": column(BOOL, default=True),
    "num_prompts": column(INT),
    "num_tokens_in_prompt": column(INT),
    "dataset": column(TEXT),
    "notes": column(TEXT),
    "cosSimMatchModelId": column(TEXT),
    "cosSimMatchSourceId": column(TEXT),
    "createdAt": column(TIME, default=True),
}
TABLES = {
    "Model": (MODEL, ("id",)),
    "SourceSet": (SOURCE_SET, ("modelId", "name")),
    "Source": (SOURCE, ("modelId", "id")),
    "Neuron": (NEURON, ("modelId", "layer", "index")),
    "Activation": (ACTIVATION, ("id",)),
    "Explanation": (EXPLANATION, ("id",)),
}


class ImportFailed(Exception):
    """What the route reports as its error event: the import stopped here."""


def _fits(kind: str, value, *, prisma: bool) -> bool:
    if kind == TEXT:
        return isinstance(value, str)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == FLOAT:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == VISIBILITY:
        return value in ("PUBLIC", "UNLISTED", "PRIVATE")
    if kind == VECTOR:
        return isinstance(value, list) and len(value) == 256
    if kind == TIME:
        try:
            parsed = datetime.fromisoformat(value)
        except (TypeError, ValueError):
            return False
        return parsed.tzinfo is not None or not prisma  # PostgreSQL takes a naive time, Prisma does not
    return True  # JSON


def check_value(table: str, name: str, value, *, prisma: bool) -> None:
    kind, required, _, array = TABLES[table][0][name]
    if value is None:
        if required:
            raise ImportFailed(f'null value in column "{name}" of relation "{table}" violates not-null constraint')
        return
    values = value if array else [value]
    if array and not isinstance(value, list):
        raise ImportFailed(f"{table}.{name}: malformed array literal {value!r}")
    for item in values:
        if not _fits(kind, item, prisma=prisma):
            raise ImportFailed(f"{table}.{name}: invalid input {item!r} for {kind}")


class Database:
    """The rows of the six tables, by key, and the rows the seed and Neuronpedia's config give."""

    def __init__(self, *, users: set[str], explanation_models: set[str], explanation_types: set[str]):
        self.users, self.explanation_models, self.explanation_types = users, explanation_models, explanation_types
        self.rows: dict[str, dict[tuple, dict]] = {table: {} for table in TABLES}

    def key(self, table: str, row: dict) -> tuple:
        return tuple(row[name] for name in TABLES[table][1])

    def prisma_create(self, table: str, line: dict) -> None:
        """route.ts: findUnique on the key, create only when absent."""
        columns = TABLES[table][0]
        unknown = sorted(set(line) - set(columns) - {"inferenceHosts"})  # route.ts sets it aside
        if unknown:
            raise ImportFailed(f"Unknown argument `{unknown[0]}` in prisma.{table}.create()")
        for name, (_, required, default, _) in columns.items():
            if required and not default and line.get(name) is None:
                raise ImportFailed(f"Argument `{name}` is missing in prisma.{table}.create()")
            if name in line:
                check_value(table, name, line[name], prisma=True)
        key = self.key(table, line)
        if key not in self.rows[table]:
            self.rows[table][key] = {name: line.get(name) for name in columns if name in line}

    def insert_batch(self, table: str, lines: list[dict]) -> None:
        """import.ts's importJsonlString: all the batch or none of it."""
        if not lines:
            return
        columns = TABLES[table][0]
        chosen = [name for name in lines[0] if name in columns]
        staged = {}
        for line in lines:
            row = {name: line.get(name) for name in chosen}
            for name in chosen:
                check_value(table, name, row[name], prisma=False)
            for name, (_, required, default, _) in columns.items():
                if name not in chosen and required and not default:
                    raise ImportFailed(f'null value in column "{name}" of relation "{table}" violates not-null')
            self._check_references(table, row)
            key = self.key(table, row)
            if key not in self.rows[table] and key not in staged:  # ON CONFLICT DO NOTHING
                staged[key] = row
        self.rows[table].update(staged)

    def _check_references(self, table: str, row: dict) -> None:
        def require(condition: bool, what: str) -> None:
            if not condition:
                raise ImportFailed(f'insert or update on table "{table}" violates foreign key constraint ({what})')

        if table == "Neuron":
            require((row["modelId"],) in self.rows["Model"], "modelId")
            require((row["modelId"], row["layer"]) in self.rows["Source"], "layer")
            require(row.get("creatorId") in (None, *self.users), "creatorId")
        elif table in ("Activation", "Explanation"):
            require((row["modelId"], row["layer"], row["index"]) in self.rows["Neuron"], "neuron")
            require(row.get("creatorId", row.get("authorId")) in self.users, "creator")
        if table == "Explanation":
            require(row.get("typeName") in (None, *self.explanation_types), "typeName")
            require(row.get("explanationModelName") in (None, *self.explanation_models), "explanationModelName")
            require(row.get("triggeredByUserId") in (None, *self.users), "triggeredByUserId")

    def delete_source(self, model_id: str, layer: str) -> None:
        """What delete-before-reimport.sql does."""
        for table in ("Explanation", "Activation", "Neuron"):
            self.rows[table] = {
                key: row
                for key, row in self.rows[table].items()
                if not (row["modelId"] == model_id and row["layer"] == layer)
            }


def _jsonl(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def _batches(directory: Path) -> list[Path]:
    """The bucket's listing order: by key, as strings."""
    return sorted(directory.glob("*.jsonl.gz"), key=lambda path: path.name)


def import_source(database: Database, root: Path) -> None:
    """route.ts for ``<model>/<source>/`` at ``root`` with explanations=true."""
    for name in ("model.jsonl", "sourceset.jsonl", "source.jsonl"):
        if not (root / name).exists():
            raise ImportFailed(f"{name}: NoSuchKey")
    for table, name in (("Model", "model.jsonl"), ("SourceSet", "sourceset.jsonl"), ("Source", "source.jsonl")):
        for line in _jsonl(root / name):
            database.prisma_create(table, line)
    for table, folder in (("Neuron", "features"), ("Activation", "activations")):
        for path in _batches(root / folder):
            lines = _jsonl(path)
            if table == "Activation":
                lines = [_normalise_activation(line) for line in lines]
            database.insert_batch(table, lines)
    explanations = [line for path in _batches(root / "explanations") for line in _jsonl(path)]
    for start in range(0, len(explanations), 10_000):
        database.insert_batch("Explanation", explanations[start : start + 10_000])


def _normalise_activation(line: dict) -> dict:
    indices = line.get("zIndices")
    if isinstance(indices, list):
        numbers = lambda value: isinstance(value, list) and all(isinstance(item, int | float) for item in value)  # noqa: E731
        if len(indices) > 0 and numbers(indices[0]):
            line["zKIndices"] = indices[0]
        if len(indices) > 1 and numbers(indices[1]):
            line["zQIndices"] = indices[1]
    return line
