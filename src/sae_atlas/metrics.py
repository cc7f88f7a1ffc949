"""The metric registry: every per-(feature, explainer) number that can be filtered, sorted, plotted
and compared, declared once.

``Atlas``, the JSON API's models and query parameters, the HTML forms and tables, ``sae-atlas
show`` and the feature page all read this list; adding a metric is one entry here (plus, for a new
kind of source, the code that computes its column in :mod:`sae_atlas.query.atlas`). Every metric
is better higher.

Score metrics (``per_scorer``) come from ``stages/scores.parquet``: the value of ``column`` on the
rows of score method ``method`` (any method's row when ``method`` is None). They have one value per
scorer; without a chosen scorer a feature's value is the mean over its scorers.

``headline`` metrics are the columns of tables and score matrices; the others (delphi's
classification metrics, firing frequency) are there for filters, sorting, plots, comparisons and
the JSON API, and shown on request.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One number per (feature, explainer)."""

    name: str
    label: str  # short column header
    description: str
    range: tuple[float, float]  # chance level → perfect (higher is better for every metric)
    per_scorer: bool = False
    method: str | None = None  # score metrics: the method in stages/scores.parquet (None: any)
    column: str = "score"  # score metrics: the column of stages/scores.parquet
    headline: bool = True


def _score(
    name: str,
    label: str,
    description: str,
    low: float = 0.5,
    *,
    method: str | None = None,
    column="score",
    headline: bool = True,
    high: float = 1.0,
):
    return Metric(
        name=name,
        label=label,
        description=description,
        range=(low, high),
        per_scorer=True,
        method=method,
        column=column,
        headline=headline,
    )


def _classification(method: str, column: str, label: str, description: str, low: float = 0.5) -> Metric:
    """One of delphi's per-latent classification metrics of fuzz or detection."""
    return _score(
        f"{method}_{column}",
        f"{method[:3]}. {label}",
        f"{method} {description} (delphi's result_analysis definition, per latent)",
        low,
        method=method,
        column=column,
        headline=False,
    )


METRICS: tuple[Metric, ...] = (
    _score(
        "fuzz", "fuzz", "fuzz score: accuracy of the scorer on highlighted examples (study's definition)", method="fuzz"
    ),
    _score(
        "detection",
        "detection",
        "detection score: accuracy of the scorer on plain examples (study's definition)",
        method="detection",
    ),
    _score(
        "simulation",
        "simulation",
        "simulation score: mean correlation of simulated and true activations",
        0.0,
        method="simulation",
    ),
    _score(
        "embedding",
        "embedding",
        "embedding score: ROC-AUC of example similarity to the explanation",
        method="embedding",
    ),
    _score(
        "intruder", "intruder", "intruder score: share of intruder examples the scorer found", 0.2, method="intruder"
    ),
    Metric(
        "semantic_similarity",
        "agreement",
        "mean cosine of this explanation to the other explainers' explanations",
        (0.0, 1.0),
    ),
    Metric(
        "activation_similarity",
        "coherence",
        "mean pairwise cosine of the feature's sampled activation windows",
        (0.0, 1.0),
    ),
    Metric(
        "decoder_similarity",
        "decoder",
        "cosine of the feature's nearest decoder neighbour",
        (0.0, 1.0),
    ),
    Metric(
        "names_top_tokens",
        "names tokens",
        "share of the latent's five most frequent activating tokens the explanation names (stages/diagnosis.py)",
        (0.0, 1.0),
        headline=False,
    ),
    Metric(
        "corroborated_share",
        "corroborated",
        "share of the explanation's claims another explainer of the latent also makes (stages/claims.py)",
        (0.0, 1.0),
        headline=False,
    ),
)

for _method in ("fuzz", "detection"):
    METRICS += (
        _classification(
            _method, "balanced_accuracy", "bal. acc.", "balanced accuracy: (TP/positives + TN/negatives) / 2"
        ),
        _classification(_method, "precision", "precision", "precision: TP / (TP + FP)", 0.0),
        _classification(_method, "recall", "recall", "recall: TP / positives", 0.0),
        _classification(_method, "f1", "F1", "F1: 2 · precision · recall / (precision + recall)", 0.0),
        _classification(
            _method, "probability_auc", "prob. AUC", "ROC-AUC of the scorer's probability (log_probs runs)"
        ),
    )
METRICS += (
    _score(
        "simulation_overall",
        "sim. overall",
        "simulation: correlation of the pooled group (all examples, outer distance 0), the paper's headline",
        0.0,
        method="simulation",
        column="overall",
        headline=False,
    ),
    _score(
        "example_embedding",
        "ex. emb.",
        "example embedding: mean delta_plus − delta_minus over batches (delphi's ExampleEmbeddingScorer; "
        "no explanation involved)",
        0.0,
        method="example_embedding",
        headline=False,
    ),
    _score(
        "firing_frequency",
        "firing",
        "share of cached tokens the latent fires on (delphi's log/hookpoint_firing_counts.pt)",
        0.0,
        column="firing_frequency",
        headline=False,
        high=0.01,
    ),
)

BY_NAME: dict[str, Metric] = {metric.name: metric for metric in METRICS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
SCORE_METRICS: tuple[Metric, ...] = tuple(metric for metric in METRICS if metric.per_scorer)
HEADLINE: tuple[Metric, ...] = tuple(metric for metric in METRICS if metric.headline)
HEADLINE_SCORE_METRICS: tuple[Metric, ...] = tuple(metric for metric in SCORE_METRICS if metric.headline)
# Each score method's own score (fuzz, detection, simulation, embedding, intruder, example_embedding).
METHOD_SCORES: tuple[Metric, ...] = tuple(
    metric for metric in SCORE_METRICS if metric.method is not None and metric.column == "score"
)


def get(name: str) -> Metric:
    """The metric called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; metrics are {', '.join(NAMES)}") from None
