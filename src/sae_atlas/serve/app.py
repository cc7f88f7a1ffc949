"""``sae-atlas serve``: a read-only FastAPI app over :class:`~sae_atlas.query.atlas.Atlas`.

JSON API under ``/api`` (OpenAPI docs at ``/docs``), ``/health`` for probes. Every parameter is
validated (422 with a message naming it), an unknown feature is a 404, and nothing a client sends
can make the server answer 5xx. There is no SQL over HTTP and no route that writes.

(No ``from __future__ import annotations`` here: FastAPI reads the parameter types of the routes,
some of which are built per atlas inside :func:`create_app`.)
"""

import contextlib
import gc
import sys
import threading
from pathlib import Path
from typing import Annotated, Literal

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from sae_atlas import __version__, metrics
from sae_atlas.exports import tables
from sae_atlas.query.atlas import METRICS, Atlas, FeatureNotFound, QueryError
from sae_atlas.query.parameters import (
    compare_query_model,
    feature_query_model,
    names_type,
    plot_query_model,
    validation_message,
)
from sae_atlas.serve import pages
from sae_atlas.serve.guard import Guard

MAX_FEATURE_ID = 2**32 - 1


class FastJSON(JSONResponse):
    """JSON rendered by orjson: the feature payloads hold thousands of numbers."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# -- response models (the OpenAPI schema) -------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ScorerScores(BaseModel):
    """One entry of the contract's ``scores`` struct of features.parquet."""

    scorer: str
    fuzz: float | None
    simulation: float | None
    detection: float | None
    embedding: float | None


def _metric_fields(chosen) -> dict:
    return {metric.name: (float | None, Field(description=metric.description)) for metric in chosen}


# Every score metric of the registry, per scorer.
ScorerMetrics = create_model("ScorerMetrics", scorer=(str, ...), **_metric_fields(metrics.SCORE_METRICS))


class SemanticSimilarity(BaseModel):
    explainer: str
    cosine_similarity: float | None


class QuantileScore(BaseModel):
    scorer: str
    method: str
    quantile: int = Field(description="activation quantile, 0 = the top one (delphi's convention)")
    score: float | None = Field(
        description="fuzz / detection: recall; embedding: AUC against every non-activating example; "
        "simulation: the quantile group's correlation"
    )
    examples: int


class Explanation(BaseModel):
    explainer: str
    explanation_text: str
    explanation_ok: bool
    explanation_method: str | None
    scores: list[ScorerScores] = Field(description="the contract's scores struct, as features.parquet holds it")
    semantic_similarity: list[SemanticSimilarity]
    metrics: list[ScorerMetrics] = Field(description="every score metric, per scorer")
    by_quantile: list[QuantileScore] = Field(description="each score method's value per activation quantile")


class NeighbourExplanation(BaseModel):
    explainer: str
    text: str
    ok: bool


class Neighbour(BaseModel):
    feature_id: int
    cosine_similarity: float
    explanations: list[NeighbourExplanation]


class ActivationSimilarity(BaseModel):
    num_examples_sampled: int
    mean_pairwise_similarity: float | None
    std_pairwise_similarity: float | None
    min_pairwise_similarity: float | None
    max_pairwise_similarity: float | None


class ActivationExample(BaseModel):
    prompt_id: int
    quantile: int = Field(description="sampling bin, 0 = lowest activations")
    max_activation: float
    max_position: int
    window: list[int] = Field(description="[start, stop) of the embedded window")
    tokens: list[str]
    activations: list[float] = Field(description="activation value of every token")


class Feature(BaseModel):
    feature_id: int
    sae_id: str | None
    explanations: list[Explanation]
    decoder_neighbours: list[Neighbour]
    activation_similarity: ActivationSimilarity | None
    activation_examples: list[ActivationExample]


# One row of the feature table: a column per metric of the registry.
FeatureRow = create_model(
    "FeatureRow",
    feature_id=(int, ...),
    explainer=(str, ...),
    explanation_text=(str, ...),
    explanation_ok=(bool, ...),
    **_metric_fields(metrics.METRICS),
)


class SearchHit(BaseModel):
    feature_id: int
    explainer: str
    explanation_text: str
    similarity: float


class FeaturePage(BaseModel):
    total: int = Field(description="rows matching the filters, before limit and offset")
    limit: int
    offset: int
    rows: list[FeatureRow]
    hits: list[SearchHit] | None = Field(None, description="with q: the closest explanations")


class SearchResult(BaseModel):
    query: str
    hits: list[SearchHit]


class Histogram(BaseModel):
    metric: str
    description: str
    edges: list[float]
    counts: list[int]
    count: int
    missing: int


class ScatterPoint(BaseModel):
    feature_id: int
    explainer: str
    x: float
    y: float


class Scatter(BaseModel):
    x: str
    y: str
    points: list[ScatterPoint]
    total: int = Field(description="rows with both metrics")
    shown: int = Field(description="points returned (a fixed sample above 5,000)")
    correlation: float | None


class Plots(BaseModel):
    histogram: Histogram
    scatter: Scatter


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")
    sae_id: str | None
    features: int
    rows: int
    explainers: list[str]
    scorers: list[str]
    files: dict[str, int | None]
    metrics: dict[str, str]
    mean_scores: list[dict]
    mean_semantic_similarity: list[dict]
    mean_activation_similarity: float | None


class ComparisonSettings(BaseModel):
    resamples: int
    seed: int
    confidence: float
    metrics: list[str]
    holm_family: str
    weights: str | None = Field(description="what the weighted means are weighted by (None: no firing counts)")


class SummaryRow(BaseModel):
    explainer: str
    scorer: str
    metric: str
    latents: int
    mean: float
    median: float
    ci_low: float | None
    ci_high: float | None
    weighted_mean: float | None = Field(description="mean weighted by firing frequency, as delphi weights F1")


class PairedRow(BaseModel):
    first: str
    second: str
    scorer: str
    metric: str
    latents: int = Field(description="latents both explainers explained and the scorer scored")
    mean_difference: float = Field(description="first minus second")
    ci_low: float | None
    ci_high: float | None
    wilcoxon_p: float | None
    holm_p: float | None
    wins: int
    ties: int
    losses: int


class ScorerAgreementRow(BaseModel):
    first: str
    second: str
    metric: str
    explanations: int
    spearman: float | None
    kendall: float | None
    top_decile_overlap: float | None
    rv: float | None = Field(description="RV coefficient of the two scorers' profiles over rv_metrics")
    rv_metrics: list[str]


class Disagreement(BaseModel):
    feature_id: int
    cosine: float
    first_text: str | None
    second_text: str | None


class ExplainerAgreementRow(BaseModel):
    first: str
    second: str
    latents: int
    mean: float
    min: float
    q1: float
    median: float
    q3: float
    max: float
    correlation_with_scores: dict[str, float | None]
    disagreements: list[Disagreement]


class ComparabilityWarning(BaseModel):
    setting: str
    message: str


class RunSettings(BaseModel):
    data_source: str
    explainer: str
    scorer: str
    settings: dict


class Comparability(BaseModel):
    runs: list[RunSettings]
    warnings: list[ComparabilityWarning]
    not_recorded: list[str]


class Comparison(BaseModel):
    settings: ComparisonSettings
    explainers: list[str]
    scorers: list[str]
    metrics: dict[str, str]
    summary: list[SummaryRow]
    paired: list[PairedRow]
    scorer_agreement: list[ScorerAgreementRow]
    explainer_agreement: list[ExplainerAgreementRow]
    comparability: Comparability


class Problem(BaseModel):
    detail: str


Metric = Literal[METRICS]  # type: ignore[valid-type]
ERRORS = {
    404: {"model": Problem},
    414: {"model": Problem, "description": "query string too long"},
    422: {"model": Problem},
}


def is_page(path: str) -> bool:
    """Whether ``path`` is one of the HTML pages (everything but the API, probes, docs and files)."""
    return not path.startswith(("/api/", "/health", "/docs", "/redoc", "/openapi.json", "/static/"))


class OwnThreads:
    """Runs blocking work on worker threads of its own (``tokens`` at a time), not on the pool that
    builds pages: a comparison at 20,000 resamples takes seconds, and must not hold up ``/``."""

    def __init__(self, tokens: int = 1):
        self.tokens = tokens
        self._limiter: anyio.CapacityLimiter | None = None

    async def __call__(self, function, *args):
        if self._limiter is None:  # made in the event loop that uses it
            self._limiter = anyio.CapacityLimiter(self.tokens)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)


def create_app(atlas: Atlas, *, prepare: bool = True, page_threads: int | None = None) -> FastAPI:
    """The application serving ``atlas``. With ``prepare``, what the first requests would wait for
    (the example index, the embedding model) loads in the background as the server starts.
    ``page_threads`` caps the worker threads that build pages, tables and searches (default:
    Starlette's 40)."""
    Explainer, Scorer = names_type(atlas.explainers), names_type(atlas.scorers)
    TableQuery = feature_query_model(atlas.explainers, atlas.scorers)
    PlotsQuery = plot_query_model(atlas.explainers, atlas.scorers)
    CompareQuery = compare_query_model()

    def prepare_in_background() -> None:
        atlas.prepare()
        # What stays loaded for the server's life is never garbage: exempt it from the collector,
        # whose full passes over it would otherwise stall every request at once (~0.3 s under load).
        gc.freeze()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if page_threads:
            # Feature look-ups run on the event loop; every other route in a worker thread. With
            # dozens of runnable workers the loop waits its turn for the GIL behind all of them;
            # with a few, it gets the GIL back within a switch interval. CPU-bound pages gain
            # nothing from more threads than cores anyway.
            anyio.to_thread.current_default_thread_limiter().total_tokens = page_threads
        if prepare:
            threading.Thread(target=prepare_in_background, name="prepare-atlas", daemon=True).start()
        yield

    comparing = OwnThreads(1)
    app = FastAPI(
        title="sae-atlas",
        version=__version__,
        description=f"Read-only API over the sae-atlas outputs of `{atlas.sae_id}`.",
        default_response_class=FastJSON,
        lifespan=lifespan,
    )

    app.state.comparing = comparing

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        # One readable line ("limit: Input should be less than or equal to 1000"), not pydantic's list.
        message = validation_message(error, skip_location=1)
        if is_page(request.url.path):  # an HTML page answers in HTML, with the same message
            # off the event loop, as the page itself would be (the compare page computes a comparison)
            run = comparing if request.url.path == "/compare" else anyio.to_thread.run_sync
            return await run(app.state.invalid_page, request, message)
        return JSONResponse({"detail": message}, status_code=422)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, error: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(FeatureNotFound)
    async def not_found(request: Request, error: FeatureNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"feature {error.args[0]} not found"}, status_code=404)

    @app.get("/health", response_model=Health, tags=["meta"])
    def health():
        return {"status": "ok", "version": __version__}

    @app.get("/api/stats", response_model=Stats, tags=["features"])
    def stats():
        """What the output directory holds, and its headline numbers."""
        return FastJSON(atlas.stats())

    @app.get(
        "/api/features",
        response_model=FeaturePage,
        responses={**ERRORS, 200: {"content": {media: {} for media in tables.MEDIA_TYPES.values()}}},
        tags=["features"],
    )
    def features(query: Annotated[TableQuery, Query()]):
        """One row per (feature, explainer), filtered, sorted and paged (the index page's data);
        with ``format`` csv, jsonl or parquet, a file of every matching row."""
        if query.format == "json":
            return FastJSON(pages.feature_table(atlas, query))
        return StreamingResponse(
            tables.encode(pages.feature_export(atlas, query), query.format),
            media_type=tables.MEDIA_TYPES[query.format],
            headers={"Content-Disposition": f'attachment; filename="features.{query.format}"'},
        )

    @app.get("/api/features/{feature_id}", response_model=Feature, responses=ERRORS, tags=["features"])
    async def feature(feature_id: Annotated[int, PathParameter(ge=0, le=MAX_FEATURE_ID)]):
        """Everything about one latent (the feature page's data)."""
        # On the event loop, not the thread pool: the look-up is array slicing (a fraction of a
        # millisecond), less than the hop to a worker thread would cost.
        return FastJSON(pages.feature(atlas, feature_id))

    @app.get("/api/search", response_model=SearchResult, responses=ERRORS, tags=["features"])
    def search(
        q: Annotated[str, Query(min_length=1, max_length=500, description="free text")],
        k: Annotated[int, Query(ge=1, le=100)] = 10,
        explainer: Explainer | None = None,
    ):
        """Explanations closest in meaning to ``q``."""
        hits = atlas.search(q, k, explainer=explainer)
        return FastJSON({"query": q, "hits": hits.to_dicts()})

    @app.get("/api/histogram", response_model=Histogram, responses=ERRORS, tags=["plots"])
    def histogram(
        metric: Metric,
        bins: Annotated[int, Query(ge=1, le=200)] = 20,
        explainer: Explainer | None = None,
        scorer: Scorer | None = None,
    ):
        """Counts of a metric over equal-width bins."""
        return FastJSON(atlas.histogram(metric, bins, explainer=explainer, scorer=scorer))

    @app.get("/api/compare", response_model=Comparison, responses=ERRORS, tags=["compare"])
    async def compare(query: Annotated[CompareQuery, Query()]):
        """Explainers and scorers compared: bootstrap CIs, paired differences, agreement (the compare
        page's data)."""
        return FastJSON(await app.state.comparing(pages.compare, atlas, query))

    @app.get("/api/plots", response_model=Plots, responses=ERRORS, tags=["plots"])
    def plots(query: Annotated[PlotsQuery, Query()]):
        """A histogram of one metric and a scatter of two (the plots page's data)."""
        return FastJSON(pages.plots(atlas, query))

    from sae_atlas.serve.web import mount_browser

    mount_browser(app, atlas)
    # Added last, so outermost: every response passes it, the browser's redirects included.
    app.add_middleware(Guard)
    return app


def serve(output_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``output_dir`` until interrupted."""
    import uvicorn

    # Many short requests next to a few long ones (pages, searches): let Python switch threads
    # every millisecond rather than every 5, build pages on one worker thread (they are Python
    # under the GIL: more threads add contention, not throughput), and encode search queries on
    # one thread, so a feature look-up on the event loop never waits long for the GIL. Measured in
    # bench/load.py: feature p99 246 ms → 12 ms under a mixed load of 8 clients.
    sys.setswitchinterval(0.001)
    app = create_app(Atlas(output_dir, threads=1), page_threads=1)
    uvicorn.run(app, host=host, port=port, log_level="warning")
