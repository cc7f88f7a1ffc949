"""The activation examples of every latent, as the feature page shows them: the windows stage 4
sampled and embedded, with every token's activation.

The whole index loads in the background (a few seconds at 131k latents); a look-up before it is
ready reads only the row groups of ``stages/sampled_examples.parquet`` that hold the latent (by
their statistics) and that latent's prompts, so the first feature page never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from sae_atlas import layout
from sae_atlas.config import SamplingConfig
from sae_atlas.query.lazy import Lazy
from sae_atlas.sampling import centre_positions, sample_examples, window_bounds

SAMPLED_COLUMNS = (
    "feature_id",
    "prompt_id",
    "quantile",
    "max_activation",
    "max_position",
    "window_start",
    "window_stop",
    "activation_pairs",
)


@dataclass
class Examples:
    """Sampled activation examples, flat, sorted by feature."""

    feature_id: np.ndarray
    prompt_id: np.ndarray
    quantile: np.ndarray
    max_activation: np.ndarray
    centre: np.ndarray
    window_start: np.ndarray
    window_stop: np.ndarray
    pair_offsets: np.ndarray
    positions: np.ndarray
    values: np.ndarray
    prompts: list[list[str]] | dict[int, list[str]]  # tokens by prompt id

    @classmethod
    def of(cls, sampled: pl.DataFrame, prompts) -> Examples:
        """The look-up arrays of sampled examples (in their stored order: by feature, top first);
        ``prompts[p]`` gives prompt p's tokens (a list, or a mapping for a few prompts)."""
        flat = sampled["activation_pairs"].explode().drop_nulls().struct.unnest()
        counts = sampled["activation_pairs"].list.len().to_numpy().astype(np.int64)
        return cls(
            feature_id=sampled["feature_id"].to_numpy().astype(np.int64),
            prompt_id=sampled["prompt_id"].to_numpy().astype(np.int64),
            quantile=sampled["quantile"].to_numpy(),
            max_activation=sampled["max_activation"].to_numpy().astype(np.float64),
            centre=sampled["max_position"].to_numpy().astype(np.int64),
            window_start=sampled["window_start"].to_numpy().astype(np.int64),
            window_stop=sampled["window_stop"].to_numpy().astype(np.int64),
            pair_offsets=np.concatenate(([0], np.cumsum(counts))),
            positions=flat["token_position"].to_numpy().astype(np.int64),
            values=flat["activation_value"].to_numpy().astype(np.float64),
            prompts=prompts,
        )

    def of_feature(self, feature_id: int) -> list[dict]:
        """One latent's examples: window, tokens and every token's activation."""
        start, stop = np.searchsorted(self.feature_id, [feature_id, feature_id + 1])
        if start == stop:
            return []
        tokens = [self.prompts[prompt] for prompt in self.prompt_id[start:stop].tolist()]
        lengths = np.array([len(row) for row in tokens])
        # every example of the feature at once: dense activations in one matrix
        dense = np.zeros((stop - start, int(lengths.max(initial=0))))
        pairs = slice(self.pair_offsets[start], self.pair_offsets[stop])
        rows = np.repeat(np.arange(stop - start), np.diff(self.pair_offsets[start : stop + 1]))
        dense[rows, self.positions[pairs]] = self.values[pairs]
        activations = dense.tolist()
        columns = zip(
            self.prompt_id[start:stop].tolist(),
            self.quantile[start:stop].tolist(),
            self.max_activation[start:stop].tolist(),
            self.centre[start:stop].tolist(),
            self.window_start[start:stop].tolist(),
            self.window_stop[start:stop].tolist(),
            strict=True,
        )
        return [
            {
                "prompt_id": prompt,
                "quantile": quantile,
                "max_activation": peak,
                "max_position": centre,
                "window": [window_start, window_stop],
                "tokens": tokens[index],
                "activations": activations[index][: lengths[index]],
            }
            for index, (prompt, quantile, peak, centre, window_start, window_stop) in enumerate(columns)
        ]


def sampled_like_stage_4(examples: Path) -> pl.DataFrame:
    """An output written by another tool has no stages/sampled_examples.parquet (or an older one
    without activations): its examples are sampled with stage 4's own functions and default
    settings (:class:`~sae_atlas.config.SamplingConfig`), so they can still be shown."""
    settings = SamplingConfig()
    candidates = (
        pl.scan_parquet(examples)
        .select(
            "feature_id",
            "prompt_id",
            "max_activation",
            "activation_pairs",
            centre=centre_positions(pl.col("activation_pairs")),
            length=pl.col("prompt_tokens").list.len(),
        )
        .collect()
    )
    sampled = sample_examples(candidates, quantiles=settings.quantiles, per_quantile=settings.per_quantile)
    starts, stops = window_bounds(sampled["length"].to_numpy(), sampled["centre"].to_numpy(), settings.window)
    return sampled.select(
        "feature_id",
        "prompt_id",
        "quantile",
        "max_activation",
        pl.col("centre").alias("max_position"),
        window_start=pl.Series(starts),
        window_stop=pl.Series(stops),
        activation_pairs="activation_pairs",
    )


class ExampleIndex:
    """Every latent's sampled examples in one output directory (see the module docstring)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.index: Lazy[Examples | None] = Lazy(self._load, name="example-index")
        self._row_groups: list[tuple[int, int]] | None = None

    @property
    def error(self) -> str | None:
        """Why the index could not be loaded (a damaged file), else None."""
        return self.index.error

    def _has_sampled_table(self) -> bool:
        path = self.output_dir / layout.SAMPLED_EXAMPLES
        return path.exists() and "activation_pairs" in pq.read_schema(path).names

    def _load(self) -> Examples | None:
        if self._has_sampled_table():
            sampled = pl.read_parquet(self.output_dir / layout.SAMPLED_EXAMPLES, columns=list(SAMPLED_COLUMNS))
        elif (self.output_dir / layout.ACTIVATION_EXAMPLES).exists():
            sampled = sampled_like_stage_4(self.output_dir / layout.ACTIVATION_EXAMPLES)
        else:
            return None
        return Examples.of(sampled, layout.read_prompt_tokens(self.output_dir).to_list())

    def latents(self) -> np.ndarray:
        """Every latent with sampled examples (loads the index)."""
        examples = self.index.get()
        return np.unique(examples.feature_id) if examples is not None else np.zeros(0, dtype=np.int64)

    def _one_feature(self, feature_id: int) -> Examples | None:
        """One feature's examples before the index is loaded: only the row groups that hold it."""
        if not self._has_sampled_table():
            return self.index.get()
        path = self.output_dir / layout.SAMPLED_EXAMPLES
        if self._row_groups is None:
            self._row_groups = layout.row_group_ranges(path, "feature_id")
        groups = [group for group, (low, high) in enumerate(self._row_groups) if low <= feature_id <= high]
        if not groups:
            return None
        rows = pl.from_arrow(pq.ParquetFile(path).read_row_groups(groups, columns=list(SAMPLED_COLUMNS)))
        rows = rows.filter(pl.col("feature_id") == feature_id)
        prompts = layout.read_prompt_tokens(self.output_dir, rows["prompt_id"].unique().to_list())
        return Examples.of(rows, prompts)

    def of_feature(self, feature_id: int) -> list[dict]:
        """A latent's sampled examples, from the index once it is loaded."""
        examples = self.index.get(wait=False)
        if examples is None:
            if self.index.loaded:  # nothing to show, or a damaged file (see error)
                return []
            examples = self._one_feature(feature_id)
            if examples is None:
                return []
        return examples.of_feature(feature_id)
