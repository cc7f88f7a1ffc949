"""Readers for activation records, in both formats the pipeline accepts.

(a) ``activations.jsonl`` — lines ``{"index": "877", "dataSetPromptId": 0, "sparseValues": [[pos,
    value], ...]}`` — with ``prompts.json``, a JSON list of token-string lists (SentencePiece ``▁``
    word marks). The JSONL file is streamed: each line is parsed and immediately appended to flat
    typed buffers, so half a million lines never exist as Python dicts at once.
(b) a delphi latent cache, ``latents/<hook>/{start}_{end}.safetensors`` shards (``locations``,
    ``activations``, ``tokens``), with a ``tokenizer.json`` that turns token ids into strings.

Both produce the same :class:`ActivationRecords`: one row per (feature, prompt) with its
activation pairs sorted by position, and the prompt token table. Bad lines or shards are reported
with file and line and dropped; everything else is kept.
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from sae_atlas.problems import MAX_LATENT_ID, Problems, latent_out_of_range
from sae_atlas.sources import files

SHARD_NAME = re.compile(r"(?P<start>[0-9]+)_(?P<end>[0-9]+)\.safetensors", re.ASCII)  # matched whole
ACTIVATION_PAIR_TYPE = pa.struct([("token_position", pa.uint32()), ("activation_value", pa.float32())])


@dataclass
class ActivationRecords:
    """Sparse activation records in columnar form.

    Record ``i`` is feature ``feature_id[i]`` on prompt ``prompt_id[i]``; its pairs are
    ``positions[offsets[i]:offsets[i+1]]`` / ``values[...]``, sorted by position. ``prompts[p]``
    holds the token strings of prompt ``p``.
    """

    feature_id: np.ndarray
    prompt_id: np.ndarray
    offsets: np.ndarray
    positions: np.ndarray
    values: np.ndarray
    prompts: pa.ListArray
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.feature_id)

    def pairs(self) -> pa.ListArray:
        """The activation pairs as ``list<struct<token_position, activation_value>>``."""
        struct = pa.StructArray.from_arrays(
            [pa.array(self.positions, pa.uint32()), pa.array(self.values, pa.float32())],
            fields=list(ACTIVATION_PAIR_TYPE),
        )
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), struct)


def _empty_records(paths: list[Path]) -> ActivationRecords:
    none = np.zeros(0, dtype=np.uint32)
    return ActivationRecords(
        none,
        none,
        np.zeros(1, dtype=np.int64),
        none,
        np.zeros(0, dtype=np.float32),
        prompts=pa.array([], pa.list_(pa.string())),
        files=paths,
    )


def _validate_and_sort(
    feature_id: np.ndarray,
    prompt_id: np.ndarray,
    counts: np.ndarray,
    positions: np.ndarray,
    values: np.ndarray,
    *,
    prompt_lengths: np.ndarray,
    path: Path,
    problems: Problems,
    lines: np.ndarray | None = None,
    width: int | None = None,
) -> tuple[tuple[np.ndarray, ...], int]:
    """Drop records that point outside their prompt, hold bad values or repeat a (feature, prompt)
    pair; sort records by (feature, prompt) and pairs by position.

    ``prompt_lengths[p]`` is -1 for a prompt that could not be read; records of latents at or
    beyond ``width`` (the SAE's number of latents, when known) are dropped. Returns the arrays
    (feature_id, prompt_id, offsets, positions, values) and the number of records without pairs.
    """
    n_records = len(counts)
    record_of_pair = np.repeat(np.arange(n_records), counts)
    dropped = np.zeros(n_records, dtype=bool)

    def drop(mask: np.ndarray, message) -> None:
        for index in np.flatnonzero(mask & ~dropped):
            problems.add(
                path, message(index), line=None if lines is None else int(lines[index]), latent=int(feature_id[index])
            )
        dropped[mask] = True

    n_prompts = len(prompt_lengths)
    limit = MAX_LATENT_ID + 1 if width is None else min(width, MAX_LATENT_ID + 1)
    drop(feature_id >= limit, lambda i: latent_out_of_range(int(feature_id[i]), width))
    drop(prompt_id >= n_prompts, lambda i: f"prompt id {prompt_id[i]} is out of range (prompts has {n_prompts})")
    length = np.full(n_records, -1, dtype=np.int64)
    in_range = prompt_id < n_prompts
    length[in_range] = prompt_lengths[prompt_id[in_range]]
    drop(length < 0, lambda i: f"prompt {prompt_id[i]} could not be read")

    def any_pair(mask_of_pairs: np.ndarray) -> np.ndarray:
        hit = np.zeros(n_records, dtype=bool)
        hit[record_of_pair[mask_of_pairs]] = True
        return hit

    outside = (positions < 0) | (positions != np.floor(positions)) | (positions >= length[record_of_pair])
    first_outside = {}
    for pair in np.flatnonzero(outside):
        first_outside.setdefault(record_of_pair[pair], positions[pair])
    drop(
        any_pair(outside),
        lambda i: f"token position {first_outside[i]:g} is outside prompt {prompt_id[i]} (length {length[i]})",
    )
    # Values are stored as float32: one beyond its range would become inf.
    unusable = ~np.isfinite(values) | (np.abs(values) > np.finfo(np.float32).max)
    first_unusable = {}
    for pair in np.flatnonzero(unusable):
        first_unusable.setdefault(record_of_pair[pair], values[pair])
    drop(
        any_pair(unusable),
        lambda i: f"activation value {first_unusable[i]:g} is not a finite float32 number",
    )
    empty = (counts == 0) & ~dropped
    dropped |= empty

    order = np.lexsort((prompt_id, feature_id))
    order = order[~dropped[order]]
    repeated = np.zeros(len(order), dtype=bool)
    repeated[1:] = (feature_id[order][1:] == feature_id[order][:-1]) & (prompt_id[order][1:] == prompt_id[order][:-1])
    for index in order[repeated]:
        problems.add(
            path,
            f"second record for prompt {prompt_id[index]}; the first is kept",
            line=None if lines is None else int(lines[index]),
            latent=int(feature_id[index]),
            kind="duplicate",
        )
    order = order[~repeated]

    starts = np.concatenate(([0], np.cumsum(counts)))[:-1]
    kept_counts = counts[order]
    offsets = np.concatenate(([0], np.cumsum(kept_counts))).astype(np.int64)
    # Gather each kept record's pairs: position within the record + the record's old start.
    pair_index = np.arange(offsets[-1]) - np.repeat(offsets[:-1], kept_counts) + np.repeat(starts[order], kept_counts)
    kept_positions, kept_values = positions[pair_index], values[pair_index]
    by_position = np.lexsort((kept_positions, np.repeat(np.arange(len(order)), kept_counts)))
    arrays = (
        feature_id[order].astype(np.uint32),
        prompt_id[order].astype(np.uint32),
        offsets,
        kept_positions[by_position].astype(np.uint32),
        kept_values[by_position].astype(np.float32),
    )
    return arrays, int(empty.sum())


# ---------------------------------------------------------------------------------------------
# (a) activations.jsonl + prompts.json


def read_prompts(path: Path, problems: Problems) -> pa.ListArray:
    """``prompts.json``: a JSON list of token-string lists. Bad prompts become empty lists."""
    if not path.exists():
        problems.add(path, "prompts.json is missing", kind="missing")
        return pa.array([], pa.list_(pa.string()))
    raw = files.read_bytes(path, problems)
    if raw is None:
        return pa.array([], pa.list_(pa.string()))
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        problems.add(path, f"truncated or invalid JSON ({error})")
        return pa.array([], pa.list_(pa.string()))
    if not isinstance(data, list):
        problems.add(path, f"expected a JSON list of token lists, got {type(data).__name__}")
        return pa.array([], pa.list_(pa.string()))
    try:
        return pa.array(data, pa.list_(pa.string()))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    # Only on failure: find the bad prompts one by one, so the error can name them.
    for index, prompt in enumerate(data):
        if not (isinstance(prompt, list) and all(isinstance(token, str) for token in prompt)):
            problems.add(path, f"prompt {index} is not a list of token strings; its records are dropped")
            data[index] = None
    return pa.array(data, pa.list_(pa.string()))


def _parse_index(value) -> int:
    if type(value) is int and value >= 0:
        latent = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        latent = int(value)
    else:
        raise ValueError(f"index {value!r} is not a latent id")
    if latent > MAX_LATENT_ID:  # checked here: the record buffers hold 64-bit integers
        raise ValueError(latent_out_of_range(latent, None))
    return latent


def read_jsonl(directory: Path, problems: Problems, *, width: int | None = None) -> ActivationRecords:
    """Stream ``activations.jsonl`` with ``prompts.json`` from ``directory``."""
    directory = Path(directory)
    activations_path, prompts_path = directory / "activations.jsonl", directory / "prompts.json"
    prompts = read_prompts(prompts_path, problems)
    prompt_lengths = prompts.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    if len(prompts) == 0:
        if activations_path.exists():
            problems.add(activations_path, "not read: prompts.json has no usable prompts", kind="missing")
        return _empty_records([activations_path, prompts_path])

    features, prompt_ids, counts, lines = array("q"), array("q"), array("q"), array("q")
    flat = array("d")
    loads = orjson.loads
    if not activations_path.exists():
        problems.add(activations_path, "activations.jsonl is missing", kind="missing")
        handle = None
    else:
        try:
            handle = activations_path.open("rb")
        except OSError as error:
            problems.add(activations_path, f"file cannot be read ({files.reason(error)})", kind="unreadable")
            handle = None
    if handle is not None:
        with handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = loads(line)
                    if type(record) is not dict:
                        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                    feature = _parse_index(record["index"])
                    prompt = record["dataSetPromptId"]
                    if type(prompt) is not int:
                        raise ValueError(f"dataSetPromptId {prompt!r} is not an integer")
                    if prompt < 0:
                        raise ValueError(f"negative prompt id {prompt}")
                    if prompt > MAX_LATENT_ID:
                        raise ValueError(f"prompt id {prompt} is out of range")
                    pairs = record["sparseValues"]
                    if type(pairs) is not list or not all(type(pair) is list and len(pair) == 2 for pair in pairs):
                        raise ValueError("sparseValues is not a list of [position, value] pairs")
                    numbers = array("d", chain.from_iterable(pairs))
                except orjson.JSONDecodeError as error:
                    problems.add(activations_path, f"invalid JSON ({error})", line=line_number)
                    continue
                except KeyError as error:
                    problems.add(activations_path, f"missing key {error}", line=line_number)
                    continue
                except (TypeError, ValueError) as error:
                    message = str(error) if isinstance(error, ValueError) else "non-numeric position or value"
                    problems.add(activations_path, message, line=line_number)
                    continue
                features.append(feature)
                prompt_ids.append(prompt)
                counts.append(len(pairs))
                lines.append(line_number)
                flat.extend(numbers)

    pairs = np.frombuffer(flat, dtype=np.float64).reshape(-1, 2)
    arrays, empty = _validate_and_sort(
        np.frombuffer(features, dtype=np.int64),
        np.frombuffer(prompt_ids, dtype=np.int64),
        np.frombuffer(counts, dtype=np.int64),
        pairs[:, 0],
        pairs[:, 1],
        prompt_lengths=prompt_lengths,
        path=activations_path,
        problems=problems,
        lines=np.frombuffer(lines, dtype=np.int64),
        width=width,
    )
    notes = [f"{activations_path}: {empty} records without activations skipped"] if empty else []
    return ActivationRecords(*arrays, prompts=prompts, files=[activations_path, prompts_path], notes=notes)


# ---------------------------------------------------------------------------------------------
# (b) delphi latent cache: latents/<hook>/{start}_{end}.safetensors + tokenizer.json


def _is_byte_level(tokenizer_spec: dict) -> bool:
    decoder = tokenizer_spec.get("decoder") or {}
    kinds = [decoder.get("type"), *(part.get("type") for part in decoder.get("decoders") or [])]
    return "ByteLevel" in kinds


def token_strings(tokenizer_path: Path, token_ids: np.ndarray, problems: Problems) -> pa.Array | None:
    """The display string of each token id, aligned with ``token_ids``.

    SentencePiece vocabularies keep their pieces (``▁the``, ``<0x0A>``), which the window text
    builder turns back into text; byte-level BPE pieces (``Ġthe``) are decoded one token at a
    time, which gives delphi's ``str_tokens`` (`` the``).
    """
    from tokenizers import Tokenizer

    if not Path(tokenizer_path).exists():
        problems.add(tokenizer_path, "tokenizer file is missing", kind="missing")
        return None
    raw = files.read_bytes(tokenizer_path, problems, what="tokenizer file")
    if raw is None:
        return None
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        spec = orjson.loads(raw)
    except Exception as error:  # tokenizers raises plain Exception subclasses for bad files
        problems.add(tokenizer_path, f"not a readable tokenizer.json ({str(error).splitlines()[0]})")
        return None
    unique, inverse = np.unique(token_ids, return_inverse=True)
    byte_level = _is_byte_level(spec)
    strings = []
    unknown = []
    for token_id in unique.tolist():
        piece = (
            tokenizer.decode([token_id], skip_special_tokens=False) if byte_level else tokenizer.id_to_token(token_id)
        )
        if piece is None:
            unknown.append(token_id)
            piece = f"<unk:{token_id}>"
        strings.append(piece)
    if unknown:
        problems.add(
            tokenizer_path, f"{len(unknown)} token ids are not in the vocabulary (e.g. {unknown[0]}); shown as <unk:ID>"
        )
    return pa.array(strings, pa.string()).take(pa.array(inverse.ravel()))


def _shard_array(data: dict, key: str, ndim: int, path: Path, problems: Problems) -> np.ndarray | None:
    value = data.get(key)
    if value is None:
        problems.add(path, f"shard has no {key!r} tensor; skipped")
        return None
    if value.ndim != ndim:
        problems.add(path, f"{key!r} has shape {list(value.shape)}, expected {ndim} dimensions; shard skipped")
        return None
    return value


def read_delphi_cache(
    directory: Path, tokenizer_path: Path | None, problems: Problems, *, width: int | None = None
) -> ActivationRecords:
    """Read every ``{start}_{end}.safetensors`` shard of one delphi hookpoint cache directory."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    shards = []
    if not directory.is_dir():
        problems.add(directory, "activation cache directory does not exist", kind="missing")
    else:
        for path in files.list_directory(directory, problems):
            if path.is_dir() or path.name == "config.json":
                continue
            match = SHARD_NAME.fullmatch(path.name)
            if match is None:
                problems.add(path, "shard name does not parse as {start}_{end}.safetensors; skipped", kind="foreign")
                continue
            start, end = int(match.group("start")), int(match.group("end"))
            if end > MAX_LATENT_ID:
                problems.add(path, f"shard range {start}_{end} is beyond the largest feature id; skipped")
                continue
            if start > end:
                problems.add(path, f"shard range {start}_{end} is empty; skipped")
                continue
            shards.append((start, end, path))
    shards.sort()

    tokens = None
    parts: list[tuple[np.ndarray, ...]] = []
    read = []
    for start, end, path in shards:
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            problems.add(path, f"unreadable safetensors file ({str(error).splitlines()[0]})")
            continue
        read.append(path)
        locations = _shard_array(data, "locations", 2, path, problems)
        activations = _shard_array(data, "activations", 1, path, problems)
        if locations is None or activations is None:
            continue
        if locations.shape[1] != 3 or len(locations) != len(activations):
            problems.add(
                path,
                f"locations {list(locations.shape)} do not match activations {list(activations.shape)}; shard skipped",
            )
            continue
        shard_tokens = data.get("tokens")
        if shard_tokens is not None:
            if shard_tokens.ndim != 2:
                problems.add(path, f"tokens has shape {list(shard_tokens.shape)}, expected [n_seq, ctx]")
            elif tokens is None:
                tokens = shard_tokens
            elif shard_tokens.shape != tokens.shape:
                problems.add(
                    path,
                    f"tokens shape {list(shard_tokens.shape)} differs from "
                    f"{list(tokens.shape)} in the first shard; shard skipped",
                )
                continue
        locations = locations.astype(np.int64)
        latent = locations[:, 2] + start
        beyond = latent > end
        if beyond.any():
            problems.add(
                path, f"{int(beyond.sum())} locations name latents beyond the shard range {start}_{end}; dropped"
            )
        keep = ~beyond
        parts.append((latent[keep], locations[keep, 0], locations[keep, 1], activations[keep].astype(np.float32)))

    if shards and tokens is None and parts:
        problems.add(directory, "no shard has a 'tokens' matrix (a legacy cache?); prompts cannot be rebuilt")
    n_seq, ctx = tokens.shape if tokens is not None else (0, 0)
    if tokens is not None and tokenizer_path is not None:
        strings = token_strings(tokenizer_path, tokens.ravel(), problems)
    else:
        strings = None
        if tokens is not None:
            problems.add(directory, "no tokenizer configured; prompts cannot be rebuilt", kind="missing")
    if strings is None:
        return _empty_records(read)
    prompts = pa.ListArray.from_arrays(pa.array(np.arange(0, n_seq * ctx + 1, ctx, dtype=np.int32)), strings)

    if parts:
        latent, seq, pos, act = (np.concatenate(column) for column in zip(*parts, strict=True))
    else:
        latent = seq = pos = np.zeros(0, dtype=np.int64)
        act = np.zeros(0, dtype=np.float32)
    order = np.lexsort((pos, seq, latent))
    latent, seq, pos, act = latent[order], seq[order], pos[order], act[order]
    boundary = np.flatnonzero((np.diff(latent) != 0) | (np.diff(seq) != 0)) + 1
    starts = np.concatenate(([0], boundary)) if len(latent) else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.concatenate((starts, [len(latent)]))) if len(latent) else np.zeros(0, dtype=np.int64)
    prompt_lengths = np.full(n_seq, ctx, dtype=np.int64)
    arrays, _ = _validate_and_sort(
        latent[starts],
        seq[starts],
        counts,
        pos.astype(np.float64),
        act.astype(np.float64),
        prompt_lengths=prompt_lengths,
        path=directory,
        problems=problems,
        width=width,
    )
    return ActivationRecords(*arrays, prompts=prompts, files=read)


def read_activations(
    format: str, path: Path, tokenizer: Path | None, problems: Problems, *, width: int | None = None
) -> ActivationRecords:
    """Read activation records in ``format`` ("jsonl" or "delphi") from ``path``; records of latents
    at or beyond ``width`` (the SAE's number of latents, when known) are reported and dropped."""
    if format == "delphi":
        return read_delphi_cache(path, tokenizer, problems, width=width)
    return read_jsonl(path, problems, width=width)
