"""The one embedding engine: texts in, L2-normalised float32 vectors out.

``Embedder`` is shared by the explanation and activation stages and by semantic search. It

- resolves a model spec through :mod:`sae_atlas.embedding_models` (``quantize = "int8"`` on a CPU:
  :mod:`sae_atlas.embedding_int8`);
- embeds each distinct text once, and only texts the content-addressed cache
  (:mod:`sae_atlas.embedding_cache`) has not seen, which is how re-runs after a small change stay
  cheap;
- forms batches of texts of one token count (sorted by it): no padding, so a float32 vector is the
  same whatever else is embedded with it;
- loads the model lazily, so a run whose texts are all cached never loads it;
- hands the batches of missing texts to an ``encoder`` when the run's engine has one (a Ray Data
  actor pool, :mod:`sae_atlas.ray_engine`): the same batches, encoded elsewhere.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_atlas import layout
from sae_atlas.config import DEFAULT_MODEL
from sae_atlas.devices import resolve_device
from sae_atlas.embedding_cache import EmbeddingCache, text_key
from sae_atlas.embedding_models import SentenceTransformerBackend, model_location

__all__ = ["Embedder", "EmbeddingCache", "EmbeddingStats", "model_location", "text_key"]


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

    def snapshot(self) -> EmbeddingStats:
        """A copy, to measure the work of the calls that follow with :meth:`since`."""
        return EmbeddingStats(**self.__dict__)

    def since(self, before: EmbeddingStats) -> dict:
        """What was done after ``before`` was taken."""
        return {name: value - getattr(before, name) for name, value in self.__dict__.items()}


def encode_filled(backend, texts: list[str], rows: int | None) -> np.ndarray:
    """``backend.encode(texts)``, the batch filled to ``rows`` rows with copies of its first text
    (their vectors dropped) when it is shorter: the model then sees one shape per token count."""
    if rows is None or len(texts) >= rows:
        return backend.encode(texts)
    return backend.encode([*texts, *[texts[0]] * (rows - len(texts))])[: len(texts)]


def embedder_of_output(output_dir: Path, *, threads: int | None = None) -> Embedder:
    """The embedder that embedded an output directory's explanations, from the settings its
    sidecar records (model, quantisation, device, cache): a query embeds text as the run did."""
    sidecar = layout.read_sidecar(Path(output_dir) / layout.EXPLANATION_EMBEDDINGS) or {}
    settings = (sidecar.get("config") or {}).get("embedding") or {}
    cache = Path(output_dir) / layout.EMBEDDING_CACHE
    return Embedder(
        settings.get("model", DEFAULT_MODEL),
        quantize=settings.get("quantize", "none"),
        device=settings.get("device", "auto"),
        cache_dir=settings.get("cache_dir") or (cache if cache.exists() else None),
        threads=threads,
    )


ProgressCallback = Callable[[int, int], None]
# Texts per encoder job when prefetching: bounds the vectors held at once (0.4 GB at 384 dims).
PREFETCH_TEXTS = 262_144


class Embedder:
    """Texts → unit vectors through one model, with de-duplication and an on-disk cache.

    >>> embedder = Embedder("builtin:all-MiniLM-L6-v2", cache_dir="cache")  # doctest: +SKIP
    >>> embedder.embed(["dates and months", "the token 'of'"]).shape  # doctest: +SKIP
    (2, 384)
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        batch_size: int = 64,
        device: str = "auto",
        quantize: str = "none",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        backend=None,
        encoder=None,
    ):
        """``threads``: CPU threads the model may use (None: every core); a server answering
        requests, or one of several workers sharing a machine, wants fewer.
        ``backend``: an already loaded backend of the same model, to share it instead of loading
        the model again (e.g. ``Embedder(spec, cache_dir=other, backend=embedder.backend)``).
        ``encoder``: encodes the batches of missing texts elsewhere (``encode(embedder, texts,
        batches, progress)`` → vectors); this process then loads the model on the CPU only to
        count tokens (and, for int8, to export the model it ships)."""
        self.model_spec = model
        self.threads = threads
        self.batch_size = batch_size
        self.device = device
        self.quantize = quantize
        self.cache_root = Path(cache_dir) if cache_dir else None
        self.stats = EmbeddingStats()
        self._backend = backend
        self.encoder = encoder
        self._loading = threading.Lock()

    @property
    def int8(self) -> bool:
        """Whether vectors come from the int8 model: ``quantize = "int8"`` applies on the CPU only
        (on CUDA the float model is faster anyway)."""
        return self.quantize == "int8" and resolve_device(self.device) == "cpu"

    @property
    def backend(self):
        """The loaded model backend (loaded on first use, once even when threads ask together)."""
        if self._backend is None:
            with self._loading:
                if self._backend is None:
                    if self.int8:
                        from sae_atlas.embedding_int8 import OnnxInt8Backend

                        self._backend = OnnxInt8Backend(
                            self.model_spec, cache_dir=self.cache_root, threads=self.threads
                        )
                    else:
                        # With a remote encoder this copy only tokenises: the CPU will do.
                        device = "cpu" if self.encoder is not None else self.device
                        self._backend = SentenceTransformerBackend(self.model_spec, device=device, threads=self.threads)
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

    def batches(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Indices of ``texts`` in the batches they are encoded in: the texts sorted by token count
        (stable), each batch up to ``batch_size`` texts of one token count.

        One token count per batch means no padding tokens; float32 batches are also filled to
        ``batch_size`` rows (:meth:`full_rows`), so every product the model computes has one shape
        per token count, and a vector does not depend on its batch-mates (CPU kernels pick their
        blocking by shape, and the last bits with it): a text embedded in an incremental run is the
        bytes it is in a run from scratch. Every engine encodes these same batches, so int8's
        per-batch activation ranges, and with them its vectors, agree across engines too.
        """
        counts = self.backend.token_counts(texts)
        order = np.argsort(counts, kind="stable")
        boundaries = np.flatnonzero(np.diff(counts[order])) + 1
        return [
            run[start : start + self.batch_size]
            for run in np.split(order, boundaries)
            for start in range(0, len(run), self.batch_size)
        ]

    @property
    def full_rows(self) -> int | None:
        """Rows every float32 batch is filled to (copies of its first text, results dropped); None
        for int8, whose vectors depend on their batch-mates through its per-batch activation scale
        whatever is done, so filling would only cost time."""
        return None if self.int8 else self.batch_size

    def encode_query(self, text: str) -> np.ndarray:
        """One text's vector, encoded alone and not cached: a search query, where a person waits.
        Not filled to ``batch_size`` rows (10× the latency), so it may differ from a stored vector of
        the same text in the last bits."""
        return self.backend.encode([text])[0]

    def encode_uncached(self, texts: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed ``texts`` with the model, batches formed from token-count-sorted texts."""
        if not texts:
            return np.zeros((0, self.backend.dimension), dtype=np.float32)
        return self.encode_batches(texts, self.batches(texts), progress)

    def encode_batches(
        self, texts: Sequence[str], batches: list[np.ndarray], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Vectors of ``texts``, each of ``batches`` (indices into ``texts``) encoded as one batch:
        here, or by the encoder when there is one."""
        started = time.perf_counter()
        if self.encoder is not None:
            vectors = self.encoder.encode(self, texts, batches, progress)
        else:
            vectors = np.zeros((len(texts), self.backend.dimension), dtype=np.float32)
            done = 0
            for batch in batches:
                vectors[batch] = encode_filled(self.backend, [texts[index] for index in batch], self.full_rows)
                done += len(batch)
                if progress:
                    progress(done, len(texts))
        self.stats.seconds_encoding += time.perf_counter() - started
        return vectors

    def prefetch(self, calls: Iterable[Sequence[str]], progress: ProgressCallback | None = None) -> int:
        """Encode now what the ``embed`` calls of ``calls`` (each one call's texts, in order) would
        encode, and store it in the cache; those calls then find every text cached.

        Each call's missing texts form their batches exactly as ``embed`` would form them (the
        texts of earlier calls count as cached), so the vectors are the ones ``embed`` would have
        made, int8's batch-dependent ones included. The batches of many calls go to the encoder
        together, ``PREFETCH_TEXTS`` texts at a time: for engines that encode in one distributed
        job. Returns how many texts were encoded."""
        cache = self._cache()
        if cache is None:
            return 0
        pending: dict[bytes, int] = {}  # key → position in ``texts``, for texts not yet stored
        texts: list[str] = []
        batches: list[np.ndarray] = []
        encoded = 0

        def flush() -> None:
            nonlocal texts, batches, pending
            if texts:
                vectors = self.encode_batches(texts, batches, progress)
                cache.store(list(pending), vectors[list(pending.values())])
            pending, texts, batches = {}, [], []

        for call in calls:
            unique = list(dict.fromkeys(call))
            keys = [text_key(text) for text in unique]
            found, _ = cache.lookup(keys)
            missing = [index for index in np.flatnonzero(~found) if keys[index] not in pending]
            if not missing:
                continue
            offset = len(texts)
            batches.extend(batch + offset for batch in self.batches([unique[index] for index in missing]))
            for index in missing:
                pending[keys[index]] = len(texts)
                texts.append(unique[index])
            encoded += len(missing)
            if len(texts) >= PREFETCH_TEXTS:
                flush()
        flush()
        # Counted as embedded now; the embed calls that follow will find them cached, so they are
        # taken off the cached count in advance (the stage's statistics stay what a local run says).
        self.stats.embedded += encoded
        self.stats.from_cache -= encoded
        return encoded

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
