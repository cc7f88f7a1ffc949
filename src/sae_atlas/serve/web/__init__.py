"""The feature browser served at ``/`` by ``sae-atlas serve``: the HTML side of every declared page.

Server-rendered HTML (Jinja2) of the same page data as the JSON API (:mod:`sae_atlas.serve.pages`,
their JSON twins), with query parameters parsed by the same models. :func:`mount_browser` is a loop
over the page declarations: each page's route, its 422 page (its default view with the one-line
message), its JSON twin link and its place in the navigation come from its declaration. Every page
holds its data as soon as it loads and needs no JavaScript to be useful (a few lines add keyboard
navigation to the table). Plots are inline SVG computed here. Metric names, labels, descriptions
and colour ranges come from the metric registry. Templates and the stylesheet ship inside the package.

(No ``from __future__ import annotations`` here: FastAPI reads the parameter types of the routes,
whose query models are built per atlas inside :func:`mount_browser`.)
"""

from collections.abc import Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from sae_atlas import metrics
from sae_atlas.query.atlas import Atlas, FeatureNotFound, QueryError
from sae_atlas.serve.web.charts import brief, short_name
from sae_atlas.serve.web.render import (
    HERE,
    BlankFieldRedirect,
    colour,
    display_tokens,
    groupby_pair,
    highlighted_tokens,
    metric_range,
    token_style,
    twin_link,
)

__all__ = ["HERE", "colour", "display_tokens", "highlighted_tokens", "mount_browser"]

HTML = {"content": {"text/html": {}}}
PAGE_RESPONSES = {200: {**HTML, "description": "the page"}, 422: {**HTML, "description": "invalid parameters"}}


def templates_for(atlas: Atlas, navigation: list[tuple[str, str]]) -> Jinja2Templates:
    """The templates with the helpers and registries every page may use."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["groupby_pair"] = groupby_pair
    templates.env.filters["json_script"] = json_script
    templates.env.globals.update(
        short_name=short_name,
        brief=brief,
        colour=colour,
        token_style=token_style,
        highlighted_tokens=highlighted_tokens,
        display_tokens=display_tokens,
        metric_range=metric_range,
        METRICS=metrics.METRICS,
        metric_names=metrics.NAMES,
        HEADLINE=metrics.HEADLINE,
        SCORE_METRICS=metrics.SCORE_METRICS,
        HEADLINE_SCORE_METRICS=metrics.HEADLINE_SCORE_METRICS,
        feature_link=lambda feature_id: f"/features/{feature_id}",
        label_of=lambda name: metrics.BY_NAME[name].label,
        description_of=lambda name: metrics.BY_NAME[name].description,
        sae_id=atlas.sae_id,
        navigation=navigation,
    )
    return templates


def json_script(value) -> Markup:
    """``value`` as JSON to embed in a ``<script type="application/json">``: every "<" escaped, so
    no text can close the element."""
    return Markup(orjson.dumps(value).decode().replace("<", "\\u003c"))


def mount_browser(app: FastAPI, atlas: Atlas, runners: dict[str, Callable]) -> None:
    """Add every declared HTML page and the static files to ``app``.

    The pages' parameters are validated by FastAPI with the same models as their JSON twins; an
    invalid value renders the page with the one-line message (422) through ``app.state.invalid_page``.
    ``runners``: where a page's work runs, by its declaration's ``runs_on``.
    """
    from sae_atlas.serve import pages as declared  # imported here: the declarations use this package

    chosen = declared.html_pages()
    twins = declared.twins()
    templates = templates_for(atlas, [(page.nav, page.path) for page in chosen if page.nav])
    writes = getattr(app.state, "writes", None)
    # the token a page's script sends with a write (another origin cannot read it)
    templates.env.globals["page_token"] = writes.page_token if writes is not None and not writes.read_only else ""
    queries = {page.name: page.query(atlas) if page.query else None for page in chosen}
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(BlankFieldRedirect, paths=declared.form_paths())

    def missing(request: Request, status_code: int, **context) -> HTMLResponse:
        context["json_twin"] = twin_link(twins, request.url.path, request.url.query)
        return templates.TemplateResponse(request, "missing.html", context, status_code=status_code)

    def render(request: Request, page, query, path: dict, error: str | None = None) -> HTMLResponse:
        try:
            data = page.data(atlas, query, **path)
        except FeatureNotFound:
            return missing(request, 404, feature_id=path.get("feature_id"), error=None)
        context = {"data": data, "error": error, "json_twin": twin_link(twins, request.url.path, request.url.query)}
        if page.context is not None:
            context.update(page.context(atlas, query, data, request))
        return templates.TemplateResponse(request, page.template, context, status_code=422 if error else 200)

    def invalid_page(request: Request, message: str) -> HTMLResponse:
        """The page asked for, with its default view and the message (422)."""
        page = next((page for page in chosen if page.path == request.url.path), None)
        if page is None or queries[page.name] is None:
            return missing(request, 422, feature_id=None, error=message)
        return render(request, page, queries[page.name](), {}, message)

    app.state.invalid_page = invalid_page
    app.state.page_runner = lambda path: runners[next((p.runs_on for p in chosen if p.path == path), "pages")]
    for page in chosen:
        add_page_route(app, page, queries[page.name], render, runners)


def add_page_route(app: FastAPI, page, query_model, render: Callable, runners: dict[str, Callable]) -> None:
    """The HTML route of one declared page."""
    run = runners[page.runs_on]

    async def endpoint(request: Request, query=None, **path):
        try:
            return await run(render, request, page, query, path)
        except QueryError as problem:
            return await run(render, request, page, query_model(), path, str(problem))

    endpoint.__signature__ = page.signature(query_model, request=True)
    twin = f" (JSON twin: ``{page.api}``)"
    responses = dict(PAGE_RESPONSES)
    if page.path_parameters:
        responses[404] = {**HTML, "description": "not found"}
    app.add_api_route(
        page.path,
        endpoint,
        methods=["GET"],
        response_class=HTMLResponse,
        tags=["pages"],
        responses=responses,
        name=f"{page.name}_page",
        description=page.description + twin,
    )
