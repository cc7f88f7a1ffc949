"""What the scorers saw: a latent's scored examples, one row per example and one column per
explainer × scorer run, from ``stages/score_records.parquet`` and ``stages/score_examples.parquet``.

Each cell is the run's verdict on the example: ``correct``, ``wrong``, ``failed`` (the record is
there but its batch failed) or null (the run did not score that example). An example is

- **disagreed on** when two scorers of one explainer's explanation gave different verdicts;
- **missed by every explainer** when every run that scored it got it wrong;
- **failed** when some run's batch failed on it.

Examples are sorted so that those separating the explainers come first: the spread (max − min)
of the explainers' share of correct verdicts on the example, then the quantile (top first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.query.lazy import Lazy

DECISION_METHODS = ("fuzz", "detection")
SHOWS = ("all", "disagree", "all_miss", "failed")


def _read(output_dir: Path) -> tuple[pl.DataFrame, np.ndarray, pl.DataFrame, np.ndarray]:
    records_path, examples_path = output_dir / layout.SCORE_RECORDS, output_dir / layout.SCORE_EXAMPLES
    if not records_path.exists() or not examples_path.exists():
        empty = pl.DataFrame(schema={"feature_id": pl.UInt32})
        return empty, np.zeros(0, np.uint32), empty, np.zeros(0, np.uint32)
    records = pl.read_parquet(records_path).filter(pl.col("method").is_in(DECISION_METHODS)).sort("feature_id")
    examples = pl.read_parquet(examples_path).sort("feature_id", "example_id")
    return records, records["feature_id"].to_numpy(), examples, examples["feature_id"].to_numpy()


def _slice(table: pl.DataFrame, ids: np.ndarray, feature_id: int) -> pl.DataFrame:
    low, high = np.searchsorted(ids, [feature_id, feature_id + 1])
    return table.slice(int(low), int(high - low))


class ScoreEvidence:
    """The scored records of an output directory, read on first use, looked up by latent."""

    def __init__(self, output_dir: Path):
        self.tables = Lazy(lambda: _read(Path(output_dir)), name="score-evidence")

    @property
    def available(self) -> bool:
        return (self.tables.get()[0]).height > 0

    def of_feature(self, feature_id: int, runs: list[dict], *, method: str | None = None, show: str = "all") -> dict:
        """A latent's examples per decision method with each run's verdict (``runs``: data_source,
        explainer, scorer of every run, in the order of the columns)."""
        records, record_ids, examples, example_ids = self.tables.get()
        mine = _slice(records, record_ids, feature_id)
        texts = _slice(examples, example_ids, feature_id)
        order = sorted(runs, key=lambda run: (run["explainer"], run["scorer"]))
        methods = [name for name in DECISION_METHODS if method in (None, name)]
        return {
            "feature_id": feature_id,
            "show": show,
            "runs": order,
            "methods": [_method_evidence(mine, texts, name, order, show) for name in methods],
        }


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
    all_miss = wrong.any(axis=1) & ~correct.any(axis=1)
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
