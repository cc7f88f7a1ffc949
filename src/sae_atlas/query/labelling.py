"""Labels against an atlas: what a label may judge (a latent of the SAE, an explanation it has), the
text it judged, and the labels read back with their staleness (:mod:`sae_atlas.label_store`)."""

from __future__ import annotations

import threading
import weakref
from functools import cached_property

import numpy as np
import orjson
import polars as pl

from sae_atlas import layout
from sae_atlas.label_store import VERDICTS, LabelError, LabelIn, LabelStore
from sae_atlas.query.atlas import Atlas

FILTERS = ("feature_id", "explainer", "verdict", "author")
# What the feature table's ``labelled`` filter keeps: every row; explanations with a current label
# (not stale); those without one (never labelled, or labelled before the text changed); the stale
# ones; those of one verdict.
LABELLED = ("any", "yes", "no", "stale", *VERDICTS)


class Labelling:
    """The label store of ``atlas``'s output directory, checked against the atlas. ``read_only``:
    the store is opened read-only (never created)."""

    def __init__(self, atlas: Atlas, *, read_only: bool = False):
        self.atlas = atlas
        sidecar = layout.read_sidecar(atlas.output_dir / layout.FEATURES) or {}
        causes = ((sidecar.get("config") or {}).get("labels") or {}).get("causes") or []
        self.store = LabelStore(atlas.output_dir, read_only=read_only, causes=causes)
        self._lock = threading.Lock()
        self._current: tuple[int, pl.DataFrame] | None = None

    @cached_property
    def texts(self) -> dict[tuple[int, str], str]:
        """(feature_id, explainer) → the explanation text a label of it judges."""
        rows = self.atlas.features(limit=None).select("feature_id", "explainer", "explanation_text")
        return {(feature, explainer): text for feature, explainer, text in rows.iter_rows() if text is not None}

    @cached_property
    def latents(self) -> np.ndarray:
        """Every latent a label may name: those with explanations, decoder neighbours or examples."""
        explained = np.fromiter((feature for feature, _ in self.texts), dtype=np.int64)
        return np.unique(
            np.concatenate([explained, self.atlas.latents_with_neighbours(), self.atlas.sampled_latents()])
        ).astype(np.int64)

    def add(self, labels: list[LabelIn], *, author: str) -> list[str]:
        """Store ``labels`` (one transaction) after checking each names a latent of this atlas."""
        with self._lock:  # the look-up tables are built once, by one thread
            latents, texts = self.latents, self.texts
        for label in labels:
            position = int(np.searchsorted(latents, label.feature_id))
            if position >= len(latents) or latents[position] != label.feature_id:
                raise LabelError(f"feature {label.feature_id} is not a latent of {self.atlas.sae_id}")
        return self.store.add(labels, sae_id=self.atlas.sae_id or "", texts=texts, default_author=author)

    def retract_last(self, feature_id: int, explainer: str | None, author: str) -> str | None:
        return self.store.retract_last(
            sae_id=self.atlas.sae_id or "", feature_id=feature_id, explainer=explainer, author=author
        )

    def current(self, **filters) -> pl.DataFrame:
        """The current labels of this atlas's SAE, with ``stale``; ``filters``: equality on
        :data:`FILTERS` (``explainer=""``: labels of latents themselves)."""
        version = self.store.version()
        with self._lock:
            if self._current is None or self._current[0] != version:
                # read and derived once per state of the store: a page's reads cost one query
                frame = self.store.current(self.texts).filter(pl.col("sae_id") == (self.atlas.sae_id or ""))
                self._current = (version, frame)
            frame = self._current[1]
        return _filtered(frame, filters)

    def version(self) -> int:
        """The store's version (:meth:`LabelStore.version`)."""
        return self.store.version()

    def history(self, **filters) -> pl.DataFrame:
        """Every label row ever written for this SAE, taken-back ones and retractions included."""
        frame = self.store.history().filter(pl.col("sae_id") == (self.atlas.sae_id or ""))
        latent_itself = pl.when(pl.col("explainer") == "").then(None).otherwise(pl.col("explainer"))
        return _filtered(frame.with_columns(explainer=latent_itself), filters)


_OF_ATLAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OF_ATLAS_LOCK = threading.Lock()


def labelling_of(atlas: Atlas, *, read_only: bool = False) -> Labelling:
    """The one :class:`Labelling` of ``atlas`` (its look-up tables are built once, not per page)."""
    with _OF_ATLAS_LOCK:
        kinds = _OF_ATLAS.setdefault(atlas, {})
        if read_only not in kinds:
            kinds[read_only] = Labelling(atlas, read_only=read_only)
        return kinds[read_only]


def with_labels(rows: pl.DataFrame, current: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (one per feature_id × explainer) with the current label of each explanation:
    ``verdict``, ``causes`` and ``label_stale``, null where it has none."""
    labels = current.filter(pl.col("explainer").is_not_null()).select(
        pl.col("feature_id").cast(rows.schema["feature_id"]), "explainer", "verdict", "causes", label_stale="stale"
    )
    return rows.join(labels, on=["feature_id", "explainer"], how="left", maintain_order="left")


def labelled_rows(rows: pl.DataFrame, labelled: str) -> pl.DataFrame:
    """The rows of :func:`with_labels` that ``labelled`` (one of :data:`LABELLED`) keeps."""
    if labelled not in LABELLED:
        raise LabelError(f"labelled must be one of {', '.join(LABELLED)}")
    judged = pl.col("verdict").is_not_null() & ~pl.col("label_stale")
    keep = {
        "any": pl.lit(True),
        "yes": judged,
        "no": ~judged.fill_null(False),
        "stale": pl.col("label_stale").fill_null(False),
    }.get(labelled, judged & (pl.col("verdict") == labelled))
    return rows.filter(keep.fill_null(False))


def _filtered(frame: pl.DataFrame, filters: dict) -> pl.DataFrame:
    for name, value in filters.items():
        if value is None:
            continue
        if name not in FILTERS:
            raise LabelError(f"unknown filter {name!r}; filters are {', '.join(FILTERS)}")
        if name == "explainer" and value == "":
            frame = frame.filter(pl.col("explainer").is_null())
        else:
            frame = frame.filter(pl.col(name) == value)
    return frame


def as_table(frame: pl.DataFrame, format: str) -> pl.DataFrame:
    """Labels as a table file holds them: CSV has no lists, so there ``causes`` is its JSON text."""
    if format == "csv" and "causes" in frame.columns:
        return frame.with_columns(
            pl.col("causes").map_elements(lambda items: orjson.dumps(list(items)).decode(), pl.String)
        )
    return frame


def from_table(frame: pl.DataFrame) -> pl.DataFrame:
    """The inverse of :func:`as_table`."""
    if "causes" in frame.columns and frame.schema["causes"] == pl.String:
        return frame.with_columns(pl.col("causes").str.json_decode(pl.List(pl.String)))
    return frame
