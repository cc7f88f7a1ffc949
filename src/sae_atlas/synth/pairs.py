"""Planted pairs of latents (``synth --plant-families``): the truth the family pairs are checked on.

- **Decoder twins** (:data:`TWIN_SHARE` of the latents): the second latent's decoder row is the
  first's plus a little noise (cosine ≈ :data:`TWIN_COSINE`): a near-duplicate decoder.
- **Same words** (:data:`SAME_WORDS_SHARE`): the second's row is close to the first's (cosine ≈
  :data:`SAME_WORDS_COSINE`, a distinct latent) and, where both are explained, every explainer
  gives it the first's explanation word for word: the explainer did not tell them apart.

Both latents of a pair share their concept. Pairs are drawn with a generator of their own, so the
rest of the corpus is the one the seed always gave.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

TWIN_SHARE = 0.01
TWIN_COSINE = 0.97
SAME_WORDS_SHARE = 0.02
SAME_WORDS_COSINE = 0.8


@dataclass
class PlantedPairs:
    """(first, second) latents of each kind of pair."""

    twins: list[tuple[int, int]]
    same_words: list[tuple[int, int]]

    def copy_explanations(self, explanations: list, explained: np.ndarray) -> list:
        """``explanations`` with the second latent of every same-words pair explained like the first
        (pairs of which one latent is not explained are left as they are)."""
        chosen = set(explained.tolist())
        source = {second: first for first, second in self.same_words if first in chosen and second in chosen}
        by_key = {(item.feature_id, item.explainer.short): item for item in explanations}
        return [
            replace(by_key[(source[item.feature_id], item.explainer.short)], feature_id=item.feature_id)
            if item.feature_id in source
            else item
            for item in explanations
        ]

    def partner_columns(self, n_features: int, explained: np.ndarray) -> dict[str, list]:
        """Ground-truth columns: ``decoder_twin_of`` and ``same_words_as`` (the first latent, on
        the second's row; same words only where both are explained)."""
        chosen = set(explained.tolist())
        twins: list[int | None] = [None] * n_features
        same: list[int | None] = [None] * n_features
        for first, second in self.twins:
            twins[second] = first
        for first, second in self.same_words:
            if first in chosen and second in chosen:
                same[second] = first
        return {"decoder_twin_of": twins, "same_words_as": same}


def _closer(row: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at about ``cosine`` to unit ``row``: noise of norm tan(arccos cosine)."""
    noise = rng.normal(size=row.shape)
    noise -= noise @ row * row
    noise *= np.tan(np.arccos(cosine)) / np.linalg.norm(noise)
    moved = row + noise
    return (moved / np.linalg.norm(moved)).astype(np.float32)


def plant_pairs(primary: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> PlantedPairs:
    """Draw the pairs among latents of one concept (``primary``: each latent's concept) and move
    the second latent's decoder row in ``weights`` (in place)."""
    n_features = len(primary)
    shuffled = rng.permutation(n_features)
    by_concept = shuffled[np.argsort(primary[shuffled], kind="stable")]
    concept = primary[by_concept]
    # consecutive latents of one concept pair up; each latent is in one pair at most
    starts = np.flatnonzero(concept[:-1:2] == concept[1::2]) * 2
    pairs = [(int(by_concept[start]), int(by_concept[start + 1])) for start in rng.permutation(starts)]
    n_twins, n_same = round(TWIN_SHARE * n_features), round(SAME_WORDS_SHARE * n_features)
    twins, same = pairs[:n_twins], pairs[n_twins : n_twins + n_same]
    moves = [(pair, TWIN_COSINE) for pair in twins] + [(pair, SAME_WORDS_COSINE) for pair in same]
    for (first, second), cosine in moves:
        weights[second] = _closer(weights[first].astype(np.float64), cosine, rng)
    return PlantedPairs(sorted(twins), sorted(same))
