"""What the HTML pages are drawn with: template filters and globals (colour scales, token
highlighting, links), the JSON twin of a page, and the form redirect. Nothing here knows a page."""

import math
from pathlib import Path
from urllib.parse import urlencode

from fastapi.responses import RedirectResponse
from markupsafe import Markup, escape
from starlette.datastructures import QueryParams

from sae_atlas import metrics
from sae_atlas.serve.parameters import FeatureQuery, without_blanks

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


def twin_link(twins: dict[str, str], path: str, query: str = "") -> str | None:
    """The JSON twin of an HTML page's path (and its query string); ``twins``: page path → API path."""
    for page, twin in twins.items():
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
