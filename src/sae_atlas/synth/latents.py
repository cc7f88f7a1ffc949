"""The synthetic SAE: which concepts each latent is about, its decoder row and its activations.

- A latent has one concept, or two (``MULTI_CONCEPT_RATE``); it responds to a subset of its
  concepts' words.
- Its decoder row is the sum of its concepts' directions plus noise, normalised, so latents that
  share a concept point in similar directions.
- It fires on the prompts that contain its words (preferring prompts where they recur, i.e. the
  prompt is about its concept): high on its words, a little on the tokens right after, and faintly
  on a few background tokens.
- With planted patterns (``synth --plant-patterns``) each latent is one of four kinds
  (:data:`PATTERN_SHARES`): ``lexical`` fires on one word of its concept, ``mixed`` on a set of
  them (every latent without planting), ``contextual`` near its concept's words but not on them
  (2–12 tokens away: the context carries it, no token does), ``diffuse`` anywhere in random prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sae_atlas.synth.concepts import CONCEPTS
from sae_atlas.synth.text import WORD_MARK, PromptCorpus

MULTI_CONCEPT_RATE = 0.2
DECODER_NOISE = 1.0  # same-concept decoder cosine ≈ 1 / (1 + noise²)
# Reference scale (DESIGN.md §6): 544,188 records over 16,384 latents and 24,571 prompts, ~14.3
# activation pairs per record.
REFERENCE_RECORDS_PER_LATENT = 33.2
REFERENCE_PROMPTS = 24_571
BACKGROUND_PER_PROMPT = 2.6
SPREAD = 0.35  # of the number of prompts a latent fires on (log scale)
PATTERNS = ("lexical", "mixed", "contextual", "diffuse")
PATTERN_SHARES = (0.3, 0.3, 0.25, 0.15)
CONTEXT_OFFSETS = np.array([*range(-12, -1), *range(2, 13)])


@dataclass
class Latents:
    """Ground truth of every latent."""

    concepts: list[tuple[int, ...]]
    trigger_sets: list[list[np.ndarray]]  # per latent, per concept: the piece ids it fires on
    strength: np.ndarray  # typical peak activation
    # the planted kind of each latent (PATTERNS) and, for lexical ones, the word it fires on
    pattern: list[str] | None = None
    word: list[str | None] | None = None

    def pattern_of(self, latent: int) -> str:
        return self.pattern[latent] if self.pattern is not None else "mixed"

    def triggers(self, latent: int) -> np.ndarray:
        """Every piece id ``latent`` fires on."""
        return np.unique(np.concatenate(self.trigger_sets[latent]))

    @property
    def multi_concept(self) -> np.ndarray:
        return np.array([len(concepts) > 1 for concepts in self.concepts])

    def concept_names(self, latent: int) -> list[str]:
        return [CONCEPTS[concept].name for concept in self.concepts[latent]]


def concept_count(n_features: int) -> int:
    """How many concepts a corpus of ``n_features`` latents uses: every concept gets ≥ 4 latents."""
    return int(max(2, min(len(CONCEPTS), n_features // 4)))


def assign_latents(
    n_features: int, corpus: PromptCorpus, n_concepts: int, rng: np.random.Generator, *, plant: bool = False
) -> Latents:
    """Concepts, trigger words and strength of each latent; ``plant``: a planted pattern each."""
    primary = rng.permutation(np.arange(n_features) % n_concepts)
    multi = rng.random(n_features) < MULTI_CONCEPT_RATE
    secondary = (primary + rng.integers(1, n_concepts, n_features)) % n_concepts
    words_of_piece = [piece.removeprefix(WORD_MARK) for piece in corpus.vocabulary]
    pieces_of_word: dict[str, list[int]] = {}
    for piece_id, word in enumerate(words_of_piece):
        if corpus.concept_of_piece[piece_id] >= 0:
            pieces_of_word.setdefault(word, []).append(piece_id)

    concepts, triggers = [], []
    for latent in range(n_features):
        chosen = (int(primary[latent]), int(secondary[latent])) if multi[latent] else (int(primary[latent]),)
        sets = []
        for concept in chosen:
            words = CONCEPTS[concept].words
            subset = rng.choice(len(words), size=max(3, round(0.7 * len(words))), replace=False)
            pieces = [piece for index in subset for piece in pieces_of_word.get(words[index], [])]
            sets.append(np.array(sorted(pieces), dtype=np.int32))
        concepts.append(chosen)
        triggers.append(sets)
    strength = np.exp(rng.normal(np.log(20.0), 0.5, n_features)).astype(np.float32)
    if not plant:  # no draws: a corpus without planted patterns is the one it always was
        return Latents(concepts, triggers, strength)
    patterns = [PATTERNS[index] for index in rng.choice(len(PATTERNS), size=n_features, p=PATTERN_SHARES)]
    words: list[str | None] = [None] * n_features
    for latent in np.flatnonzero(np.array(patterns) == "lexical").tolist():
        concept = concepts[latent][0]
        present = [word for word in CONCEPTS[concept].words if pieces_of_word.get(word)]
        if not present:
            patterns[latent] = "mixed"
            continue
        words[latent] = str(rng.choice(present))
        concepts[latent] = (concept,)
        triggers[latent] = [np.array(sorted(pieces_of_word[words[latent]]), dtype=np.int32)]
    return Latents(concepts, triggers, strength, patterns, words)


def decoder_weights(latents: Latents, d_model: int, rng: np.random.Generator, block_rows: int = 8192) -> np.ndarray:
    """W_dec [n_features, d_model], unit rows along the sum of each latent's concept directions.

    Drawn a block of rows at a time in float64 (the random stream is the same as drawing the whole
    matrix at once), so memory is the float32 result plus one block: 1.9 GB, not 5.6, at 131k × 3584.
    """
    directions = rng.normal(size=(len(CONCEPTS), d_model))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    n_features = len(latents.concepts)
    weights = np.empty((n_features, d_model), dtype=np.float32)
    for start in range(0, n_features, block_rows):
        stop = min(start + block_rows, n_features)
        rows = rng.normal(size=(stop - start, d_model)) * (DECODER_NOISE / np.sqrt(d_model))
        for latent in range(start, stop):
            rows[latent - start] += directions[list(latents.concepts[latent])].sum(axis=0)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        weights[start:stop] = rows
    return weights


@dataclass
class ActivationTable:
    """Sparse activations: record i is (feature[i], prompt[i]) with pairs offsets[i]:offsets[i+1]."""

    feature: np.ndarray
    prompt: np.ndarray
    offsets: np.ndarray
    positions: np.ndarray
    values: np.ndarray

    @staticmethod
    def concatenate(tables: list[ActivationTable]) -> ActivationTable:
        """The records of ``tables``, in order."""
        counts = [np.diff(table.offsets) for table in tables]
        return _table(
            [table.feature for table in tables],
            [table.prompt for table in tables],
            counts,
            [table.positions for table in tables],
            [table.values for table in tables],
        )


def _occurrence_index(corpus: PromptCorpus) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every concept piece: the prompts it occurs in and how often (CSR-style by piece id)."""
    n_prompts, ctx = corpus.tokens.shape
    flat = corpus.tokens.ravel().astype(np.int64)
    prompt_of = np.repeat(np.arange(n_prompts, dtype=np.int64), ctx)
    concept = corpus.concept_of_piece[flat] >= 0
    keys, counts = np.unique(flat[concept] * n_prompts + prompt_of[concept], return_counts=True)
    pieces, prompts = keys // n_prompts, keys % n_prompts
    starts = np.searchsorted(pieces, np.arange(len(corpus.vocabulary) + 1))
    return starts, prompts, counts, pieces


def _choose_prompts(
    pieces: np.ndarray,
    wanted: int,
    starts: np.ndarray,
    occurrence_prompts: np.ndarray,
    occurrence_counts: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """``wanted`` prompts containing ``pieces``, preferring prompts where they recur (the prompt is
    about the concept)."""
    if not len(pieces):
        return np.zeros(0, dtype=np.int64)
    candidate_prompts = np.concatenate([occurrence_prompts[starts[p] : starts[p + 1]] for p in pieces])
    candidate_counts = np.concatenate([occurrence_counts[starts[p] : starts[p + 1]] for p in pieces])
    if not len(candidate_prompts):
        return np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(candidate_prompts, return_inverse=True)
    weight = np.bincount(inverse, weights=candidate_counts).astype(np.float64) ** 2
    return rng.choice(unique, size=min(wanted, len(unique)), replace=False, p=weight / weight.sum())


def records_per_latent(n_prompts: int) -> float:
    """Mean prompts per latent: the reference density, but never so few that sampling is trivial."""
    return float(np.clip(REFERENCE_RECORDS_PER_LATENT * n_prompts / REFERENCE_PROMPTS, 12.0, 40.0))


def activation_blocks(
    corpus: PromptCorpus, latents: Latents, rng: np.random.Generator, *, skip_first: bool, boundaries: list[int]
) -> Iterator[ActivationTable]:
    """Every latent's activations over the corpus, one table per latent range
    ``boundaries[i]:boundaries[i+1]`` (``skip_first``: position 0 is ``<bos>``). Latents are drawn in
    order, so the corpus is the same whatever the boundaries; memory is one block's."""
    n_prompts, ctx = corpus.tokens.shape
    starts, occurrence_prompts, occurrence_counts, _ = _occurrence_index(corpus)
    target = records_per_latent(n_prompts)
    first_position = 1 if skip_first else 0
    for block_start, block_stop in itertools.pairwise(boundaries):
        features, prompts, counts, positions, values = [], [], [], [], []
        for latent in range(block_start, block_stop):
            sets = latents.trigger_sets[latent]
            # log-normal spread around the target, with the target as its mean
            wanted = max(4, round(target * float(np.exp(rng.normal(-(SPREAD**2) / 2, SPREAD)))))
            # A multi-concept latent fires about as often on each of its concepts.
            shares = np.diff(np.linspace(0, wanted, len(sets) + 1).round().astype(int))
            chosen = np.unique(
                np.concatenate(
                    [
                        _choose_prompts(pieces, share, starts, occurrence_prompts, occurrence_counts, rng)
                        for pieces, share in zip(sets, shares, strict=True)
                    ]
                )
            )
            if not len(chosen):
                continue
            pattern = latents.pattern_of(latent)
            if pattern == "diffuse":
                chosen = np.sort(rng.choice(n_prompts, size=min(len(chosen), n_prompts), replace=False))
            pieces = np.unique(np.concatenate(sets))
            window = corpus.tokens[chosen]
            dense = np.zeros(window.shape, dtype=np.float32)
            rows, columns = _peak_positions(window, pieces, pattern, first_position, rng)
            peaks = latents.strength[latent] * rng.uniform(0.25, 1.0, len(rows)).astype(np.float32)
            for offset, chance, scale in ((1, 0.7, 0.3), (2, 0.4, 0.12)):
                spill = (columns + offset < ctx) & (rng.random(len(rows)) < chance)
                target_rows, target_columns = rows[spill], columns[spill] + offset
                spill_values = peaks[spill] * rng.uniform(0.03, scale, int(spill.sum())).astype(np.float32)
                np.maximum.at(dense, (target_rows, target_columns), spill_values)
            background = rng.poisson(BACKGROUND_PER_PROMPT, len(chosen))
            background_rows = np.repeat(np.arange(len(chosen)), background)
            background_columns = rng.integers(first_position, ctx, len(background_rows))
            background_values = latents.strength[latent] * rng.uniform(0.005, 0.05, len(background_rows))
            np.maximum.at(dense, (background_rows, background_columns), background_values.astype(np.float32))
            dense[rows, columns] = np.maximum(dense[rows, columns], peaks)
            record_rows, record_columns = np.nonzero(dense)
            per_row = np.bincount(record_rows, minlength=len(chosen))
            present = per_row > 0
            features.append(np.full(int(present.sum()), latent, dtype=np.int64))
            prompts.append(chosen[present])
            counts.append(per_row[present])
            positions.append(record_columns)
            values.append(dense[record_rows, record_columns])
        yield _table(features, prompts, counts, positions, values)


def _peak_positions(window: np.ndarray, pieces: np.ndarray, pattern: str, first: int, rng: np.random.Generator):
    """Where a latent of ``pattern`` peaks in its prompts (rows of ``window``): on its pieces, a few
    tokens away from them (contextual), or at three random positions a prompt (diffuse)."""
    ctx = window.shape[1]
    if pattern == "diffuse":
        rows = np.repeat(np.arange(len(window)), 3)
        return rows, rng.integers(first, ctx, len(rows))
    rows, columns = np.nonzero(np.isin(window, pieces))
    if pattern == "contextual":
        moved = columns + rng.choice(CONTEXT_OFFSETS, len(columns))
        inside = (moved >= first) & (moved < ctx)
        rows, columns = rows[inside], moved[inside]
        # one peak per (prompt, position): np.maximum.at and the records below expect no duplicates
        unique = np.unique(rows.astype(np.int64) * ctx + columns)
        rows, columns = unique // ctx, unique % ctx
    keep = columns >= first
    return rows[keep], columns[keep]


def _table(features, prompts, counts, positions, values) -> ActivationTable:
    if not features:
        empty = np.zeros(0, dtype=np.int64)
        return ActivationTable(empty, empty, np.zeros(1, dtype=np.int64), empty, np.zeros(0, dtype=np.float32))
    count = np.concatenate(counts)
    return ActivationTable(
        feature=np.concatenate(features),
        prompt=np.concatenate(prompts),
        offsets=np.concatenate(([0], np.cumsum(count))).astype(np.int64),
        positions=np.concatenate(positions).astype(np.int64),
        values=np.concatenate(values).astype(np.float32),
    )
