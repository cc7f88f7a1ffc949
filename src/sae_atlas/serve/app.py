"""``sae-atlas serve``: a FastAPI app over :class:`~sae_atlas.query.atlas.Atlas`.

JSON API under ``/api`` (OpenAPI docs at ``/docs``), ``/health`` for probes. Every parameter is
validated (422 with a message naming it), an unknown feature is a 404, and nothing a client sends
can make the server answer 5xx. There is no SQL over HTTP. The read routes are derived from the
page declarations of :mod:`sae_atlas.serve.pages`; the response models are the query layer's
(:mod:`sae_atlas.query.results`): this module declares none of its own. The only writes are
people's labels, checked as :mod:`sae_atlas.serve.label_routes` says.

(No ``from __future__ import annotations`` here: FastAPI reads the parameter types of the routes,
some of which are built per atlas inside :func:`create_app`.)
"""

import contextlib
import functools
import gc
import sys
import threading
from pathlib import Path

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from sae_atlas import __version__
from sae_atlas.exports import tables
from sae_atlas.query import results
from sae_atlas.query.atlas import Atlas, FeatureNotFound, QueryError
from sae_atlas.query.labelling import labelling_of
from sae_atlas.serve import pages
from sae_atlas.serve.guard import Guard
from sae_atlas.serve.label_routes import WriteSettings, add_label_routes
from sae_atlas.serve.parameters import validation_message
from sae_atlas.serve.web import mount_browser


class FastJSON(JSONResponse):
    """JSON rendered by orjson: the feature payloads hold thousands of numbers."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


ERRORS = {
    404: {"model": results.Problem},
    414: {"model": results.Problem, "description": "query string too long"},
    422: {"model": results.Problem},
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


async def inline(function, *args):
    """Run ``function`` on the event loop itself (a look-up cheaper than a hop to a thread)."""
    return function(*args)


def lifespan_of(atlas: Atlas, *, prepare: bool, page_threads: int | None):
    """What the app does as it starts: cap the page threads, load what the first requests need."""

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

    return lifespan


def create_app(
    atlas: Atlas, *, prepare: bool = True, page_threads: int | None = None, writes: WriteSettings | None = None
) -> FastAPI:
    """The application serving ``atlas``: a JSON route per declared page (:data:`pages.PAGES`),
    the HTML pages (:func:`mount_browser`) and ``/health``. With ``prepare``, what the first
    requests would wait for (the example index, the embedding model) loads in the background as
    the server starts. ``page_threads`` caps the worker threads that build pages, tables and
    searches (default: Starlette's 40). ``writes``: whether and how labels may be written
    (default: on loopback at port 8000, with the pages' token)."""
    writes = writes or WriteSettings()
    app = FastAPI(
        title="sae-atlas",
        version=__version__,
        description=f"API over the sae-atlas outputs of `{atlas.sae_id}`; labels are its only writes.",
        default_response_class=FastJSON,
        lifespan=lifespan_of(atlas, prepare=prepare, page_threads=page_threads),
    )
    runners = {"pages": anyio.to_thread.run_sync, "own": OwnThreads(1), "loop": inline}
    add_error_handlers(app)

    @app.get("/health", response_model=results.Health, tags=["meta"])
    def health():
        return {"status": "ok", "version": __version__}

    for page in pages.PAGES.values():
        add_api_route(app, atlas, page, runners[page.runs_on])
    add_label_routes(app, labelling_of(atlas, read_only=writes.read_only), writes)
    app.state.writes = writes
    mount_browser(app, atlas, runners)
    # Added last, so outermost: every response passes it, the browser's redirects included.
    app.add_middleware(Guard)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """One line for every refusal: 422 for a bad parameter (an HTML page answers with itself and
    the message), 404 for an unknown feature."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        # One readable line ("limit: Input should be less than or equal to 1000"), not pydantic's list.
        message = validation_message(error, skip_location=1)
        if is_page(request.url.path):  # an HTML page answers in HTML, with the same message
            run = app.state.page_runner(request.url.path)  # off the event loop, as the page itself
            return await run(app.state.invalid_page, request, message)
        return JSONResponse({"detail": message}, status_code=422)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, error: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(FeatureNotFound)
    async def not_found(request: Request, error: FeatureNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"feature {error.args[0]} not found"}, status_code=404)


def add_api_route(app: FastAPI, atlas: Atlas, page: pages.Page, run) -> None:
    """The JSON route of one declared page; with an ``export`` and a ``format`` other than json, a
    file of every matching row in that registered format, streamed."""
    query_model = page.query(atlas) if page.query else None

    async def endpoint(query=None, **path):
        if page.export is not None and query.format != "json":
            renderer = tables.RENDERERS[query.format]
            frame = await run(page.export, atlas, query)
            return StreamingResponse(
                tables.encode(frame, renderer.name),
                media_type=renderer.media_type,
                headers={"Content-Disposition": f'attachment; filename="features{renderer.suffixes[0]}"'},
            )
        return FastJSON(await run(functools.partial(page.data, atlas, query, **path)))

    endpoint.__signature__ = page.signature(query_model)
    responses = dict(ERRORS)
    if page.export is not None:
        responses[200] = {"content": {renderer.media_type: {} for renderer in tables.RENDERERS.values()}}
    app.add_api_route(
        page.api,
        endpoint,
        methods=["GET"],
        response_model=page.result,
        responses=responses,
        tags=list(page.tags),
        name=page.name,
        description=page.description + (f" (the data of the page ``{page.path}``)" if page.path else ""),
    )


def serve(
    output_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    read_only: bool = False,
    write_token: str | None = None,
) -> None:
    """Serve ``output_dir`` until interrupted."""
    import uvicorn

    # Many short requests next to a few long ones (pages, searches): let Python switch threads
    # every millisecond rather than every 5, build pages on one worker thread (they are Python
    # under the GIL: more threads add contention, not throughput), and encode search queries on
    # one thread, so a feature look-up on the event loop never waits long for the GIL. Measured in
    # bench/load.py: feature p99 246 ms → 12 ms under a mixed load of 8 clients.
    sys.setswitchinterval(0.001)
    writes = WriteSettings(host=host, port=port, read_only=read_only, write_token=write_token)
    app = create_app(Atlas(output_dir, threads=1), page_threads=1, writes=writes)
    uvicorn.run(app, host=host, port=port, log_level="warning")
