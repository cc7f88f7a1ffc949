"""Stage 4, ``activation_embeddings``: each feature's sampled activation windows, embedded.

``activation_examples.parquet`` is sorted by feature: it is read a block of whole features at a
time, and each block's windows are selected (``sampling``: sampling is per feature, so blocks give
the same result as all at once), embedded a chunk at a time and written as they come: memory is
bounded by the block, at any number of features. One row per feature: the sampled prompt ids (top
example first) and their vectors in the configured storage dtype. The sampled examples themselves
(prompt, quantile, window, activations) go to ``stages/sampled_examples.parquet``, so the query
layer shows exactly what was embedded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.sampling import centre_positions, sample_examples, window_texts
from sae_atlas.schema import STAGE_SAMPLED_EXAMPLES
from sae_atlas.stage import EmbedFunction, Parts, Plan, Product, Stage, StageContext
from sae_atlas.vector_storage import DTYPES, SCALES_COLUMN, quantise

CHUNK_WINDOWS = 16_384
BLOCK_ROWS = 131_072  # activation-example rows read per block (whole features)
EXAMPLE_COLUMNS = ["feature_id", "prompt_id", "max_activation", "activation_pairs"]


def select_windows(
    examples: pl.DataFrame, prompts: pl.Series, *, quantiles: int, per_quantile: int, window: int
) -> pl.DataFrame:
    """The sampled windows of every feature with their text.

    ``examples`` has ``feature_id``, ``prompt_id``, ``max_activation`` and ``activation_pairs``
    (the activation-examples table); ``prompts[p]`` holds prompt p's tokens.
    """
    candidates = examples.select(
        "feature_id",
        "prompt_id",
        "max_activation",
        "activation_pairs",
        centre=centre_positions(pl.col("activation_pairs")),
    )
    sampled = sample_examples(candidates, quantiles=quantiles, per_quantile=per_quantile)
    return window_texts(sampled, prompts, window)


def whole_features(frames: Iterator[pl.DataFrame]) -> Iterator[pl.DataFrame]:
    """``frames`` of a table sorted by feature, regrouped so that no feature is split between two:
    a frame's last feature moves to the next frame when there is one."""
    pending: pl.DataFrame | None = None
    for frame in frames:
        if pending is not None and not pending.is_empty():
            last = pending["feature_id"][-1]
            boundary = pending.height - int((pending["feature_id"] == last).sum())
            if boundary:
                yield pending.slice(0, boundary)
            frame = pl.concat([pending.slice(boundary), frame])
        pending = frame
    if pending is not None and not pending.is_empty():
        yield pending


def feature_chunks(windows: pl.DataFrame, rows: int = CHUNK_WINDOWS) -> Iterator[pl.DataFrame]:
    """Consecutive slices of ``windows`` (sorted by feature) of about ``rows`` rows, never
    splitting a feature."""
    return streamed_chunks(iter([windows]), rows)


def streamed_chunks(blocks: Iterator[pl.DataFrame], rows: int | None = None) -> Iterator[pl.DataFrame]:
    """The windows of ``blocks`` (each whole features, in feature order) cut into chunks the way
    they would be cut all at once: each chunk ends at the first feature boundary at or after
    ``rows`` windows. Where a chunk ends decides which texts share an embedding batch, and with
    it the vectors (to rounding): streaming must not move it. ``rows``: CHUNK_WINDOWS unless given."""
    rows = rows or CHUNK_WINDOWS
    pending: pl.DataFrame | None = None
    for block in blocks:
        pending = block if pending is None else pl.concat([pending, block])
        while pending.height >= rows:
            features = pending["feature_id"].to_numpy()
            # a block ends with a whole feature: its end is a boundary too
            boundaries = np.append(np.flatnonzero(np.diff(features)) + 1, len(features))
            stop = int(boundaries[boundaries >= rows][0])
            yield pending.slice(0, stop)
            pending = pending.slice(stop)
    if pending is not None and pending.height:
        yield pending


def empty_table(dtype: str) -> pl.DataFrame:
    """A zero-row table with the schema of the file for ``dtype``."""
    schema = {
        "feature_id": pl.UInt32,
        "sae_id": pl.Categorical(),
        "prompt_ids": pl.List(pl.UInt32),
        "embeddings": pl.List(pl.List(DTYPES[dtype])),
    }
    if dtype == "int8":
        schema[SCALES_COLUMN] = pl.List(pl.Float32)
    return pl.DataFrame(schema=schema)


def sampled_examples(windows: pl.DataFrame) -> pl.DataFrame:
    """``stages/sampled_examples.parquet``: the sampled windows without their text."""
    return windows.select(
        pl.col("feature_id"),
        pl.col("prompt_id"),
        pl.col("quantile"),
        pl.col("max_activation"),
        pl.col("centre").alias("max_position"),
        pl.col("window_start"),
        pl.col("window_stop"),
        pl.col("activation_pairs"),
    ).cast(dict(STAGE_SAMPLED_EXAMPLES))


def embed_windows(windows: pl.DataFrame, *, sae_id: str, embed: EmbedFunction, dtype: str) -> pl.DataFrame:
    """One row per feature of ``windows``: prompt ids and the stored vectors of their texts."""
    if windows.is_empty():
        return empty_table(dtype)
    stored, scales = quantise(embed(windows["text"].to_list()), dtype)
    columns = {"embedding": pl.Series(stored).cast(pl.List(DTYPES[dtype]))}
    if scales is not None:
        columns["scale"] = pl.Series(scales, dtype=pl.Float32)
    grouped = (
        windows.select("feature_id", "prompt_id")
        .with_columns(**columns)
        .group_by("feature_id", maintain_order=True)
        .agg(
            prompt_ids=pl.col("prompt_id").cast(pl.UInt32),
            embeddings=pl.col("embedding"),
            **({SCALES_COLUMN: pl.col("scale")} if scales is not None else {}),
        )
    )
    grouped = grouped.with_columns(pl.col("feature_id").cast(pl.UInt32), sae_id=pl.lit(sae_id).cast(pl.Categorical()))
    return grouped.select(empty_table(dtype).columns).cast(empty_table(dtype).schema)


def windows_upper_bound(feature_ids: Iterator[np.ndarray], per_feature: int) -> int:
    """At most how many windows stage 4 embeds: each feature's rows, capped at ``per_feature``
    (its quantiles × per quantile); ``feature_ids`` come sorted, in parts. For progress bars."""
    total, carry_feature, carry_count = 0, None, 0
    for ids in feature_ids:
        if not len(ids):
            continue
        features, counts = np.unique(ids, return_counts=True)
        if features[0] == carry_feature:
            counts[0] += carry_count
        elif carry_feature is not None:
            total += min(carry_count, per_feature)
        total += int(np.minimum(counts[:-1], per_feature).sum())
        carry_feature, carry_count = features[-1], int(counts[-1])
    return total + (min(carry_count, per_feature) if carry_feature is not None else 0)


def plan(context: StageContext) -> Plan:
    sampling, settings = context.config.sampling, context.config.embedding
    dtype = context.config.output.embedding_dtype

    def execute(problems: Problems) -> Product:
        prompts = context.prompt_tokens()
        per_feature = sampling.quantiles * sampling.per_quantile
        total = windows_upper_bound(
            (frame["feature_id"].to_numpy() for frame in context.read_batches("activation_examples", ["feature_id"])),
            per_feature,
        )
        embed = context.embed(STAGE.name, total=total)
        before = context.embedder.stats.snapshot()
        per_feature_counts: list[np.ndarray] = []
        text_hashes: list[np.ndarray] = []
        stats: dict = {}

        def selections() -> Iterator[pl.DataFrame]:
            for block in whole_features(context.read_batches("activation_examples", EXAMPLE_COLUMNS, rows=BLOCK_ROWS)):
                yield select_windows(
                    block,
                    prompts,
                    quantiles=sampling.quantiles,
                    per_quantile=sampling.per_quantile,
                    window=sampling.window,
                )

        # A distributed engine embeds every chunk's missing window texts in one job first (a pass
        # of selection only), batched as the chunks below would batch them; the local engine
        # embeds them chunk by chunk below, and reads nothing here.
        context.prefetch_embeddings(STAGE.name, (chunk["text"].to_list() for chunk in streamed_chunks(selections())))

        def windows() -> Iterator[pl.DataFrame]:
            for selected in selections():
                per_feature_counts.append(selected.group_by("feature_id", maintain_order=True).len()["len"].to_numpy())
                text_hashes.append(selected["text"].hash(seed=0).to_numpy())
                yield selected

        def parts() -> Iterator[Parts]:
            dimension = None
            for chunk in streamed_chunks(windows()):
                part = embed_windows(chunk, sae_id=context.sae_id, embed=embed, dtype=dtype)
                dimension = dimension or len(part["embeddings"][0][0])
                yield Parts(part, {layout.SAMPLED_EXAMPLES: sampled_examples(chunk)})
            work = context.embedder.stats.since(before)
            stats.update(
                window_statistics(per_feature_counts, text_hashes),
                model=settings.model,
                quantize=settings.quantize,
                dimension=dimension,
                embedding_dtype=dtype,
                texts_encoded=work["embedded"],
                texts_from_cache=work["from_cache"],
                seconds_encoding=round(work["seconds_encoding"], 3),
            )

        return Product(
            data=parts(),
            rows=None,
            statistics=stats,
            schema=empty_table(dtype).to_arrow().schema,
            schemas={layout.SAMPLED_EXAMPLES: pl.DataFrame(schema=STAGE_SAMPLED_EXAMPLES).to_arrow().schema},
        )

    return Plan(key={}, execute=execute)


def window_statistics(per_feature_counts: list[np.ndarray], text_hashes: list[np.ndarray]) -> dict:
    """Windows per feature and distinct texts, for the sidecar, from every block's counts."""
    per_feature = np.concatenate(per_feature_counts) if per_feature_counts else np.zeros(0, np.int64)
    hashes = np.concatenate(text_hashes) if text_hashes else np.zeros(0, np.uint64)
    counts, features = np.unique(per_feature, return_counts=True)
    return {
        "features": len(per_feature),
        "windows": int(per_feature.sum()),
        "distinct_texts": len(np.unique(hashes)),
        "windows_per_feature": {
            "mean": round(float(per_feature.mean()) if len(per_feature) else 0.0, 3),
            "min": int(per_feature.min(initial=0) if len(per_feature) else 0),
            "max": int(per_feature.max(initial=0)),
            "histogram": {str(count): int(number) for count, number in zip(counts, features, strict=True)},
        },
    }


STAGE = Stage(
    name="activation_embeddings",
    output=layout.ACTIVATION_EMBEDDINGS,
    version=3,
    plan=plan,
    reads=("activation_examples",),
    config=("sampling", "embedding.model", "embedding.quantize", "output.embedding_dtype"),
    extra_outputs=(layout.SAMPLED_EXAMPLES,),
    description="each feature's sampled activation windows, embedded",
)
