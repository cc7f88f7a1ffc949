"""Feature families, their pairs and the map, read back (:mod:`sae_atlas.stages.families`,
:mod:`sae_atlas.stages.family_pairs`, :mod:`sae_atlas.stages.latent_map`): a latent's family on its
page, the map's points, and how often each explainer gives near-identical explanations to distinct
decoder neighbours.

Same-words rate, per explainer: of the pairs of decoder neighbours both of which it explained
(usably), the share its explanations of the two lie at cosine ≥ SAME_WORDS (lower is better: the
explainer told the latents apart). Unit of resampling: the latent, each pair belonging to its
lower-id latent; each resample draws latents with replacement with all their pairs and takes the
ratio of the sums (percentile bootstrap). Descriptive intervals, no test: nothing to correct for
multiple testing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.query.lazy import Lazy
from sae_atlas.query.resampling import Resamples, finite_or_none
from sae_atlas.stages.families import neighbour_edges
from sae_atlas.stages.family_pairs import KINDS, SAME_WORDS

UNIT = "latents: each resample draws latents with replacement, with the neighbour pairs each is the lower id of"
FAMILY = "descriptive intervals, no test: nothing to correct for multiple testing"
MEMBERS_SHOWN = 24
PAIR_FIELDS = ("feature_id", "neighbour_id", "kind", "explainer", "decoder_cosine", "explanation_cosine",
               "narrower_id", "same_family", "evidence")  # fmt: skip
# Map coordinates travel and are compared at 4 decimals (a thousandth of a pixel on any screen):
# the page, its JSON and the table's box filter all see the same numbers.
MAP_DECIMALS = 4


def map_coordinate(name: str) -> pl.Expr:
    return pl.col(name).cast(pl.Float64).round(MAP_DECIMALS)


def _read(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path).sort("feature_id") if path.exists() else None


def _rows_of(table: pl.DataFrame, column: str, value: int) -> pl.DataFrame:
    ids = table[column].to_numpy()
    low, high = np.searchsorted(ids, [value, value + 1])
    return table.slice(int(low), int(high - low))


class Families:
    """The families files of ``output_dir``, read on first use (missing in an output written
    before families existed, or without decoder weights)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.table = Lazy(lambda: _read(self.output_dir / layout.FAMILIES), name="families")
        self.pairs = Lazy(self._read_pairs, name="family-pairs")
        self.by_family = Lazy(lambda: self._table().sort("family_id", "subfamily_id", "feature_id"), name="by-family")
        # every pair of decoder neighbours once: the same-words rate's denominator, read once
        self.edges = Lazy(self._read_edges, name="neighbour-edges")

    def _table(self) -> pl.DataFrame:
        table = self.table.get()
        if table is None:
            raise LookupError("this output has no families: run `sae-atlas run` with decoder weights")
        return table

    def _read_pairs(self) -> pl.DataFrame | None:
        pairs = _read(self.output_dir / layout.FAMILY_PAIRS)
        if pairs is None:
            return None
        # every pair under both its latents: a latent's pairs are one slice
        flipped = pairs.with_columns(feature_id="neighbour_id", neighbour_id="feature_id")
        return pl.concat([pairs, flipped]).sort("feature_id", "neighbour_id")

    def _read_edges(self) -> pl.DataFrame | None:
        path = self.output_dir / layout.DECODER_SIMILARITY
        return neighbour_edges(pl.read_parquet(path)).select("source", "target") if path.exists() else None

    def available(self) -> bool:
        return self.table.get() is not None

    def of_feature(self, feature_id: int) -> dict | None:
        """A latent's family and subfamily (name, size, some members) and its pairs worth a look;
        None without families."""
        table = self.table.get()
        if table is None:
            return None
        row = _rows_of(table, "feature_id", feature_id)
        if row.height == 0:
            return None
        mine = row.row(0, named=True)
        members = _rows_of(self.by_family.get(), "family_id", mine["family_id"])
        sub = members.filter(pl.col("subfamily_id") == mine["subfamily_id"])
        pairs = self.pairs.get()
        found = _rows_of(pairs, "feature_id", feature_id).select(PAIR_FIELDS).to_dicts() if pairs is not None else []
        return {
            "family_id": mine["family_id"],
            "family_name": mine["family_name"],
            "family_size": mine["family_size"],
            "subfamily_id": mine["subfamily_id"],
            "subfamily_name": mine["subfamily_name"],
            "subfamily_size": mine["subfamily_size"],
            "members": sub["feature_id"].head(MEMBERS_SHOWN).to_list(),
            "x": mine["x"],
            "y": mine["y"],
            "pairs": found,
        }

    def latents_in(self, *, family: int | None = None, pair: str | None = None,
                   box: tuple[float, float, float, float] | None = None) -> pl.Series:  # fmt: skip
        """The feature ids of a family, of the latents in a pair of kind ``pair`` ("any": of any
        kind), or on the map within ``box`` (x0, y0, x1, y1, ends included)."""
        table = self._table()
        if family is not None:
            table = table.filter(pl.col("family_id") == family)
        if box is not None:
            x0, y0, x1, y1 = box
            table = table.filter(
                map_coordinate("x").is_between(min(x0, x1), max(x0, x1))
                & map_coordinate("y").is_between(min(y0, y1), max(y0, y1))
            )
        ids = table["feature_id"]
        if pair is not None:
            pairs = self.pairs.get()
            pairs = pairs if pairs is not None else pl.DataFrame(schema={"feature_id": pl.UInt32, "kind": pl.String})
            if pair != "any":
                pairs = pairs.filter(pl.col("kind") == pair)
            ids = ids.filter(ids.is_in(pairs["feature_id"].unique().implode()))
        return ids.cast(pl.Int64)

    def same_words_rates(self, explained: pl.DataFrame, explainers: list[str], *, resamples: Resamples,
                         confidence: float) -> dict | None:  # fmt: skip
        """Per explainer, the share of explained decoder-neighbour pairs given the same words
        (module docstring), with its interval; ``explained``: feature_id, explainer of the usable
        explanations. None without families."""
        pairs, edges = self.pairs.get(), self.edges.get()
        if pairs is None or edges is None:
            return None
        explained = explained.select(pl.col("feature_id").cast(pl.UInt32), "explainer").unique()
        both = edges.join(explained.rename({"feature_id": "source"}), on="source").join(
            explained.rename({"feature_id": "target"}), on=["target", "explainer"]
        )
        same = (
            pairs.filter((pl.col("kind") == KINDS[0]) & (pl.col("feature_id") < pl.col("neighbour_id")))
            .select(source="feature_id", target="neighbour_id", explainer="explainer")
            .with_columns(same=pl.lit(1.0))
        )
        both = both.join(same, on=["source", "target", "explainer"], how="left").with_columns(
            pl.col("same").fill_null(0.0)
        )
        latents = both["source"].unique().sort()
        frame = pl.DataFrame({"source": latents})
        columns = []
        for explainer in explainers:
            mine = (
                both.filter(pl.col("explainer") == explainer)
                .group_by("source")
                .agg(same=pl.col("same").sum(), pairs=pl.len().cast(pl.Float64))
            )
            joined = frame.join(mine, on="source", how="left", maintain_order="left").fill_null(0.0)
            columns += [joined["same"].to_numpy(), joined["pairs"].to_numpy()]
        values = np.column_stack(columns).astype(np.float32) if columns else np.zeros((0, 0), np.float32)
        totals = (
            np.concatenate([block @ values for block in resamples.blocks(len(latents))]).astype(np.float64)
            if len(latents)
            else np.zeros((0, values.shape[1]))
        )
        tail = (1 - confidence) / 2 * 100
        rows = []
        for index, explainer in enumerate(explainers):
            same_count, pair_count = values[:, 2 * index].sum(), values[:, 2 * index + 1].sum()
            low = high = None
            if len(totals) and pair_count:
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratios = totals[:, 2 * index] / totals[:, 2 * index + 1]
                ratios = ratios[np.isfinite(ratios)]
                if len(ratios) and len(latents) > 1:
                    low, high = (finite_or_none(value) for value in np.percentile(ratios, [tail, 100 - tail]))
            rows.append({
                "explainer": explainer,
                "pairs": int(pair_count),
                "same_words": int(same_count),
                "rate": float(same_count / pair_count) if pair_count else None,
                "low": low,
                "high": high,
            })  # fmt: skip
        return {"threshold": SAME_WORDS, "unit": UNIT, "family": FAMILY, "confidence": confidence, "explainers": rows}


def map_points(families: pl.DataFrame, colour: pl.DataFrame | None, colour_name: str) -> dict:
    """The map's columns (feature_id, x, y, family_id) of every latent and ``colour``'s value for
    each (feature_id, value: a number, or a category's code with ``categories``)."""
    points = families.select("feature_id", map_coordinate("x"), map_coordinate("y"), "family_id")
    names = families.group_by("family_id").agg(pl.col("family_name").first(), size=pl.len()).sort("family_id")
    data = {
        "family_names": names["family_name"].to_list(),
        "family_sizes": names["size"].to_list(),
        "colour": colour_name,
        "total": points.height,
        "categories": None,
        "x_range": [finite_or_none(points["x"].min()), finite_or_none(points["x"].max())],
        "y_range": [finite_or_none(points["y"].min()), finite_or_none(points["y"].max())],
    }
    if colour is None:
        values: list = points["family_id"].to_list()
    elif colour.schema["value"] == pl.String:
        categories = colour["value"].drop_nulls().unique().sort().to_list()
        code = pl.col("value").replace_strict(
            categories, list(range(len(categories))), default=None, return_dtype=pl.Int64
        )
        codes = colour.with_columns(value=code)
        values = points.join(codes, on="feature_id", how="left", maintain_order="left")["value"].to_list()
        data["categories"] = categories
    else:
        joined = points.join(colour, on="feature_id", how="left", maintain_order="left")
        values = [finite_or_none(value) for value in joined["value"].to_list()]
    return data | {
        "feature_id": points["feature_id"].to_list(),
        "x": points["x"].to_list(),
        "y": points["y"].to_list(),
        "family_id": points["family_id"].to_list(),
        "value": values,
    }
