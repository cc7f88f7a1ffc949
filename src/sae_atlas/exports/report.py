"""``sae-atlas report``: the comparison of explainers and scorers as one file to keep or share.

HTML: self-contained (the stylesheet inlined, plots as inline SVG, no script, nothing fetched), with
the comparison drawn as on the ``/compare`` page, each score metric's distribution per explainer,
and the run's provenance (config, input fingerprints, versions, each delphi run's settings).
Markdown: the same numbers as tables, for a paper's appendix.
"""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from sae_atlas import __version__, layout, metrics
from sae_atlas.query.atlas import Atlas
from sae_atlas.serve.web import HERE, colour
from sae_atlas.serve.web.charts import comparison_charts, headline_charts, histogram_svg_data, short_name

FORMATS = ("html", "md")
PACKAGES = ("polars", "pyarrow", "numpy", "scipy", "sentence-transformers", "torch")


def provenance(atlas: Atlas) -> dict:
    """Where the numbers come from: versions, the config, and each output's fingerprint and time."""
    outputs = []
    config = None
    for name in (*layout.MASTER_FILES, layout.SCORES, layout.DECODER_SIMILARITY):
        sidecar = layout.read_sidecar(atlas.output_dir / name)
        if not sidecar:
            continue
        config = config or sidecar.get("config")
        outputs.append(
            {
                "file": name,
                "rows": sidecar.get("rows"),
                "created_at": sidecar.get("created_at"),
                "stage": sidecar.get("stage"),
                "stage_version": sidecar.get("stage_version"),
                "fingerprint": sidecar.get("fingerprint"),
                "seconds": (sidecar.get("timing") or {}).get("seconds"),
            }
        )
    versions = {"sae-atlas": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"versions": versions, "config": config, "outputs": outputs}


def distributions(atlas: Atlas, metric_names: list[str], bins: int = 20) -> dict[str, list[dict]]:
    """Per metric, the histogram of each explainer's values (mean over scorers)."""
    return {
        metric: [
            {"explainer": explainer, "svg": histogram_svg_data(histogram, width=360, height=180), **histogram}
            for explainer in atlas.explainers
            if (histogram := atlas.histogram(metric, bins, explainer=explainer))["count"]
        ]
        for metric in metric_names
    }


def _environment() -> Environment:
    environment = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape())
    environment.globals.update(
        short_name=short_name,
        colour=colour,
        label_of=lambda name: metrics.BY_NAME[name].label,
        description_of=lambda name: metrics.BY_NAME[name].description,
        feature_link=lambda feature_id: None,  # no server behind a file
        SCORE_METRICS=metrics.SCORE_METRICS,
    )
    return environment


def render_html(atlas: Atlas, comparison: dict) -> str:
    """The report as one HTML document."""
    return (
        _environment()
        .get_template("report.html")
        .render(
            data=comparison,
            charts=comparison_charts(comparison),
            headline_charts=headline_charts(comparison),
            distributions=distributions(atlas, comparison["settings"]["metrics"]),
            provenance=provenance(atlas),
            stylesheet=(HERE / "static" / "style.css").read_text(encoding="utf-8"),
            sae_id=atlas.sae_id,
            generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
    )


# Characters with a meaning in CommonMark inline text or tables; each is written backslash-escaped.
# (Inside one line of a table or paragraph: what would open emphasis, code, a link, an image, a
# cell or strike-through. Newlines are gone, so line-start markers such as "#" or "1." cannot fire.)
MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]#!|~])")


def md(value) -> str:
    """``value`` as literal Markdown text on one line: HTML special characters as entities (raw
    HTML passes through Markdown renderers), every run of whitespace as one space (a newline
    could start a heading or a list), Markdown punctuation backslash-escaped. Names, ids and
    settings come from the study's files: they are data, never markup."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return md(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(value) for value in row) + " |" for row in rows),
        "",
    ]


def render_markdown(atlas: Atlas, comparison: dict) -> str:
    """The report's numbers as Markdown tables."""
    settings = comparison["settings"]
    lines = [
        f"# Explainers and scorers compared: {md(atlas.sae_id)}",
        "",
        f"{len(comparison['explainers'])} explainers, {len(comparison['scorers'])} scorers; sae-atlas {__version__}.",
        "",
    ]
    lines += _markdown_headline(comparison)
    lines += [
        "## Comparability",
        "",
        *(
            [
                f"- **{md(warning['setting'])}** ({warning['severity']}): {md(warning['message'])}"
                for warning in comparison["comparability"]["warnings"]
            ]
            or [
                "No check fired: the runs agree on every recorded setting that changes scores, and the data shows "
                "no identical texts, differing example counts, differing latent sets, self-scoring or unparsed "
                "explanations."
            ]
        ),
        "",
    ]
    lines += _markdown_selection(comparison)
    lines += [
        f"Below: means over latents with {settings['confidence']:.0%} intervals (percentile bootstrap, "
        f"{settings['resamples']:,} resamples, seed {settings['seed']}; Student-t below {settings['small_sample']} "
        "latents); per-scorer paired differences with unadjusted Wilcoxon p (exploratory: the tests are the "
        "headline's).",
        "",
    ]
    lines += _markdown_control(comparison)
    for metric in settings["metrics"]:
        lines += _markdown_metric(comparison, metric)
    lines += _markdown_explainer_agreement(comparison)
    lines += _markdown_people(comparison)
    lines += _markdown_provenance(atlas, comparison)
    return "\n".join(lines).rstrip() + "\n"


def _markdown_headline(comparison: dict) -> list[str]:
    """The answer first: the sentences, each headline metric's ranking and the tested differences."""
    headline = comparison["headline"]
    settings = comparison["settings"]
    lines = ["## The answer", "", *(f"- {md(sentence)}" for sentence in headline["sentences"]), ""]
    lines += [
        "Each explainer's score is averaged over the scorers per latent, on the latents every explainer × scorer "
        f"run scored. Intervals ({settings['confidence']:.0%}) resample latents with all their scorers (clustered "
        f"bootstrap; Student-t below {settings['small_sample']} latents). Wilcoxon signed-rank p, Holm-adjusted over "
        f"a fixed family: {headline['family']} ({', '.join(headline['metrics'])}).",
        "",
    ]
    lines += _table(
        ["metric", "rank", "explainer", "latents", "mean", "interval", "chance"],
        [
            [
                ranking["metric"],
                item["rank"],
                short_name(item["explainer"]),
                ranking["latents"],
                item["mean"],
                f"[{_cell(item['ci_low'])}, {_cell(item['ci_high'])}]",
                ranking["chance"],
            ]
            for ranking in headline["rankings"]
            for item in ranking["explainers"]
        ],
    )
    lines += _table(
        [
            "metric",
            "ahead − behind",
            "latents",
            "same text",
            "difference",
            "interval",
            "Holm p",
            "scorers agreeing",
            "interaction p",
        ],
        [
            [
                row["metric"],
                f"{short_name(row['first'])} − {short_name(row['second'])}",
                row["latents"],
                row["identical_texts"],
                row["mean_difference"],
                f"[{_cell(row['ci_low'])}, {_cell(row['ci_high'])}]",
                row["holm_p"],
                f"{row['scorers_agreeing']} of {len(row['per_scorer'])}",
                row["interaction_p"],
            ]
            for row in headline["pairs"]
        ],
    )
    return lines


def _markdown_selection(comparison: dict) -> list[str]:
    """Which latents each metric is compared on, and the intervals that are Student-t."""
    selection = comparison["selection"]
    lines = [
        "## Latents compared",
        "",
        f"{selection['identical_latents']:,} latents have the same text from two explainers; "
        f"{selection['excluded_identical']:,} of them are left out.",
        "",
    ]
    lines += _table(
        ["metric", "latents with a value", "scored by every run", "compared on"],
        [[row["metric"], row["with_values"], row["common"], row["used"]] for row in selection["metrics"]],
    )
    for item in comparison["small_samples"]:
        lines.append(f"- Student-t interval (few latents): {md(item['where'])}, {item['latents']} latents")
    return lines + ([""] if comparison["small_samples"] else [])


def _markdown_control(comparison: dict) -> list[str]:
    """The paired differences on identical texts: the scorers' noise, which should cover 0."""
    rows = comparison.get("identical_text_control") or []
    if not rows:
        return []
    lines = ["Control: the paired difference where both explainers wrote the same text (should cover 0):", ""]
    return lines + _table(
        ["first", "second", "scorer", "metric", "latents", "difference", "interval"],
        [
            [
                short_name(row["first"]),
                short_name(row["second"]),
                short_name(row["scorer"]),
                row["metric"],
                row["latents"],
                row["mean_difference"],
                f"[{_cell(row['ci_low'])}, {_cell(row['ci_high'])}]",
            ]
            for row in rows
        ],
    )


def _markdown_metric(comparison: dict, metric: str) -> list[str]:
    """One metric's section: means, paired differences, scorer agreement."""
    lines: list[str] = []
    lines += [f"## {metrics.BY_NAME[metric].label}", "", metrics.BY_NAME[metric].description, ""]
    lines += _table(
        ["explainer", "scorer", "latents", "mean", "median", "interval", "weighted mean"],
        [
            [
                short_name(row["explainer"]),
                short_name(row["scorer"]),
                row["latents"],
                row["mean"],
                row["median"],
                f"[{_cell(row['ci_low'])}, {_cell(row['ci_high'])}]",
                row["weighted_mean"],
            ]
            for row in comparison["summary"]
            if row["metric"] == metric
        ],
    )
    paired = [row for row in comparison["paired"] if row["metric"] == metric]
    if paired:
        lines += ["Paired differences (first − second):", ""]
        lines += _table(
            ["first", "second", "scorer", "latents", "difference", "interval", "Wilcoxon p (unadjusted)", "W/T/L"],
            [
                [
                    short_name(row["first"]),
                    short_name(row["second"]),
                    short_name(row["scorer"]),
                    row["latents"],
                    row["mean_difference"],
                    f"[{_cell(row['ci_low'])}, {_cell(row['ci_high'])}]",
                    row["wilcoxon_p"],
                    f"{row['wins']}/{row['ties']}/{row['losses']}",
                ]
                for row in paired
            ],
        )
    lines += _markdown_errors(comparison, metric)
    agreement = [row for row in comparison["scorer_agreement"] if row["metric"] == metric]
    alphas = [row for row in comparison["scorer_reliability"] if row["metric"] == metric]
    if alphas:
        lines += ["Krippendorff's α over all scorers (interval data), within each explainer:", ""]
        lines += _table(
            ["explainer", "scorers", "latents", "α", "interval"],
            [
                [
                    short_name(row["explainer"]),
                    row["scorers"],
                    row["latents"],
                    row["alpha"],
                    f"[{_cell(row['ci_low'])}, {_cell(row['ci_high'])}]",
                ]
                for row in alphas
            ],
        )
    if agreement:
        lines += ["Scorer agreement within each explainer (top decile: ties averaged):", ""]
        lines += _table(
            ["explainer", "scorers", "latents", "Spearman", "interval", "Kendall τ-b", "top-decile overlap", "chance"],
            [
                [
                    short_name(row["explainer"]),
                    f"{short_name(row['first'])} · {short_name(row['second'])}",
                    row["latents"],
                    row["spearman"],
                    f"[{_cell(row['spearman_low'])}, {_cell(row['spearman_high'])}]",
                    row["kendall"],
                    row["top_decile_overlap"],
                    row["top_decile_chance"],
                ]
                for row in agreement
            ],
        )
    return lines


def _markdown_errors(comparison: dict, metric: str) -> list[str]:
    """Where the errors fall: the false-positive rate and the false-negative rate at the top and
    bottom quantiles, per explainer × scorer."""
    errors = [row for row in comparison.get("error_anatomy", []) if row["method"] == metric]
    if not errors:
        return []
    by_run: dict[tuple[str, str], dict[int, dict]] = {}
    for row in errors:
        by_run.setdefault((row["explainer"], row["scorer"]), {})[row["quantile"]] = row
    quantiles = sorted({row["quantile"] for row in errors if row["quantile"] >= 0})
    shown = [quantiles[0], quantiles[-1]] if quantiles else []
    lines = ["Where the errors fall (mean over latents of each latent's error rate, with its interval):", ""]
    return lines + _table(
        ["explainer", "scorer", "false positives", *(f"false negatives q{q}" for q in shown)],
        [
            [
                short_name(explainer),
                short_name(scorer),
                *(
                    f"{_cell(row['mean'])} [{_cell(row['ci_low'])}, {_cell(row['ci_high'])}]" if row else "–"
                    for row in [rates.get(-1), *(rates.get(q) for q in shown)]
                ),
            ]
            for (explainer, scorer), rates in by_run.items()
        ],
    )


def _markdown_explainer_agreement(comparison: dict) -> list[str]:
    lines: list[str] = []
    lines += ["## Explainer agreement", ""]
    for pair in comparison["explainer_agreement"]:
        correlation = ", ".join(
            f"{metrics.BY_NAME[name].label} {_cell(value, 2)}"
            for name, value in pair["correlation_with_scores"].items()
        )
        lines += [
            f"**{md(short_name(pair['first']))} and {md(short_name(pair['second']))}**: "
            f"{pair['latents']:,} latents, cosine "
            f"mean {_cell(pair['mean'])}, quartiles {_cell(pair['q1'])} / {_cell(pair['median'])} / "
            f"{_cell(pair['q3'])}; Spearman with the score: {correlation}.",
            "",
        ]
    return lines


def _markdown_people(comparison: dict) -> list[str]:
    """The scorers and explainers against people's labels (when anything is labelled)."""
    people = comparison.get("people")
    if not people:
        return []
    origin = (
        "every label used was taken in the random triage order"
        if people["unbiased"]
        else "not every label came from the random order: the explainers' shares describe the explanations labelled"
    )
    lines = [
        "## The scorers against people",
        "",
        f"{people['n']} labelled explanations; {origin}. Intervals: {people['confidence']:.0%} percentile bootstrap, "
        f"{people['resamples']:,} resamples, unit of resampling: {md(people['unit'])}; no multiple-testing correction.",
        "",
    ]
    lines += _table(
        ["scorer", "n (good / bad)", "AUC good vs bad", "Spearman ρ with the verdict"],
        [
            [
                row["scorer"],
                f"{row['n']} ({row['n_good']} / {row['n_bad']})",
                f"{_cell(row['auc'])} [{_cell(row['auc_low'])}, {_cell(row['auc_high'])}]",
                f"{_cell(row['spearman'])} [{_cell(row['spearman_low'])}, {_cell(row['spearman_high'])}]",
            ]
            for row in people["scorers"]
        ],
    )
    lines += _table(
        ["explainer", "n", "share good"],
        [
            [
                md(row["explainer"]),
                str(row["n"]),
                f"{_cell(row['share_good'])} [{_cell(row['low'])}, {_cell(row['high'])}]",
            ]
            for row in people["explainers"]
        ],
    )
    return lines


def _markdown_provenance(atlas: Atlas, comparison: dict) -> list[str]:
    lines: list[str] = []
    details = provenance(atlas)
    lines += ["## Provenance", ""]
    lines += _table(["package", "version"], [[name, version] for name, version in details["versions"].items()])
    lines += _table(
        ["output", "rows", "stage version", "fingerprint", "created"],
        [
            [item["file"], item["rows"], item["stage_version"], item["fingerprint"], item["created_at"]]
            for item in details["outputs"]
        ],
    )
    lines += _table(
        ["run", "explainer", "scorer", "settings"],
        [
            [
                run["data_source"],
                short_name(run["explainer"]),
                short_name(run["scorer"]),
                ", ".join(f"{key}={value}" for key, value in run["settings"].items() if value is not None),
            ]
            for run in comparison["comparability"]["runs"]
        ],
    )
    return lines


def write_report(atlas: Atlas, comparison: dict, path: Path, format: str) -> None:
    """Write the report in ``format`` ("html" or "md") to ``path`` (atomically)."""
    layout.refuse_output_files(Path(path))
    text = render_html(atlas, comparison) if format == "html" else render_markdown(atlas, comparison)
    layout.write_atomic_bytes(Path(path), text.encode("utf-8"))
