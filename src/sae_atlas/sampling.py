"""Which activation examples of a feature get embedded, and the text each one shows.

Shared by the ``activation_embeddings`` and ``activation_similarity`` stages (DESIGN.md §2):

- **Sampling**: among a feature's prompts, boundaries q1..q(Q-1) are the linear-interpolated
  quantiles (NumPy's default) of ``max_activation``; bins are ``<= q1``, ``(q1, q2]``, …,
  ``> q(Q-1)``; each bin keeps its top ``per_quantile`` prompts by ``max_activation``, ties broken
  by the lower prompt id. A feature with fewer prompts than quantiles keeps them all.
- **Window**: with c the position of the prompt's largest activation (lowest position on ties),
  the ``window`` tokens ``tokens[c - window//2 : c + window//2]``, shifted (not truncated) to stay
  inside the prompt when it is long enough; shorter prompts are used whole.
- **Text**: the window's tokens joined back into natural text: ``▁`` starts a word, GPT-style
  leading spaces are kept, byte-fallback pieces such as ``<0x0A>`` are decoded, special tokens are
  dropped and surrounding whitespace is stripped.

All of it is vectorised over every feature at once.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

WORD_MARK = "▁"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>", "<s>", "</s>", "<mask>", "[CLS]", "[SEP]", "[PAD]")
_GPT_SPECIAL = r"^<\|[^|>]+\|>$"  # <|endoftext|>, <|im_start|>, ...
_BYTE_RUN = re.compile(r"(?:<0x[0-9A-Fa-f]{2}>)+")


def assign_bins(frame: pl.DataFrame, value: str, quantiles: int) -> tuple[pl.DataFrame, list[str]]:
    """``frame`` (``feature_id`` and the Float64 column ``value``) with each row's sampling bin,
    ``quantile`` (UInt8, 0 = the lowest), and its feature's ``_count``, ``_low``, ``_high`` and bin
    edges (the ``quantiles - 1`` inner quantiles of ``value``, linear interpolation; a row on an
    edge falls in the lower bin); returns the edge columns' names. The one binning rule: stage 4
    samples by it, the Neuronpedia export reports its bins."""
    levels = [step / quantiles for step in range(1, quantiles)]
    edges = [f"_q{index}" for index in range(len(levels))]
    bounds = frame.group_by("feature_id").agg(
        _count=pl.len(),
        _low=pl.col(value).min(),
        _high=pl.col(value).max(),
        **{
            edge: pl.col(value).quantile(level, interpolation="linear")
            for edge, level in zip(edges, levels, strict=True)
        },
    )
    quantile = (
        pl.sum_horizontal([(pl.col(value) > pl.col(edge)).cast(pl.UInt8) for edge in edges])
        if edges
        else pl.lit(0, pl.UInt8)
    )
    return frame.join(bounds, on="feature_id").with_columns(quantile=quantile.cast(pl.UInt8)), edges


def sample_examples(examples: pl.DataFrame, *, quantiles: int, per_quantile: int) -> pl.DataFrame:
    """The sampled rows of ``examples`` (``feature_id``, ``prompt_id``, ``max_activation``, …).

    Adds ``quantile`` (0 = the lowest bin, :func:`assign_bins`) and returns the rows ordered by
    feature, then ``max_activation`` descending, then prompt id, so a feature's first row is its top
    example.
    """
    frame, edges = assign_bins(
        examples.with_columns(_value=pl.col("max_activation").cast(pl.Float64)), "_value", quantiles
    )
    frame = frame.sort(["feature_id", "quantile", "_value", "prompt_id"], descending=[False, False, True, False])
    rank = pl.int_range(pl.len()).over(["feature_id", "quantile"])
    kept = frame.filter((rank < per_quantile) | (pl.col("_count") < quantiles))
    return kept.sort(["feature_id", "_value", "prompt_id"], descending=[False, True, False]).drop(
        "_value", "_count", "_low", "_high", *edges
    )


def window_bounds(lengths: np.ndarray, centres: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of each window: ``window`` tokens around the centre, shifted inside the prompt."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.asarray(centres, dtype=np.int64) - window // 2
    starts = np.clip(starts, 0, np.maximum(lengths - window, 0))
    return starts, np.minimum(starts + window, lengths)


def centre_positions(activation_pairs: pl.Expr) -> pl.Expr:
    """Position of the largest activation of each row (pairs are sorted by position, so
    ``arg_max``'s first occurrence is the lowest position among ties)."""
    values = activation_pairs.list.eval(pl.element().struct.field("activation_value"))
    positions = activation_pairs.list.eval(pl.element().struct.field("token_position"))
    return positions.list.get(values.list.arg_max())


def _decode_bytes(match: re.Match) -> str:
    raw = bytes(int(piece[3:5], 16) for piece in re.findall(r"<0x[0-9A-Fa-f]{2}>", match.group(0)))
    return raw.decode("utf-8", errors="replace")


def tokens_to_text(tokens: pl.Series) -> pl.Series:
    """Natural text of each list of tokens (see the module docstring)."""
    kept = tokens.list.eval(
        pl.element().filter(~pl.element().is_in(SPECIAL_TOKENS) & ~pl.element().str.contains(_GPT_SPECIAL))
    )
    joined = kept.list.join("").str.replace_all(WORD_MARK, " ", literal=True)
    if joined.str.contains("<0x", literal=True).any():
        joined = joined.map_elements(lambda text: _BYTE_RUN.sub(_decode_bytes, text), return_dtype=pl.String)
    return joined.str.strip_chars()


def window_texts(examples: pl.DataFrame, prompts: pl.Series, window: int) -> pl.DataFrame:
    """``examples`` (``prompt_id``, ``centre``) with ``window_start``, ``window_stop`` and ``text``.

    ``prompts`` is indexed by prompt id and holds each prompt's token strings.
    """
    tokens = prompts.gather(examples["prompt_id"].cast(pl.Int64))
    starts, stops = window_bounds(tokens.list.len().to_numpy(), examples["centre"].to_numpy(), window)
    windows = pl.DataFrame({"tokens": tokens, "start": starts, "length": stops - starts}).select(
        pl.col("tokens").list.slice(pl.col("start"), pl.col("length"))
    )["tokens"]
    return examples.with_columns(
        window_start=pl.Series(starts, dtype=pl.UInt32),
        window_stop=pl.Series(stops, dtype=pl.UInt32),
        text=tokens_to_text(windows),
    )
