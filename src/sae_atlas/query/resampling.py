"""Resampling latents: bootstrap counts shared by every group of the same size, percentile
intervals of means from one matrix product, Student-t intervals where the bootstrap under-covers
(small n), Holm's step-down adjustment and the Wilcoxon signed-rank test."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
from scipy import stats


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``resamples`` bootstrap samples
    ([resamples, n] float32): the draws are ``rng.integers(0, n, (resamples, n))``."""
    draws = rng.integers(0, n, size=(resamples, n))
    draws += np.arange(resamples)[:, None] * n  # in place: one [resamples, n] int64 array at a time
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float32)


# Resample counts are made and used a block at a time, so a comparison's memory does not grow with
# latents × resamples (20,000 resamples of 16k latents are 1.3 GB as one float32 matrix): each block
# holds at most this many counts.
BLOCK_CELLS = 1 << 22
# The counts of a group size are kept for the other groups of that size (every explainer of a study
# usually has the same latents) while all kept counts fit in this many cells (256 MB of float32);
# beyond it they are drawn again at each use: memory stays bounded, time grows.
KEPT_CELLS = 1 << 26


class Resamples:
    """Bootstrap resample counts by sample size n: ``resamples`` rows, made in blocks of
    :meth:`block_rows` rows, block k drawn from ``[seed, n, k]``. The counts depend only on the
    seed, n and the number of resamples, so a comparison's result does not depend on which other
    groups it computes, nor on what was kept."""

    def __init__(self, resamples: int, seed: int):
        self.resamples = resamples
        self.seed = seed
        self._kept: dict[int, list[np.ndarray]] = {}

    @staticmethod
    def block_rows(n: int) -> int:
        return max(1, BLOCK_CELLS // max(n, 1))

    def _draw(self, n: int) -> Iterator[np.ndarray]:
        rows = self.block_rows(n)
        for index, start in enumerate(range(0, self.resamples, rows)):
            size = min(rows, self.resamples - start)
            yield resample_counts(n, size, np.random.default_rng([self.seed, n, index]))

    def blocks(self, n: int) -> Iterator[np.ndarray]:
        """The [rows, n] float32 count blocks of the resamples of n items, in order."""
        if n in self._kept:
            return iter(self._kept[n])
        kept = sum(block.size for blocks in self._kept.values() for block in blocks)
        if kept + n * self.resamples > KEPT_CELLS:
            return self._draw(n)
        self._kept[n] = list(self._draw(n))
        return iter(self._kept[n])

    def counts(self, n: int) -> np.ndarray:
        """All the counts at once ([resamples, n]); for small n and tests."""
        return np.concatenate(list(self.blocks(n)))


def bootstrap_means(
    values: np.ndarray, counts: np.ndarray | Iterable[np.ndarray], confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap CI of the mean of each column of ``values`` [n, g] (NaN = missing,
    left out of that column's mean), from shared resample ``counts`` [B, n] (one array, or blocks
    of rows of it): (low, high) [g]. Sums and counts of every column come from one float32 matrix
    product per block; only the [B, g] means are kept."""
    present = ~np.isnan(values)
    stacked = np.concatenate([np.where(present, values, 0.0), present], axis=1).astype(np.float32)
    blocks = [counts] if isinstance(counts, np.ndarray) else counts
    totals = np.concatenate([(block @ stacked).astype(np.float64) for block in blocks])
    sums, weights = totals[:, : values.shape[1]], totals[:, values.shape[1] :]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / weights
    tail = (1 - confidence) / 2 * 100
    low = np.full(values.shape[1], np.nan)
    high = np.full(values.shape[1], np.nan)
    for column in range(values.shape[1]):
        finite = means[:, column][np.isfinite(means[:, column])]
        if len(finite):
            low[column], high[column] = np.percentile(finite, [tail, 100 - tail])
    return low, high


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None where it is missing, NaN or infinite (an interval bound of a
    column without one: a single latent)."""
    return None if value is None or not np.isfinite(value) else float(value)


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of ``p_values`` (None stays None): the k-th smallest of m is
    multiplied by m − k + 1, then made monotone."""
    indexed = sorted((p, index) for index, p in enumerate(p_values) if p is not None and not math.isnan(p))
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(indexed):
        running = max(running, min(1.0, (len(indexed) - rank) * p))
        adjusted[index] = running
    return adjusted


def wilcoxon(differences: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p of paired ``differences`` (zeros dropped, SciPy's default);
    None when no difference is non-zero."""
    nonzero = differences[differences != 0]
    if len(nonzero) == 0:
        return None
    return float(stats.wilcoxon(nonzero).pvalue)


# Below this many latents with a value the percentile bootstrap under-covers (0.905 for a nominal 95 %
# interval at 12 paired latents, measured on synth; docs/notes.md): intervals are Student-t there.
SMALL_SAMPLE = 100


def t_interval(values: np.ndarray, confidence: float) -> tuple[float, float] | None:
    """The Student-t interval of the mean of ``values`` (no NaN): mean ± t(n−1) · s / √n; None
    below 2 values. A constant gets a zero-width interval."""
    n = len(values)
    if n < 2:
        return None
    # From the upper tail: (1 + confidence) / 2 rounds to 1.0 for a confidence within 1e-16 of 1,
    # where ppf is infinite; isf of the tail stays finite for every confidence below 1.
    half = stats.t.isf((1 - confidence) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def mean_intervals(
    values: np.ndarray, counts: Iterable[np.ndarray], confidence: float
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The interval of the mean of each column of ``values`` [n, g] (NaN = missing): the percentile
    bootstrap (:func:`bootstrap_means`) for columns with at least :data:`SMALL_SAMPLE` values,
    Student-t below; (low, high, the method of each column: "bootstrap" or "t")."""
    low, high = bootstrap_means(values, counts, confidence)
    present = (~np.isnan(values)).sum(axis=0)
    methods = []
    for column in range(values.shape[1]):
        if present[column] >= SMALL_SAMPLE:
            methods.append("bootstrap")
            continue
        methods.append("t")
        column_values = values[:, column]
        interval = t_interval(column_values[~np.isnan(column_values)], confidence)
        low[column], high[column] = interval if interval else (np.nan, np.nan)
    return low, high, methods
