"""Why an explanation fails: what it claims against what the latent does, and one cause by rules.

Per (feature, explainer), from the explanation text (``features.parquet``), its scores
(``stages/scores.parquet``: fuzz and detection, every scorer) and the latent's activation pattern
(``stages/activation_patterns.parquet``, when the run has activations):

- ``names_top_token`` / ``names_top_tokens``: whether the explanation names the latent's top
  activating token, and the share of its five most frequent it names. Names compare as words,
  case-insensitively, quoted or plain, the tokenizer's word marks removed ("the word Paris" names
  ``▁Paris``; "European capitals" does not; "Parisian" does not name "Paris").
- ``false_positive_rate``: the share of non-activating examples the scorers called activating
  (fuzz and detection, pooled over scorers): how broad the explanation reads.
- ``top_quantile_recall`` and ``low_quantile_recall``: the scorers' recall on the examples of the
  top three activation quantiles and of the lowest three (fuzz and detection, mean over scorers),
  and ``quantile_drop``, the first minus the second: an explanation of the top activations only
  holds at the top.
- ``claims`` and ``corroborated_share``: how many claims the explanation makes and the share of
  them another explainer of the latent also makes (:mod:`sae_atlas.stages.claims`).
- ``cause``: the first rule below that holds, with ``cause_evidence``, a sentence citing the
  numbers that triggered it; null when none holds (or the explanation failed to parse).

===================================  ===========================================================
misses the token pattern             a lexical latent, its top token not named, fuzz < LOW_SCORE
too broad                            false-positive rate among the study's highest BROAD_SHARE
                                     (its 90th percentile), and ≥ TOO_BROAD_FLOOR
describes the top activations only   recall drop from top to low quantiles ≥ TOP_ONLY, and the
                                     top quantiles' recall ≥ HELD
no coherent pattern                  a diffuse latent whose explainers disagree (mean cosine of
                                     this explanation to the others' < AGREE)
===================================  ===========================================================

Without activations, the columns that need them are null and the stage says so once.
"""

from __future__ import annotations

import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_DIAGNOSIS
from sae_atlas.stage import Plan, Product, Stage, StageContext

LOW_SCORE = 0.7
# Relative: scorers differ in how readily they say yes (the study's real runs call 38 % of
# non-activating examples activating on average), so "too broad" is broader than most of the study.
BROAD_SHARE = 0.1
TOO_BROAD_FLOOR = 0.2
TOP_ONLY = 0.3
HELD = 0.6
AGREE = 0.5
TOP_QUANTILES = 3
CAUSES = (
    "misses the token pattern",
    "too broad",
    "describes the top activations only",
    "no coherent pattern",
)
CLASSIFIERS = ("fuzz", "detection")


def _words(column: pl.Expr) -> pl.Expr:
    """The words of a text, lower case: runs of letters and digits."""
    return column.str.to_lowercase().str.extract_all(r"[\p{L}\p{N}]+")


def named_tokens(explanations: pl.DataFrame, patterns: pl.DataFrame) -> pl.DataFrame:
    """(feature_id, explainer, names_top_token, names_top_tokens) for every explanation whose
    latent has top tokens. ``explanations``: feature_id, explainer, explanation_text;
    ``patterns``: feature_id, top_tokens (most frequent first). A token is named when each of its
    words is a word of the explanation (one join of words, no pattern per explanation)."""
    tokens = (
        patterns.select("feature_id", "top_tokens")
        .explode("top_tokens")
        .with_columns(rank=pl.int_range(pl.len()).over("feature_id"), words=_words(pl.col("top_tokens")))
        .filter(pl.col("words").list.len() > 0)  # a token of punctuation alone is not a word to name
        .with_columns(size=pl.col("words").list.len())
    )
    written = (
        explanations.select("feature_id", "explainer", word=_words(pl.col("explanation_text").fill_null("")))
        .explode("word")
        .drop_nulls("word")
        .unique()
    )
    matched = (
        tokens.select("feature_id", "rank", word="words")
        .explode("word")
        .unique()
        .join(written, on=["feature_id", "word"], how="inner")
        .group_by("feature_id", "explainer", "rank")
        .agg(found=pl.len())
    )
    pairs = explanations.select("feature_id", "explainer").join(
        tokens.select("feature_id", "rank", "size"), on="feature_id", how="inner"
    )
    named = pairs.join(matched, on=["feature_id", "explainer", "rank"], how="left").with_columns(
        named=pl.col("found").fill_null(0) >= pl.col("size")
    )
    return named.group_by("feature_id", "explainer").agg(
        names_top_token=pl.col("named").filter(pl.col("rank") == 0).first().fill_null(False),
        names_top_tokens=pl.col("named").mean(),
    )


SCORE_COLUMNS = ["feature_id", "llm_explainer", "method", "score", "false_positives", "true_negatives", "by_quantile"]


def _recall(by_quantile: pl.Expr, keep) -> pl.Expr:
    """The mean recall of one score row over the quantiles ``keep(quantile, lowest)`` selects."""
    quantile, score = pl.element().struct.field("quantile"), pl.element().struct.field("score")
    lowest = quantile.max()
    return by_quantile.list.eval(score.filter(keep(quantile, lowest) & score.is_not_null())).list.mean()


def classifier_evidence(scores: pl.DataFrame) -> pl.DataFrame:
    """(feature_id, explainer, false_positive_rate, top_quantile_recall, low_quantile_recall) from
    the fuzz and detection rows of ``scores`` (the scores stage's columns): false positives pooled
    over scorers; recall per score row over its top three quantiles and its lowest three (never
    the same ones), then the mean over scorers and the two methods. Quantile lists are read in
    place, not unnested: at 131k latents that would be tens of millions of rows."""
    rows = scores.filter(pl.col("method").cast(pl.String).is_in(CLASSIFIERS)).select(
        pl.col("feature_id").cast(pl.Int64),
        explainer=pl.col("llm_explainer").cast(pl.String),
        false_positives="false_positives",
        true_negatives="true_negatives",
        top=_recall(pl.col("by_quantile"), lambda quantile, lowest: quantile < TOP_QUANTILES),
        low=_recall(
            pl.col("by_quantile"),
            lambda quantile, lowest: (quantile > lowest - TOP_QUANTILES) & (quantile >= TOP_QUANTILES),
        ),
    )
    return rows.group_by("feature_id", "explainer").agg(
        false_positive_rate=pl.col("false_positives").sum()
        / (pl.col("false_positives").sum() + pl.col("true_negatives").sum()),
        top_quantile_recall=pl.col("top").mean(),
        low_quantile_recall=pl.col("low").mean(),
    )


def _percent(value: pl.Expr) -> pl.Expr:
    return (value * 100).round(0).cast(pl.Int64).cast(pl.String) + pl.lit(" %")


def _number(value: pl.Expr) -> pl.Expr:
    return value.round(2).cast(pl.String)


def too_broad_threshold(false_positive_rates: pl.Series) -> float:
    """The false-positive rate above which an explanation is too broad in this study."""
    highest = false_positive_rates.drop_nulls().drop_nans().quantile(1 - BROAD_SHARE, interpolation="linear")
    return max(TOO_BROAD_FLOOR, float(highest) if highest is not None else TOO_BROAD_FLOOR)


def causes(too_broad: float) -> tuple[pl.Expr, pl.Expr]:
    """The cause rule and its evidence sentence over the diagnosis table's columns; ``too_broad``:
    :func:`too_broad_threshold` of the study."""
    fuzz = pl.col("fuzz")
    misses = (pl.col("pattern") == "lexical") & ~pl.col("names_top_token") & (fuzz < LOW_SCORE)
    broad = pl.col("false_positive_rate") >= too_broad
    top_only = (pl.col("quantile_drop") >= TOP_ONLY) & (pl.col("top_quantile_recall") >= HELD)
    incoherent = (pl.col("pattern") == "diffuse") & (pl.col("agreement") < AGREE)
    rules = [
        (
            misses,
            pl.concat_str(
                pl.lit("a lexical latent (its top token “"),
                pl.col("top_token"),
                pl.lit("” is "),
                _percent(pl.col("top_token_coverage")),
                pl.lit(" of its activating tokens); the explanation does not name it; fuzz "),
                _number(fuzz),
                pl.lit(f" < {LOW_SCORE}"),
            ),
        ),
        (
            broad,
            pl.concat_str(
                pl.lit("the scorers called "),
                _percent(pl.col("false_positive_rate")),
                pl.lit(f" of non-activating examples activating (the study's broadest {BROAD_SHARE:.0%}: ≥ "),
                pl.lit(f"{too_broad:.0%})"),
            ),
        ),
        (
            top_only,
            pl.concat_str(
                pl.lit("recall "),
                _number(pl.col("top_quantile_recall")),
                pl.lit(f" on the top {TOP_QUANTILES} quantiles, "),
                _number(pl.col("low_quantile_recall")),
                pl.lit(f" on the lowest {TOP_QUANTILES} (a drop ≥ {TOP_ONLY})"),
            ),
        ),
        (
            incoherent,
            pl.concat_str(
                pl.lit("a diffuse latent (coherence "),
                _number(pl.col("coherence")),
                pl.lit(", no token above "),
                _percent(pl.col("top_token_coverage")),
                pl.lit("); explainers disagree (mean cosine "),
                _number(pl.col("agreement")),
                pl.lit(f" < {AGREE})"),
            ),
        ),
    ]
    cause, evidence = (
        pl.when(pl.lit(False)).then(pl.lit(None, pl.String)),
        pl.when(pl.lit(False)).then(pl.lit(None, pl.String)),
    )
    for name, (condition, sentence) in zip(CAUSES, rules, strict=True):
        held = condition.fill_null(False) & pl.col("explanation_ok")
        cause, evidence = cause.when(held).then(pl.lit(name)), evidence.when(held).then(sentence)
    return cause.otherwise(None), evidence.otherwise(None)


def diagnose(
    explanations: pl.DataFrame,
    scores: pl.DataFrame,
    patterns: pl.DataFrame | None,
    claims: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per (feature, explainer) of ``explanations`` (:data:`STAGE_DIAGNOSIS`).
    ``explanations``: feature_id, explainer, explanation_text, explanation_ok, agreement (mean cosine
    to the other explainers' texts); ``scores``: the scores stage; ``patterns``: the activation
    patterns stage, or None; ``claims``: the claims stage, or None."""
    keys = ["feature_id", "explainer"]
    table = explanations.with_columns(pl.col("feature_id").cast(pl.Int64))
    if claims is not None:
        shares = claims.group_by(pl.col("feature_id").cast(pl.Int64), "explainer").agg(
            claims=pl.len(), corroborated_share=pl.col("corroborated").mean()
        )
        table = table.join(shares, on=keys, how="left")
    else:
        table = table.with_columns(claims=pl.lit(None, pl.UInt32), corroborated_share=pl.lit(None, pl.Float64))
    fuzz = (
        scores.filter(pl.col("method").cast(pl.String) == "fuzz")
        .group_by(pl.col("feature_id").cast(pl.Int64), explainer=pl.col("llm_explainer").cast(pl.String))
        .agg(fuzz=pl.col("score").mean())
    )
    table = table.join(fuzz, on=keys, how="left").join(classifier_evidence(scores), on=keys, how="left")
    if patterns is not None:
        latent = patterns.select(
            pl.col("feature_id").cast(pl.Int64), "pattern", "top_token", "top_token_coverage", "coherence", "top_tokens"
        )
        table = table.join(latent, on="feature_id", how="left").join(named_tokens(table, latent), on=keys, how="left")
    else:
        table = table.with_columns(
            pattern=pl.lit(None, pl.String),
            top_token=pl.lit(None, pl.String),
            top_token_coverage=pl.lit(None, pl.Float64),
            coherence=pl.lit(None, pl.Float64),
            names_top_token=pl.lit(None, pl.Boolean),
            names_top_tokens=pl.lit(None, pl.Float64),
        )
    table = table.with_columns(quantile_drop=pl.col("top_quantile_recall") - pl.col("low_quantile_recall"))
    cause, evidence = causes(too_broad_threshold(table["false_positive_rate"]))
    table = table.with_columns(cause=cause, cause_evidence=evidence)
    return table.select(list(STAGE_DIAGNOSIS)).cast(dict(STAGE_DIAGNOSIS)).sort(keys)  # type: ignore[arg-type]


def explanation_rows(features: pl.DataFrame) -> pl.DataFrame:
    """The explanations of ``features.parquet`` with each one's agreement with the other explainers."""
    return features.select(
        "feature_id",
        explainer=pl.col("llm_explainer").cast(pl.String),
        explanation_text="explanation_text",
        explanation_ok="explanation_ok",
        agreement=pl.col("semantic_similarity").list.eval(pl.element().struct.field("cosine_similarity")).list.mean(),
    )


def plan(context: StageContext) -> Plan:
    def execute(problems: Problems) -> Product:
        features = context.read(
            "features", ["feature_id", "llm_explainer", "explanation_text", "explanation_ok", "semantic_similarity"]
        )
        # only the classifiers' rows and the columns used: the scores of 131k latents are millions of rows
        scores = (
            pl.scan_parquet(context.path(layout.SCORES))
            .filter(pl.col("method").cast(pl.String).is_in(CLASSIFIERS))
            .select(SCORE_COLUMNS)
            .collect()
        )
        patterns = context.read("activation_patterns") if context.has("activation_patterns") else None
        claims = context.read("claims") if context.has("claims") else None
        table = diagnose(explanation_rows(features), scores, patterns, claims)
        statistics = {"explanations": table.height} | {
            str(cause): int(count) for cause, count in table["cause"].value_counts().iter_rows() if cause is not None
        }
        notes = []
        if patterns is None:
            notes.append(
                "no activations: the pattern, the top tokens and the causes that need them "
                "(misses the token pattern, no coherent pattern) are null"
            )
        return Product(data=table, rows=table.height, statistics=statistics, notes=notes)

    thresholds = {"low": LOW_SCORE, "broad": [BROAD_SHARE, TOO_BROAD_FLOOR], "top_only": TOP_ONLY, "held": HELD}
    thresholds["agree"] = AGREE
    return Plan(key=thresholds, execute=execute)


STAGE = Stage(
    name="diagnosis",
    output=layout.DIAGNOSIS,
    version=1,
    plan=plan,
    reads=("features", "scores"),
    optional_reads=("activation_patterns", "claims"),
    description="why each explanation fails: the tokens it names, its error anatomy, a cause by rules",
)
