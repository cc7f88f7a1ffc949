"""``sae-atlas serve``: a read-only FastAPI app over :class:`~sae_atlas.atlas.Atlas`.

JSON API under ``/api`` (OpenAPI docs at ``/docs``), ``/health`` for probes. Every parameter is
validated (422 with a message naming it), an unknown feature is a 404, and nothing a client sends
can make the server answer 5xx. There is no SQL over HTTP and no route that writes.

(No ``from __future__ import annotations`` here: FastAPI reads the parameter types of the routes,
some of which are built per atlas inside :func:`create_app`.)
"""

from pathlib import Path
from typing import Annotated, Literal

import orjson
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from sae_atlas import __version__
from sae_atlas.atlas import COLUMNS, METRICS, Atlas, FeatureNotFound, QueryError

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
    scorer: str
    fuzz: float | None
    simulation: float | None
    detection: float | None
    embedding: float | None


class SemanticSimilarity(BaseModel):
    explainer: str
    cosine_similarity: float | None


class Explanation(BaseModel):
    explainer: str
    explanation_text: str
    explanation_ok: bool
    explanation_method: str | None
    scores: list[ScorerScores]
    semantic_similarity: list[SemanticSimilarity]


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


class FeatureRow(BaseModel):
    feature_id: int
    explainer: str
    explanation_text: str
    explanation_ok: bool
    fuzz: float | None
    detection: float | None
    simulation: float | None
    embedding: float | None
    semantic_similarity: float | None
    activation_similarity: float | None
    decoder_similarity: float | None


class FeaturePage(BaseModel):
    total: int = Field(description="rows matching the filters, before limit and offset")
    limit: int
    offset: int
    rows: list[FeatureRow]


class SearchHit(BaseModel):
    feature_id: int
    explainer: str
    explanation_text: str
    similarity: float


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


class Problem(BaseModel):
    detail: str


SortColumn = Literal[COLUMNS]  # type: ignore[valid-type]
Metric = Literal[METRICS]  # type: ignore[valid-type]


class FeatureQuery(BaseModel):
    """Query parameters of ``GET /api/features``."""

    model_config = ConfigDict(extra="forbid")
    explainer: str | None = Field(None, description="only this explainer's rows")
    scorer: str | None = Field(None, description="score columns from this scorer only")
    contains: str | None = Field(None, max_length=500, description="text the explanation contains")
    sort: SortColumn = "feature_id"
    order: Literal["asc", "desc"] = "asc"
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10_000_000)
    fuzz_min: float | None = None
    fuzz_max: float | None = None
    detection_min: float | None = None
    detection_max: float | None = None
    simulation_min: float | None = None
    simulation_max: float | None = None
    embedding_min: float | None = None
    embedding_max: float | None = None
    semantic_similarity_min: float | None = None
    semantic_similarity_max: float | None = None
    activation_similarity_min: float | None = None
    activation_similarity_max: float | None = None
    decoder_similarity_min: float | None = None
    decoder_similarity_max: float | None = None

    def filters(self) -> dict[str, tuple[float | None, float | None]]:
        bounds = {metric: (getattr(self, f"{metric}_min"), getattr(self, f"{metric}_max")) for metric in METRICS}
        return {metric: bound for metric, bound in bounds.items() if bound != (None, None)}


ERRORS = {404: {"model": Problem}, 422: {"model": Problem}}


def _names(values: list[str]):
    """The type of a parameter that must be one of ``values`` (so the schema lists them)."""
    return Literal[tuple(values)] if values else str  # type: ignore[valid-type]


def create_app(atlas: Atlas) -> FastAPI:
    """The application serving ``atlas``."""
    Explainer, Scorer = _names(atlas.explainers), _names(atlas.scorers)
    Query_ = create_model(
        "FeatureQuery",
        __base__=FeatureQuery,
        explainer=(Explainer | None, Field(None, description="only this explainer's rows")),
        scorer=(Scorer | None, Field(None, description="score columns from this scorer only")),
    )
    app = FastAPI(
        title="sae-atlas",
        version=__version__,
        description=f"Read-only API over the sae-atlas outputs of `{atlas.sae_id}`.",
        default_response_class=FastJSON,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # One readable line ("limit: Input should be less than or equal to 1000"), not pydantic's list.
        messages = [
            f"{'.'.join(str(part) for part in item['loc'][1:]) or item['loc'][0]}: {item['msg']}"
            for item in error.errors()
        ]
        return JSONResponse({"detail": "; ".join(messages)}, status_code=422)

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

    @app.get("/api/features", response_model=FeaturePage, responses=ERRORS, tags=["features"])
    def features(query: Annotated[Query_, Query()]):
        """One row per (feature, explainer), filtered, sorted and paged."""
        rows, total = atlas.query_features(
            explainer=query.explainer,
            scorer=query.scorer,
            filters=query.filters(),
            contains=query.contains,
            sort=query.sort,
            descending=query.order == "desc",
            limit=query.limit,
            offset=query.offset,
        )
        return FastJSON({"total": total, "limit": query.limit, "offset": query.offset, "rows": rows.to_dicts()})

    @app.get("/api/features/{feature_id}", response_model=Feature, responses=ERRORS, tags=["features"])
    def feature(feature_id: Annotated[int, PathParameter(ge=0, le=MAX_FEATURE_ID)]):
        """Everything about one latent."""
        return FastJSON(atlas.feature(feature_id))

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

    from sae_atlas.web import mount_browser

    mount_browser(app, atlas)
    return app


def serve(output_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``output_dir`` until interrupted."""
    import uvicorn

    app = create_app(Atlas(output_dir))
    uvicorn.run(app, host=host, port=port, log_level="warning")
