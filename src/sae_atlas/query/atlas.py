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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from sae_atlas import layout, metrics
from sae_atlas.query import comparison
from sae_atlas.query.summary import mean_scores, mean_semantic_similarity
from sae_atlas.sampling import centre_positions, sample_examples, window_bounds
from sae_atlas.schema import CONTRACT_SCORE_FIELDS

# The names of the per-(feature, explainer) metrics that can be filtered, sorted and plotted.
METRICS = metrics.NAMES
COMPARISONS_KEPT = 8
SCORE_NAMES = tuple(metric.name for metric in metrics.SCORE_METRICS)
COLUMNS = ("feature_id", "explainer", "explanation_text", "explanation_ok", *METRICS)
DEFAULT_WINDOW = 32  # tokens shown around the peak of an example sampled without stage 4's table
EXPLANATION_COLUMNS = (
    "llm_explainer",
    "explanation_text",
    "explanation_ok",
    "explanation_method",
    "scores",
    "semantic_similarity",
)
EXPLANATION_FIELDS = ("explainer", *EXPLANATION_COLUMNS[1:])
QUANTILE_FIELDS = ("scorer", "method", "quantile", "score", "examples")


def score_columns(long: pl.DataFrame) -> pl.DataFrame:
    """``stages/scores.parquet`` rows (one per feature × run × method) as one row per (feature,
    explainer, scorer) with a column per score metric of the registry (null where the table has
    no such column, e.g. an output of an earlier version)."""

    def value(metric: metrics.Metric) -> pl.Expr:
        if metric.column not in long.columns:
            return pl.lit(None, pl.Float64).alias(metric.name)
        chosen = pl.col(metric.column).cast(pl.Float64)
        if metric.method is not None:
            chosen = chosen.filter(pl.col("method") == metric.method)
        return chosen.drop_nulls().first().alias(metric.name)

    return (
        long.with_columns(
            pl.col("feature_id").cast(pl.Int64),
            pl.col("llm_explainer").cast(pl.String).alias("explainer"),
            pl.col("llm_scorer").cast(pl.String).alias("scorer"),
            pl.col("method").cast(pl.String),
        )
        .group_by(["feature_id", "explainer", "scorer"], maintain_order=True)
        .agg(value(metric) for metric in metrics.SCORE_METRICS)
    )


class FeatureNotFound(KeyError):
    """No output file knows this feature id."""


class QueryError(ValueError):
    """A query names an unknown metric, column or explainer; the message says which."""


@dataclass
class _Examples:
    """The sampled activation examples of every feature, flat, sorted by feature."""

    feature_id: np.ndarray
    prompt_id: np.ndarray
    quantile: np.ndarray
    max_activation: np.ndarray
    centre: np.ndarray
    window_start: np.ndarray
    window_stop: np.ndarray
    pair_offsets: np.ndarray
    positions: np.ndarray
    values: np.ndarray
    prompts: list[list[str]] | dict[int, list[str]]  # tokens by prompt id


SAMPLED_COLUMNS = (
    "feature_id",
    "prompt_id",
    "quantile",
    "max_activation",
    "max_position",
    "window_start",
    "window_stop",
    "activation_pairs",
)


def _examples_of(sampled: pl.DataFrame, prompts) -> _Examples:
    """The look-up arrays of sampled examples (in their stored order: by feature, top first);
    ``prompts[p]`` gives prompt p's tokens (a list, or a mapping for a few prompts)."""
    flat = sampled["activation_pairs"].explode().drop_nulls().struct.unnest()
    counts = sampled["activation_pairs"].list.len().to_numpy().astype(np.int64)
    return _Examples(
        feature_id=sampled["feature_id"].to_numpy().astype(np.int64),
        prompt_id=sampled["prompt_id"].to_numpy().astype(np.int64),
        quantile=sampled["quantile"].to_numpy(),
        max_activation=sampled["max_activation"].to_numpy().astype(np.float64),
        centre=sampled["max_position"].to_numpy().astype(np.int64),
        window_start=sampled["window_start"].to_numpy().astype(np.int64),
        window_stop=sampled["window_stop"].to_numpy().astype(np.int64),
        pair_offsets=np.concatenate(([0], np.cumsum(counts))),
        positions=flat["token_position"].to_numpy().astype(np.int64),
        values=flat["activation_value"].to_numpy().astype(np.float64),
        prompts=prompts,
    )


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
        self._scores = self._read_scores()
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
        self._table = self._flat_table()
        self._lock = threading.Lock()
        self._examples: _Examples | bool | None = None  # False: no examples in this output
        self._loader: threading.Thread | None = None
        self.example_error: str | None = None
        self._row_groups: list[tuple[int, int]] | None = None
        self._vectors: tuple[pl.DataFrame, np.ndarray] | None = None
        self._embedder = embedder
        self._stats: dict | None = None
        # The last few comparisons asked for (a page and its JSON twin ask for the same one); bounded,
        # since a server answers comparisons with any settings for as long as it runs.
        self._comparisons: OrderedDict[tuple, dict] = OrderedDict()
        self._comparisons_lock = threading.Lock()
        self._quantiles: pl.DataFrame | None = None
        self._quantile_ids = np.zeros(0, dtype=np.int64)

    # -- opening ----------------------------------------------------------------------------------

    def _read_optional(self, name: str) -> pl.DataFrame | None:
        path = self.output_dir / name
        return _as_string(pl.read_parquet(path), "sae_id") if path.exists() else None

    def _read_scores(self) -> pl.DataFrame:
        """``feature_id``, ``explainer``, ``scorer`` and one column per score metric, sorted by
        feature: from stages/scores.parquet (every method), else from the ``scores`` struct of
        features.parquet (the contract's methods only; an output written by another tool)."""
        keys = ["feature_id", "explainer", "scorer"]
        path = self.output_dir / layout.SCORES
        if path.exists():
            present = set(pq.read_schema(path).names)
            # An output of an earlier version lacks the newer columns: their metrics are null.
            columns = sorted({metric.column for metric in metrics.SCORE_METRICS} & present)
            table = score_columns(
                pl.read_parquet(path, columns=["feature_id", "llm_explainer", "llm_scorer", "method", *columns])
            )
        else:
            table = (
                self._rows.select("feature_id", pl.col("llm_explainer").alias("explainer"), "scores")
                .explode("scores")
                .drop_nulls("scores")
                .unnest("scores")
                .with_columns(
                    pl.lit(None, pl.Float64).alias(name) for name in SCORE_NAMES if name not in CONTRACT_SCORE_FIELDS
                )
            )
        # Keep the explainers and scorers in the order features.parquet lists them.
        explainer_rank = {name: rank for rank, name in enumerate(self.explainers)}
        return (
            table.with_columns(
                _explainer=pl.col("explainer").replace_strict(explainer_rank, default=len(explainer_rank)),
                _row=pl.int_range(pl.len()),
            )
            .sort("feature_id", "_explainer", "_row")
            .select(*keys, *SCORE_NAMES)
        )

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
            quantiles: dict[str, list[dict]] = {}
            table = self._quantile_index()
            low, high = np.searchsorted(self._quantile_ids, [feature_id, feature_id + 1])
            for explainer, *values in table.slice(low, high - low).drop("feature_id").rows():
                quantiles.setdefault(explainer, []).append(dict(zip(QUANTILE_FIELDS, values, strict=True)))
            for item in explanations:
                item["metrics"] = by_explainer.get(item["explainer"], [])
                item["by_quantile"] = quantiles.get(item["explainer"], [])
        neighbours = self._neighbours(feature_id)
        similarity = self._activation_similarity(feature_id)
        examples = self._feature_examples(feature_id)
        if not explanations and neighbours is None and similarity is None and not examples:
            raise FeatureNotFound(feature_id)
        return {
            "feature_id": feature_id,
            "sae_id": self.sae_id,
            "explanations": explanations,
            "decoder_neighbours": neighbours or [],
            "activation_similarity": similarity,
            "activation_examples": examples,
        }

    def _quantile_index(self) -> pl.DataFrame:
        """Every score per activation quantile, one row per (feature, explainer, scorer, method,
        quantile), sorted by feature (read on first use)."""
        if self._quantiles is None:
            with self._lock:
                if self._quantiles is None:
                    path = self.output_dir / layout.SCORES
                    if path.exists() and "by_quantile" in pq.read_schema(path).names:
                        table = (
                            pl.read_parquet(
                                path, columns=["feature_id", "llm_explainer", "llm_scorer", "method", "by_quantile"]
                            )
                            .explode("by_quantile")
                            .drop_nulls("by_quantile")
                            .unnest("by_quantile")
                            .select(
                                pl.col("feature_id").cast(pl.Int64),
                                pl.col("llm_explainer").cast(pl.String).alias("explainer"),
                                pl.col("llm_scorer").cast(pl.String).alias("scorer"),
                                pl.col("method").cast(pl.String),
                                "quantile",
                                "score",
                                "examples",
                            )
                            .sort("feature_id", maintain_order=True)
                        )
                    else:
                        table = pl.DataFrame(
                            schema={"feature_id": pl.Int64, "explainer": pl.String, **dict.fromkeys(QUANTILE_FIELDS)}
                        )
                    self._quantile_ids = table["feature_id"].to_numpy()
                    self._quantiles = table
        return self._quantiles

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
        examples = self._examples_index()
        return np.unique(examples.feature_id) if examples is not None else np.zeros(0, dtype=np.int64)

    def feature_examples(self, feature_id: int) -> list[dict]:
        """A latent's sampled activation examples, as :meth:`feature` gives them."""
        return self._feature_examples(int(feature_id))

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

    # -- activation examples (loaded on first use) --------------------------------------------------

    def _sampled(self) -> pl.DataFrame | None:
        """The examples stage 4 sampled and embedded, with their activations. An output written by
        another tool has no stages/sampled_examples.parquet (or an older one without activations):
        its examples are then sampled the way stage 4 does by default, so they can still be shown."""
        path = self.output_dir / layout.SAMPLED_EXAMPLES
        if path.exists() and "activation_pairs" in pq.read_schema(path).names:
            return pl.read_parquet(path, columns=list(SAMPLED_COLUMNS))
        examples = self.output_dir / layout.ACTIVATION_EXAMPLES
        if not examples.exists():
            return None
        candidates = (
            pl.scan_parquet(examples)
            .select(
                "feature_id",
                "prompt_id",
                "max_activation",
                "activation_pairs",
                centre=centre_positions(pl.col("activation_pairs")),
                length=pl.col("prompt_tokens").list.len(),
            )
            .collect()
        )
        sampled = sample_examples(candidates)
        starts, stops = window_bounds(sampled["length"].to_numpy(), sampled["centre"].to_numpy(), DEFAULT_WINDOW)
        return sampled.select(
            "feature_id",
            "prompt_id",
            "quantile",
            "max_activation",
            pl.col("centre").alias("max_position"),
            window_start=pl.Series(starts),
            window_stop=pl.Series(stops),
            activation_pairs="activation_pairs",
        )

    def _load_examples(self) -> _Examples | None:
        sampled = self._sampled()
        if sampled is None:
            return None
        return _examples_of(sampled, layout.read_prompt_tokens(self.output_dir).to_list())

    def _examples_index(self, wait: bool = True) -> _Examples | None:
        """The complete example index; with ``wait=False``, None while it is still loading (it
        starts loading in the background on the first call)."""
        if self._examples is None:
            with self._lock:
                if self._loader is None:
                    self._loader = threading.Thread(target=self._load_index, name="example-index", daemon=True)
                    self._loader.start()
            if not wait:
                return None
            self._loader.join()
        return self._examples or None

    def _load_index(self) -> None:
        try:
            self._examples = self._load_examples() or False
        except Exception as error:  # a damaged file: look-ups go on without examples (validate says why)
            self._examples = False
            self.example_error = f"{type(error).__name__}: {error}"

    def _examples_of_feature(self, feature_id: int) -> _Examples | None:
        """One feature's examples before the index is loaded: only the row groups of
        stages/sampled_examples.parquet that hold it (by their statistics), and its prompts."""
        path = self.output_dir / layout.SAMPLED_EXAMPLES
        if not path.exists() or "activation_pairs" not in pq.read_schema(path).names:
            return self._examples_index()
        if self._row_groups is None:
            self._row_groups = layout.row_group_ranges(path, "feature_id")
        groups = [group for group, (low, high) in enumerate(self._row_groups) if low <= feature_id <= high]
        if not groups:
            return None
        rows = pl.from_arrow(pq.ParquetFile(path).read_row_groups(groups, columns=list(SAMPLED_COLUMNS)))
        rows = rows.filter(pl.col("feature_id") == feature_id)
        prompts = layout.read_prompt_tokens(self.output_dir, rows["prompt_id"].unique().to_list())
        return _examples_of(rows, prompts)

    def _feature_examples(self, feature_id: int) -> list[dict]:
        examples = self._examples_index(wait=False)
        if examples is None:
            if self._examples is False:
                return []
            examples = self._examples_of_feature(feature_id)
            if examples is None:
                return []
        start, stop = np.searchsorted(examples.feature_id, [feature_id, feature_id + 1])
        if start == stop:
            return []
        tokens = [examples.prompts[prompt] for prompt in examples.prompt_id[start:stop].tolist()]
        lengths = np.array([len(row) for row in tokens])
        window_starts, window_stops = examples.window_start[start:stop], examples.window_stop[start:stop]
        # every example of the feature at once: dense activations in one matrix
        dense = np.zeros((stop - start, int(lengths.max(initial=0))))
        pairs = slice(examples.pair_offsets[start], examples.pair_offsets[stop])
        rows = np.repeat(np.arange(stop - start), np.diff(examples.pair_offsets[start : stop + 1]))
        dense[rows, examples.positions[pairs]] = examples.values[pairs]
        activations = dense.tolist()
        return [
            {
                "prompt_id": prompt,
                "quantile": quantile,
                "max_activation": peak,
                "max_position": centre,
                "window": [window_start, window_stop],
                "tokens": tokens[index],
                "activations": activations[index][: lengths[index]],
            }
            for index, (prompt, quantile, peak, centre, window_start, window_stop) in enumerate(
                zip(
                    examples.prompt_id[start:stop].tolist(),
                    examples.quantile[start:stop].tolist(),
                    examples.max_activation[start:stop].tolist(),
                    examples.centre[start:stop].tolist(),
                    window_starts.tolist(),
                    window_stops.tolist(),
                    strict=True,
                )
            )
        ]

    # -- tables -----------------------------------------------------------------------------------

    def query_features(
        self,
        *,
        explainer: str | None = None,
        scorer: str | None = None,
        filters: dict[str, tuple[float | None, float | None]] | None = None,
        contains: str | None = None,
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
        total = table.height
        table = table.sort([sort, "_order"], descending=[descending, False], nulls_last=True)
        page = table.slice(offset, limit) if limit is not None else table.slice(offset)
        return page.select(COLUMNS), total

    def features(self, **query) -> pl.DataFrame:
        """One row per (feature, explainer) with flattened score columns.

        Keywords: ``explainer``, ``scorer`` (score columns from that scorer only; otherwise the mean
        over scorers), ``filters`` ({metric: (low, high)}, either bound None), ``contains`` (text in
        the explanation), ``sort`` (any column), ``descending``, ``limit``, ``offset``.
        """
        return self.query_features(**query)[0]

    def histogram(
        self, metric: str, bins: int = 20, *, explainer: str | None = None, scorer: str | None = None
    ) -> dict:
        """Counts of ``metric`` over equal-width bins (rows where it is null are counted apart)."""
        if metric not in METRICS:
            raise QueryError(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}")
        table, _ = self.query_features(explainer=explainer, scorer=scorer, limit=None)
        values = table[metric].drop_nulls().to_numpy()
        values = values[np.isfinite(values)]
        if len(values):
            low, high = float(values.min()), float(values.max())
            counts, edges = np.histogram(values, bins=bins, range=(low, high) if high > low else (low - 0.5, low + 0.5))
        else:
            counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
        return {
            "metric": metric,
            "description": metrics.BY_NAME[metric].description,
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "count": len(values),
            "missing": table.height - len(values),
        }

    def stats(self) -> dict:
        """What the directory holds, and its headline numbers (computed once: the files never change
        under an open Atlas)."""
        if self._stats is None:
            self._stats = self._compute_stats()
        return self._stats

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
            "mean_scores": mean_scores(self._rows).to_dicts(),
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
    ) -> dict:
        """Explainers and scorers compared (see :mod:`sae_atlas.query.comparison`): per explainer × scorer
        × metric summaries with bootstrap CIs, paired differences between explainers, scorer and
        explainer agreement, and the comparability of the runs. Plain data, JSON-ready."""
        chosen = list(dict.fromkeys(metric_names)) if metric_names else self.comparable_metrics()
        for name in chosen:
            if name not in SCORE_NAMES:
                raise QueryError(f"cannot compare {name!r}; score metrics are {', '.join(SCORE_NAMES)}")
        if not 0 < confidence < 1:
            raise QueryError(f"confidence must be between 0 and 1, not {confidence}")
        key = (tuple(chosen), resamples, seed, confidence)
        with self._comparisons_lock:
            cached = self._comparisons.get(key)
            if cached is not None:
                self._comparisons.move_to_end(key)
                return cached
        scores = self._scores.select("feature_id", "explainer", "scorer", *chosen)
        wide = comparison.wide_scores(scores, chosen)
        draws = comparison.Resamples(resamples, seed)
        firing = (
            self._scores.group_by("feature_id")
            .agg(weight=pl.col("firing_frequency").drop_nulls().first())
            .drop_nulls("weight")
        )
        similarity = (
            self._rows.select("feature_id", explainer="llm_explainer", pairs="semantic_similarity")
            .explode("pairs")
            .drop_nulls("pairs")
            .select(
                "feature_id",
                "explainer",
                other=pl.col("pairs").struct.field("explainer").cast(pl.String),
                cosine=pl.col("pairs").struct.field("cosine_similarity"),
            )
        )
        texts = self._rows.select("feature_id", explainer="llm_explainer", explanation_text="explanation_text")
        result = {
            "settings": {
                "resamples": resamples,
                "seed": seed,
                "confidence": confidence,
                "metrics": chosen,
                "holm_family": "every paired row of this comparison",
                "weights": "firing frequency" if firing.height else None,
            },
            "explainers": self.explainers,
            "scorers": self.scorers,
            "metrics": {name: metrics.BY_NAME[name].description for name in chosen},
            "summary": comparison.summary(
                wide,
                chosen,
                self.explainers,
                self.scorers,
                resamples=draws,
                confidence=confidence,
                weights=firing if firing.height else None,
            ),
            "paired": comparison.paired_differences(
                wide, chosen, self.explainers, self.scorers, resamples=draws, confidence=confidence
            ),
            "scorer_agreement": comparison.scorer_agreement(scores, chosen, self.scorers),
            "explainer_agreement": comparison.explainer_agreement(similarity, scores, texts, chosen, self.explainers),
            "comparability": comparison.comparability(*self._run_settings()),
        }
        with self._comparisons_lock:
            self._comparisons[key] = result
            while len(self._comparisons) > COMPARISONS_KEPT:
                self._comparisons.popitem(last=False)
        return result

    def _run_settings(self) -> tuple[dict, list[dict]]:
        """Each run's score-relevant settings (from the scores sidecar) and which runs there are."""
        path = self.output_dir / layout.SCORES
        if not path.exists():
            return {}, []
        runs = (
            pl.read_parquet(path, columns=["data_source", "llm_explainer", "llm_scorer"])
            .unique(maintain_order=True)
            .select(
                pl.col("data_source").cast(pl.String),
                explainer=pl.col("llm_explainer").cast(pl.String),
                scorer=pl.col("llm_scorer").cast(pl.String),
            )
        )
        sidecar = layout.read_sidecar(path) or {}
        settings = (sidecar.get("statistics") or {}).get("run_settings") or {}
        return settings, runs.to_dicts()

    # -- semantic search --------------------------------------------------------------------------

    def _search_vectors(self) -> tuple[pl.DataFrame, np.ndarray] | None:
        if self._vectors is None:
            with self._lock:
                if self._vectors is None:
                    path = self.output_dir / layout.EXPLANATION_EMBEDDINGS
                    if not path.exists():
                        self._vectors = False
                    else:
                        frame = _as_string(pl.read_parquet(path), "llm_explainer").filter(
                            pl.col("embedding").is_not_null()
                        )
                        dimension = int(frame["embedding"].list.len().max() or 0)
                        vectors = (
                            frame["embedding"].list.to_array(dimension).to_numpy()
                            if frame.height
                            else np.zeros((0, dimension), np.float32)
                        )
                        rows = frame.select(
                            pl.col("feature_id").cast(pl.Int64),
                            pl.col("llm_explainer").alias("explainer"),
                            "explanation_text",
                        )
                        self._vectors = (rows, np.ascontiguousarray(vectors, dtype=np.float32))
        return self._vectors or None

    @property
    def embedder(self):
        """The model that embedded the explanations (from the sidecar), loaded on first use."""
        if self._embedder is None:
            from sae_atlas.embedding import Embedder

            sidecar = layout.read_sidecar(self.output_dir / layout.EXPLANATION_EMBEDDINGS) or {}
            settings = (sidecar.get("config") or {}).get("embedding") or {}
            cache = self.output_dir / layout.EMBEDDING_CACHE
            self._embedder = Embedder(
                settings.get("model", "builtin:all-MiniLM-L6-v2"),
                quantize=settings.get("quantize", "none"),
                device=settings.get("device", "auto"),
                cache_dir=settings.get("cache_dir") or (cache if cache.exists() else None),
                threads=self._threads,
            )
        return self._embedder

    def prepare(self, *, search: bool = True) -> None:
        """Load now what the first queries would otherwise wait for: the headline numbers, the
        activation-example index and (``search``) the explanation vectors and the model. A server
        calls it in the background as it starts."""
        self.stats()
        self._quantile_index()
        self._examples_index()
        if search and self._search_vectors() is not None:
            self.embedder.backend  # noqa: B018 (loading the model is the point)

    def search(self, text: str, k: int = 10, *, explainer: str | None = None) -> pl.DataFrame:
        """The ``k`` explanations closest in meaning to ``text`` (cosine, same model as stage 2)."""
        loaded = self._search_vectors()
        if loaded is None or not text.strip():
            return pl.DataFrame(
                schema={
                    "feature_id": pl.Int64,
                    "explainer": pl.String,
                    "explanation_text": pl.String,
                    "similarity": pl.Float64,
                }
            )
        rows, vectors = loaded
        # One short query: the content cache would cost more than encoding it.
        query = self.embedder.encode_query(text)
        similarity = vectors @ query
        if explainer is not None:
            if explainer not in self.explainers:
                raise QueryError(f"unknown explainer {explainer!r}; explainers are {', '.join(self.explainers)}")
            similarity = np.where((rows["explainer"] == explainer).to_numpy(), similarity, -np.inf)
        k = max(0, min(k, int(np.isfinite(similarity).sum())))
        top = np.argpartition(-similarity, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        top = top[np.lexsort((top, -similarity[top]))]
        return rows[top].with_columns(similarity=pl.Series(similarity[top].astype(np.float64)))
