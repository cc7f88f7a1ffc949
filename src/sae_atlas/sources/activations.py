"""Readers for activation records, in both formats the pipeline accepts.

(a) ``activations.jsonl`` — lines ``{"index": "877", "dataSetPromptId": 0, "sparseValues": [[pos,
    value], ...]}`` — with ``prompts.json``, a JSON list of token-string lists (SentencePiece ``▁``
    word marks). The file is read a batch of lines at a time into flat typed buffers, so a batch
    never exists as Python dicts at once.
(b) a delphi latent cache, ``latents/<hook>/{start}_{end}.safetensors`` shards (``locations``,
    ``activations``, ``tokens``), with a ``tokenizer.json`` that turns token ids into strings. Shards
    are read one at a time, a slice of locations at a time.

Both give an :class:`ActivationStream`: the prompt token table, and the records as blocks of whole
features in (feature, prompt) order, each an :class:`ActivationRecords` with its activation pairs
sorted by position. Records may come in any order: they are partitioned by feature range
(:mod:`sae_atlas.sources.buckets`), written to a scratch directory when they outgrow memory, and
sorted one range at a time, so memory is bounded by the block size, not by the number of records.
Bad lines or shards are reported with file and line and dropped; everything else is kept.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from sae_atlas.problems import MAX_LATENT_ID, Problems, latent_out_of_range
from sae_atlas.sources import files
from sae_atlas.sources.buckets import FeatureBuckets, RecordChunk

SHARD_NAME = re.compile(r"(?P<start>[0-9]+)_(?P<end>[0-9]+)\.safetensors", re.ASCII)  # matched whole
ACTIVATION_PAIR_TYPE = pa.struct([("token_position", pa.uint32()), ("activation_value", pa.float32())])
LINES_PER_BATCH = 65_536
LOCATIONS_PER_SLICE = 4_000_000


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


def _no_records(prompts: pa.ListArray) -> ActivationRecords:
    none = np.zeros(0, dtype=np.uint32)
    return ActivationRecords(none, none, np.zeros(1, dtype=np.int64), none, np.zeros(0, dtype=np.float32), prompts)


@dataclass
class ActivationStream:
    """Activation records of one input, delivered a block of whole features at a time.

    ``prompts`` and ``files`` are known at once; iterating yields the blocks in feature order
    (each :class:`ActivationRecords` shares ``prompts``). ``records`` counts the entries read
    (0: nothing usable was read); ``notes`` is complete once iteration ends.
    """

    prompts: pa.ListArray
    files: list[Path]
    records: int
    _blocks: Callable[[], Iterator[ActivationRecords]] | None = None
    notes: list[str] = field(default_factory=list)
    _consumed: bool = False

    def __iter__(self) -> Iterator[ActivationRecords]:
        # Blocks are read from scratch files that are removed as they go: there is one pass.
        if self._consumed:
            raise RuntimeError("an activation stream can be iterated once")
        self._consumed = True
        if self._blocks is not None:
            yield from self._blocks()

    def collect(self) -> ActivationRecords:
        """Every block in one :class:`ActivationRecords` (for inputs that fit in memory)."""
        blocks = list(self)
        if not blocks:
            return ActivationRecords(*_arrays_of(_no_records(self.prompts)), self.prompts, self.files, self.notes)
        counts = np.concatenate([np.diff(block.offsets) for block in blocks])
        return ActivationRecords(
            np.concatenate([block.feature_id for block in blocks]),
            np.concatenate([block.prompt_id for block in blocks]),
            np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            np.concatenate([block.positions for block in blocks]),
            np.concatenate([block.values for block in blocks]),
            prompts=self.prompts,
            files=self.files,
            notes=self.notes,
        )


def _arrays_of(records: ActivationRecords) -> tuple[np.ndarray, ...]:
    return records.feature_id, records.prompt_id, records.offsets, records.positions, records.values


def _validate(
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
) -> tuple[np.ndarray, int]:
    """Which records to keep: not those that point outside their prompt, hold bad values or belong
    to a latent beyond ``width``, nor those without pairs (counted, not reported).

    ``prompt_lengths[p]`` is -1 for a prompt that could not be read. Returns the keep mask and the
    number of records without pairs.
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
    return ~(dropped | empty), int(empty.sum())


def _sort_unique(chunk: RecordChunk, *, path: Path, problems: Problems, lines: bool) -> tuple[np.ndarray, ...]:
    """Sort records by (feature, prompt) and pairs by position; a second record of a (feature,
    prompt) pair (by arrival order) is reported and dropped. Returns (feature_id, prompt_id,
    offsets, positions, values)."""
    feature_id, prompt_id = chunk.feature, chunk.prompt
    order = np.lexsort((prompt_id, feature_id))
    repeated = np.zeros(len(order), dtype=bool)
    repeated[1:] = (feature_id[order][1:] == feature_id[order][:-1]) & (prompt_id[order][1:] == prompt_id[order][:-1])
    for index in order[repeated]:
        problems.add(
            path,
            f"second record for prompt {prompt_id[index]}; the first is kept",
            line=int(chunk.line[index]) if lines else None,
            latent=int(feature_id[index]),
            kind="duplicate",
        )
    kept = chunk.take(order[~repeated])
    offsets = np.concatenate(([0], np.cumsum(kept.counts))).astype(np.int64)
    by_position = np.lexsort((kept.positions, np.repeat(np.arange(len(kept)), kept.counts)))
    return (
        kept.feature.astype(np.uint32),
        kept.prompt.astype(np.uint32),
        offsets,
        kept.positions[by_position].astype(np.uint32),
        kept.values[by_position].astype(np.float32),
    )


def _stream(
    prompts: pa.ListArray,
    paths: list[Path],
    buckets: FeatureBuckets,
    block: Callable[[RecordChunk], tuple[tuple[np.ndarray, ...], int]],
    empty_note: Callable[[int], str],
) -> ActivationStream:
    """The stream of ``buckets``: each bucket turned into a block by ``block`` (which returns the
    block's arrays and its number of records without pairs)."""

    def blocks() -> Iterator[ActivationRecords]:
        empty = 0
        try:
            for chunk in buckets.buckets():
                arrays, without_pairs = block(chunk)
                empty += without_pairs
                if len(arrays[0]):
                    yield ActivationRecords(*arrays, prompts=prompts, files=paths)
        finally:
            buckets.close()
        if empty:
            stream.notes.append(empty_note(empty))

    stream = ActivationStream(prompts, paths, buckets.records, blocks)
    return stream


# ---------------------------------------------------------------------------------------------
# (a) activations.jsonl + prompts.json


def read_prompts(path: Path, problems: Problems) -> pa.ListArray:
    """``prompts.json``: a JSON list of token-string lists. Bad prompts become empty lists."""
    if not path.exists():
        problems.add(path, "prompts.json is missing", kind="missing")
        return pa.array([], pa.list_(pa.string()))
    raw = files.read_bytes(path, problems, what="prompts.json")
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


def _parse_lines(handle, path: Path, problems: Problems, batch: int) -> Iterator[RecordChunk]:
    """The well-formed lines of ``activations.jsonl``, ``batch`` lines at a time (float64 positions
    and values, so that validation can name what is wrong with them)."""
    loads = orjson.loads
    line_number = 0
    while True:
        features, prompt_ids, counts, lines = array("q"), array("q"), array("q"), array("q")
        flat = array("d")
        read = 0
        for line in handle:
            line_number += 1
            read += 1
            if not line.strip():
                if read >= batch:
                    break
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
                problems.add(path, f"invalid JSON ({error})", line=line_number)
            except KeyError as error:
                problems.add(path, f"missing key {error}", line=line_number)
            except (TypeError, ValueError) as error:
                message = str(error) if isinstance(error, ValueError) else "non-numeric position or value"
                problems.add(path, message, line=line_number)
            else:
                features.append(feature)
                prompt_ids.append(prompt)
                counts.append(len(pairs))
                lines.append(line_number)
                flat.extend(numbers)
            if read >= batch:
                break
        pairs_read = np.frombuffer(flat, dtype=np.float64).reshape(-1, 2)
        yield RecordChunk(
            np.frombuffer(features, dtype=np.int64),
            np.frombuffer(prompt_ids, dtype=np.int64),
            np.frombuffer(lines, dtype=np.int64),
            np.frombuffer(counts, dtype=np.int64),
            pairs_read[:, 0],
            pairs_read[:, 1],
        )
        if read < batch:
            return


def stream_jsonl(
    directory: Path,
    problems: Problems,
    *,
    width: int | None = None,
    scratch: Path | None = None,
    lines_per_batch: int = LINES_PER_BATCH,
    buckets: FeatureBuckets | None = None,
) -> ActivationStream:
    """``activations.jsonl`` with ``prompts.json`` from ``directory``, as a stream of blocks.

    Lines are read and validated a batch at a time and put in their feature range's bucket
    (written under ``scratch`` when they outgrow memory; ``buckets`` sets other budgets);
    duplicates are found and records sorted one bucket at a time as the stream is iterated.
    """
    directory = Path(directory)
    activations_path, prompts_path = directory / "activations.jsonl", directory / "prompts.json"
    paths = [activations_path, prompts_path]
    prompts = read_prompts(prompts_path, problems)
    prompt_lengths = prompts.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    if len(prompts) == 0:
        if activations_path.exists():
            problems.add(activations_path, "not read: prompts.json has no usable prompts", kind="missing")
        return ActivationStream(prompts, paths, 0)

    if not activations_path.exists():
        problems.add(activations_path, "activations.jsonl is missing", kind="missing")
        handle = None
    else:
        refused = files.regular_file_problem(activations_path)
        if refused:
            problems.add(activations_path, refused, kind="unreadable")
            handle = None
        else:
            try:
                handle = activations_path.open("rb")
            except OSError as error:
                problems.add(activations_path, f"file cannot be read ({files.reason(error)})", kind="unreadable")
                handle = None
    buckets = buckets or FeatureBuckets(scratch)
    empty = 0
    if handle is not None:
        with handle:
            for chunk in _parse_lines(handle, activations_path, problems, lines_per_batch):
                keep, without_pairs = _validate(
                    chunk.feature,
                    chunk.prompt,
                    chunk.counts,
                    chunk.positions,
                    chunk.values,
                    prompt_lengths=prompt_lengths,
                    path=activations_path,
                    problems=problems,
                    lines=chunk.line,
                    width=width,
                )
                empty += without_pairs
                kept = chunk.take(np.flatnonzero(keep))
                kept.positions = kept.positions.astype(np.uint32)
                kept.values = kept.values.astype(np.float32)
                buckets.add(kept)

    stream = _stream(
        prompts,
        paths,
        buckets,
        lambda chunk: (_sort_unique(chunk, path=activations_path, problems=problems, lines=True), 0),
        lambda _: "",
    )
    if empty:
        stream.notes.append(f"{activations_path}: {empty} records without activations skipped")
    return stream


def read_jsonl(directory: Path, problems: Problems, *, width: int | None = None) -> ActivationRecords:
    """:func:`stream_jsonl`, every block in memory at once (small inputs, tests)."""
    return stream_jsonl(directory, problems, width=width).collect()


# ---------------------------------------------------------------------------------------------
# (b) delphi latent cache: latents/<hook>/{start}_{end}.safetensors + tokenizer.json


def _is_byte_level(tokenizer_spec: dict) -> bool:
    decoder = tokenizer_spec.get("decoder") or {}
    kinds = [decoder.get("type"), *(part.get("type") for part in decoder.get("decoders") or [])]
    return "ByteLevel" in kinds


# transformers' ``clean_up_tokenization`` (tokenization_utils_base.py), which ``batch_decode``
# applies when a tokenizer's config sets ``clean_up_tokenization_spaces``.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


def clean_up_tokenization(text: str) -> str:
    """What transformers' ``clean_up_tokenization`` makes of ``text`` (`` .`` → ``.``, …)."""
    for before, after in CLEAN_UP:
        text = text.replace(before, after)
    return text


def cleans_up_spaces(tokenizer_path: Path, problems: Problems) -> bool:
    """Whether the ``tokenizer_config.json`` beside ``tokenizer_path`` sets
    ``clean_up_tokenization_spaces`` (delphi's ``str_tokens`` then show `` .`` as ``.``)."""
    path = Path(tokenizer_path).with_name("tokenizer_config.json")
    if not path.exists():
        return False
    raw = files.read_bytes(path, problems, what="tokenizer config")
    try:
        config = orjson.loads(raw) if raw is not None else {}
    except orjson.JSONDecodeError as error:
        problems.add(path, f"not valid JSON ({error}); clean_up_tokenization_spaces taken as false")
        return False
    value = config.get("clean_up_tokenization_spaces", False) if isinstance(config, dict) else False
    if not isinstance(value, bool):
        problems.add(path, f"clean_up_tokenization_spaces is {value!r}, not true or false; taken as false")
        return False
    return value


def token_strings(tokenizer_path: Path, token_ids: np.ndarray, problems: Problems) -> pa.Array | None:
    """The display string of each token id, aligned with ``token_ids``.

    SentencePiece vocabularies keep their pieces (``▁the``, ``<0x0A>``), which the window text
    builder turns back into text; byte-level BPE pieces (``Ġthe``) are decoded one token at a
    time, which gives delphi's ``str_tokens`` (`` the``), cleaned up as transformers'
    ``batch_decode`` does when ``tokenizer_config.json`` sets ``clean_up_tokenization_spaces``.
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
    clean_up = byte_level and cleans_up_spaces(tokenizer_path, problems)
    strings = []
    unknown = []
    for token_id in unique.tolist():
        piece = (
            tokenizer.decode([token_id], skip_special_tokens=False) if byte_level else tokenizer.id_to_token(token_id)
        )
        if piece is None:
            unknown.append(token_id)
            piece = f"<unk:{token_id}>"
        elif clean_up:
            piece = clean_up_tokenization(piece)
        strings.append(piece)
    if unknown:
        problems.add(
            tokenizer_path, f"{len(unknown)} token ids are not in the vocabulary (e.g. {unknown[0]}); shown as <unk:ID>"
        )
    return pa.array(strings, pa.string()).take(pa.array(inverse.ravel()))


def _shard_shape(handle, key: str, ndim: int, path: Path, problems: Problems) -> list[int] | None:
    if key not in set(handle.keys()):
        problems.add(path, f"shard has no {key!r} tensor; skipped")
        return None
    shape = list(handle.get_slice(key).get_shape())
    if len(shape) != ndim:
        problems.add(path, f"{key!r} has shape {shape}, expected {ndim} dimensions; shard skipped")
        return None
    return shape


def _shards(directory: Path, problems: Problems) -> list[tuple[int, int, Path]]:
    """The ``{start}_{end}.safetensors`` shards of ``directory`` by latent range."""
    shards = []
    if not directory.is_dir():
        problems.add(directory, "activation cache directory does not exist", kind="missing")
        return shards
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
    return sorted(shards)


def _read_shard(
    start: int,
    end: int,
    path: Path,
    problems: Problems,
    tokens_shape: list[int] | None,
    slice_rows: int,
    opened: list[Path],
) -> Iterator[RecordChunk | np.ndarray]:
    """One shard: its ``tokens`` matrix first when it is the first shard to have one (an ndarray),
    then its locations a slice at a time, each location one pair (a record of one). ``opened``
    gets ``path`` when the file could be opened."""
    from safetensors import SafetensorError, safe_open

    refused = files.regular_file_problem(path)
    if refused:
        problems.add(path, refused, kind="unreadable")
        return
    try:
        handle_context = safe_open(str(path), framework="numpy")
        handle = handle_context.__enter__()
    except (SafetensorError, OSError, ValueError) as error:
        problems.add(path, f"unreadable safetensors file ({str(error).splitlines()[0]})")
        return
    opened.append(path)
    try:
        locations = _shard_shape(handle, "locations", 2, path, problems)
        activations = _shard_shape(handle, "activations", 1, path, problems)
        if locations is None or activations is None:
            return
        if locations[1] != 3 or locations[0] != activations[0]:
            problems.add(path, f"locations {locations} do not match activations {activations}; shard skipped")
            return
        if "tokens" in set(handle.keys()):
            shape = list(handle.get_slice("tokens").get_shape())
            if len(shape) != 2:
                problems.add(path, f"tokens has shape {shape}, expected [n_seq, ctx]")
            elif tokens_shape is None:
                yield handle.get_tensor("tokens")
            elif shape != tokens_shape:
                message = f"tokens shape {shape} differs from {tokens_shape} in the first shard; shard skipped"
                problems.add(path, message)
                return
        location_slice, activation_slice = handle.get_slice("locations"), handle.get_slice("activations")
        beyond_total = 0
        for begin in range(0, locations[0], slice_rows):
            stop = min(begin + slice_rows, locations[0])
            location = location_slice[begin:stop].astype(np.int64)
            latent = location[:, 2] + start
            beyond = latent > end
            beyond_total += int(beyond.sum())
            keep = ~beyond
            n = int(keep.sum())
            yield RecordChunk(
                latent[keep],
                location[keep, 0],
                np.zeros(n, dtype=np.int64),
                np.ones(n, dtype=np.int64),
                location[keep, 1].astype(np.uint32),
                activation_slice[begin:stop][keep].astype(np.float32),
            )
        if beyond_total:
            problems.add(path, f"{beyond_total} locations name latents beyond the shard range {start}_{end}; dropped")
    except (SafetensorError, OSError, ValueError) as error:
        problems.add(path, f"unreadable safetensors file ({str(error).splitlines()[0]})")
    finally:
        handle_context.__exit__(None, None, None)


def _delphi_block(
    chunk: RecordChunk, *, ctx: int, n_seq: int, path: Path, problems: Problems, width: int | None
) -> tuple[tuple[np.ndarray, ...], int]:
    """One bucket of shard locations grouped into (latent, sequence) records, validated, sorted."""
    latent, seq, pos, act = chunk.feature, chunk.prompt, chunk.positions, chunk.values
    order = np.lexsort((pos, seq, latent))
    latent, seq, pos, act = latent[order], seq[order], pos[order], act[order]
    boundary = np.flatnonzero((np.diff(latent) != 0) | (np.diff(seq) != 0)) + 1
    starts = np.concatenate(([0], boundary)) if len(latent) else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.concatenate((starts, [len(latent)]))) if len(latent) else np.zeros(0, dtype=np.int64)
    keep, empty = _validate(
        latent[starts],
        seq[starts],
        counts,
        pos.astype(np.float64),
        act.astype(np.float64),
        prompt_lengths=np.full(n_seq, ctx, dtype=np.int64),
        path=path,
        problems=problems,
        width=width,
    )
    records = RecordChunk(latent[starts], seq[starts], np.zeros(len(starts), dtype=np.int64), counts, pos, act).take(
        np.flatnonzero(keep)
    )
    return _sort_unique(records, path=path, problems=problems, lines=False), empty


def stream_delphi_cache(
    directory: Path,
    tokenizer_path: Path | None,
    problems: Problems,
    *,
    width: int | None = None,
    scratch: Path | None = None,
    slice_rows: int = LOCATIONS_PER_SLICE,
    buckets: FeatureBuckets | None = None,
) -> ActivationStream:
    """Every ``{start}_{end}.safetensors`` shard of one delphi hookpoint cache directory, as a
    stream of blocks: shards are read one at a time, ``slice_rows`` locations at a time, and put in
    their feature range's bucket; records are formed and sorted one bucket at a time."""
    directory = Path(directory)
    buckets = buckets or FeatureBuckets(scratch)
    tokens = None
    read: list[Path] = []
    shards = _shards(directory, problems)
    for start, end, path in shards:
        shape = None if tokens is None else list(tokens.shape)
        for part in _read_shard(start, end, path, problems, shape, slice_rows, read):
            if isinstance(part, np.ndarray):
                tokens = part
            else:
                buckets.add(part)

    if shards and tokens is None and buckets.records:
        problems.add(directory, "no shard has a 'tokens' matrix (a legacy cache?); prompts cannot be rebuilt")
    n_seq, ctx = tokens.shape if tokens is not None else (0, 0)
    if tokens is not None and tokenizer_path is not None:
        strings = token_strings(tokenizer_path, tokens.ravel(), problems)
    else:
        strings = None
        if tokens is not None:
            problems.add(directory, "no tokenizer configured; prompts cannot be rebuilt", kind="missing")
    if strings is None:
        buckets.close()
        return ActivationStream(pa.array([], pa.list_(pa.string())), read, 0)
    prompts = pa.ListArray.from_arrays(pa.array(np.arange(0, n_seq * ctx + 1, ctx, dtype=np.int32)), strings)
    return _stream(
        prompts,
        read,
        buckets,
        lambda chunk: _delphi_block(chunk, ctx=ctx, n_seq=n_seq, path=directory, problems=problems, width=width),
        lambda empty: f"{directory}: {empty} records without activations skipped",
    )


def read_delphi_cache(
    directory: Path, tokenizer_path: Path | None, problems: Problems, *, width: int | None = None
) -> ActivationRecords:
    """:func:`stream_delphi_cache`, every block in memory at once (small inputs, tests)."""
    return stream_delphi_cache(directory, tokenizer_path, problems, width=width).collect()


def stream_activations(
    format: str,
    path: Path,
    tokenizer: Path | None,
    problems: Problems,
    *,
    width: int | None = None,
    scratch: Path | None = None,
) -> ActivationStream:
    """Activation records in ``format`` ("jsonl" or "delphi") from ``path``, a block of features
    at a time; records of latents at or beyond ``width`` (the SAE's number of latents, when known)
    are reported and dropped; ``scratch`` takes what does not fit in memory."""
    if format == "delphi":
        return stream_delphi_cache(path, tokenizer, problems, width=width, scratch=scratch)
    return stream_jsonl(path, problems, width=width, scratch=scratch)
