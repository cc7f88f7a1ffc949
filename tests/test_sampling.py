"""Sampling of activation examples and their windows: properties (hypothesis) and exact cases."""

from __future__ import annotations

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_atlas.sampling import sample_examples, tokens_to_text, window_bounds


def reference_sample(values: np.ndarray, prompts: np.ndarray, quantiles: int, per_quantile: int) -> list[int]:
    """DESIGN.md §2 for one feature, written the obvious way."""
    if len(values) < quantiles:
        chosen = list(range(len(values)))
    else:
        bounds = np.quantile(values.astype(np.float64), [step / quantiles for step in range(1, quantiles)])
        bins = np.array([int(np.sum(value > bounds)) for value in values.astype(np.float64)])
        chosen = []
        for quantile in range(quantiles):
            members = [index for index in range(len(values)) if bins[index] == quantile]
            members.sort(key=lambda index: (-values[index], prompts[index]))
            chosen.extend(members[:per_quantile])
    chosen.sort(key=lambda index: (-values[index], prompts[index]))
    return [int(prompts[index]) for index in chosen]


features = st.lists(
    st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=40),  # small values: many ties
    min_size=1,
    max_size=5,
)


def as_frame(per_feature: list[list[int]], seed: int) -> pl.DataFrame:
    rows = [
        (feature, prompt, float(value) / 4)
        for feature, values in enumerate(per_feature)
        for prompt, value in enumerate(values)
    ]
    order = np.random.default_rng(seed).permutation(len(rows))
    return pl.DataFrame(
        [rows[index] for index in order], schema=["feature_id", "prompt_id", "max_activation"], orient="row"
    ).with_columns(pl.col("max_activation").cast(pl.Float32))


@settings(max_examples=150, deadline=None)
@given(features, st.integers(1, 6), st.integers(1, 6), st.integers(0, 1000))
def test_sampler_properties(per_feature, quantiles, per_quantile, seed):
    sampled = sample_examples(as_frame(per_feature, seed), quantiles=quantiles, per_quantile=per_quantile)
    for feature, values in enumerate(per_feature):
        rows = sampled.filter(pl.col("feature_id") == feature)
        # never more than quantiles × per_quantile
        assert rows.height <= quantiles * per_quantile
        # always the feature's top example (highest activation, lowest prompt id), first
        top = max(range(len(values)), key=lambda prompt: (values[prompt], -prompt))
        assert rows["prompt_id"][0] == top
        # exactly the rule, written independently
        expected = reference_sample(np.array(values, np.float32) / 4, np.arange(len(values)), quantiles, per_quantile)
        assert rows["prompt_id"].to_list() == expected
    # deterministic: the input order does not matter
    again = sample_examples(as_frame(per_feature, seed + 1), quantiles=quantiles, per_quantile=per_quantile)
    assert again.equals(sampled)


def test_quantile_bins_follow_numpy_linear_interpolation():
    frame = pl.DataFrame(
        {"feature_id": [0] * 10, "prompt_id": list(range(10)), "max_activation": [float(v) for v in range(1, 11)]}
    )
    # q1, q2, q3 = 3.25, 5.5, 7.75 → bins {1,2,3} {4,5} {6,7} {8,9,10}; top one of each
    sampled = sample_examples(frame, quantiles=4, per_quantile=1)
    assert sampled["prompt_id"].to_list() == [9, 6, 4, 2]
    assert sampled["quantile"].to_list() == [3, 2, 1, 0]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.data(), st.integers(1, 64))
def test_window_properties(length, data, window):
    centre = data.draw(st.integers(0, length - 1))
    (start,), (stop,) = window_bounds(np.array([length]), np.array([centre]), window)
    assert 0 <= start <= centre < stop <= length  # inside the prompt, around the max token
    assert stop - start == min(window, length)  # shifted, never truncated
    if length >= window and window // 2 <= centre <= length - (window - window // 2):
        assert start == centre - window // 2  # centred when the prompt allows it


def test_windows_shift_at_prompt_edges():
    starts, stops = window_bounds(np.array([127, 127, 127, 20]), np.array([3, 60, 125, 10]), 32)
    assert starts.tolist() == [0, 44, 95, 0] and stops.tolist() == [32, 76, 127, 20]


def test_tokens_become_natural_text():
    texts = tokens_to_text(
        pl.Series(
            [
                ["<bos>", "▁The", "▁serv", "ices", "▁are", "▁open", "."],
                [" the", " end", " of", "\n", "The"],
                ["▁line", "<0x0A>", "▁next", "<0xE2>", "<0x82>", "<0xAC>", "5"],
                ["<|endoftext|>", "Hello", ",", " world", "<eos>"],
                ["▁", "▁spaced", "▁"],
            ]
        )
    ).to_list()
    assert texts == ["The services are open.", "the end of\nThe", "line\n next€5", "Hello, world", "spaced"]
    assert "▁" not in " ".join(texts)
