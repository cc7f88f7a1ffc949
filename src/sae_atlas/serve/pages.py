"""The data behind every page of ``sae-atlas serve``: one function per page.

The JSON API returns a page's data as it is; the browser renders the same data as HTML. So every
HTML page has a JSON twin by construction (:data:`TWINS`), and the two can never disagree.
"""

from __future__ import annotations

import numpy as np

from sae_atlas.query.atlas import Atlas
from sae_atlas.query.parameters import CompareQuery, FeatureQuery, PlotQuery

SEARCH_HITS = 25
MAX_SCATTER_POINTS = 5000
# HTML page → its JSON twin (same path parameters and query string).
TWINS = {
    "/": "/api/features",
    "/features/{feature_id}": "/api/features/{feature_id}",
    "/plots": "/api/plots",
    "/compare": "/api/compare",
}


def feature_table(atlas: Atlas, query: FeatureQuery) -> dict:
    """One page of the (feature, explainer) table; with ``q``, the closest explanations too."""
    rows, total = atlas.query_features(**query.table_arguments())
    data = {"total": total, "limit": query.limit, "offset": query.offset, "rows": rows.to_dicts()}
    if query.q and query.q.strip():
        data["hits"] = atlas.search(query.q, SEARCH_HITS, explainer=query.explainer).to_dicts()
    return data


def feature_export(atlas: Atlas, query: FeatureQuery):
    """The rows of the feature table a download holds (every matching row unless limited)."""
    return atlas.query_features(**query.export_arguments())[0]


def feature(atlas: Atlas, feature_id: int) -> dict:
    """Everything about one latent."""
    return atlas.feature(feature_id)


def scatter(rows, x: str, y: str) -> dict:
    """The points of two metrics of the feature table (rows missing either are left out); more
    than :data:`MAX_SCATTER_POINTS` are sampled with a fixed seed, so the page is light and stable."""
    columns = ["feature_id", "explainer", *dict.fromkeys([x, y])]
    data = rows.select(columns).drop_nulls([x, y])
    total = data.height
    if total > MAX_SCATTER_POINTS:
        data = data.sample(MAX_SCATTER_POINTS, seed=0)
    xs, ys = data[x].to_numpy(), data[y].to_numpy()
    correlation = float(np.corrcoef(xs, ys)[0, 1]) if len(xs) > 2 and xs.std() > 0 and ys.std() > 0 else None
    return {
        "x": x,
        "y": y,
        "points": [
            {"feature_id": feature_id, "explainer": explainer, "x": float(px), "y": float(py)}
            for feature_id, explainer, px, py in zip(
                data["feature_id"].to_list(), data["explainer"].to_list(), xs, ys, strict=True
            )
        ],
        "total": total,
        "shown": data.height,
        "correlation": correlation,
    }


def plots(atlas: Atlas, query: PlotQuery) -> dict:
    """A histogram of one metric and a scatter of two."""
    histogram = atlas.histogram(query.metric, query.bins, explainer=query.explainer, scorer=query.scorer)
    rows = atlas.features(explainer=query.explainer, scorer=query.scorer, limit=None)
    return {"histogram": histogram, "scatter": scatter(rows, query.x, query.y)}


def compare(atlas: Atlas, query: CompareQuery) -> dict:
    """Explainers and scorers compared, with their uncertainty (:meth:`Atlas.compare`)."""
    return atlas.compare(**query.arguments())
