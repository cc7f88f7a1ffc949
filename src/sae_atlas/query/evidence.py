"""What the scorers saw: a latent's scored examples, one row per example and one column per
explainer × scorer run, from ``stages/score_records.parquet`` and ``stages/score_examples.parquet``.

Each cell is the run's verdict on the example: ``correct``, ``wrong``, ``failed`` (the record is
there but its batch failed) or null (the run did not score that example). An example is

- **disagreed on** when two scorers of one explainer's explanation gave different verdicts;
- **missed by every explainer** when every explainer was judged on it and none of its runs got it
  right;
- **failed** when some run's batch failed on it.

Examples are sorted so that those separating the explainers come first: the spread (max − min)
of the explainers' share of correct verdicts on the example, then the quantile (top first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sae_atlas import layout

DECISION_METHODS = ("fuzz", "detection", "intruder")
SHOWS = ("all", "disagree", "all_miss", "failed")


def _latent(path: Path, feature_id: int, columns: list[str] | None = None) -> pl.DataFrame:
    """One latent's rows of a stage file sorted by latent: the row groups whose statistics hold
    it are read, the others skipped (a page reads kilobytes of a file of gigabytes)."""
    return pl.scan_parquet(path).filter(pl.col("feature_id") == feature_id).select(columns or pl.all()).collect()


class ScoreEvidence:
    """The scored records of an output directory, looked up by latent in the stage files."""

    def __init__(self, output_dir: Path):
        self.records = Path(output_dir) / layout.SCORE_RECORDS
        self.examples = Path(output_dir) / layout.SCORE_EXAMPLES

    def of_feature(self, feature_id: int, runs: list[dict], *, method: str | None = None, show: str = "all") -> dict:
        """A latent's examples per decision method with each run's verdict (``runs``: data_source,
        explainer, scorer of every run, in the order of the columns)."""
        order = sorted(runs, key=lambda run: (run["explainer"], run["scorer"]))
        methods = [name for name in DECISION_METHODS if method in (None, name)]
        result = {"feature_id": feature_id, "show": show, "runs": order, "methods": []}
        if not (self.records.exists() and self.examples.exists()) or not 0 <= feature_id < 2**32:
            return result
        mine = _latent(self.records, feature_id).filter(pl.col("method").is_in(methods))
        texts = _latent(self.examples, feature_id)
        result["methods"] = [_method_evidence(mine, texts, name, order, show) for name in methods]
        return result


def _verdicts(records: pl.DataFrame, runs: list[dict]) -> pl.DataFrame:
    """One row per example, one column per run: "correct", "wrong", "failed" or null."""
    verdict = (
        pl.when(pl.col("correct").is_null())
        .then(pl.lit("failed"))
        .when(pl.col("correct"))
        .then(pl.lit("correct"))
        .otherwise(pl.lit("wrong"))
    )
    columns = [run["data_source"] for run in runs]
    wide = records.with_columns(verdict=verdict).pivot(
        "data_source", index=["example_id", "activating", "quantile"], values="verdict", aggregate_function="first"
    )
    for name in columns:
        if name not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.String).alias(name))
    return wide.select("example_id", "activating", "quantile", *columns)


def _method_evidence(records: pl.DataFrame, texts: pl.DataFrame, method: str, runs: list[dict], show: str) -> dict:
    chosen = records.filter((pl.col("method") == method) & pl.col("example_id").is_not_null())
    if chosen.is_empty():
        return {"method": method, "examples": [], "total": 0, "counts": dict.fromkeys(SHOWS[1:], 0)}
    wide = _verdicts(chosen, runs)
    cells = wide.select(run["data_source"] for run in runs).to_numpy()
    correct, wrong, failed = (cells == "correct"), (cells == "wrong"), (cells == "failed")
    explainers = sorted({run["explainer"] for run in runs})
    by_explainer = [np.array([run["explainer"] == name for run in runs]) for name in explainers]
    disagree = np.zeros(len(cells), bool)
    shares = []
    for columns in by_explainer:
        decided = correct[:, columns] | wrong[:, columns]
        disagree |= correct[:, columns].any(axis=1) & wrong[:, columns].any(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares.append(correct[:, columns].sum(axis=1) / decided.sum(axis=1))
    shares = np.column_stack(shares)
    spread = np.nan_to_num(np.nanmax(shares, axis=1) - np.nanmin(shares, axis=1)) if shares.size else np.zeros(0)
    # every explainer was judged on it and none of its runs got it right (a miss by the one explainer
    # that happened to be scored on an example is not a miss by every explainer)
    all_miss = np.ones(len(cells), bool)
    for columns in by_explainer:
        all_miss &= wrong[:, columns].any(axis=1) & ~correct[:, columns].any(axis=1)
    flags = {"disagree": disagree, "all_miss": all_miss, "failed": failed.any(axis=1)}
    keep = np.ones(len(cells), bool) if show == "all" else flags[show]
    rank = np.lexsort((wide["example_id"].to_numpy(), wide["quantile"].fill_null(99).to_numpy(), -spread))
    text = dict(zip(texts["example_id"].to_list(), texts.select("str_tokens", "activations").rows(), strict=True))
    rows = []
    for index in rank:
        if not keep[index]:
            continue
        example_id = int(wide["example_id"][int(index)])
        tokens, activations = text.get(example_id, (None, None))
        rows.append(
            {
                "example_id": example_id,
                "str_tokens": tokens or [],
                "activations": activations,
                "activating": wide["activating"][int(index)],
                "quantile": wide["quantile"][int(index)],
                "verdicts": cells[index].tolist(),
                "spread": float(spread[index]),
                **{name: bool(flag[index]) for name, flag in flags.items()},
            }
        )
    return {
        "method": method,
        "examples": rows,
        "total": len(cells),
        "counts": {name: int(flag.sum()) for name, flag in flags.items()},
    }
