"""Semantic search over the explanations of one output directory: their stored vectors, and the
model that made them (from the run's sidecar), both loaded on first use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.query.lazy import Lazy

HIT_SCHEMA = {"feature_id": pl.Int64, "explainer": pl.String, "explanation_text": pl.String, "similarity": pl.Float64}


class UnknownExplainer(ValueError):
    """A search asked for an explainer this output does not have."""


def _vectors(output_dir: Path) -> tuple[pl.DataFrame, np.ndarray] | None:
    """(rows, unit vectors) of every embedded explanation, or None without the file."""
    path = output_dir / layout.EXPLANATION_EMBEDDINGS
    if not path.exists():
        return None
    frame = pl.read_parquet(path).filter(pl.col("embedding").is_not_null())
    dimension = int(frame["embedding"].list.len().max() or 0)
    vectors = frame["embedding"].list.to_array(dimension).to_numpy() if frame.height else np.zeros((0, dimension))
    rows = frame.select(
        pl.col("feature_id").cast(pl.Int64),
        pl.col("llm_explainer").cast(pl.String).alias("explainer"),
        "explanation_text",
    )
    return rows, np.ascontiguousarray(vectors, dtype=np.float32)


class SearchIndex:
    """The explanations' vectors and their model; ``embedder`` given, or the run's own."""

    def __init__(self, output_dir: Path, *, embedder=None, threads: int | None = None):
        self.output_dir = Path(output_dir)
        self.vectors = Lazy(lambda: _vectors(self.output_dir), name="search-vectors")
        self._embedder = Lazy(lambda: embedder or self._run_embedder(threads), name="search-model")

    def _run_embedder(self, threads: int | None):
        from sae_atlas.embedding import embedder_of_output  # torch: only when a search needs it

        return embedder_of_output(self.output_dir, threads=threads)

    @property
    def embedder(self):
        return self._embedder.get()

    def prepare(self) -> None:
        """Load the vectors and the model now (a server, as it starts)."""
        if self.vectors.get() is not None:
            self.embedder.backend  # noqa: B018 (loading the model is the point)

    def search(self, text: str, k: int, *, explainer: str | None, explainers: list[str]) -> pl.DataFrame:
        """The ``k`` explanations closest in meaning to ``text`` (cosine; ties by position)."""
        loaded = self.vectors.get()
        if loaded is None or not text.strip():
            return pl.DataFrame(schema=HIT_SCHEMA)
        rows, vectors = loaded
        similarity = vectors @ self.embedder.encode_query(text)
        if explainer is not None:
            if explainer not in explainers:
                raise UnknownExplainer(f"unknown explainer {explainer!r}; explainers are {', '.join(explainers)}")
            similarity = np.where((rows["explainer"] == explainer).to_numpy(), similarity, -np.inf)
        k = max(0, min(k, int(np.isfinite(similarity).sum())))
        top = np.argpartition(-similarity, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        top = top[np.lexsort((top, -similarity[top]))]
        return rows[top].with_columns(similarity=pl.Series(similarity[top].astype(np.float64)))
