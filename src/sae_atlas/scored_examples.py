"""The example each score record scored, and what the scorer decided on it (scorer evidence).

:mod:`sae_atlas.score_methods` turns a score file's records into the numbers its aggregator needs;
this module keeps, per record, what a researcher needs to see the scorer's work: its position in
the file, the scorer's verdict and the example it was shown. Examples are kept once per latent in
an :class:`ExampleStore` (every run of a study scores the same examples of a latent) and records
point to them by their text: the tokens concatenated, which is also what the embedding scorer keeps.

What "the example" is differs by method (raw-formats.md §1.6):

``fuzz``, ``detection``, ``embedding``   the record's example (``str_tokens``, or ``text``)
``intruder``                             the intruder the scorer had to find in its sample
``example_embedding``                    the batch's activating query (the explanation plays no part)
``simulation``                           one row per scored sequence (not per group): its tokens,
                                         the simulator's expected activations and the true ones
                                         (normalised 0–10, as delphi compares them)
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from sae_atlas.score_methods import finite, is_number

# The methods whose records are one example each, kept record by record in stages/score_records;
# simulation's records are groups, so its sequences are kept instead (:func:`simulation_sequences`).
EVIDENCE_METHODS = ("fuzz", "detection", "embedding", "intruder", "example_embedding")
# the methods whose records are a right-or-wrong decision of the scorer
DECISION_METHODS = ("fuzz", "detection", "intruder")
EVIDENCE_COLUMNS = {"record": pl.UInt32, "prediction": pl.Boolean, "example_text": pl.String}
ACTIVATION_LIST = pl.List(pl.Float32)
SEQUENCE_COLUMNS = {
    "record": pl.UInt32,
    "activating": pl.Boolean,
    "quantile": pl.Int16,
    "outcome": pl.Float64,
    "example_text": pl.String,
    "simulated_activations": ACTIVATION_LIST,
    "true_activations": ACTIVATION_LIST,
}


def _prediction(record: dict) -> bool | None:
    """A classifier's verdict (is the example activating?): a bool, or Gen 1/2's 0/1; None when
    the record failed (-1, null)."""
    prediction = record.get("prediction")
    if type(prediction) is bool:
        return prediction
    if type(prediction) is int and prediction in (0, 1):
        return bool(prediction)
    return None


def _example(record: dict) -> tuple[str | None, list | None, list | None]:
    """(text, tokens, activations) of the example a record scored. The text is the tokens
    concatenated, so that the embedding scorer's ``text`` (the same example as one string) is the
    same example as the classifiers' ``str_tokens``."""
    tokens = record.get("str_tokens")
    if type(tokens) is list and tokens:
        try:
            text = "".join(tokens)
        except TypeError:  # a token that is not a string: the example is not known
            return None, None, None
        activations = record.get("activations")
        return text, tokens, activations if type(activations) is list and len(activations) == len(tokens) else None
    text = record.get("text")
    return (text, [text], None) if type(text) is str else (None, None, None)


def _intruder_example(record: dict) -> tuple[str | None, list | None, list | None]:
    """The intruder of an intruder record: its tokens where the sample has them (delphi 0.1.3),
    else its highlighted string with the ``<< >>`` marks taken out; nothing for a failed sample."""
    sample = record.get("sample")
    if not isinstance(sample, dict) or type(sample.get("intruder_index")) is not int:
        return None, None, None
    index = sample["intruder_index"]
    tokens, activations = sample.get("tokens"), sample.get("activations")
    if type(tokens) is list and 0 <= index < len(tokens) and type(tokens[index]) is list:
        shown = activations[index] if type(activations) is list and index < len(activations) else None
        return _example({"str_tokens": tokens[index], "activations": shown})
    examples = sample.get("examples")
    if type(examples) is list and 0 <= index < len(examples) and type(examples[index]) is str:
        text = examples[index].replace("<<", "").replace(">>", "")
        return text, [text], None
    return None, None, None


def _query_example(record: dict) -> tuple[str | None, list | None, list | None]:
    """The activating query of an example_embedding batch."""
    batch = record.get("batch")
    query = batch.get("positive_query") if isinstance(batch, dict) else None
    return (query, [query], None) if type(query) is str and query else (None, None, None)


class ExampleStore:
    """The distinct examples of a block of latents, by (latent, text). Of the records that scored
    an example, the one kept is the first with per-token activations, in the order (data_source,
    method, record), else the first in that order: the choice depends on the records only, not on
    the order they are read in, so a block read in part (:mod:`sae_atlas.stages.score_cache`)
    keeps the same examples as a block read whole."""

    def __init__(self):
        # (latent, text) → (tokens, activations, (data_source, method))
        self.examples: dict[tuple[int, str], tuple[list, list | None, tuple[str, str]]] = {}

    def offer(self, latent: int, text: str, tokens: list, activations: list | None, origin: tuple[str, str]) -> None:
        """Keep this example of ``latent`` unless the one held comes first (the class's rule)."""
        held = self.examples.get((latent, text))
        if held is None or _first((activations, origin), (held[1], held[2])):
            self.examples[latent, text] = (tokens, activations, origin)

    def table(self) -> pl.DataFrame:
        """feature_id, example_text, str_tokens, activations (float32; a value that is not a number
        counts as 0), origin_source, origin_method."""
        keys = list(self.examples)
        number = lambda value: float(value) if is_number(value) else 0.0  # noqa: E731
        held = [self.examples[key] for key in keys]
        return pl.DataFrame(
            {
                "feature_id": pl.Series([latent for latent, _ in keys], dtype=pl.UInt32),
                "example_text": pl.Series([text for _, text in keys], dtype=pl.String),
                "str_tokens": pl.Series(_list_array([tokens for tokens, _, _ in held], pa.string(), str)),
                "activations": pl.Series(
                    _list_array([activations for _, activations, _ in held], pa.float32(), number)
                ).cast(ACTIVATION_LIST),
                "origin_source": pl.Series([origin[0] for *_, origin in held], dtype=pl.String),
                "origin_method": pl.Series([origin[1] for *_, origin in held], dtype=pl.String),
            }
        )


def _first(candidate: tuple, held: tuple) -> bool:
    """Whether ``candidate`` (activations, origin) comes before ``held`` in the store's order."""
    if (candidate[0] is None) != (held[0] is None):
        return held[0] is None
    return candidate[1] < held[1]


def pick_examples(examples: pl.DataFrame) -> pl.DataFrame:
    """One row per (feature_id, example_text) of several :meth:`ExampleStore.table` tables
    concatenated, by the store's rule."""
    return examples.sort(pl.col("activations").is_null(), "origin_source", "origin_method", maintain_order=True).unique(
        ["feature_id", "example_text"], keep="first", maintain_order=True
    )


_EXAMPLE_OF = {"intruder": _intruder_example, "example_embedding": _query_example}


def parse_evidence(records: list[dict], method: str, latent: int, source: str, store: ExampleStore) -> dict:
    """Per record of an :data:`EVIDENCE_METHODS` file: its position, the scorer's verdict and the
    text of its example (kept in ``store``); None for other methods. One loop, inlined for the
    classifiers: it runs for every record of a study."""
    n = len(records)
    if method not in EVIDENCE_METHODS:
        return {"record": list(range(n)), "prediction": [None] * n, "example_text": [None] * n}
    known, origin = store.examples, (source, method)
    classifier = method in ("fuzz", "detection")
    example_of = _EXAMPLE_OF.get(method, _example)
    texts, predictions = [], []
    for record in records:
        if classifier:
            prediction = record.get("prediction")
            predictions.append(prediction if type(prediction) is bool else _prediction(record))
        tokens = record.get("str_tokens") if example_of is _example else None
        if type(tokens) is list and tokens:  # the common case, inline (see _example)
            try:
                text = "".join(tokens)
            except TypeError:
                text = None
            held = known.get((latent, text)) if text is not None else ()
            # new, or held without activations, or held from a later run or method
            if held is None or (held and (held[1] is None or origin < held[2])):
                activations = record.get("activations")
                if type(activations) is not list or len(activations) != len(tokens):
                    activations = None
                store.offer(latent, text, tokens, activations, origin)
        else:
            text, tokens, activations = example_of(record)
            held = known.get((latent, text)) if text is not None else ()
            # a copy without activations replaces only a copy without them from a later run
            if held is None or (held and (activations is not None or (held[1] is None and origin < held[2]))):
                store.offer(latent, text, tokens, activations, origin)
        texts.append(text)
    return {"record": list(range(n)), "prediction": predictions if classifier else [None] * n, "example_text": texts}


def _numbers(values) -> list | None:
    """A per-token activation list as floats (null where not a finite number), or None."""
    return [finite(value) for value in values] if type(values) is list else None


def simulation_sequences(records: list[dict], latent: int, source: str, store: ExampleStore) -> dict:
    """One row per sequence a simulation file scored (columns :data:`SEQUENCE_COLUMNS`): the
    quantile groups' sequences, then the pooled group's others (the pooled group repeats every
    activating sequence of the quantile groups: those repeats are not kept)."""
    columns = {name: [] for name in SEQUENCE_COLUMNS}
    groups = [group for group in records if type(group.get("scored_sequence_simulations")) is list]
    pooled = [is_number(group.get("distance")) and group["distance"] == 0 for group in groups]
    seen: set[str] = set()
    for group, is_pooled in sorted(zip(groups, pooled, strict=True), key=lambda item: item[1]):
        for sequence in group["scored_sequence_simulations"]:
            if not isinstance(sequence, dict):
                continue
            simulation = sequence.get("simulation") if isinstance(sequence.get("simulation"), dict) else {}
            text, tokens, _ = _example({"str_tokens": simulation.get("tokens")})
            distance = sequence.get("distance")
            activating = (distance >= 0) if is_number(distance) else None
            if is_pooled and activating is not False and text in seen:
                continue
            seen.add(text)
            if text is not None:
                store.offer(latent, text, tokens, None, (source, "simulation"))
            columns["record"].append(len(columns["record"]))
            columns["activating"].append(activating)
            columns["quantile"].append(int(distance) if activating and float(distance).is_integer() else None)
            columns["outcome"].append(finite(sequence.get("ev_correlation_score")))
            columns["example_text"].append(text)
            columns["simulated_activations"].append(_numbers(simulation.get("expected_activations")))
            columns["true_activations"].append(_numbers(sequence.get("true_activations")))
    return columns


def _list_array(rows: list, values_type: pa.DataType, convert) -> pa.Array:
    """A list column from ``rows`` (lists or None), built flat: one Arrow array of every value and
    the offsets (building a list of Python lists into a column element by element is 30 × slower)."""
    offsets, flat, missing = [0], [], []
    for row in rows:
        if row is None:
            missing.append(True)
        else:
            flat.extend(row)
            missing.append(False)
        offsets.append(len(flat))
    try:
        values = pa.array(flat, type=values_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        values = pa.array([convert(value) for value in flat], type=values_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pa.array(missing, pa.bool_()))
