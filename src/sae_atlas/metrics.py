"""The metric registry: every per-(feature, explainer) number that can be filtered, sorted, plotted
and compared, declared once.

``Atlas``, the JSON API's models and query parameters, the HTML forms and tables, ``sae-atlas
show`` and the feature page all read this list; adding a metric is one entry here (plus, for a new
kind of source, the code that computes its column in :mod:`sae_atlas.atlas`).

Score metrics (``per_scorer``) come from ``stages/scores.parquet``: the value of ``column`` on the
rows of score method ``method``. They have one value per scorer; without a chosen scorer a
feature's value is the mean over its scorers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae_atlas import layout


@dataclass(frozen=True)
class Metric:
    """One number per (feature, explainer)."""

    name: str
    label: str  # short column header
    description: str
    range: tuple[float, float]  # chance level → perfect: the ends of colour scales
    source: str  # the output file it comes from (a ``layout`` name)
    direction: Literal["higher", "lower"] = "higher"  # which way is better
    per_scorer: bool = False
    method: str | None = None  # score metrics: the method in stages/scores.parquet
    column: str = "score"  # score metrics: the column of stages/scores.parquet


def _score(name: str, label: str, description: str, low: float = 0.5, *, method: str | None = None, column="score"):
    return Metric(
        name=name,
        label=label,
        description=description,
        range=(low, 1.0),
        source=layout.SCORES,
        per_scorer=True,
        method=method or name,
        column=column,
    )


METRICS: tuple[Metric, ...] = (
    _score("fuzz", "fuzz", "fuzz score: accuracy of the scorer on highlighted examples (study's definition)"),
    _score("detection", "detection", "detection score: accuracy of the scorer on plain examples (study's definition)"),
    _score("simulation", "simulation", "simulation score: mean correlation of simulated and true activations", 0.0),
    _score("embedding", "embedding", "embedding score: ROC-AUC of example similarity to the explanation"),
    _score("intruder", "intruder", "intruder score: share of intruder examples the scorer found", 0.2),
    Metric(
        "semantic_similarity",
        "agreement",
        "mean cosine of this explanation to the other explainers' explanations",
        (0.0, 1.0),
        layout.FEATURES,
    ),
    Metric(
        "activation_similarity",
        "coherence",
        "mean pairwise cosine of the feature's sampled activation windows",
        (0.0, 1.0),
        layout.ACTIVATION_SIMILARITY,
    ),
    Metric(
        "decoder_similarity",
        "decoder",
        "cosine of the feature's nearest decoder neighbour",
        (0.0, 1.0),
        layout.DECODER_SIMILARITY,
    ),
)

BY_NAME: dict[str, Metric] = {metric.name: metric for metric in METRICS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
SCORE_METRICS: tuple[Metric, ...] = tuple(metric for metric in METRICS if metric.per_scorer)


def get(name: str) -> Metric:
    """The metric called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; metrics are {', '.join(NAMES)}") from None
