"""The feature browser served at ``/`` by ``sae-atlas serve``.

Server-rendered HTML (Jinja2) of the same page data as the JSON API (:mod:`sae_atlas.serve.pages`, its
JSON twins), with query parameters parsed by the same models (:mod:`sae_atlas.query.parameters`). Every page
holds its data as soon as it loads and needs no JavaScript to be useful (a few lines add keyboard
navigation to the table). Plots are inline SVG computed here: a histogram of any metric and a
scatter of two metrics whose points link to their features. Metric names, labels, descriptions and
colour ranges come from the metric registry. Templates and the stylesheet ship inside the package.

(No ``from __future__ import annotations`` here: FastAPI reads the parameter types of the routes,
whose query models are built per atlas inside :func:`mount_browser`.)
"""

import math
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParameter
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from starlette.datastructures import QueryParams

from sae_atlas import metrics
from sae_atlas.query.atlas import Atlas, FeatureNotFound, QueryError
from sae_atlas.query.parameters import (
    CompareQuery,
    FeatureQuery,
    PlotQuery,
    compare_query_model,
    feature_query_model,
    plot_query_model,
    without_blanks,
)
from sae_atlas.serve import pages
from sae_atlas.serve.web.charts import comparison_charts, histogram_svg_data, scatter_svg_data, short_name

HERE = Path(__file__).parent
PAGE_SIZES = (25, 50, 100, 250, 500)

HEADERS = [
    ("feature_id", "feature", "latent index"),
    ("explainer", "explainer", "the LLM that wrote the explanation"),
    ("explanation_text", "explanation", "the explanation"),
]


def groupby_pair(rows: list[dict]) -> list[tuple[tuple[str, str], dict[int, dict]]]:
    """Per-quantile scores grouped by (scorer, method), each group by quantile, in first-seen order."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for row in rows:
        groups.setdefault((row["scorer"], row["method"]), {})[row["quantile"]] = row
    return list(groups.items())


def shown_metrics(query: FeatureQuery) -> list[metrics.Metric]:
    """The metric columns of the table: the headline ones, and any other it is sorted or filtered by."""
    wanted = {query.sort, *query.filters()}
    return [metric for metric in metrics.METRICS if metric.headline or metric.name in wanted]


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
    """The range of a metric's colour scale (chance level → perfect)."""
    return metrics.BY_NAME[metric].range


def twin_link(path: str, query: str = "") -> str | None:
    """The JSON twin of an HTML page's path (and its query string)."""
    for page, twin in pages.TWINS.items():
        prefix = page.split("{", 1)[0]
        if path == page or ("{" in page and path.startswith(prefix) and path != prefix):
            target = twin.split("{", 1)[0] + path[len(prefix) :] if "{" in page else twin
            return target + (f"?{query}" if query else "")
    return None


class BlankFieldRedirect:
    """A form submits its empty fields as ``name=``: redirect (303) to the same page without them,
    so a page's URL and its JSON twin's are the same.

    A pure ASGI middleware: Starlette's ``@app.middleware("http")`` would wrap every request of
    every route in a task and a stream, which costs more than a feature look-up itself.
    """

    def __init__(self, app, *, paths: tuple[str, ...]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] in self.paths:
            query = scope.get("query_string", b"").decode("latin-1")
            kept = without_blanks(QueryParams(query)) if query else None
            if kept is not None:
                target = scope["path"] + (f"?{urlencode(kept)}" if kept else "")
                await RedirectResponse(target, status_code=303)(scope, receive, send)
                return
        await self.app(scope, receive, send)


SEPARATOR = "\x1f"  # a control character no token shows; lets one escape() call cover a whole prompt


def display_tokens(tokens: list[str]) -> list[str]:
    """Each token as the page shows it: HTML-escaped, ``▁`` as a space, ``<0x0A>`` as ⏎."""
    joined = SEPARATOR.join(tokens)
    shown = str(escape(joined.replace("▁", " ").replace("<0x0A>", "⏎"))).split(SEPARATOR)
    if len(shown) != len(tokens):  # a token holding the separator: escape them one by one
        shown = [str(escape(token.replace("▁", " ").replace("<0x0A>", "⏎"))) for token in tokens]
    return shown


def highlighted_tokens(shown: list[str], activations: list[float], peak: float, start: int, stop: int, centre=None):
    """The tokens ``shown[start:stop]`` (from :func:`display_tokens`) as ``<span>``s shaded by
    activation, the value on hover. Built in one pass: a feature page shows thousands of tokens,
    which per-token template logic makes slow."""
    parts = []
    for position in range(start, stop):
        value = activations[position]
        classes = "tok peak" if position == centre else "tok"
        if value > 0:
            style = token_style(value, peak)
            parts.append(f'<span class="{classes}" style="{style}" title="{value:.3f}">{shown[position]}</span>')
        else:
            parts.append(f'<span class="{classes}">{shown[position]}</span>')
    return Markup("".join(parts))


FORM_PAGES = ("/", "/plots", "/compare")
HTML = {"content": {"text/html": {}}}
PAGE_RESPONSES = {200: {**HTML, "description": "the page"}, 422: {**HTML, "description": "invalid parameters"}}
MAX_FEATURE_ID = 2**32 - 1


def mount_browser(app: FastAPI, atlas: Atlas) -> None:
    """Add the HTML pages and their static files to ``app``.

    The pages' parameters are validated by FastAPI with the same models as their JSON twins; an
    invalid value renders the page with the one-line message (422) through ``app.state.invalid_page``.
    """
    TableQuery = feature_query_model(atlas.explainers, atlas.scorers)
    PlotsQuery = plot_query_model(atlas.explainers, atlas.scorers)
    ComparisonQuery = compare_query_model()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["groupby_pair"] = groupby_pair
    templates.env.globals.update(
        short_name=short_name,
        colour=colour,
        token_style=token_style,
        highlighted_tokens=highlighted_tokens,
        display_tokens=display_tokens,
        metric_range=metric_range,
        METRICS=metrics.METRICS,
        HEADLINE=metrics.HEADLINE,
        SCORE_METRICS=metrics.SCORE_METRICS,
        HEADLINE_SCORE_METRICS=metrics.HEADLINE_SCORE_METRICS,
        feature_link=lambda feature_id: f"/features/{feature_id}",
        label_of=lambda name: metrics.BY_NAME[name].label,
        description_of=lambda name: metrics.BY_NAME[name].description,
        sae_id=atlas.sae_id,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        context["json_twin"] = twin_link(request.url.path, request.url.query)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    app.add_middleware(BlankFieldRedirect, paths=FORM_PAGES)

    def index_page(request: Request, query: FeatureQuery, error: str | None = None) -> HTMLResponse:
        data = pages.feature_table(atlas, query)
        shown = shown_metrics(query)
        params = request.query_params
        kept = {key: value for key, value in params.items() if value not in ("", None) and key != "offset"}

        def link(**changes) -> str:
            merged = {**kept, **{key: value for key, value in changes.items() if value is not None}}
            return "/?" + urlencode({key: value for key, value in merged.items() if value not in ("", None)})

        def download(format: str) -> str:
            """Every row the current filters and sort select, as a file (the JSON twin's ``format``)."""
            chosen = {key: value for key, value in kept.items() if key not in ("limit", "q", "format")}
            return "/api/features?" + urlencode({**chosen, "format": format})

        return page(
            request,
            "index.html",
            status_code=422 if error else 200,
            rows=data["rows"],
            total=data["total"],
            limit=query.limit,
            offset=query.offset,
            sort=query.sort,
            order=query.order,
            explainers=atlas.explainers,
            scorers=atlas.scorers,
            explainer=query.explainer,
            scorer=query.scorer,
            contains=query.contains or "",
            query=query.q or "",
            hits=data.get("hits", []),
            params=params,
            error=error,
            link=link,
            download=download,
            page_sizes=PAGE_SIZES,
            stats=atlas.stats(),
            headers=[*HEADERS, *[(metric.name, metric.label, metric.description) for metric in shown]],
            shown=shown,
            filtered=list(query.filters()),
            filtering=bool(query.explainer or query.scorer or query.contains or query.filters()),
        )

    def plots_page(request: Request, query: PlotQuery, error: str | None = None) -> HTMLResponse:
        data = pages.plots(atlas, query)
        return page(
            request,
            "plots.html",
            status_code=422 if error else 200,
            error=error,
            metric=query.metric,
            bins=query.bins,
            x=query.x,
            y=query.y,
            explainer=query.explainer,
            scorer=query.scorer,
            explainers=atlas.explainers,
            scorers=atlas.scorers,
            histogram=data["histogram"],
            bars=histogram_svg_data(data["histogram"]),
            scatter=scatter_svg_data(data["scatter"]),
        )

    def compare_page(request: Request, query: CompareQuery, error: str | None = None) -> HTMLResponse:
        data = pages.compare(atlas, query)
        return page(
            request,
            "compare.html",
            status_code=422 if error else 200,
            error=error,
            data=data,
            charts=comparison_charts(data),
        )

    def invalid_page(request: Request, message: str) -> HTMLResponse:
        """The page asked for, with its default view and the message (422)."""
        if request.url.path == "/":
            return index_page(request, TableQuery(), message)
        if request.url.path == "/plots":
            return plots_page(request, PlotsQuery(), message)
        if request.url.path == "/compare":
            return compare_page(request, ComparisonQuery(), message)
        return page(request, "missing.html", status_code=422, feature_id=None, error=message)

    app.state.invalid_page = invalid_page

    @app.get("/", response_class=HTMLResponse, tags=["pages"], responses=PAGE_RESPONSES)
    def index(request: Request, query: Annotated[TableQuery, Query()]):
        """The feature table with filters and semantic search (JSON twin: ``/api/features``)."""
        try:
            return index_page(request, query)
        except QueryError as problem:
            return index_page(request, TableQuery(), str(problem))

    @app.get(
        "/features/{feature_id}",
        response_class=HTMLResponse,
        tags=["pages"],
        responses={**PAGE_RESPONSES, 404: {**HTML, "description": "unknown feature"}},
    )
    def feature_page(request: Request, feature_id: Annotated[int, PathParameter(ge=0, le=MAX_FEATURE_ID)]):
        """Everything about one latent (JSON twin: ``/api/features/{feature_id}``)."""
        try:
            record = pages.feature(atlas, feature_id)
        except FeatureNotFound:
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
            # the detail metrics some scorer has a value for
            detail=[
                metric
                for metric in metrics.SCORE_METRICS
                if not metric.headline
                and any(row[metric.name] is not None for item in record["explanations"] for row in item["metrics"])
            ],
        )

    @app.get("/compare", response_class=HTMLResponse, tags=["pages"], responses=PAGE_RESPONSES)
    async def compare(request: Request, query: Annotated[ComparisonQuery, Query()]):
        """Explainers and scorers compared, with uncertainty (JSON twin: ``/api/compare``)."""
        try:
            return await app.state.comparing(compare_page, request, query)
        except QueryError as problem:
            return await app.state.comparing(compare_page, request, ComparisonQuery(), str(problem))

    @app.get("/plots", response_class=HTMLResponse, tags=["pages"], responses=PAGE_RESPONSES)
    def plots(request: Request, query: Annotated[PlotsQuery, Query()]):
        """A histogram of one metric and a scatter of two (JSON twin: ``/api/plots``)."""
        try:
            return plots_page(request, query)
        except QueryError as problem:
            return plots_page(request, PlotsQuery(), str(problem))
