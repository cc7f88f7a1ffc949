"""SVG geometry for the pages' plots: histogram, scatter and forest plot. Pure functions from data
to coordinates; the templates draw them (inline SVG, no script, no library)."""

from __future__ import annotations


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


def forest_svg_data(
    rows: list[dict], *, label: str = "label", zero_line: bool = False, plot_width: int = 460, row_height: int = 22
) -> dict:
    """A forest plot: one row per item of ``rows`` (``label``, ``value``, ``low``, ``high``): the
    value as a dot, its interval as a line; ``zero_line`` draws x = 0 (for differences). The label
    column is as wide as the longest label (11 px text: ~6.4 px a character)."""
    values = [number for row in rows for number in (row["value"], row["low"], row["high"]) if number is not None]
    if zero_line:
        values.append(0.0)
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad
    left, right = 16 + round(6.4 * max((len(str(row[label])) for row in rows), default=10)), 20
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
        "ticks": [{"x": x(value), "label": f"{value:.2f}"} for value in _axis(low, high)],
    }


def short_name(name: str) -> str:
    """A model name without its organisation."""
    return str(name).rsplit("/", 1)[-1]


def comparison_charts(data: dict) -> dict:
    """What the compare page and the report draw from :meth:`Atlas.compare`'s data: per metric, a
    forest plot of the explainer × scorer means, one of the paired differences, and the scorers'
    rank-agreement matrix."""
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
                "excludes_zero": row["ci_low"] is not None
                and row["ci_high"] is not None
                and (row["ci_low"] > 0 or row["ci_high"] < 0),
                **{key: row[key] for key in ("latents", "wilcoxon_p", "holm_p", "wins", "ties", "losses")},
            }
            for row in data["paired"]
            if row["metric"] == metric
        ]
        agreement = {(row["first"], row["second"]): row for row in data["scorer_agreement"] if row["metric"] == metric}
        matrix = [
            [
                1.0
                if first == second
                else (agreement.get((first, second)) or agreement.get((second, first)) or {}).get("spearman")
                for second in data["scorers"]
            ]
            for first in data["scorers"]
        ]
        charts[metric] = {
            "summary": forest_svg_data(summary) if summary else None,
            "paired": forest_svg_data(paired, zero_line=True) if paired else None,
            "paired_rows": paired,
            "agreement": matrix,
            "agreement_rows": [row for row in data["scorer_agreement"] if row["metric"] == metric],
        }
    return charts
