"""What every HTTP response of ``sae-atlas serve`` carries, and what no request gets past.

A pure ASGI middleware (no per-request task or thread, so it costs microseconds):

- security headers on every response: ``Content-Security-Policy`` (the pages load nothing from
  elsewhere and run only their own script; the API docs may use the CDN their page names),
  ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy``;
- ``HEAD`` answered as ``GET`` without the body, on every route (``/health`` for probes);
- query strings over :data:`MAX_QUERY_BYTES` refused with 414: no valid query is that long, and
  pages copy their query string into every link;
- a response to a request the server already refused as malformed is dropped, not logged as a
  traceback.
"""

from __future__ import annotations

import contextlib

import orjson

try:  # uvicorn's HTTP/1.1 implementation: its error when a response comes after it gave up
    from h11 import LocalProtocolError as ProtocolRefused
except ImportError:  # pragma: no cover - another server

    class ProtocolRefused(Exception):
        pass


MAX_QUERY_BYTES = 2048
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from jsDelivr with an inline script.
DOCS_POLICY = (
    "default-src 'self'; img-src 'self' data: https://fastapi.tiangolo.com; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; worker-src blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")


def _headers(path: str) -> list[tuple[bytes, bytes]]:
    policy = DOCS_POLICY if path.startswith(DOCS_PATHS) else PAGE_POLICY
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]


class Guard:
    """The middleware; ``app.add_middleware(Guard)``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = _headers(scope.get("path", ""))
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def guarded(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            # The server may already have answered 400 to a malformed request (a bad chunked
            # body) and closed the connection while the app was answering: nothing left to send.
            with contextlib.suppress(ProtocolRefused):
                await send(message)

        query = scope.get("query_string", b"")
        if len(query) > MAX_QUERY_BYTES:
            body = orjson.dumps(
                {"detail": f"query string of {len(query):,} bytes is over the {MAX_QUERY_BYTES:,}-byte limit"}
            )
            await guarded(
                {
                    "type": "http.response.start",
                    "status": 414,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await guarded({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, guarded)
