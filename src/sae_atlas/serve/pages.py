"""Every page of ``sae-atlas serve``, declared once.

A page is a data function (``atlas, query, **path`` → a JSON-ready dict) and a :class:`Page`
declaration: its JSON route, its HTML route and template, its query model, its result model (from
:mod:`sae_atlas.query.results`), its label in the navigation bar. :func:`sae_atlas.serve.app.create_app`
and :func:`sae_atlas.serve.web.mount_browser` are loops over :data:`PAGES`: the JSON route, the
HTML route, the JSON twin link, the 422 page (the page's default view with the one-line message)
and the navigation are all derived from the declaration, so an HTML page and its JSON twin can
never disagree. A new page is its data function, its declaration (:func:`register`) and its template.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import numpy as np
import polars as pl
from fastapi import Path as PathParameter
from fastapi import Query, Request
from pydantic import BaseModel

from sae_atlas import metrics
from sae_atlas.exports import tables
from sae_atlas.label_store import VERDICTS
from sae_atlas.query import results
from sae_atlas.query.against_people import for_atlas as people_against
from sae_atlas.query.atlas import Atlas
from sae_atlas.query.diagnosis_rates import explainer_rates
from sae_atlas.query.errors import QueryError
from sae_atlas.query.families import KINDS as PAIR_KINDS
from sae_atlas.query.families import map_points
from sae_atlas.query.labelling import LABELLED, as_table, labelled_rows, labelling_of, with_labels
from sae_atlas.query.resampling import Resamples
from sae_atlas.query.triage import UNBIASED
from sae_atlas.query.triage import ordered as triage_queue
from sae_atlas.schema import STAGE_FAMILIES
from sae_atlas.serve.parameters import (
    MAP_COLOURS,
    CompareQuery,
    EvidenceQuery,
    FeatureQuery,
    LabelsQuery,
    MapPointQuery,
    MapQuery,
    PlotQuery,
    TriageQuery,
    compare_query_model,
    feature_query_model,
    histogram_query_model,
    map_query_model,
    plot_query_model,
    search_query_model,
)
from sae_atlas.serve.web.charts import comparison_charts, headline_charts, histogram_svg_data, scatter_svg_data
from sae_atlas.serve.web.render import HEADERS, PAGE_SIZES, shown_metrics

SEARCH_HITS = 25
MAX_SCATTER_POINTS = 5000
MAX_FEATURE_ID = 2**32 - 1
EVIDENCE_ON_FEATURE_PAGE = 5  # examples per method; the evidence page has them all


@dataclass(frozen=True)
class Page:
    """One page: a data function and everything the API and the browser derive from it."""

    name: str
    api: str  # the JSON route (the HTML page's twin): "/api/features/{feature_id}"
    data: Callable[..., dict]  # (atlas, query, **path parameters) → the page's data
    result: type[BaseModel]  # the data's model: the API's response model
    description: str  # what the page shows (the routes' OpenAPI description)
    query: Callable[[Atlas], type[BaseModel]] | None = None  # the atlas's query model; None: none
    path: str | None = None  # the HTML route; None: a JSON route only
    template: str | None = None
    nav: str | None = None  # its label in the navigation bar
    # Path parameters: name → (type, FastAPI's Path(...) with its bounds).
    path_parameters: dict[str, tuple[type, Any]] = field(default_factory=dict)
    # The table a file download holds (the query's ``format`` other than json), for table pages.
    export: Callable[[Atlas, BaseModel], Any] | None = None
    # Where the work runs: "pages" (the worker threads), "loop" (the event loop: a look-up cheaper
    # than a thread hop), "own" (threads of its own: long work never holds up the pages).
    runs_on: Literal["pages", "loop", "own"] = "pages"
    # Extra template context: (atlas, query, data, request) → dict.
    context: Callable[..., dict] | None = None
    tags: tuple[str, ...] = ("pages",)

    def signature(self, query_model: type[BaseModel] | None, *, request: bool = False) -> inspect.Signature:
        """The parameters FastAPI reads for a route of this page: the request (HTML routes), the
        path parameters with their bounds, the query model."""
        keyword = inspect.Parameter.KEYWORD_ONLY
        parameters = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
        parameters = parameters if request else []
        parameters += [
            inspect.Parameter(name, keyword, annotation=Annotated[kind, spec])
            for name, (kind, spec) in self.path_parameters.items()
        ]
        if query_model is not None:
            parameters.append(inspect.Parameter("query", keyword, annotation=Annotated[query_model, Query()]))
        return inspect.Signature(parameters)


PAGES: dict[str, Page] = {}


def register(page: Page) -> Page:
    """Declare a page (replacing one of the same name); apps built afterwards serve it."""
    PAGES[page.name] = page
    return page


def html_pages() -> list[Page]:
    return [page for page in PAGES.values() if page.path is not None]


def twins() -> dict[str, str]:
    """HTML page path → its JSON twin's path."""
    return {page.path: page.api for page in html_pages()}


def form_paths() -> tuple[str, ...]:
    """The HTML pages whose forms submit query strings (every page with a query model)."""
    return tuple(page.path for page in html_pages() if page.query is not None and not page.path_parameters)


# -- data functions --------------------------------------------------------------------------------


def feature_table(atlas: Atlas, query: FeatureQuery) -> dict:
    """One page of the (feature, explainer) table with people's labels; with ``q``, the closest
    explanations too."""
    rows, total = labelled_table(atlas, with_latents(atlas, query, query.table_arguments()), query.labelled)
    data = {"total": total, "limit": query.limit, "offset": query.offset, "rows": rows.to_dicts()}
    if query.q and query.q.strip():
        data["hits"] = atlas.search(query.q, SEARCH_HITS, explainer=query.explainer).to_dicts()
    return data


def feature_export(atlas: Atlas, query: FeatureQuery):
    """The rows of the feature table a download holds (every matching row unless limited)."""
    arguments = with_latents(atlas, query, query.export_arguments())
    return as_table(labelled_table(atlas, arguments, query.labelled)[0], query.format)


def with_latents(atlas: Atlas, query: FeatureQuery, arguments: dict) -> dict:
    """``arguments`` keeping only the latents the query's family, pair kind and map box select."""
    if query.family is None and query.pair is None and not query.box:
        return arguments
    try:
        latents = atlas.families.latents_in(family=query.family, pair=query.pair, box=query.box_bounds())
    except LookupError as error:
        raise QueryError(str(error)) from None
    return {**arguments, "latents": latents}


def labelled_table(atlas: Atlas, arguments: dict, labelled: str) -> tuple[pl.DataFrame, int]:
    """:meth:`Atlas.query_features` with each row's current label, kept by ``labelled``: a filter on
    labels takes every matching row first, then pages (the store is read, never created)."""
    current = labelling_of(atlas, read_only=True).current()
    if labelled == "any":
        rows, total = atlas.query_features(**arguments)
        return with_labels(rows, current), total
    everything, _ = atlas.query_features(**{**arguments, "limit": None, "offset": 0})
    matching = labelled_rows(with_labels(everything, current), labelled)
    limit = arguments["limit"]
    return matching.slice(arguments["offset"], limit), matching.height


def feature(atlas: Atlas, query: None = None, *, feature_id: int) -> dict:
    """Everything about one latent."""
    return atlas.feature(feature_id)


def evidence(atlas: Atlas, query: EvidenceQuery, *, feature_id: int) -> dict:
    """What the scorers saw on one latent (:meth:`Atlas.evidence`)."""
    return atlas.evidence(feature_id, method=None if query.method == "both" else query.method, show=query.show)


def triage(atlas: Atlas, query: TriageQuery) -> dict:
    """The next explanation to judge in the chosen order, with everything the feature page shows."""
    labelling = labelling_of(atlas)
    version = labelling.version()
    current = labelling.current()
    queue, used, note = triage_queue(atlas, current, order=query.order, explainer=query.explainer, version=version)
    position = min(query.position, max(queue.height - 1, 0))
    item = None
    if queue.height:
        feature_id, explainer, priority = queue.row(position)
        text = labelling.texts.get((feature_id, explainer), "")
        item = {"feature_id": feature_id, "explainer": explainer, "explanation_text": text, "priority": priority}
    labels = current.filter(pl.col("feature_id") == item["feature_id"]) if item else current.clear()
    return {
        "order": query.order,
        "order_used": used,
        "note": note,
        "unbiased": used == UNBIASED,
        "explainer": query.explainer,
        "position": position,
        "total": queue.height,
        "item": item,
        "feature": atlas.feature(item["feature_id"]) if item else None,
        "labels": labels.select(
            "label_id",
            "feature_id",
            "explainer",
            "verdict",
            "causes",
            "note",
            "author",
            "created_at",
            "origin",
            "stale",
        ).to_dicts(),
        "verdicts": list(VERDICTS),
        "causes": list(labelling.store.causes),
    }


def label_summary(atlas: Atlas, query: LabelsQuery) -> dict:
    """Labelling progress per explainer, and the scorers and explainers against people's verdicts."""
    current = labelling_of(atlas).current()
    rows = atlas.features(limit=None).filter(pl.col("explanation_ok"))
    judged = current.filter(pl.col("explainer").is_not_null() & ~pl.col("stale"))
    counts = judged.group_by("explainer", "verdict").len()
    progress = []
    for explainer, explanations in rows.group_by("explainer").len().sort("explainer").iter_rows():
        mine = dict(counts.filter(pl.col("explainer") == explainer).select("verdict", "len").iter_rows())
        progress.append({"explainer": explainer, "explanations": explanations, "labelled": sum(mine.values())}
                        | {verdict: mine.get(verdict, 0) for verdict in VERDICTS})  # fmt: skip
    metric, people = people_against(atlas, current, resamples=query.resamples, seed=query.seed)
    return {
        "metric": metric,
        "progress": progress,
        "latent_labels": int(current["explainer"].is_null().sum()),
        "stale": int(current["stale"].sum()),
        "people": people,
    }


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
    """Explainers and scorers compared, with their uncertainty (:meth:`Atlas.compare`), and the
    scorers against people's labels as they are now (never cached: labels change)."""
    arguments = query.arguments()
    return with_people_and_diagnosis(atlas, atlas.compare(**arguments), arguments)


def with_people_and_diagnosis(atlas: Atlas, comparison: dict, arguments: dict) -> dict:
    """``comparison`` with ``people`` (the scorers against the current labels), ``diagnosis``
    (each explainer's causes and kinds of latent) and ``same_words`` (how often each explainer
    explains distinct decoder neighbours alike), with its settings."""
    current = labelling_of(atlas).current()
    resamples, seed = arguments.get("resamples", 2000), arguments.get("seed", 0)
    confidence = arguments.get("confidence", 0.95)
    _, people = people_against(atlas, current, resamples=resamples, seed=seed, confidence=confidence)
    table = atlas.diagnosis.explanations.get()
    rates = None
    if table is not None:
        rates = explainer_rates(table, atlas.explainers, resamples=Resamples(resamples, seed), confidence=confidence)
    explained = atlas.features(limit=None).filter(pl.col("explanation_ok")).select("feature_id", "explainer")
    same_words = atlas.families.same_words_rates(
        explained, atlas.explainers, resamples=Resamples(resamples, seed), confidence=confidence
    )
    return {**comparison, "people": people, "diagnosis": rates, "same_words": same_words}


def latent_map(atlas: Atlas, query: MapQuery) -> dict:
    """Every latent's place on the map with one colour value each: its family or subfamily, its
    activation pattern, its latest verdict, or a metric of the registry (``explainer``'s, else the
    mean over explainers)."""
    settings = {"colours": list(MAP_COLOURS), "explainer": query.explainer}
    families = atlas.families.table.get()
    if families is None:
        note = "this output has no map: it needs decoder weights ([decoder] in the config) and `sae-atlas run`"
        return map_points(pl.DataFrame(schema=STAGE_FAMILIES), None, query.colour) | settings | {"note": note}
    colour = None
    if query.colour == "subfamily":
        colour = families.select("feature_id", value="subfamily_id")
    elif query.colour == "pattern":
        patterns = atlas.diagnosis.patterns.get()
        colour = None if patterns is None else patterns.select(pl.col("feature_id").cast(pl.UInt32), value="pattern")
    elif query.colour == "label":
        current = labelling_of(atlas, read_only=True).current().filter(~pl.col("stale"))
        if query.explainer is not None:
            current = current.filter(pl.col("explainer") == query.explainer)
        colour = current.sort("created_at").group_by("feature_id").agg(value=pl.col("verdict").last())
        colour = colour.with_columns(pl.col("feature_id").cast(pl.UInt32), pl.col("value").cast(pl.String))
    elif query.colour != "family":
        rows = atlas.features(explainer=query.explainer, limit=None)
        colour = rows.group_by(pl.col("feature_id").cast(pl.UInt32)).agg(value=pl.col(query.colour).mean())
    data = map_points(families, colour, query.colour)
    if query.colour == "pattern" and colour is None:
        data["note"] = "no activation patterns in this output: the points keep one colour"
    return data | settings


def map_explanations(atlas: Atlas, query: MapPointQuery) -> dict:
    """A latent's explanations and family name: what the map shows under the pointer."""
    feature_id = query.feature_id
    family = atlas.families.of_feature(feature_id) if atlas.families.available() else None
    return {
        "feature_id": feature_id,
        "family_name": family["family_name"] if family else None,
        "explanations": [
            {"explainer": item["explainer"], "text": item["text"]} for item in atlas.explanations_of(feature_id)
        ],
    }


def stats(atlas: Atlas, query: None = None) -> dict:
    """What the output directory holds, and its headline numbers."""
    return atlas.stats()


def search(atlas: Atlas, query) -> dict:
    """Explanations closest in meaning to ``q``."""
    return {"query": query.q, "hits": atlas.search(query.q, query.k, explainer=query.explainer).to_dicts()}


def histogram(atlas: Atlas, query) -> dict:
    """Counts of a metric over equal-width bins."""
    return atlas.histogram(query.metric, query.bins, explainer=query.explainer, scorer=query.scorer)


# -- what the HTML pages add to their data ---------------------------------------------------------


def index_context(atlas: Atlas, query: FeatureQuery, data: dict, request) -> dict:
    """The table page: its rows, links that keep the filters, downloads in every format."""
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

    return {
        "rows": data["rows"],
        "total": data["total"],
        "limit": query.limit,
        "offset": query.offset,
        "sort": query.sort,
        "order": query.order,
        "explainers": atlas.explainers,
        "scorers": atlas.scorers,
        "explainer": query.explainer,
        "scorer": query.scorer,
        "contains": query.contains or "",
        "labelled": query.labelled,
        "labelled_choices": LABELLED,
        "pair_choices": ("any", *PAIR_KINDS),
        "pair": query.pair,
        "family": query.family,
        "box": query.box,
        "query": query.q or "",
        "hits": data.get("hits", []),
        "params": params,
        "link": link,
        "download": download,
        "renderers": list(tables.RENDERERS.values()),
        "page_sizes": PAGE_SIZES,
        "stats": atlas.stats(),
        "headers": [*HEADERS, *[(metric.name, metric.label, metric.description) for metric in shown]],
        "shown": shown,
        "filtered": list(query.filters()),
        "filtering": bool(
            query.explainer
            or query.scorer
            or query.contains
            or query.filters()
            or query.labelled != "any"
            or query.family is not None
            or query.pair
            or query.box
        ),
    }


def feature_context(atlas: Atlas, query: None, data: dict, request) -> dict:
    """The feature page: explanations side by side, agreement, examples grouped by quantile."""
    explainers = [item["explainer"] for item in data["explanations"]]
    agreement = {
        (item["explainer"], entry["explainer"]): entry["cosine_similarity"]
        for item in data["explanations"]
        for entry in item["semantic_similarity"]
    }
    groups: dict[int, list[dict]] = {}
    for example in data["activation_examples"]:
        groups.setdefault(example["quantile"], []).append(example)
    return {
        "record": data,
        "evidence": atlas.evidence(data["feature_id"]) if data["explanations"] else None,
        "evidence_rows": EVIDENCE_ON_FEATURE_PAGE,
        "explainers": explainers,
        "agreement": agreement,
        "groups": sorted(groups.items(), reverse=True),
        "neighbours": data["decoder_neighbours"],
        # the detail metrics some scorer has a value for
        "detail": [
            metric
            for metric in metrics.SCORE_METRICS
            if not metric.headline
            and any(row[metric.name] is not None for item in data["explanations"] for row in item["metrics"])
        ],
    }


def plots_context(atlas: Atlas, query: PlotQuery, data: dict, request) -> dict:
    return {
        "metric": query.metric,
        "bins": query.bins,
        "x": query.x,
        "y": query.y,
        "explainer": query.explainer,
        "scorer": query.scorer,
        "explainers": atlas.explainers,
        "scorers": atlas.scorers,
        "histogram": data["histogram"],
        "bars": histogram_svg_data(data["histogram"]),
        "scatter": scatter_svg_data(data["scatter"]),
    }


def compare_context(atlas: Atlas, query: CompareQuery, data: dict, request) -> dict:
    return {"charts": comparison_charts(data), "headline_charts": headline_charts(data)}


# -- the pages -------------------------------------------------------------------------------------

FEATURE_ID = {"feature_id": (int, PathParameter(ge=0, le=MAX_FEATURE_ID))}

register(
    Page(
        "features",
        "/api/features",
        feature_table,
        results.FeaturePage,
        "One row per (feature, explainer), filtered, sorted and paged, with semantic search; with "
        "``format`` other than json, a file of every matching row.",
        query=lambda atlas: feature_query_model(atlas.explainers, atlas.scorers),
        path="/",
        template="index.html",
        nav="Features",
        export=feature_export,
        context=index_context,
        tags=("features",),
    )
)
register(
    Page(
        "feature",
        "/api/features/{feature_id}",
        feature,
        results.Feature,
        "Everything about one latent: explanations, scores, agreement, decoder neighbours, examples.",
        path="/features/{feature_id}",
        template="feature.html",
        path_parameters=FEATURE_ID,
        # the worker threads: with the scorers' evidence the page reads a row group of two files
        context=feature_context,
        tags=("features",),
    )
)
register(
    Page(
        "evidence",
        "/api/features/{feature_id}/evidence",
        evidence,
        results.Evidence,
        "What the scorers saw: a latent's fuzz and detection examples with every run's verdict.",
        query=lambda atlas: EvidenceQuery,
        path="/features/{feature_id}/evidence",
        template="evidence.html",
        path_parameters=FEATURE_ID,
        context=lambda atlas, query, data, request: {"query": query},
        tags=("features",),
    )
)
register(
    Page(
        "plots",
        "/api/plots",
        plots,
        results.Plots,
        "A histogram of one metric and a scatter of two.",
        query=lambda atlas: plot_query_model(atlas.explainers, atlas.scorers),
        path="/plots",
        template="plots.html",
        nav="Plots",
        context=plots_context,
        tags=("plots",),
    )
)
register(
    Page(
        "compare",
        "/api/compare",
        compare,
        results.Comparison,
        "Explainers and scorers compared: bootstrap CIs, paired differences, agreement.",
        query=lambda atlas: compare_query_model(),
        path="/compare",
        template="compare.html",
        nav="Compare",
        runs_on="own",
        context=compare_context,
        tags=("compare",),
    )
)
register(
    Page(
        "triage",
        "/api/triage",
        triage,
        results.Triage,
        "The next explanation to judge, in an order: classifier uncertainty, scorer or explainer disagreement, random.",
        query=lambda atlas: TriageQuery,
        path="/triage",
        template="triage.html",
        nav="Triage",
        context=lambda atlas, query, data, request: {"query": query, "explainers": atlas.explainers},
        tags=("labels",),
    )
)
register(
    Page(
        "labels",
        "/api/labels/summary",
        label_summary,
        results.LabelSummary,
        "Labelling progress per explainer; the scorers and the explainers against people's verdicts.",
        query=lambda atlas: LabelsQuery,
        path="/labels",
        template="labels.html",
        nav="Labels",
        runs_on="own",
        tags=("labels",),
    )
)
register(
    Page(
        "map",
        "/api/map",
        latent_map,
        results.MapPoints,
        "Every latent on a 2-D map of its decoder neighbours (UMAP), coloured by family, pattern, label or a metric.",
        query=lambda atlas: map_query_model(atlas.explainers),
        path="/map",
        template="map.html",
        nav="Map",
        context=lambda atlas, query, data, request: {"query": query, "explainers": atlas.explainers},
        tags=("families",),
    )
)
register(
    Page(
        "map-explanations",
        "/api/map/explanations",
        map_explanations,
        results.MapExplanations,
        "A latent's explanations and family name: what the map shows under the pointer.",
        query=lambda atlas: MapPointQuery,
        tags=("families",),
    )
)
register(Page("stats", "/api/stats", stats, results.Stats, "What the output directory holds.", tags=("features",)))
register(
    Page(
        "search",
        "/api/search",
        search,
        results.SearchResult,
        "Explanations closest in meaning to ``q``.",
        query=lambda atlas: search_query_model(atlas.explainers),
        tags=("features",),
    )
)
register(
    Page(
        "histogram",
        "/api/histogram",
        histogram,
        results.Histogram,
        "Counts of a metric over equal-width bins.",
        query=lambda atlas: histogram_query_model(atlas.explainers, atlas.scorers),
        tags=("plots",),
    )
)
