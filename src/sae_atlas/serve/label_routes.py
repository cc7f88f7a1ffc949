"""The routes that write: labels (``POST`` / ``DELETE /api/labels``), and what a write must show.

Every write is hostile until checked, in this order, each refusal one line:

1. the server writes at all: not ``--read-only``, and bound beyond loopback only with a write token
   (``serve --write-token`` or ``SAE_ATLAS_WRITE_TOKEN``);
2. ``Host`` names this server (on loopback: 127.0.0.1, localhost or [::1] at its port), so a page
   of another site that renamed itself to 127.0.0.1 (DNS rebinding) cannot write;
3. ``Origin``, which browsers send with every write, is this server: another site's page cannot;
4. a token: ``Authorization: Bearer <write token>`` (scripts), or the per-server token the pages
   carry (``X-SAE-Atlas-Token``, which another origin cannot read);
5. the body: at most :data:`MAX_BODY` bytes, a label or a list of at most :data:`MAX_LABELS`, each
   validated (422 with one line naming the field).

A label is acknowledged (201) only once its transaction is committed. Notes are stored as given
and escaped wherever they are shown (the pages' templates autoescape; the JSON is JSON).
"""

import secrets
from dataclasses import dataclass, field
from typing import Annotated

import anyio.to_thread
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter, ValidationError

from sae_atlas.exports import tables
from sae_atlas.label_store import LabelError, LabelIn
from sae_atlas.query import results
from sae_atlas.query.labelling import Labelling, as_table
from sae_atlas.serve.parameters import validation_message

MAX_BODY = 256 * 1024
MAX_LABELS = 500
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LABELS = TypeAdapter(LabelIn | list[LabelIn])


@dataclass
class WriteSettings:
    """Whether and how this server takes writes."""

    host: str = "127.0.0.1"
    port: int = 8000
    read_only: bool = False
    write_token: str | None = None
    page_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    def hosts(self) -> set[str]:
        names = set(LOOPBACK) if self.loopback else {self.host, *LOOPBACK}
        return {f"[{name}]:{self.port}" if ":" in name else f"{name}:{self.port}" for name in names}


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def check_write(request: Request, settings: WriteSettings) -> None:
    """Raise :class:`Refused` unless ``request`` may write (module docstring)."""
    if settings.read_only:
        raise Refused(403, "this server is read-only (serve --read-only): labels cannot be written")
    if not settings.loopback and not settings.write_token:
        raise Refused(
            403,
            f"this server listens on {settings.host}, beyond loopback, without a write token "
            "(serve --write-token or SAE_ATLAS_WRITE_TOKEN): writes are off",
        )
    host = request.headers.get("host", "")
    if settings.loopback and host not in settings.hosts():
        raise Refused(403, f"Host {host!r} is not this server: write refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{host}":
        raise Refused(403, f"a write from another origin ({origin}) is refused")
    authorization = request.headers.get("authorization", "")
    if settings.write_token and secrets.compare_digest(
        authorization.encode(), f"Bearer {settings.write_token}".encode()
    ):
        return
    page_token = request.headers.get("x-sae-atlas-token", "")
    if secrets.compare_digest(page_token.encode(), settings.page_token.encode()):
        return
    raise Refused(403, "a write needs the page's token or Authorization: Bearer <write token>")


async def read_body(request: Request) -> bytes:
    """The request body, refused (413) beyond :data:`MAX_BODY` whether or not it says its length."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise Refused(413, f"a body of at most {MAX_BODY:,} bytes is accepted")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise Refused(413, f"a body of at most {MAX_BODY:,} bytes is accepted")
    return bytes(body)


def parse_labels(body: bytes) -> list[LabelIn]:
    """One label or a list of them, each validated; :class:`Refused` (422) in one line."""
    try:
        parsed = LABELS.validate_json(body)
    except ValidationError as error:
        raise Refused(422, validation_message(error, skip_location=0)) from None
    labels = parsed if isinstance(parsed, list) else [parsed]
    if not labels or len(labels) > MAX_LABELS:
        raise Refused(422, f"send 1 to {MAX_LABELS} labels at a time")
    return labels


PROBLEM = {"model": results.Problem}
TOO_LONG = {414: {**PROBLEM, "description": "query string too long"}}  # the guard's, for every route
REFUSALS = {403: {**PROBLEM, "description": "the write is refused (read-only, host, origin or token)"}, **TOO_LONG}
_ONE = LabelIn.model_json_schema()  # no nested models: no references to resolve
BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"anyOf": [_ONE, {"type": "array", "items": _ONE, "minItems": 1, "maxItems": MAX_LABELS}]}
            }
        },
    }
}


def add_label_routes(app: FastAPI, labelling: Labelling, settings: WriteSettings) -> None:
    """``GET``, ``POST`` and ``DELETE /api/labels``."""

    @app.exception_handler(Refused)
    async def refused(request: Request, error: Refused) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.post(
        "/api/labels",
        status_code=201,
        tags=["labels"],
        name="add_labels",
        openapi_extra=BODY,
        responses={**REFUSALS, 413: {**PROBLEM, "description": "body too large"}, 422: PROBLEM},
    )
    async def add_labels(request: Request):
        """Store one label or a list of them (a JSON object each: ``feature_id``, ``explainer``,
        ``verdict``, ``causes``, ``note``, ``author``); their ids, once committed."""
        check_write(request, settings)
        labels = parse_labels(await read_body(request))
        try:
            ids = await anyio.to_thread.run_sync(lambda: labelling.add(labels, author="anonymous"))
        except LabelError as error:
            raise Refused(422, str(error)) from None
        return {"labels": ids}

    @app.delete(
        "/api/labels/last", tags=["labels"], name="take_back_label", responses={**REFUSALS, 404: PROBLEM, 422: PROBLEM}
    )
    async def take_back(
        request: Request,
        feature_id: Annotated[int, Query(ge=0, lt=2**32)],
        author: Annotated[str, Query(min_length=1, max_length=64)],
        explainer: Annotated[str | None, Query(max_length=200)] = None,
    ):
        """Take back ``author``'s newest label of a latent (or of its explanation by ``explainer``)."""
        check_write(request, settings)
        taken = await anyio.to_thread.run_sync(lambda: labelling.retract_last(feature_id, explainer, author))
        if taken is None:
            raise Refused(404, f"{author!r} has no label of feature {feature_id} to take back")
        return {"retracted": taken}

    formats = {renderer.media_type: {} for renderer in tables.RENDERERS.values()}
    rows = {200: {"content": {"application/json": {}, **formats}}, 422: PROBLEM, **TOO_LONG}

    @app.get("/api/labels", tags=["labels"], name="labels", responses=rows)
    async def labels(
        feature_id: Annotated[int | None, Query(ge=0, lt=2**32)] = None,
        explainer: Annotated[str | None, Query(max_length=200, description='"" for labels of latents')] = None,
        verdict: Annotated[str | None, Query(pattern="^(good|partial|bad|unsure)$")] = None,
        author: Annotated[str | None, Query(max_length=64)] = None,
        history: Annotated[bool, Query(description="every row ever written, not the current labels")] = False,
        format: Annotated[str, Query(pattern="^(json|" + "|".join(tables.RENDERERS) + ")$")] = "json",
    ):
        """The current labels (or their whole history), filtered; in any table format."""
        filters = {"feature_id": feature_id, "explainer": explainer, "verdict": verdict, "author": author}
        read = labelling.history if history else labelling.current
        frame = await anyio.to_thread.run_sync(lambda: read(**filters))
        if format != "json":
            renderer = tables.RENDERERS[format]
            return StreamingResponse(
                tables.encode(as_table(frame, renderer.name), renderer.name),
                media_type=renderer.media_type,
                headers={"Content-Disposition": f'attachment; filename="labels{renderer.suffixes[0]}"'},
            )
        return Response(orjson.dumps({"labels": frame.to_dicts()}), media_type="application/json")
