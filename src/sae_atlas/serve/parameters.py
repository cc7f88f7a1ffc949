"""Query parameters, declared once and parsed the same way for the JSON API and the HTML pages.

The models are built per atlas (its explainers and scorers become enumerations, so the OpenAPI
schema lists the valid values) and from the metric registry (a ``<metric>_min`` / ``<metric>_max``
pair per metric). FastAPI validates the API's parameters with them; the HTML pages call
:func:`parse` with the same model, so a value is accepted or refused by one rule, with one message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from sae_atlas import metrics
from sae_atlas.exports import tables
from sae_atlas.query.atlas import COLUMNS, QueryError
from sae_atlas.query.families import KINDS as PAIR_KINDS
from sae_atlas.query.labelling import LABELLED

MAX_TEXT = 500
_NUMBER = r"-?\d{1,12}(?:\.\d{1,12})?"
BOX = rf"^{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}$"
MAX_LIMIT = 1000
MAX_OFFSET = 10_000_000


MAP_COLOURS = ("family", "subfamily", "pattern", "label", *metrics.NAMES)


def names_type(values: list[str]):
    """The type of a parameter that must be one of ``values`` (so the schema lists them)."""
    return Literal[tuple(values)] if values else str  # type: ignore[valid-type]


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureQuery(_Query):
    """Query parameters of the feature table (``GET /api/features`` and the index page)."""

    explainer: str | None = None
    scorer: str | None = None
    contains: str | None = None
    q: str | None = None
    labelled: str = "any"
    family: int | None = None
    pair: str | None = None
    box: str | None = None
    sort: str = "feature_id"
    order: Literal["asc", "desc"] = "asc"
    limit: int = 100
    offset: int = 0
    format: str = "json"

    def filters(self) -> dict[str, tuple[float | None, float | None]]:
        """``{metric: (low, high)}`` for every metric with a bound."""
        bounds = {name: (getattr(self, f"{name}_min"), getattr(self, f"{name}_max")) for name in metrics.NAMES}
        return {name: bound for name, bound in bounds.items() if bound != (None, None)}

    def box_bounds(self) -> tuple[float, float, float, float] | None:
        """``box`` ("x0,y0,x1,y1") as four numbers."""
        return None if not self.box else tuple(float(part) for part in self.box.split(","))  # type: ignore[return-value]

    def table_arguments(self) -> dict:
        """The keyword arguments of :meth:`Atlas.query_features`."""
        return {
            "explainer": self.explainer,
            "scorer": self.scorer,
            "filters": self.filters(),
            "contains": self.contains,
            "sort": self.sort,
            "descending": self.order == "desc",
            "limit": self.limit,
            "offset": self.offset,
        }

    def export_arguments(self) -> dict:
        """:meth:`table_arguments` for a file download: every matching row, unless the query
        names ``limit`` or ``offset`` itself."""
        arguments = self.table_arguments()
        if "limit" not in self.model_fields_set:
            arguments["limit"] = None
        return arguments


class PlotQuery(_Query):
    """Query parameters of the plots (``GET /api/plots`` and the plots page)."""

    metric: str = "detection"
    bins: int = 20
    x: str = "semantic_similarity"
    y: str = "fuzz"
    explainer: str | None = None
    scorer: str | None = None


def feature_query_model(explainers: list[str], scorers: list[str]) -> type[FeatureQuery]:
    """The feature-table query of an atlas with these explainers and scorers."""
    explainer, scorer = names_type(explainers), names_type(scorers)
    bounds = {}
    for metric in metrics.METRICS:
        for end, word in (("min", "lowest"), ("max", "highest")):
            bounds[f"{metric.name}_{end}"] = (
                float | None,
                Field(None, allow_inf_nan=False, description=f"{word} {metric.label}: {metric.description}"),
            )
    return create_model(
        "FeatureQuery",
        __base__=FeatureQuery,
        explainer=(explainer | None, Field(None, description="only this explainer's rows")),
        scorer=(scorer | None, Field(None, description="score columns from this scorer only")),
        contains=(str | None, Field(None, max_length=MAX_TEXT, description="text the explanation contains")),
        q=(str | None, Field(None, max_length=MAX_TEXT, description="free text: closest explanations, as `hits`")),
        labelled=(
            Literal[LABELLED],  # type: ignore[valid-type]
            Field("any", description="by people's labels: yes, no (none or stale), stale, or one verdict"),
        ),
        family=(int | None, Field(None, ge=0, le=2**32 - 1, description="only the latents of this family")),
        pair=(
            Literal[("any", *PAIR_KINDS)] | None,  # type: ignore[valid-type]
            Field(None, description="only latents in a pair worth a look of this kind"),
        ),
        box=(
            str | None,
            Field(None, pattern=BOX, max_length=200, description="only latents within x0,y0,x1,y1 on the map"),
        ),
        sort=(Literal[COLUMNS], Field("feature_id", description="column to sort by")),  # type: ignore[valid-type]
        limit=(int, Field(100, ge=1, le=MAX_LIMIT)),
        offset=(int, Field(0, ge=0, le=MAX_OFFSET)),
        format=(
            Literal[("json", *tables.formats())],  # type: ignore[valid-type]
            Field("json", description=f"json: one page; {', '.join(tables.formats())}: a file of every matching row"),
        ),
        **bounds,
    )


def plot_query_model(explainers: list[str], scorers: list[str]) -> type[PlotQuery]:
    """The plots query of an atlas with these explainers and scorers."""
    metric = Literal[metrics.NAMES]  # type: ignore[valid-type]
    return create_model(
        "PlotQuery",
        __base__=PlotQuery,
        metric=(metric, Field("detection", description="metric of the histogram")),
        bins=(int, Field(20, ge=1, le=200, description="histogram bins")),
        x=(metric, Field("semantic_similarity", description="metric on the scatter's x axis")),
        y=(metric, Field("fuzz", description="metric on the scatter's y axis")),
        explainer=(names_type(explainers) | None, Field(None, description="only this explainer's rows")),
        scorer=(names_type(scorers) | None, Field(None, description="score metrics from this scorer only")),
    )


class SearchQuery(_Query):
    """Query parameters of the semantic search (``GET /api/search``)."""

    q: str
    k: int = 10
    explainer: str | None = None


def search_query_model(explainers: list[str]) -> type[SearchQuery]:
    """The search query of an atlas with these explainers."""
    return create_model(
        "SearchQuery",
        __base__=SearchQuery,
        q=(str, Field(min_length=1, max_length=MAX_TEXT, description="free text")),
        k=(int, Field(10, ge=1, le=100)),
        explainer=(names_type(explainers) | None, None),
    )


class HistogramQuery(_Query):
    """Query parameters of one histogram (``GET /api/histogram``)."""

    metric: str
    bins: int = 20
    explainer: str | None = None
    scorer: str | None = None


def histogram_query_model(explainers: list[str], scorers: list[str]) -> type[HistogramQuery]:
    """The histogram query of an atlas with these explainers and scorers."""
    return create_model(
        "HistogramQuery",
        __base__=HistogramQuery,
        metric=(Literal[metrics.NAMES], ...),  # type: ignore[valid-type]
        bins=(int, Field(20, ge=1, le=200)),
        explainer=(names_type(explainers) | None, None),
        scorer=(names_type(scorers) | None, None),
    )


class EvidenceQuery(_Query):
    """Query parameters of a latent's scorer evidence (``/features/{id}/evidence``)."""

    method: Literal["fuzz", "detection", "intruder", "both"] = Field(
        "both", description="one method, or every one (both)"
    )
    show: Literal["all", "disagree", "all_miss", "failed"] = Field(
        "all", description="all examples, those scorers disagree on, those every run misses, or failed ones"
    )


class MapQuery(_Query):
    """Query parameters of the map (``/map``)."""

    colour: str = "family"
    explainer: str | None = None


def map_query_model(explainers: list[str]) -> type[MapQuery]:
    """The map's query of an atlas with these explainers."""
    return create_model(
        "MapQuery",
        __base__=MapQuery,
        colour=(
            Literal[MAP_COLOURS],  # type: ignore[valid-type]
            Field("family", description="colour the points by a family, the pattern, the label or a metric"),
        ),
        explainer=(
            names_type(explainers) | None,
            Field(None, description="a metric's or label's explainer (none: the mean over explainers / any)"),
        ),
    )


class MapPointQuery(_Query):
    """The latent under the pointer on the map (``/api/map/explanations``)."""

    feature_id: int = Field(ge=0, le=2**32 - 1)


class TriageQuery(_Query):
    """Query parameters of the triage queue (``/triage``)."""

    order: Literal["uncertainty", "scorer_disagreement", "explainer_disagreement", "random"] = Field(
        "scorer_disagreement", description="which explanation to judge next"
    )
    explainer: str | None = Field(None, max_length=200, description="only this explainer's explanations")
    position: int = Field(0, ge=0, le=10_000_000, description="the place in the queue")


class LabelsQuery(_Query):
    """Query parameters of the labels page (``/labels``)."""

    resamples: int = Field(2000, ge=100, le=20_000, description="bootstrap resamples of the intervals")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the bootstrap's seed")


class CompareQuery(_Query):
    """Query parameters of the comparison (``GET /api/compare`` and the compare page)."""

    metric: list[str] | None = None
    resamples: int = 2000
    seed: int = 0
    confidence: float = 0.95
    latents: Literal["common", "all"] = "common"
    exclude_identical: bool = False

    def arguments(self) -> dict:
        """The arguments of :meth:`Atlas.compare`."""
        return {
            "metric_names": self.metric,
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": self.confidence,
            "latents": self.latents,
            "exclude_identical": self.exclude_identical,
        }


def compare_query_model() -> type[CompareQuery]:
    """The comparison query: the score metrics of the registry, bootstrap settings within bounds."""
    score_metric = Literal[tuple(metric.name for metric in metrics.SCORE_METRICS)]  # type: ignore[valid-type]
    return create_model(
        "CompareQuery",
        __base__=CompareQuery,
        metric=(
            list[score_metric] | None,
            Field(None, description="score metrics to compare (default: the headline ones and balanced accuracy)"),
        ),
        resamples=(int, Field(2000, ge=100, le=20_000, description="bootstrap resamples")),
        seed=(int, Field(0, ge=0, le=2**32 - 1, description="seed of the resampling")),
        confidence=(float, Field(0.95, gt=0.5, lt=1.0, allow_inf_nan=False, description="interval coverage")),
        latents=(
            Literal["common", "all"],
            Field(
                "common",
                description="compare on the latents every explainer × scorer run scored (common), or on every "
                "latent with a value (all: the means are then over different latents)",
            ),
        ),
        exclude_identical=(
            bool,
            Field(False, description="leave out the latents where two explainers wrote the same text"),
        ),
    )


def without_blanks(params: Mapping[str, str]) -> list[tuple[str, str]] | None:
    """``params`` without its empty values when it has any (an HTML form sends its empty fields as
    ``name=``, meaning "not set"), else None; repeated names keep every value. The pages redirect
    to that canonical query, so the API and the pages see the same parameters and apply the same
    rule to them."""
    items = list(params.multi_items()) if hasattr(params, "multi_items") else list(params.items())
    if all(value != "" for _, value in items):
        return None
    return [(key, value) for key, value in items if value != ""]


def validation_message(error: ValidationError, *, skip_location: int = 0) -> str:
    """One readable line for a validation error ("limit: Input should be less than or equal to 1000")."""
    messages = []
    for item in error.errors():
        location = item["loc"][skip_location:] or item["loc"]
        messages.append(f"{'.'.join(str(part) for part in location)}: {item['msg']}")
    return "; ".join(messages)


Q = TypeVar("Q", bound=_Query)


def parse(model: type[Q], params: Mapping[str, str]) -> Q:
    """Validate ``params`` (e.g. a request's query string) with ``model``; :class:`QueryError`
    with one line when they do not fit."""
    try:
        return model.model_validate(dict(params))
    except ValidationError as error:
        raise QueryError(validation_message(error)) from None
