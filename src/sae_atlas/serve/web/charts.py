"""SVG geometry for the pages' plots: histogram, scatter and forest plot. Pure functions from data
to coordinates; the templates draw them (inline SVG, no script, no library)."""

from __future__ import annotations

import math

from sae_atlas import metrics
from sae_atlas.query.headline import short_name


def _axis(low: float, high: float, ticks: int = 5) -> list[float]:
    return [low + (high - low) * step / (ticks - 1) for step in range(ticks)]


def histogram_svg_data(histogram: dict, width: int = 640, height: int = 260) -> dict:
    """Bar geometry for a histogram dictionary (as returned by ``Atlas.histogram``)."""
    counts = histogram["counts"]
    edges = histogram["edges"]
    tallest = max(counts) if counts and max(counts) > 0 else 1
    plot_width, plot_height = width - 80, height - 50  # room for the axis labels on both sides
    bar_width = plot_width / max(len(counts), 1)
    bars = []
    for index, count in enumerate(counts):
        bar_height = plot_height * count / tallest
        bars.append(
            {
                "x": 50 + index * bar_width,
                "y": 10 + plot_height - bar_height,
                "width": max(bar_width - 1, 1),
                "height": bar_height,
                "count": count,
                "low": edges[index],
                "high": edges[index + 1],
            }
        )
    return {
        "width": width,
        "height": height,
        "bars": bars,
        "x_ticks": [
            {"x": 50 + plot_width * step / 4, "label": f"{value:.2f}"}
            for step, value in enumerate(_axis(edges[0], edges[-1]))
        ],
        "y_ticks": [
            {"y": 10 + plot_height - plot_height * step / 4, "label": f"{value:.0f}"}
            for step, value in enumerate(_axis(0, tallest))
        ],
        "baseline": 10 + plot_height,
    }


def scatter_svg_data(scatter: dict, width: int = 640, height: int = 420) -> dict:
    """Point geometry for the scatter data of :func:`sae_atlas.serve.pages.scatter`."""
    points = scatter["points"]
    xs = [point["x"] for point in points]
    ys = [point["y"] for point in points]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    x_high, y_high = (x_high if x_high > x_low else x_low + 1.0), (y_high if y_high > y_low else y_low + 1.0)
    # a margin of 3 % so that no point sits on an axis
    x_pad, y_pad = 0.03 * (x_high - x_low), 0.03 * (y_high - y_low)
    x_low, x_high, y_low, y_high = x_low - x_pad, x_high + x_pad, y_low - y_pad, y_high + y_pad
    plot_width, plot_height = width - 95, height - 50
    return {
        "width": width,
        "height": height,
        "points": [
            {
                **point,
                "cx": 60 + plot_width * (point["x"] - x_low) / (x_high - x_low),
                "cy": 10 + plot_height - plot_height * (point["y"] - y_low) / (y_high - y_low),
            }
            for point in points
        ],
        "total": scatter["total"],
        "shown": scatter["shown"],
        "correlation": scatter["correlation"],
        "x_ticks": [
            {"x": 60 + plot_width * step / 4, "label": f"{value:.2f}"}
            for step, value in enumerate(_axis(x_low, x_high))
        ],
        "y_ticks": [
            {"y": 10 + plot_height - plot_height * step / 4, "label": f"{value:.2f}"}
            for step, value in enumerate(_axis(y_low, y_high))
        ],
        "baseline": 10 + plot_height,
    }


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 × 10ᵏ) that cover [low, high]: about ``count`` of
    them, the first at or below ``low`` and the last at or above ``high``. A range that holds 0 has
    0 on a tick, since every tick is a multiple of the step."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(factor * power for factor in (1, 2, 2.5, 5, 10) if factor * power >= raw * 0.999)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(index * step, 10) + 0.0 for index in range(first, last + 1)]


def tick_label(value: float, ticks: list[float]) -> str:
    """A tick's label with as many decimals as the step needs (0.25, not 0.2500000001)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    power = math.floor(math.log10(step) + 1e-9)
    decimals = max(0, -power) + (1 if round(step / 10**power, 6) == 2.5 else 0)
    return f"{value:.{decimals}f}"


def forest_svg_data(
    rows: list[dict],
    *,
    label: str = "label",
    zero_line: bool = False,
    reference: float | None = None,
    plot_width: int = 460,
    row_height: int = 22,
) -> dict:
    """A forest plot: one row per item of ``rows`` (``label``, ``value``, ``low``, ``high``): the
    value as a dot, its interval as a line; ``zero_line`` draws x = 0 (for differences) and
    ``reference`` another line (e.g. the chance level). The axis runs from one round tick to
    another, so 0 sits on a tick. The label column is as wide as the longest label (11 px text:
    up to 7 px a character)."""
    values = [number for row in rows for number in (row["value"], row["low"], row["high"]) if number is not None]
    values += [0.0] if zero_line else []
    values += [reference] if reference is not None else []
    ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    low, high = ticks[0], ticks[-1]
    left, right = 16 + round(7.0 * max((len(str(row[label])) for row in rows), default=10)), 20
    width = left + plot_width + right
    height = 30 + row_height * len(rows)

    def x(value: float) -> float:
        return left + plot_width * (value - low) / (high - low)

    return {
        "width": width,
        "height": height,
        "left": left,
        "baseline": height - 20,
        "rows": [
            {
                **row,
                "y": 10 + row_height * index + row_height / 2,
                "cx": x(row["value"]),
                "x1": x(row["low"] if row["low"] is not None else row["value"]),
                "x2": x(row["high"] if row["high"] is not None else row["value"]),
                "text": row[label],
            }
            for index, row in enumerate(rows)
        ],
        "zero": x(0.0) if zero_line else None,
        "reference": x(reference) if reference is not None else None,
        "ticks": [{"x": x(value), "label": tick_label(value, ticks)} for value in ticks],
    }


# One colour per explainer in the profile charts (colour-blind safe: Okabe and Ito).
SERIES_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


def profile_svg_data(
    series: dict[str, list[dict]],
    x_labels: list[str],
    *,
    reference: float | None = None,
    width: int = 560,
    height: int = 240,
) -> dict:
    """A line chart with intervals: per series (an explainer) its points (``position`` on the
    categorical x axis, ``mean``, ``ci_low``, ``ci_high``, ``latents``), drawn as a line with
    vertical interval bars, each series shifted a little so the bars do not overlap; ``reference``
    is a horizontal line (the chance level)."""
    values = [
        number
        for points in series.values()
        for point in points
        for number in (point["mean"], point["ci_low"], point["ci_high"])
        if number is not None
    ]
    values += [reference] if reference is not None else []
    ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    low, high = ticks[0], ticks[-1]
    left, top, plot_width, plot_height = 50, 10, width - 70, height - 60
    slot = plot_width / max(len(x_labels), 1)

    def y(value: float) -> float:
        return top + plot_height - plot_height * (value - low) / (high - low)

    drawn = []
    for index, (name, points) in enumerate(series.items()):
        shift = (index - (len(series) - 1) / 2) * min(6.0, slot / (2 * max(len(series), 1)))
        placed = [
            {
                **point,
                "x": left + slot * (point["position"] + 0.5) + shift,
                "y": y(point["mean"]),
                "y1": y(point["ci_low"] if point["ci_low"] is not None else point["mean"]),
                "y2": y(point["ci_high"] if point["ci_high"] is not None else point["mean"]),
            }
            for point in points
        ]
        drawn.append(
            {
                "name": name,
                "colour": SERIES_COLOURS[index % len(SERIES_COLOURS)],
                "points": placed,
                "line": " ".join(f"{point['x']:.1f},{point['y']:.1f}" for point in placed),
            }
        )
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": left + plot_width,
        "baseline": top + plot_height,
        "series": drawn,
        "reference": y(reference) if reference is not None else None,
        "y_ticks": [{"y": y(value), "label": tick_label(value, ticks)} for value in ticks],
        "x_ticks": [{"x": left + slot * (index + 0.5), "label": label} for index, label in enumerate(x_labels)],
    }


def _chance(metric: str) -> float | None:
    known = metrics.BY_NAME.get(metric)
    return known.range[0] if known is not None else None


def _excludes_zero(row: dict) -> bool:
    return row["ci_low"] is not None and row["ci_high"] is not None and (row["ci_low"] > 0 or row["ci_high"] < 0)


def brief(name: str, length: int = 20) -> str:
    """A model's short name cut to ``length`` characters for a chart's label (tables keep it whole)."""
    name = short_name(name)
    return name if len(name) <= length else name[: length - 1] + "…"


def headline_charts(data: dict) -> dict:
    """Per headline metric: the ranking (means with intervals, chance marked) and the paired
    differences (0 marked, the rows Holm finds significant darker)."""
    charts = {}
    pairs = data["headline"]["pairs"]
    for ranking in data["headline"]["rankings"]:
        metric = ranking["metric"]
        means = [
            {
                "label": short_name(item["explainer"]),
                "value": item["mean"],
                "low": item["ci_low"],
                "high": item["ci_high"],
            }
            for item in ranking["explainers"]
        ]
        differences = [
            {
                "label": f"{brief(row['first'], 12)} − {brief(row['second'], 12)}",
                "value": row["mean_difference"],
                "low": row["ci_low"],
                "high": row["ci_high"],
                "excludes_zero": row["significant"],
            }
            for row in pairs
            if row["metric"] == metric
        ]
        charts[metric] = {
            "ranking": forest_svg_data(means, reference=ranking["chance"], plot_width=360),
            "pairs": forest_svg_data(differences, zero_line=True, plot_width=360) if differences else None,
        }
    return charts


def _profile(points: list[dict], key: str, labels: list[str], reference: float | None, name=None) -> dict | None:
    """A profile chart of ``points`` along ``key``, one series per ``name(point)`` (the explainer)."""
    name = name or (lambda point: short_name(point["explainer"]))
    series: dict[str, list[dict]] = {}
    positions = {value: index for index, value in enumerate(sorted({point[key] for point in points}))}
    for point in points:
        series.setdefault(name(point), []).append({**point, "position": positions[point[key]]})
    return profile_svg_data(series, labels, reference=reference) if series else None


def _frequency(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def comparison_charts(data: dict) -> dict:
    """What the compare page and the report draw from :meth:`Atlas.compare`'s data: per metric, a
    forest plot of the explainer × scorer means (chance marked), one of the per-scorer paired
    differences (0 marked), and the score by activation quantile and by firing frequency."""
    charts = {}
    for metric in data["settings"]["metrics"]:
        summary = [
            {
                "label": f"{short_name(row['explainer'])} · {short_name(row['scorer'])}",
                "value": row["mean"],
                "low": row["ci_low"],
                "high": row["ci_high"],
                "latents": row["latents"],
            }
            for row in data["summary"]
            if row["metric"] == metric
        ]
        paired = [
            {
                "label": f"{short_name(row['first'])} − {short_name(row['second'])} · {short_name(row['scorer'])}",
                "value": row["mean_difference"],
                "low": row["ci_low"],
                "high": row["ci_high"],
                "excludes_zero": False,  # per-scorer rows are exploratory: nothing is highlighted
                **{key: row[key] for key in ("latents", "wilcoxon_p", "wins", "ties", "losses", "interval")},
            }
            for row in data["paired"]
            if row["metric"] == metric
        ]
        quantiles = [point for point in data["profiles"]["by_quantile"] if point["method"] == metric]
        firing = sorted(
            (point for point in data["profiles"]["by_firing"] if point["metric"] == metric), key=lambda p: p["bin"]
        )
        bins = {point["bin"]: point for point in firing}
        errors = [row for row in data.get("error_anatomy", []) if row["method"] == metric]
        misses = [row for row in errors if row["kind"] == "false negatives"]
        charts[metric] = {
            "false_negatives": _profile(
                misses,
                "quantile",
                [str(q) for q in sorted({row["quantile"] for row in misses})],
                None,
                name=lambda row: f"{brief(row['explainer'], 14)} · {brief(row['scorer'], 10)}",
            ),
            "false_positives": [row for row in errors if row["kind"] == "false positives"],
            "summary": forest_svg_data(summary, reference=_chance(metric)) if summary else None,
            "paired": forest_svg_data(paired, zero_line=True) if paired else None,
            "paired_rows": paired,
            "by_quantile": _profile(
                quantiles, "quantile", [str(q) for q in sorted({p["quantile"] for p in quantiles})], _chance(metric)
            ),
            "by_firing": _profile(
                firing,
                "bin",
                [
                    f"{_frequency(bins[b]['frequency_low'])}–{_frequency(bins[b]['frequency_high'])}"
                    for b in sorted(bins)
                ],
                _chance(metric),
            ),
        }
    return charts
