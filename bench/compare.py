"""The comparison of explainers and scorers at reference scale: ``Atlas.compare`` (B = 2000) over the
reference output (2,472 rows, 3 explainers × 3 scorers) and over a copy tiled to every latent
(49,152 rows), and ``sae-atlas report`` (HTML and Markdown). Results go to the "compare" section of
docs/benchmarks.md. Targets: compare < 1 s and < 5 s, report < 5 s.

    python bench/compare.py [OUTPUT_DIR]     # default: bench/out/reference/int8 (bench/activation_pipeline.py)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from common import OUT, update_section
from queries import wide_copy
from sae_atlas import Atlas
from sae_atlas.exports.report import render_html, render_markdown


def timed(function, repeat: int = 3) -> tuple[float, object]:
    """The median seconds of ``repeat`` calls, and the last result."""
    seconds, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def measure(directory: Path) -> dict:
    atlas = Atlas(directory)
    rows = atlas.features(limit=None).height
    started = time.perf_counter()
    first = atlas.compare()
    first_call = time.perf_counter() - started  # SciPy's import included
    # a new seed each time: the cache of a repeated comparison is not what is measured
    seeds = iter(range(1, 100))
    compare, _ = timed(lambda: atlas.compare(seed=next(seeds)))
    html, page = timed(lambda: render_html(atlas, first))
    markdown, _ = timed(lambda: render_markdown(atlas, first))
    return {
        "rows": rows,
        "metrics": len(first["settings"]["metrics"]),
        "first_call": first_call,
        "compare": compare,
        "html": html,
        "html_bytes": len(page.encode()),
        "markdown": markdown,
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main(reference: Path) -> None:
    scores = reference / "stages" / "scores.parquet"
    if not scores.exists() or "balanced_accuracy" not in pq.read_schema(scores).names:
        raise SystemExit(f"{reference}: run the current pipeline first (its scores table predates delphi's metrics)")
    wide = OUT / "reference" / "wide"
    wide_copy(reference, wide)
    results = {"reference": measure(reference), "full width": measure(wide)}
    lines = [
        f"| {label} | {result['rows']:,} | {result['metrics']} | {result['first_call']:.2f} s | "
        f"**{result['compare']:.2f} s** | {result['html']:.2f} s ({result['html_bytes'] / 1024:.0f} KiB) | "
        f"{result['markdown']:.2f} s |"
        for label, result in results.items()
    ]
    print("\n".join(lines), flush=True)
    reference_ok = results["reference"]["compare"] < 1
    wide_ok = results["full width"]["compare"] < 5
    report_ok = all(result["html"] + result["compare"] < 5 for result in results.values())
    body = "\n".join(
        [
            "## Comparing explainers and scorers",
            "",
            "`Atlas.compare()` with its defaults (the headline score metrics and delphi's balanced accuracy, "
            "B = 2,000 bootstrap resamples) over the complete int8 reference output (3 explainers × 3 scorers) and "
            "over the copy tiled to every latent. *First call* includes importing SciPy; *compare* is the median of "
            "three calls with new seeds (so nothing is cached); the report renders that comparison.",
            "",
            "| output | rows | metrics | first call | compare | HTML report | Markdown |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *lines,
            "",
            f"Targets: compare < 1 s at reference scale ({verdict(reference_ok)}), < 5 s at 49,152 rows "
            f"({verdict(wide_ok)}); `report` (compare + render) < 5 s ({verdict(report_ok)}).",
        ]
    )
    update_section("compare", body)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else OUT / "reference" / "int8")
