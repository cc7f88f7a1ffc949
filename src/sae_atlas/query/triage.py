"""Which explanation to judge next: the triage queue of (latent, explainer) pairs not yet labelled.

Orders, each a column over every pair at once:

``uncertainty``             a logistic regression (scikit-learn, seeded) trained on the good / bad
                            labels so far, with the metric registry's scores as features: the pairs
                            it is least sure of first. It needs at least :data:`MIN_PER_VERDICT`
                            labels of each; before that the queue is ordered by scorer disagreement,
                            and says so.
``scorer_disagreement``     the spread (max − min) of the headline score between scorers, largest
                            first: where the scorers cannot agree, a person decides.
``explainer_disagreement``  the spread of the latent's score between explainers, largest first.
``random``                  a seeded shuffle. Only labels taken in this order estimate how often
                            an explainer is right without bias; the other orders pick hard cases.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import polars as pl

from sae_atlas import metrics
from sae_atlas.query.atlas import Atlas
from sae_atlas.query.headline import present_headline_metrics

ORDERS = ("uncertainty", "scorer_disagreement", "explainer_disagreement", "random")
MIN_PER_VERDICT = 3
UNBIASED = "random"


def scorer_spread(atlas: Atlas, metric: str) -> pl.DataFrame:
    """(feature_id, explainer, priority): the spread of ``metric`` between scorers."""
    per_scorer = [
        atlas.features(limit=None, scorer=scorer).select("feature_id", "explainer", metric) for scorer in atlas.scorers
    ]
    stacked = (
        pl.concat(per_scorer)
        if per_scorer
        else pl.DataFrame(schema={"feature_id": pl.Int64, "explainer": pl.String, metric: pl.Float64})
    )
    return stacked.group_by("feature_id", "explainer").agg(priority=pl.col(metric).max() - pl.col(metric).min())


def ordered(
    atlas: Atlas,
    labels: pl.DataFrame,
    *,
    order: str,
    explainer: str | None = None,
    seed: int = 0,
    version: int | None = None,
) -> tuple[pl.DataFrame, str, str]:
    """The queue (``feature_id``, ``explainer``, ``priority``, first to judge first), the order
    used and a note on it. ``labels``: the current labels (their pairs, unless stale, leave the
    queue). ``version``: the label store's version (:meth:`LabelStore.version`) ``labels`` are
    of; given, the ordering of every explanation is computed once per order (and, for the
    classifier, per version) and each call only removes the labelled pairs from it."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}")
    key = (order, explainer, seed, version if order == "uncertainty" else None)
    with _MEMO_LOCK:  # one thread computes an ordering; the others wait for it rather than redo it
        memo = _MEMO.setdefault(atlas, {}) if version is not None else {}
        if key not in memo:
            memo[key] = _every_explanation(atlas, labels, order=order, explainer=explainer, seed=seed)
            while len(memo) > MEMO_SIZE:
                memo.pop(next(iter(memo)))
        queue, used, note = memo[key]
    judged = labels.filter(pl.col("explainer").is_not_null() & ~pl.col("stale"))
    # one integer per pair: the filter is a look-up in a small set, not a join of every explanation
    taken = judged.select(_pair(atlas.explainers)).to_series().drop_nulls()
    return queue.filter(~pl.col("_pair").is_in(taken.implode())).drop("_pair"), used, note


def _pair(explainers: list[str]) -> pl.Expr:
    """(feature_id, explainer) as one integer; null for an explainer the atlas does not have."""
    index = pl.col("explainer").replace_strict(explainers, range(len(explainers)), default=None, return_dtype=pl.Int64)
    return (pl.col("feature_id").cast(pl.Int64) * len(explainers) + index).alias("_pair")


# The orderings of every explanation kept per atlas (each 3 columns × explanations: 10 MB at 131k × 3).
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MEMO_SIZE = 8
_MEMO_LOCK = threading.Lock()


def _every_explanation(
    atlas: Atlas, labels: pl.DataFrame, *, order: str, explainer: str | None, seed: int
) -> tuple[pl.DataFrame, str, str]:
    """Every explanation in ``order``, labelled or not, with the order used and its note."""
    rows = atlas.features(limit=None).filter(pl.col("explanation_ok"))
    if explainer is not None:
        rows = rows.filter(pl.col("explainer") == explainer)
    pending = rows
    metric = next(iter(present_headline_metrics(rows)), None)
    note = ""
    used = order
    if order == "uncertainty":
        scored, note = _uncertainty(rows, labels, pending, seed)
        if scored is None:
            used = "scorer_disagreement"
        else:
            pending = scored
    if used == "random":
        shuffled = np.random.default_rng(seed).permutation(pending.height)
        pending = pending.with_columns(priority=pl.Series(-shuffled.astype(np.float64)))
        note = "random order: labels taken in it estimate each explainer's share of good explanations without bias"
    elif used == "scorer_disagreement" and metric is not None:
        pending = pending.join(scorer_spread(atlas, metric), on=["feature_id", "explainer"], how="left")
    elif used == "explainer_disagreement" and metric is not None:
        spread = rows.group_by("feature_id").agg(priority=pl.col(metric).max() - pl.col(metric).min())
        pending = pending.join(spread, on="feature_id", how="left")
    if "priority" not in pending.columns:
        pending = pending.with_columns(priority=pl.lit(None, pl.Float64))
    if used != order:
        note = note or f"ordered by {used.replace('_', ' ')}"
    elif used != "random" and not note:
        note = "this order picks hard cases: its labels do not estimate how often an explainer is right"
    queue = pending.sort(
        [pl.col("priority").fill_nan(None), "feature_id", "explainer"], descending=[True, False, False], nulls_last=True
    ).select("feature_id", "explainer", "priority", _pair(atlas.explainers))
    return queue, used, note


def _uncertainty(rows: pl.DataFrame, labels: pl.DataFrame, pending: pl.DataFrame, seed: int):
    """``pending`` with priority −|p − ½| of a classifier of good vs bad, or (None, why not)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    names = [metric.name for metric in metrics.SCORE_METRICS if metric.name in rows.columns]
    decided = labels.filter(
        pl.col("verdict").is_in(["good", "bad"]) & pl.col("explainer").is_not_null() & ~pl.col("stale")
    )
    training = decided.select(pl.col("feature_id").cast(rows.schema["feature_id"]), "explainer", "verdict").join(
        rows, on=["feature_id", "explainer"], how="inner"
    )
    counts = training["verdict"].value_counts()
    have = dict(zip(counts["verdict"].to_list(), counts["count"].to_list(), strict=True))
    if not names or min(have.get("good", 0), have.get("bad", 0)) < MIN_PER_VERDICT:
        return None, (
            f"the classifier needs {MIN_PER_VERDICT} good and {MIN_PER_VERDICT} bad labels "
            f"(has {have.get('good', 0)} and {have.get('bad', 0)}): ordered by scorer disagreement until then"
        )
    medians = {name: rows[name].median() for name in names}

    def matrix(frame: pl.DataFrame) -> np.ndarray:
        return frame.select(
            pl.col(name).fill_null(medians[name] if medians[name] is not None else 0.0) for name in names
        ).to_numpy()

    scaler = StandardScaler().fit(matrix(rows))
    model = LogisticRegression(random_state=seed, max_iter=1000).fit(
        scaler.transform(matrix(training)), (training["verdict"] == "good").to_numpy()
    )
    chance = model.predict_proba(scaler.transform(matrix(pending)))[:, 1] if pending.height else np.zeros(0)
    note = f"uncertainty of a logistic regression on {training.height} labels ({', '.join(names)})"
    return pending.with_columns(priority=pl.Series(-np.abs(chance - 0.5))), note
