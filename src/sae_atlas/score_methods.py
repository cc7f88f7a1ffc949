"""Score methods: how each delphi scorer's per-example records become one number per latent.

A :class:`ScoreMethod` pairs a record parser (a score file's JSON records → per-record columns)
with an aggregator (the records of every latent → one score per latent). Both are pure. The delphi
reader looks parsers up by the score directory's name, the ``scores`` stage looks aggregators up
by method; neither names a method. Adding a method is one entry in :data:`METHODS` (and a metric
in :mod:`sae_atlas.metrics` to show it).

Every parser yields the same long columns, one row per record:

``outcome``      the number the aggregator works on (``correct`` as 1.0/0.0, a similarity, a
                 correlation); null when the record failed
``activating``   the example's ground truth, where the record says or implies it
``probability``  the scorer's probability that the example is activating, where recorded
``quantile``     the activation quantile the example was drawn from (0 = top), where known
``pooled``       the record pools every example of the latent (simulation's overall group,
                 outer distance 0: the paper's headline number), where the format has one

Definitions are the study's (DESIGN.md §2): accuracy = correct / (records − failed); embedding =
ROC-AUC of the similarity against the activating label (ties counted half, null with one class);
simulation = mean and sample variance of the finite top-level correlations.

fuzz and detection also get delphi's classification metrics per latent, as
``delphi/log/result_analysis.py`` (EleutherAI/delphi 3c2e139) defines them over non-failed records:
the confusion counts, balanced accuracy ``(TP/pos + TN/neg) / 2``, precision ``TP/(TP+FP)``,
recall ``TP/pos`` and ``F1 = 2PR/(P+R)``, each 0 where its denominator is 0 (null when no record
is valid), and the ROC-AUC of the scorer's probability where records carry one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

RECORD_COLUMNS = {
    "outcome": pl.Float64,
    "activating": pl.Boolean,
    "probability": pl.Float64,
    "quantile": pl.Int16,
    "pooled": pl.Boolean,
}
# A latent's score per activation quantile (0 = the top quantile, as delphi counts).
QUANTILE_SCORE = pl.Struct({"quantile": pl.Int16, "score": pl.Float64, "examples": pl.UInt32})
# What every aggregator returns, per (data_source, feature_id); the classification columns are
# null for methods whose records are not classifications.
CLASSIFICATION_COLUMNS = {
    "true_positives": pl.UInt32,
    "true_negatives": pl.UInt32,
    "false_positives": pl.UInt32,
    "false_negatives": pl.UInt32,
    "balanced_accuracy": pl.Float64,
    "precision": pl.Float64,
    "recall": pl.Float64,
    "f1": pl.Float64,
    "probability_auc": pl.Float64,
}
AGGREGATE_COLUMNS = {
    "data_source": pl.String,
    "feature_id": pl.UInt32,
    "score": pl.Float64,
    "n_failed": pl.UInt32,
    "variance": pl.Float64,
    **CLASSIFICATION_COLUMNS,
    "overall": pl.Float64,
}
GROUP = ["data_source", "feature_id"]

Columns = dict[str, list]
Parser = Callable[[list[dict]], Columns]
Aggregator = Callable[[pl.DataFrame], pl.DataFrame]


@dataclass(frozen=True)
class ScoreMethod:
    """A delphi scorer's records: how to read them and how to aggregate them per latent.

    ``outcome_range`` is what a record's outcome can be; a value outside it is reported and
    counted as failed rather than let into a mean (1.7e308 would make the mean 2e307 and the
    variance infinite).
    """

    name: str
    parse: Parser
    aggregate: Aggregator
    description: str
    outcome_name: str = "outcome"
    outcome_range: tuple[float, float] = (0.0, 1.0)
    by_quantile: Aggregator | None = None  # per (latent, quantile): score, examples

    def out_of_range(self, outcomes: list) -> list[int]:
        """Positions of the outcomes outside ``outcome_range`` (nulls are failures, not errors)."""
        low, high = self.outcome_range
        # A little slack: cosines and correlations computed in float32 overshoot 1 by an ulp.
        low, high = low - 1e-6, high + 1e-6
        return [index for index, value in enumerate(outcomes) if value is not None and not low <= value <= high]


# -- record parsing -------------------------------------------------------------------------------


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite(value) -> float | None:
    """A finite float, or None for delphi's "nan" strings, nulls and anything else."""
    if is_number(value) and math.isfinite(value):
        return float(value)
    return None


def _quantile(distance, zero_based: bool) -> int | None:
    """The activation quantile of an activating example from its ``distance``."""
    if type(distance) is float and distance.is_integer():
        distance = int(distance)
    if type(distance) is not int:
        return None
    quantile = distance if zero_based else distance - 1
    return quantile if 0 <= quantile < 2**15 else None


def classifier_correct(record: dict) -> bool | None:
    """``correct`` of a fuzz/detection record, or None when the example failed."""
    prediction = record.get("prediction")
    if is_number(prediction) and prediction == -1:  # Gen 1/2 failure marker
        return None
    correct = record.get("correct")
    if isinstance(correct, bool):
        return correct
    # Gen 1 files may lack the dynamic ``correct`` attribute: derive it from the prediction.
    truth = record.get("activating", record.get("ground_truth"))
    if "correct" not in record and isinstance(truth, bool) and prediction in (0, 1):
        return bool(prediction) == truth
    return None


# The parsers below run once per record of hundreds of thousands of files: they test the common
# case (a current delphi record) inline and call the general helpers only for the rest.


def _columns(
    outcome: list, quantile: list, *, activating: list | None = None, probability: list | None = None
) -> Columns:
    """A parser's record columns; those a method does not have are all None."""
    absent = [None] * len(outcome)
    return {
        "outcome": outcome,
        "activating": absent if activating is None else activating,
        "probability": absent if probability is None else probability,
        "quantile": quantile,
        "pooled": absent,
    }


def parse_classifier(records: list[dict]) -> Columns:
    """fuzz / detection (``ClassifierOutput``) of every generation (raw-formats.md §1.6.1)."""
    outcome, activating, probability, quantile = [], [], [], []
    for record in records:
        correct = record.get("correct")
        prediction = record.get("prediction")
        if type(correct) is not bool or (type(prediction) is int and prediction == -1):
            correct = classifier_correct(record)
        truth = record.get("activating")
        zero_based = truth is not None  # Gen 3 records carry ``activating`` and count quantiles from 0
        if truth is None:
            truth = record.get("ground_truth")
        if type(truth) is not bool:
            truth = None
        outcome.append(None if correct is None else float(correct))
        activating.append(truth)
        # Only current records hold real probabilities (Gen 1/2 wrote 0.0 or -1 as defaults).
        chance = record.get("probability") if zero_based and correct is not None else None
        probability.append(chance if type(chance) is float and 0.0 <= chance <= 1.0 else None)
        quantile.append(_quantile(record.get("distance"), zero_based) if truth else None)
    return _columns(outcome, quantile, activating=activating, probability=probability)


def embedding_activating(record: dict) -> bool | None:
    """Ground truth of an embedding record: ``activating`` when present, else ``distance >= 0``.

    A neighbour negative with Jaccard 0 is written as ``-0.0``: counted as non-activating.
    """
    activating = record.get("activating", record.get("ground_truth"))
    if isinstance(activating, bool):
        return activating
    distance = record.get("distance")
    if not is_number(distance):
        return None
    return distance > 0 or (distance == 0 and math.copysign(1.0, distance) > 0)


def parse_embedding(records: list[dict]) -> Columns:
    """embedding (``EmbeddingOutput``): the similarity of each example to the explanation."""
    outcome, activating, quantile = [], [], []
    for record in records:
        similarity = record.get("similarity")
        outcome.append(similarity if type(similarity) is float and math.isfinite(similarity) else finite(similarity))
        truth = embedding_activating(record)
        activating.append(truth)
        quantile.append(_quantile(record.get("distance"), True) if truth else None)
    return _columns(outcome, quantile, activating=activating)


def parse_simulation(records: list[dict]) -> Columns:
    """simulation (``ScoredSimulation`` groups, every delphi generation): each group's correlation;
    outer distance q+1 is quantile q, 0 the pooled "all" group."""
    n = len(records)
    return {
        "outcome": [finite(record.get("ev_correlation_score")) for record in records],
        "activating": [None] * n,
        "probability": [None] * n,
        "quantile": [_quantile(record.get("distance"), False) for record in records],
        "pooled": [is_number(record.get("distance")) and record.get("distance") == 0 for record in records],
    }


def parse_intruder(records: list[dict]) -> Columns:
    """intruder (``IntruderResult``): whether the scorer found the intruder; ``sample: null`` fails."""
    outcome = [
        float(record["correct"])
        if record.get("sample") is not None and isinstance(record.get("correct"), bool)
        else None
        for record in records
    ]
    quantile = [
        _quantile((record.get("sample") or {}).get("chosen_quantile"), True)
        if isinstance(record.get("sample"), dict)
        else None
        for record in records
    ]
    return _columns(outcome, quantile)


def parse_example_embedding(records: list[dict]) -> Columns:
    """example_embedding (``EmbeddingOutput`` batches of delphi's ``ExampleEmbeddingScorer``): per
    batch, ``delta_plus − delta_minus``: how much closer the activating query is to the activating
    examples than to the others, plus how much closer the non-activating query is to the others.
    The explanation plays no part."""
    outcome, quantile = [], []
    for record in records:
        plus, minus = finite(record.get("delta_plus")), finite(record.get("delta_minus"))
        outcome.append(None if plus is None or minus is None else plus - minus)
        batch = record.get("batch")
        quantile.append(_quantile(batch.get("quantile_positive_query"), True) if isinstance(batch, dict) else None)
    return _columns(outcome, quantile)


# -- aggregation ----------------------------------------------------------------------------------


def accuracy(records: pl.DataFrame) -> pl.DataFrame:
    """correct / (records − failed) per latent."""
    return records.group_by(GROUP).agg(
        n_failed=pl.col("outcome").null_count(),
        score=pl.col("outcome").mean(),
    )


def _auc(records: pl.DataFrame, values: str, name: str) -> pl.DataFrame:
    """ROC-AUC of ``values`` against ``activating`` per latent (Mann–Whitney, ties count half;
    null with one class or no values), as column ``name``."""
    valid = records.filter(pl.col(values).is_not_null() & pl.col("activating").is_not_null())
    return (
        valid.with_columns(rank=pl.col(values).rank("average").over(GROUP))
        .group_by(GROUP)
        .agg(
            positives=pl.col("activating").sum(),
            negatives=(~pl.col("activating")).sum(),
            positive_rank_sum=pl.col("rank").filter(pl.col("activating")).sum(),
        )
        .select(
            *GROUP,
            pl.when((pl.col("positives") > 0) & (pl.col("negatives") > 0))
            .then(
                (pl.col("positive_rank_sum") - pl.col("positives") * (pl.col("positives") + 1) / 2)
                / (pl.col("positives") * pl.col("negatives"))
            )
            .alias(name),
        )
    )


def roc_auc(records: pl.DataFrame) -> pl.DataFrame:
    """ROC-AUC of ``outcome`` against ``activating`` per latent (Mann–Whitney, ties count half)."""
    failed = pl.col("outcome").is_null() | pl.col("activating").is_null()
    counts = records.group_by(GROUP).agg(n_failed=failed.sum())
    return counts.join(_auc(records, "outcome", "score"), on=GROUP, how="left")


def _ratio(numerator: pl.Expr, denominator: pl.Expr) -> pl.Expr:
    """delphi's guarded ratio: 0 where the denominator is 0."""
    return pl.when(denominator > 0).then(numerator / denominator).otherwise(0.0)


def classification(records: pl.DataFrame) -> pl.DataFrame:
    """The study's accuracy per latent, with delphi's confusion counts and classification metrics
    (module docstring) and the ROC-AUC of the scorer's probability."""
    valid = pl.col("outcome").is_not_null() & pl.col("activating").is_not_null()
    right, activating = pl.col("outcome") == 1.0, pl.col("activating")
    counts = records.group_by(GROUP).agg(
        n_failed=pl.col("outcome").null_count(),
        score=pl.col("outcome").mean(),
        true_positives=(valid & activating & right).sum(),
        true_negatives=(valid & ~activating & right).sum(),
        false_positives=(valid & ~activating & ~right).sum(),
        false_negatives=(valid & activating & ~right).sum(),
    )
    tp, tn, fp, fn = (
        pl.col(name) for name in ("true_positives", "true_negatives", "false_positives", "false_negatives")
    )
    positives, negatives = tp + fn, tn + fp
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, positives)
    scored = pl.when(positives + negatives > 0)
    return counts.with_columns(
        balanced_accuracy=scored.then((_ratio(tp, positives) + _ratio(tn, negatives)) / 2),
        precision=scored.then(precision),
        recall=scored.then(recall),
        f1=scored.then(_ratio(2 * precision * recall, precision + recall)),
    ).join(_auc(records, "probability", "probability_auc"), on=GROUP, how="left")


def mean_and_variance(records: pl.DataFrame) -> pl.DataFrame:
    """Mean and sample variance of the finite values per latent (one value: variance null); the
    pooled record's value apart, as ``overall``."""
    return records.group_by(GROUP).agg(
        n_failed=pl.col("outcome").null_count(),
        score=pl.col("outcome").mean(),
        variance=pl.col("outcome").var(ddof=1),
        overall=pl.col("outcome").filter(pl.col("pooled").fill_null(False)).first(),
    )


# -- per activation quantile ------------------------------------------------------------------


def quantile_means(records: pl.DataFrame) -> pl.DataFrame:
    """Per (latent, quantile): the mean outcome of the records drawn from that quantile (for
    fuzz / detection, the recall on that quantile's activating examples; for simulation, the
    quantile group's correlation)."""
    return (
        records.filter(pl.col("quantile").is_not_null())
        .group_by([*GROUP, "quantile"])
        .agg(score=pl.col("outcome").mean(), examples=pl.col("outcome").count())
    )


def quantile_auc(records: pl.DataFrame) -> pl.DataFrame:
    """Per (latent, quantile): the ROC-AUC of that quantile's activating examples against all the
    latent's non-activating ones. A positive's rank among everything minus its rank among the
    positives is the number of negatives below it (ties half), so no pair is ever formed."""
    valid = records.filter(pl.col("outcome").is_not_null() & pl.col("activating").is_not_null())
    ranked = valid.with_columns(
        below=pl.col("outcome").rank("average").over(GROUP)
        - pl.col("outcome").rank("average").over([*GROUP, "activating"]),
        negatives=(~pl.col("activating")).sum().over(GROUP),
    )
    return (
        ranked.filter(pl.col("activating") & pl.col("quantile").is_not_null() & (pl.col("negatives") > 0))
        .group_by([*GROUP, "quantile"])
        .agg(score=(pl.col("below") / pl.col("negatives")).mean(), examples=pl.len())
    )


METHODS: dict[str, ScoreMethod] = {
    method.name: method
    for method in (
        ScoreMethod(
            "fuzz", parse_classifier, classification, "accuracy on highlighted examples", by_quantile=quantile_means
        ),
        ScoreMethod(
            "detection", parse_classifier, classification, "accuracy on plain examples", by_quantile=quantile_means
        ),
        ScoreMethod(
            "simulation",
            parse_simulation,
            mean_and_variance,
            "mean correlation of simulated activations",
            outcome_name="ev_correlation_score",
            # A Pearson r lies in [-1, 1], but delphi's older simulator wrote a few values past 1
            # (5 of the study's 4,892: 1.02 to 1.26), which the study's own means include: kept.
            outcome_range=(-2.0, 2.0),
            by_quantile=quantile_means,
        ),
        ScoreMethod(
            "embedding",
            parse_embedding,
            roc_auc,
            "ROC-AUC of example similarity to the explanation",
            outcome_name="similarity",
            outcome_range=(-1.0, 1.0),
            by_quantile=quantile_auc,
        ),
        ScoreMethod("intruder", parse_intruder, accuracy, "share of intruders found", by_quantile=quantile_means),
        ScoreMethod(
            "example_embedding",
            parse_example_embedding,
            mean_and_variance,
            "mean separation of activating and other examples by embedding alone (no explanation)",
            outcome_name="delta_plus - delta_minus",
            outcome_range=(-4.0, 4.0),  # each delta is a difference of two mean cosines
            by_quantile=quantile_means,
        ),
    )
}
# delphi's CLI writes simulation scores to "simulation" although the scorer class is "simulator";
# pre-2025 code called detection "recall".
ALIASES = {"simulator": "simulation", "recall": "detection"}
# Directories delphi (or custom pipelines) write that have no per-latent score sae-atlas can agree on.
SKIPPED = {
    "surprisal": "no agreed per-latent aggregation for surprisal losses",
}


def method_of_directory(name: str) -> str:
    """The score method a ``scores/<name>/`` directory holds (aliases resolved)."""
    return ALIASES.get(name, name)
