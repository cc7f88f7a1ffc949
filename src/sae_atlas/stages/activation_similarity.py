"""Stage 5, ``activation_similarity``: how coherent each feature's activating examples are.

For every feature, the cosine of every pair i < j of its sampled window embeddings: mean, std
(population, NumPy's default), min and max. Features are computed a block at a time: their vectors
are padded to the largest sample size into a [features, n, dim] block, one batched matrix product
gives every Gram matrix, and masked reductions give the statistics. No per-feature Python loop;
the embeddings file is read a batch of features at a time, so memory is bounded by the batch.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import ACTIVATION_EXAMPLE_SIMILARITY
from sae_atlas.stage import Plan, Product, Stage, StageContext
from sae_atlas.vector_storage import ActivationEmbeddings, activation_embeddings_from_frame

FEATURES_PER_BLOCK = 1024
FEATURES_PER_READ = 2_048  # about 60 MB of float32 vectors per read at 20 windows × 384 dims


def _block_statistics(vectors: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[features, 4] (mean, std, min, max) for one block of features."""
    n_features, width = len(counts), int(counts.max(initial=0))
    dimension = vectors.shape[1]
    padded = np.zeros((n_features, max(width, 1), dimension), dtype=np.float32)
    slot = np.arange(width)
    present = slot[None, :] < counts[:, None]
    rows = offsets[:-1, None] + slot[None, :]
    padded[present] = vectors[rows[present]]
    gram = np.matmul(padded, padded.transpose(0, 2, 1))
    upper = np.triu(np.ones((width, width), dtype=bool), k=1)
    pairs = present[:, :, None] & present[:, None, :] & upper[None]
    n_pairs = pairs.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(pairs, gram, 0.0).sum(axis=(1, 2)) / n_pairs
        deviation = np.where(pairs, gram - mean[:, None, None], 0.0)
        std = np.sqrt((deviation**2).sum(axis=(1, 2)) / n_pairs)
    minimum = np.where(pairs, gram, np.inf).min(axis=(1, 2))
    maximum = np.where(pairs, gram, -np.inf).max(axis=(1, 2))
    result = np.stack([mean, std, minimum, maximum], axis=1)
    result[n_pairs == 0] = np.nan
    return result


def pairwise_statistics(embeddings: ActivationEmbeddings, *, sae_id: str) -> pl.DataFrame:
    """One row per feature with its number of sampled examples and pairwise cosine statistics;
    features with fewer than two examples get nulls."""
    counts = embeddings.counts()
    statistics = np.full((len(counts), 4), np.nan, dtype=np.float64)
    for start in range(0, len(counts), FEATURES_PER_BLOCK):
        stop = min(start + FEATURES_PER_BLOCK, len(counts))
        offsets = embeddings.offsets[start : stop + 1]
        statistics[start:stop] = _block_statistics(embeddings.vectors, offsets, counts[start:stop])
    statistics[:, [0, 2, 3]] = np.clip(statistics[:, [0, 2, 3]], -1.0, 1.0)
    table = pl.DataFrame(
        {
            "feature_id": embeddings.feature_id,
            "sae_id": [sae_id] * len(counts),
            "num_examples_sampled": counts,
            "mean_pairwise_similarity": statistics[:, 0],
            "std_pairwise_similarity": statistics[:, 1],
            "min_pairwise_similarity": statistics[:, 2],
            "max_pairwise_similarity": statistics[:, 3],
        }
    ).with_columns(
        pl.col(name).fill_nan(None)
        for name in (
            "mean_pairwise_similarity",
            "std_pairwise_similarity",
            "min_pairwise_similarity",
            "max_pairwise_similarity",
        )
    )
    return table.cast(ACTIVATION_EXAMPLE_SIMILARITY)  # type: ignore[arg-type]


def plan(context: StageContext) -> Plan:
    def execute(problems: Problems) -> Product:
        statistics = {"features": 0, "features_with_fewer_than_2_examples": 0, "stored_dtype": None}
        means = []

        def parts():
            for frame in context.read_batches("activation_embeddings", rows=FEATURES_PER_READ):
                embeddings = activation_embeddings_from_frame(frame)
                table = pairwise_statistics(embeddings, sae_id=context.sae_id)
                statistics["features"] += table.height
                statistics["features_with_fewer_than_2_examples"] += int((table["num_examples_sampled"] < 2).sum())
                statistics["stored_dtype"] = embeddings.dtype
                means.append(table["mean_pairwise_similarity"].drop_nulls().to_numpy().astype(np.float64))
                yield table
            values = np.concatenate(means) if means else np.zeros(0)
            statistics["mean_of_mean_pairwise_similarity"] = float(values.mean()) if len(values) else None

        return Product(
            data=parts(),
            rows=None,
            statistics=statistics,
            schema=pl.DataFrame(schema=ACTIVATION_EXAMPLE_SIMILARITY).to_arrow().schema,
        )

    return Plan(key={}, execute=execute)


STAGE = Stage(
    name="activation_similarity",
    output=layout.ACTIVATION_SIMILARITY,
    version=1,
    plan=plan,
    reads=("activation_embeddings",),
    description="how coherent each feature's sampled activation windows are (pairwise cosines)",
)
