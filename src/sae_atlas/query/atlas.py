"""``Atlas``: the query layer over an output directory. The CLI look-ups and the HTTP server are
thin layers over it.

    >>> from sae_atlas import Atlas
    >>> atlas = Atlas("master")                                  # doctest: +SKIP
    >>> atlas.feature(877)                                       # everything about one latent
    >>> atlas.features(explainer="…", filters={"fuzz": (0.8, None)}, sort="detection")
    >>> atlas.search("dates and months", k=10)

Opening reads ``features.parquet`` and the small per-feature tables once and builds the flat
(feature, explainer) table that filters and sorts run on; the metrics it holds are those of the
registry in :mod:`sae_atlas.metrics`. Activation examples, the explanation embeddings and the
embedding model are loaded on first use. Every optional file may be missing: the parts that depend
on it are then empty.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import polars as pl

from sae_atlas import layout, metrics
from sae_atlas.query import comparison
from sae_atlas.query.anatomy import read_error_rates
from sae_atlas.query.diagnosis import Diagnosis
from sae_atlas.query.errors import FeatureNotFound, QueryError
from sae_atlas.query.evidence import DECISION_METHODS, SHOWS, ScoreEvidence
from sae_atlas.query.examples import ExampleIndex
from sae_atlas.query.families import Families
from sae_atlas.query.lazy import Lazy
from sae_atlas.query.scores import SCORE_NAMES, QuantileScores, read_run_scores, read_scores, run_settings
from sae_atlas.query.search import SearchIndex, UnknownExplainer
from sae_atlas.query.summary import histogram_of, mean_scores, mean_semantic_similarity

# The names of the per-(feature, explainer) metrics that can be filtered, sorted and plotted.
METRICS = metrics.NAMES
COMPARISONS_KEPT = 8
COLUMNS = ("feature_id", "explainer", "explanation_text", "explanation_ok", *METRICS)
EXPLANATION_COLUMNS = (
    "llm_explainer",
    "explanation_text",
    "explanation_ok",
    "explanation_method",
    "scores",
    "semantic_similarity",
)
EXPLANATION_FIELDS = ("explainer", *EXPLANATION_COLUMNS[1:])


def _as_string(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    return frame.with_columns(pl.col(column).cast(pl.String) for column in columns if column in frame.columns)


class Atlas:
    """Read-only queries over one sae-atlas output directory."""

    def __init__(self, output_dir: str | Path, *, embedder=None, threads: int | None = None):
        """``embedder``: the model for :meth:`search` (default: the one that embedded the
        explanations, loaded on first use, with ``threads`` CPU threads; None: every core)."""
        self.output_dir = Path(output_dir)
        self._threads = threads
        path = self.output_dir / layout.FEATURES
        if not path.exists():
            raise FileNotFoundError(f"{path}: no {layout.FEATURES} (is this a sae-atlas output directory?)")
        features = _as_string(pl.read_parquet(path), "sae_id", "explanation_method", "llm_explainer")
        self._rows = features.sort("feature_id", maintain_order=True)
        self.sae_id = self._rows["sae_id"][0] if self._rows.height else None
        self.explainers = list(dict.fromkeys(self._rows["llm_explainer"].to_list()))
        self._row_ids = self._rows["feature_id"].to_numpy()
        self._scores = read_scores(self.output_dir, self._rows, self.explainers)
        self._score_ids = self._scores["feature_id"].to_numpy()
        self.scorers = list(dict.fromkeys(self._scores["scorer"].to_list()))
        self._explanation_rows = self._rows.select(EXPLANATION_COLUMNS)
        decoder = self._read_decoder()
        self._decoder_ids = decoder["feature_id"].to_numpy()
        counts = decoder["decoder_similarity"].list.len().to_numpy().astype(np.int64)
        self._decoder_offsets = np.concatenate(([0], np.cumsum(counts)))
        flat = decoder["decoder_similarity"].explode().drop_nulls().struct.unnest()
        self._decoder_neighbours = flat["feature_id"].to_numpy().astype(np.int64)
        self._decoder_cosines = flat["cosine_similarity"].to_numpy().astype(np.float64)
        self._similarity = self._read_optional(layout.ACTIVATION_SIMILARITY)
        if self._similarity is not None:
            self._similarity = self._similarity.sort("feature_id")
            self._similarity_ids = self._similarity["feature_id"].to_numpy()
            # plain Python values per column: a look-up is then one index per field
            self._similarity_columns = {
                name: self._similarity[name].to_list()
                for name in self._similarity.columns
                if name not in ("feature_id", "sae_id")
            }
        self._explanations_by_feature = self._index_explanations()
        self.diagnosis = Diagnosis(self.output_dir)
        self.families = Families(self.output_dir)
        self._table = self._flat_table()
        self._examples = ExampleIndex(self.output_dir)
        self._quantiles = QuantileScores(self.output_dir)
        self._search = SearchIndex(self.output_dir, embedder=embedder, threads=threads)
        self._stats = Lazy(self._compute_stats, name="stats")
        self._run_scores = Lazy(lambda: read_run_scores(self.output_dir), name="run-scores")
        self._evidence = ScoreEvidence(self.output_dir)
        self._error_rates = Lazy(lambda: read_error_rates(self.output_dir), name="error-rates")
        # The last few comparisons asked for (a page and its JSON twin ask for the same one); bounded,
        # since a server answers comparisons with any settings for as long as it runs.
        self._comparisons: OrderedDict[tuple, dict] = OrderedDict()
        self._comparisons_lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------------------

    def _read_optional(self, name: str) -> pl.DataFrame | None:
        path = self.output_dir / name
        return _as_string(pl.read_parquet(path), "sae_id") if path.exists() else None

    def _read_decoder(self) -> pl.DataFrame:
        """Neighbours of every latent (the stage table), else those of the explained ones."""
        path = self.output_dir / layout.DECODER_SIMILARITY
        if path.exists():
            table = pl.read_parquet(path)
        else:
            table = self._rows.select("feature_id", "decoder_similarity").unique("feature_id", keep="first")
        return table.with_columns(pl.col("feature_id").cast(pl.Int64)).sort("feature_id")

    def _index_explanations(self) -> dict[int, list[dict]]:
        index: dict[int, list[dict]] = {}
        for feature, explainer, text, ok in self._rows.select(
            "feature_id", "llm_explainer", "explanation_text", "explanation_ok"
        ).iter_rows():
            index.setdefault(feature, []).append({"explainer": explainer, "text": text, "ok": ok})
        return index

    def _flat_table(self) -> pl.DataFrame:
        keys = ["feature_id", "explainer"]
        base = self._rows.select(
            "feature_id",
            pl.col("llm_explainer").alias("explainer"),
            "explanation_text",
            "explanation_ok",
            semantic_similarity=pl.col("semantic_similarity")
            .list.eval(pl.element().struct.field("cosine_similarity"))
            .list.mean()
            .cast(pl.Float64),
            decoder_similarity=pl.col("decoder_similarity")
            .list.first()
            .struct.field("cosine_similarity")
            .cast(pl.Float64),
        )
        means = self._scores.group_by(keys).agg(pl.col(name).mean() for name in SCORE_NAMES)
        table = base.join(means, on=keys, how="left", maintain_order="left")
        if self._similarity is not None:
            coherence = self._similarity.select(
                pl.col("feature_id").cast(pl.Int64),
                activation_similarity=pl.col("mean_pairwise_similarity").cast(pl.Float64),
            )
            table = table.join(coherence, on="feature_id", how="left", maintain_order="left")
        else:
            table = table.with_columns(activation_similarity=pl.lit(None, pl.Float64))
        table = self.diagnosis.joined(table)
        return table.with_columns(_order=pl.int_range(pl.len())).select(*COLUMNS, "_order")

    # -- look-ups ---------------------------------------------------------------------------------

    def feature(self, feature_id: int) -> dict:
        """Everything about one latent, as plain Python data (JSON-ready).

        Per explainer: text, scores per scorer and method, similarity to the other explainers;
        decoder neighbours with their explanations; activation-similarity statistics; the sampled
        activation examples with tokens and per-token activation values.
        """
        feature_id = int(feature_id)
        if not 0 <= feature_id < 2**32:
            raise FeatureNotFound(feature_id)
        start, stop = np.searchsorted(self._row_ids, [feature_id, feature_id + 1])
        explanations = [
            dict(zip(EXPLANATION_FIELDS, row, strict=True))
            for row in self._explanation_rows.slice(start, stop - start).rows()
        ]
        if explanations:
            low, high = np.searchsorted(self._score_ids, [feature_id, feature_id + 1])
            by_explainer: dict[str, list[dict]] = {}
            for explainer, scorer, *values in self._scores.slice(low, high - low).drop("feature_id").rows():
                by_explainer.setdefault(explainer, []).append(
                    {"scorer": scorer, **dict(zip(SCORE_NAMES, values, strict=True))}
                )
            quantiles = self._quantiles.of_feature(feature_id)
            for item in explanations:
                item["metrics"] = by_explainer.get(item["explainer"], [])
                item["by_quantile"] = quantiles.get(item["explainer"], [])
        neighbours = self._neighbours(feature_id)
        similarity = self._activation_similarity(feature_id)
        examples = self._examples.of_feature(feature_id)
        if not explanations and neighbours is None and similarity is None and not examples:
            raise FeatureNotFound(feature_id)
        return {
            "feature_id": feature_id,
            "sae_id": self.sae_id,
            "explanations": explanations,
            "decoder_neighbours": neighbours or [],
            "activation_similarity": similarity,
            "activation_examples": examples,
            "diagnosis": self.diagnosis.of_feature(feature_id),
            "family": self.families.of_feature(feature_id),
        }

    def evidence(self, feature_id: int, *, method: str | None = None, show: str = "all") -> dict:
        """What the scorers saw on one latent: its fuzz and detection examples, one row each, with
        every explainer × scorer run's verdict (:mod:`sae_atlas.query.evidence`)."""
        if show not in SHOWS or method not in (None, *DECISION_METHODS):
            raise QueryError(f"show must be one of {', '.join(SHOWS)}; method one of {', '.join(DECISION_METHODS)}")
        return self._evidence.of_feature(int(feature_id), run_settings(self.output_dir)[1], method=method, show=show)

    def explanations_of(self, feature_id: int) -> list[dict]:
        """A latent's explanations (explainer, text, ok) without its scores: a dictionary look-up."""
        return self._explanations_by_feature.get(int(feature_id), [])

    def latents_with_neighbours(self) -> np.ndarray:
        """Every latent the decoder table has neighbours for (all of the SAE's, when there is one)."""
        return self._decoder_ids

    def neighbours_of(self, feature_id: int) -> list[dict]:
        """A latent's decoder neighbours (``feature_id``, ``cosine_similarity``), nearest first."""
        return [
            {"feature_id": row["feature_id"], "cosine_similarity": row["cosine_similarity"]}
            for row in self._neighbours(int(feature_id)) or []
        ]

    def sampled_latents(self) -> np.ndarray:
        """Every latent with sampled activation examples (loads the example index)."""
        return self._examples.latents()

    def feature_examples(self, feature_id: int) -> list[dict]:
        """A latent's sampled activation examples, as :meth:`feature` gives them."""
        return self._examples.of_feature(int(feature_id))

    @property
    def example_error(self) -> str | None:
        """Why the activation examples could not be loaded (a damaged file), else None."""
        return self._examples.error

    @staticmethod
    def _position(ids: np.ndarray, feature_id: int) -> int | None:
        position = int(np.searchsorted(ids, feature_id))
        return position if position < len(ids) and ids[position] == feature_id else None

    def _neighbours(self, feature_id: int) -> list[dict] | None:
        position = self._position(self._decoder_ids, feature_id)
        if position is None:
            return None
        start, stop = self._decoder_offsets[position], self._decoder_offsets[position + 1]
        return [
            {
                "feature_id": neighbour,
                "cosine_similarity": cosine,
                "explanations": self._explanations_by_feature.get(neighbour, []),
            }
            for neighbour, cosine in zip(
                self._decoder_neighbours[start:stop].tolist(), self._decoder_cosines[start:stop].tolist(), strict=True
            )
        ]

    def _activation_similarity(self, feature_id: int) -> dict | None:
        if self._similarity is None:
            return None
        position = self._position(self._similarity_ids, feature_id)
        if position is None:
            return None
        return {name: values[position] for name, values in self._similarity_columns.items()}

    # -- tables -----------------------------------------------------------------------------------

    def query_features(
        self,
        *,
        explainer: str | None = None,
        scorer: str | None = None,
        filters: dict[str, tuple[float | None, float | None]] | None = None,
        contains: str | None = None,
        latents: pl.Series | None = None,
        sort: str = "feature_id",
        descending: bool = False,
        limit: int | None = 100,
        offset: int = 0,
    ) -> tuple[pl.DataFrame, int]:
        """The page of :meth:`features` and the number of rows matching before paging."""
        if sort not in COLUMNS:
            raise QueryError(f"cannot sort by {sort!r}; columns are {', '.join(COLUMNS)}")
        table = self._table
        if scorer is not None:
            if scorer not in self.scorers:
                raise QueryError(f"unknown scorer {scorer!r}; scorers are {', '.join(self.scorers)}")
            by_scorer = self._scores.filter(pl.col("scorer") == scorer).drop("scorer")
            table = table.drop(SCORE_NAMES).join(by_scorer, on=["feature_id", "explainer"], how="inner")
        if explainer is not None:
            if explainer not in self.explainers:
                raise QueryError(f"unknown explainer {explainer!r}; explainers are {', '.join(self.explainers)}")
            table = table.filter(pl.col("explainer") == explainer)
        for metric, (low, high) in (filters or {}).items():
            if metric not in METRICS:
                raise QueryError(f"cannot filter on {metric!r}; metrics are {', '.join(METRICS)}")
            if low is not None:
                table = table.filter(pl.col(metric) >= low)
            if high is not None:
                table = table.filter(pl.col(metric) <= high)
        if contains:
            table = table.filter(pl.col("explanation_text").str.contains(contains, literal=True))
        if latents is not None:
            table = table.filter(pl.col("feature_id").is_in(latents.implode()))
        total = table.height
        table = table.sort([sort, "_order"], descending=[descending, False], nulls_last=True)
        page = table.slice(offset, limit) if limit is not None else table.slice(offset)
        return page.select(COLUMNS), total

    def features(self, **query) -> pl.DataFrame:
        """One row per (feature, explainer) with flattened score columns.

        Keywords: ``explainer``, ``scorer`` (score columns from that scorer only; otherwise the mean
        over scorers), ``filters`` ({metric: (low, high)}, either bound None), ``contains`` (text in
        the explanation), ``latents`` (feature ids to keep), ``sort`` (any column), ``descending``,
        ``limit``, ``offset``.
        """
        return self.query_features(**query)[0]

    def histogram(
        self, metric: str, bins: int = 20, *, explainer: str | None = None, scorer: str | None = None
    ) -> dict:
        """Counts of ``metric`` over equal-width bins (rows where it is null are counted apart)."""
        if metric not in METRICS:
            raise QueryError(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}")
        return histogram_of(self.query_features(explainer=explainer, scorer=scorer, limit=None)[0], metric, bins)

    def stats(self) -> dict:
        """What the directory holds, and its headline numbers (computed once: the files never change
        under an open Atlas)."""
        return self._stats.get()

    def _compute_stats(self) -> dict:
        files = {}
        for name in layout.MASTER_FILES:
            sidecar = layout.read_sidecar(self.output_dir / name)
            if (self.output_dir / name).exists():
                files[name] = sidecar.get("rows") if sidecar else None
        similarity = self._similarity
        return {
            "sae_id": self.sae_id,
            "features": int(self._rows["feature_id"].n_unique()),
            "rows": self._rows.height,
            "explainers": self.explainers,
            "scorers": self.scorers,
            "files": files,
            "metrics": {metric.name: metric.description for metric in metrics.METRICS},
            "mean_scores": mean_scores(self._scores).to_dicts(),
            "mean_semantic_similarity": mean_semantic_similarity(self._rows).to_dicts(),
            "mean_activation_similarity": (
                float(similarity["mean_pairwise_similarity"].mean())
                if similarity is not None and similarity["mean_pairwise_similarity"].null_count() < similarity.height
                else None
            ),
        }

    # -- comparing explainers and scorers ---------------------------------------------------------

    def comparable_metrics(self) -> list[str]:
        """The score metrics a comparison covers by default: the headline ones and delphi's
        balanced accuracy (which its result_analysis reports as "accuracy"), where there are values."""
        wanted = [
            metric.name for metric in metrics.SCORE_METRICS if metric.headline or metric.column == "balanced_accuracy"
        ]
        return [name for name in wanted if self._scores[name].null_count() < self._scores.height]

    def compare(
        self,
        metric_names: list[str] | None = None,
        *,
        resamples: int = comparison.DEFAULT_RESAMPLES,
        seed: int = comparison.DEFAULT_SEED,
        confidence: float = 0.95,
        latents: str = "common",
        exclude_identical: bool = False,
    ) -> dict:
        """Explainers and scorers compared (see :mod:`sae_atlas.query.comparison`): per explainer × scorer
        × metric summaries with bootstrap CIs, paired differences between explainers, scorer and
        explainer agreement, and the comparability of the runs, on the latents every run scored
        (``latents="all"``: every latent with a value), less those where two explainers wrote the
        same text when ``exclude_identical``. Plain data, JSON-ready."""
        chosen = list(dict.fromkeys(metric_names)) if metric_names else self.comparable_metrics()
        for name in chosen:
            if name not in SCORE_NAMES:
                raise QueryError(f"cannot compare {name!r}; score metrics are {', '.join(SCORE_NAMES)}")
        if not 0 < confidence < 1:
            raise QueryError(f"confidence must be between 0 and 1, not {confidence}")
        if latents not in ("common", "all"):
            raise QueryError(f"latents must be 'common' or 'all', not {latents!r}")
        key = (tuple(chosen), resamples, seed, confidence, latents, exclude_identical)
        with self._comparisons_lock:
            cached = self._comparisons.get(key)
            if cached is not None:
                self._comparisons.move_to_end(key)
                return cached
        result = comparison.compare_output(
            self._rows,
            self._scores,
            self.explainers,
            self.scorers,
            run_settings(self.output_dir),
            chosen,
            resamples=resamples,
            seed=seed,
            confidence=confidence,
            latents=latents,
            exclude_identical=exclude_identical,
            run_scores=self._run_scores.get(),
            quantiles=self._quantiles.table.get()[0],
            evidence=self._error_rates.get(),
        )
        with self._comparisons_lock:
            self._comparisons[key] = result
            while len(self._comparisons) > COMPARISONS_KEPT:
                self._comparisons.popitem(last=False)
        return result

    # -- semantic search --------------------------------------------------------------------------

    @property
    def embedder(self):
        """The model that embedded the explanations (from the sidecar), loaded on first use."""
        return self._search.embedder

    def prepare(self, *, search: bool = True) -> None:
        """Load now what the first queries would otherwise wait for: the headline numbers, the
        activation-example index and (``search``) the explanation vectors and the model. A server
        calls it in the background as it starts."""
        self.stats()
        self._quantiles.nested.get()
        self._examples.index.get()
        if search:
            self._search.prepare()

    def search(self, text: str, k: int = 10, *, explainer: str | None = None) -> pl.DataFrame:
        """The ``k`` explanations closest in meaning to ``text`` (cosine, same model as stage 2)."""
        try:
            return self._search.search(text, k, explainer=explainer, explainers=self.explainers)
        except UnknownExplainer as error:
            raise QueryError(str(error)) from None
