"""The feature browser served at ``/`` by ``sae-atlas serve``.

Server-rendered HTML (Jinja2) over the same :class:`~sae_atlas.atlas.Atlas` queries as the JSON
API, so every page holds its data as soon as it loads and needs no JavaScript to be useful (a few
lines add keyboard navigation to the table). Plots are inline SVG computed here: a histogram of
any metric (the data of ``/api/histogram``) and a scatter of two metrics whose points link to
their features. Templates and the stylesheet ship inside the package.
"""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from sae_atlas.atlas import COLUMNS, METRIC_DESCRIPTIONS, METRICS, Atlas, FeatureNotFound, QueryError

HERE = Path(__file__).parent
PAGE_SIZES = (25, 50, 100, 250, 500)
MAX_SCATTER_POINTS = 5000
METRIC_LABELS = {
    "fuzz": "fuzz",
    "detection": "detection",
    "simulation": "simulation",
    "embedding": "embedding",
    "semantic_similarity": "agreement",
    "activation_similarity": "coherence",
    "decoder_similarity": "decoder",
}


HEADERS = [
    ("feature_id", "feature", "latent index"),
    ("explainer", "explainer", "the LLM that wrote the explanation"),
    ("explanation_text", "explanation", "the explanation"),
    *[(metric, METRIC_LABELS[metric], METRIC_DESCRIPTIONS[metric]) for metric in METRICS],
]


def short_name(name: str) -> str:
    """A model name without its organisation."""
    return str(name).rsplit("/", 1)[-1]


def colour(value: float | None, low: float = 0.0, high: float = 1.0) -> str:
    """A background colour for ``value`` on a white → blue scale (empty for missing values)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    share = min(max((value - low) / (high - low), 0.0), 1.0) if high > low else 0.0
    return f"background-color: rgba(37, 99, 235, {0.08 + 0.62 * share:.2f});"


def token_style(value: float, peak: float) -> str:
    """An orange highlight whose strength follows the activation."""
    if value <= 0 or peak <= 0:
        return ""
    return f"background-color: rgba(234, 88, 12, {0.15 + 0.75 * min(value / peak, 1.0):.2f});"


def metric_range(metric: str) -> tuple[float, float]:
    """The natural range of a metric, for colour scales."""
    return (0.5, 1.0) if metric in ("fuzz", "detection", "embedding") else (0.0, 1.0)


def _float(value: str | None) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise QueryError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise QueryError(f"{value!r} is not a finite number")
    return number


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        number = int(value) if value not in (None, "") else default
    except ValueError:
        number = default
    return min(max(number, low), high)


def _axis(low: float, high: float, ticks: int = 5) -> list[float]:
    return [low + (high - low) * step / (ticks - 1) for step in range(ticks)]


def histogram_svg_data(histogram: dict, width: int = 640, height: int = 260) -> dict:
    """Bar geometry for a histogram dictionary (as returned by ``Atlas.histogram``)."""
    counts = histogram["counts"]
    edges = histogram["edges"]
    tallest = max(counts) if counts and max(counts) > 0 else 1
    plot_width, plot_height = width - 80, height - 50  # room for the axis labels on both sides
    bar_width = plot_width / max(len(counts), 1)
    bars = []
    for index, count in enumerate(counts):
        bar_height = plot_height * count / tallest
        bars.append(
            {
                "x": 50 + index * bar_width,
                "y": 10 + plot_height - bar_height,
                "width": max(bar_width - 1, 1),
                "height": bar_height,
                "count": count,
                "low": edges[index],
                "high": edges[index + 1],
            }
        )
    return {
        "width": width,
        "height": height,
        "bars": bars,
        "x_ticks": [
            {"x": 50 + plot_width * step / 4, "label": f"{value:.2f}"}
            for step, value in enumerate(_axis(edges[0], edges[-1]))
        ],
        "y_ticks": [
            {"y": 10 + plot_height - plot_height * step / 4, "label": f"{value:.0f}"}
            for step, value in enumerate(_axis(0, tallest))
        ],
        "baseline": 10 + plot_height,
    }


def scatter_svg_data(rows, x: str, y: str, width: int = 640, height: int = 420) -> dict:
    """Point geometry for two metrics of the flat feature table (rows missing either are left out)."""
    data = rows.select("feature_id", "explainer", x, y).drop_nulls([x, y])
    total = data.height
    if total > MAX_SCATTER_POINTS:  # a fixed sample keeps the page light and stable between loads
        data = data.sample(MAX_SCATTER_POINTS, seed=0)
    xs, ys = data[x].to_numpy(), data[y].to_numpy()
    x_low, x_high = (float(xs.min()), float(xs.max())) if len(xs) else (0.0, 1.0)
    y_low, y_high = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 1.0)
    x_high, y_high = (x_high if x_high > x_low else x_low + 1.0), (y_high if y_high > y_low else y_low + 1.0)
    # a margin of 3 % so that no point sits on an axis
    x_pad, y_pad = 0.03 * (x_high - x_low), 0.03 * (y_high - y_low)
    x_low, x_high, y_low, y_high = x_low - x_pad, x_high + x_pad, y_low - y_pad, y_high + y_pad
    plot_width, plot_height = width - 95, height - 50
    points = [
        {
            "feature_id": feature,
            "explainer": explainer,
            "cx": 60 + plot_width * (float(px) - x_low) / (x_high - x_low),
            "cy": 10 + plot_height - plot_height * (float(py) - y_low) / (y_high - y_low),
            "x": float(px),
            "y": float(py),
        }
        for feature, explainer, px, py in zip(
            data["feature_id"].to_list(), data["explainer"].to_list(), xs, ys, strict=True
        )
    ]
    correlation = float(np.corrcoef(xs, ys)[0, 1]) if len(xs) > 2 and xs.std() > 0 and ys.std() > 0 else None
    return {
        "width": width,
        "height": height,
        "points": points,
        "total": total,
        "shown": len(points),
        "correlation": correlation,
        "x_ticks": [
            {"x": 60 + plot_width * step / 4, "label": f"{value:.2f}"}
            for step, value in enumerate(_axis(x_low, x_high))
        ],
        "y_ticks": [
            {"y": 10 + plot_height - plot_height * step / 4, "label": f"{value:.2f}"}
            for step, value in enumerate(_axis(y_low, y_high))
        ],
        "baseline": 10 + plot_height,
    }


def mount_browser(app: FastAPI, atlas: Atlas) -> None:
    """Add the HTML pages and their static files to ``app``."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(
        short_name=short_name,
        colour=colour,
        token_style=token_style,
        metric_range=metric_range,
        METRICS=METRICS,
        METRIC_LABELS=METRIC_LABELS,
        METRIC_DESCRIPTIONS=METRIC_DESCRIPTIONS,
        SCORE_COLUMNS=METRICS[:4],
        sae_id=atlas.sae_id,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request):
        params = request.query_params
        error = None
        explainer = params.get("explainer") or None
        scorer = params.get("scorer") or None
        contains = (params.get("contains") or "").strip()[:500] or None
        sort = params.get("sort") if params.get("sort") in COLUMNS else "feature_id"
        order = "desc" if params.get("order") == "desc" else "asc"
        limit = _int(params.get("limit"), 100, 1, 1000)
        offset = _int(params.get("offset"), 0, 0, 10_000_000)
        query = (params.get("q") or "").strip()[:500]
        bounds = {}
        try:
            for metric in METRICS:
                low, high = _float(params.get(f"{metric}_min")), _float(params.get(f"{metric}_max"))
                if (low, high) != (None, None):
                    bounds[metric] = (low, high)
            rows, total = atlas.query_features(
                explainer=explainer,
                scorer=scorer,
                filters=bounds,
                contains=contains,
                sort=sort,
                descending=order == "desc",
                limit=limit,
                offset=offset,
            )
            hits = atlas.search(query, 25, explainer=explainer).to_dicts() if query else []
        except QueryError as problem:
            error = str(problem)
            rows, total = atlas.query_features(limit=limit)
            hits = []
        kept = {key: value for key, value in params.items() if value not in ("", None) and key != "offset"}

        def link(**changes) -> str:
            merged = {**kept, **{key: value for key, value in changes.items() if value is not None}}
            return "/?" + urlencode({key: value for key, value in merged.items() if value not in ("", None)})

        return page(
            request,
            "index.html",
            status_code=422 if error else 200,
            rows=rows.to_dicts(),
            total=total,
            limit=limit,
            offset=offset,
            sort=sort,
            order=order,
            explainers=atlas.explainers,
            scorers=atlas.scorers,
            explainer=explainer,
            scorer=scorer,
            contains=contains or "",
            query=query,
            hits=hits,
            params=params,
            error=error,
            link=link,
            page_sizes=PAGE_SIZES,
            stats=atlas.stats(),
            headers=HEADERS,
            filtering=bool(explainer or scorer or contains or bounds),
        )

    @app.get("/features/{feature_id}", response_class=HTMLResponse, include_in_schema=False)
    def feature_page(request: Request, feature_id: str):
        try:
            number = int(feature_id)
            if not 0 <= number < 2**32:
                raise ValueError
            record = atlas.feature(number)
        except (ValueError, FeatureNotFound):
            return page(request, "missing.html", status_code=404, feature_id=feature_id)
        explainers = [item["explainer"] for item in record["explanations"]]
        agreement = {
            (item["explainer"], entry["explainer"]): entry["cosine_similarity"]
            for item in record["explanations"]
            for entry in item["semantic_similarity"]
        }
        groups: dict[int, list[dict]] = {}
        for example in record["activation_examples"]:
            groups.setdefault(example["quantile"], []).append(example)
        return page(
            request,
            "feature.html",
            record=record,
            explainers=explainers,
            agreement=agreement,
            groups=sorted(groups.items(), reverse=True),
            neighbours=record["decoder_neighbours"],
        )

    @app.get("/plots", response_class=HTMLResponse, include_in_schema=False)
    def plots(request: Request):
        params = request.query_params
        metric = params.get("metric") if params.get("metric") in METRICS else "detection"
        bins = _int(params.get("bins"), 20, 1, 200)
        x = params.get("x") if params.get("x") in METRICS else "semantic_similarity"
        y = params.get("y") if params.get("y") in METRICS else "fuzz"
        explainer = params.get("explainer") if params.get("explainer") in atlas.explainers else None
        scorer = params.get("scorer") if params.get("scorer") in atlas.scorers else None
        histogram = atlas.histogram(metric, bins, explainer=explainer, scorer=scorer)
        rows = atlas.features(explainer=explainer, scorer=scorer, limit=None)
        return page(
            request,
            "plots.html",
            metric=metric,
            bins=bins,
            x=x,
            y=y,
            explainer=explainer,
            scorer=scorer,
            explainers=atlas.explainers,
            scorers=atlas.scorers,
            histogram=histogram,
            bars=histogram_svg_data(histogram),
            scatter=scatter_svg_data(rows, x, y),
        )
