"""What kind of latent each one is, from the tokens it activates on: a token pattern, a small set
of tokens, a context, or nothing coherent.

For each latent, over its sampled examples (``stages/sampled_examples.parquet``: the top examples of
every activation quantile), the **activating tokens** are those at half the example's peak or more
(the peak and its equals; the faint spill after a peak is left out). For each one, the token and the
n-grams ending there (2 and 3 tokens) are read from the prompts. Tokens compare as text with the
tokenizer's word marks (``▁``, ``Ġ``) and surrounding space removed, case folded.

Per latent: the most frequent activating token and its **coverage** (its share of the activating
tokens), the five most frequent, the **concentration** (the chance that two activating tokens drawn
at random are the same token: Simpson's index, unbiased for the number of tokens, so a latent with
few examples is not called concentrated by chance), the most frequent 2–3-gram and its coverage,
the top token's coverage in each quantile (index 0 = the top activations, as everywhere in
sae-atlas), and the **coherence** of its examples (the mean pairwise similarity of their windows,
from ``activation_example_similarity.parquet``).

The **pattern**, by rules a reader can check (thresholds chosen on synth, where each kind is
planted; docs/notes.md has the confusion matrix):

=============  =====================================================================================
lexical        one token (or n-gram) carries the latent: its coverage ≥ LEXICAL
mixed          a small set of tokens does: concentration ≥ TOKEN_SET
contextual     no token does, but the examples are about one thing: coherence ≥ COHERENT
diffuse        neither: no token, no shared context
=============  =====================================================================================

Without the activation similarity (no embeddings), latents that are neither lexical nor mixed get
no pattern (null), and the stage says so once.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.problems import Problems
from sae_atlas.schema import STAGE_ACTIVATION_PATTERNS as SCHEMA
from sae_atlas.stage import Plan, Product, Stage, StageContext

LEXICAL = 0.5
TOKEN_SET = 0.07
COHERENT = 0.35
PEAK_SHARE = 0.5  # an activating token: at least this share of its example's largest activation
TOP_TOKENS = 5
PATTERNS = ("lexical", "mixed", "contextual", "diffuse")

# the tokenizers' word marks: SentencePiece's and GPT-2's byte-level space
_MARKS = r"[\s\x{2581}\x{0120}]"


def _text(column: pl.Expr) -> pl.Expr:
    """A token (or joined tokens) as a reader sees it: word marks as spaces, trimmed."""
    return column.str.replace_all(_MARKS, " ").str.strip_chars()


def prompt_token_table(prompt_tokens: pl.Series) -> pl.DataFrame:
    """(prompt_id, position, token) of every prompt token, special tokens null; ``prompt_tokens``
    indexed by prompt id."""
    return (
        pl.DataFrame({"prompt_id": np.arange(len(prompt_tokens), dtype=np.uint32), "token": prompt_tokens})
        .explode("token")
        .with_columns(position=pl.int_range(pl.len()).over("prompt_id").cast(pl.Int64))
        # a special token (<bos>, <|endoftext|>) is no word of a pattern, nor of an n-gram across it
        .with_columns(token=pl.when(pl.col("token").str.contains(r"^<[^<>]*>$")).then(None).otherwise("token"))
    )


def peak_ngrams(sampled: pl.DataFrame, tokens: pl.DataFrame) -> pl.DataFrame:
    """One row per activating token of the sampled examples: feature_id, quantile, and the 1-, 2-
    and 3-gram ending at it (``gram1``…``gram3``, raw pieces joined; null where the prompt starts
    too close)."""
    frame = (
        sampled.select("feature_id", "quantile", "prompt_id", "max_activation", "activation_pairs")
        .explode("activation_pairs")
        .unnest("activation_pairs")
        .filter(pl.col("activation_value") >= PEAK_SHARE * pl.col("max_activation"))
        .select("feature_id", "quantile", "prompt_id", position=pl.col("token_position").cast(pl.Int64))
        .with_row_index("_token")
    )
    for back in range(3):
        shifted = tokens.rename({"token": f"_t{back}"}).with_columns(pl.col("position") + back)
        frame = frame.join(shifted, on=["prompt_id", "position"], how="left")
    return frame.sort("_token").select(
        "feature_id",
        "quantile",
        gram1=pl.col("_t0"),
        gram2=pl.concat_str("_t1", "_t0"),
        gram3=pl.concat_str("_t2", "_t1", "_t0"),
    )


def _most_frequent(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    """Per feature: the ``column`` value most tokens share (as text, its commonest spelling) and
    how many share it, the top :data:`TOP_TOKENS`, how many were counted and how many ordered pairs
    of them are the same (for the concentration)."""
    keyed = frame.select("feature_id", text=_text(pl.col(column))).filter(pl.col("text").str.len_chars() > 0)
    counts = (
        keyed.with_columns(key=pl.col("text").str.to_lowercase())
        .group_by("feature_id", "key")
        .agg(count=pl.len(), text=pl.col("text").mode().sort().first())
        .sort(["feature_id", "count", "key"], descending=[False, True, False])
    )
    return counts.group_by("feature_id", maintain_order=True).agg(
        top=pl.col("text").first(),
        top_key=pl.col("key").first(),
        top_count=pl.col("count").first(),
        top_texts=pl.col("text").head(TOP_TOKENS),
        counted=pl.col("count").sum(),
        same_pairs=(pl.col("count") * (pl.col("count") - 1)).sum(),
    )


def activation_patterns(
    sampled: pl.DataFrame, prompt_tokens: pl.Series, coherence: pl.DataFrame | None = None
) -> pl.DataFrame:
    """One row per latent with sampled examples (:data:`SCHEMA`). ``sampled``: feature_id,
    prompt_id, quantile (0 = the lowest bin), max_activation, activation_pairs; ``coherence``:
    feature_id, mean_pairwise_similarity (None: not computed)."""
    grams = peak_ngrams(sampled, prompt_token_table(prompt_tokens))
    totals = sampled.group_by("feature_id").agg(examples=pl.len())
    tokens = _most_frequent(grams, "gram1")
    longer = pl.concat([_most_frequent(grams, "gram2"), _most_frequent(grams, "gram3")], how="vertical").sort(
        ["feature_id", "top_count"], descending=[False, True]
    )
    ngram = longer.group_by("feature_id", maintain_order=True).agg(
        top_ngram=pl.col("top").first(), ngram_count=pl.col("top_count").first()
    )
    # the top token's share in each quantile, the top activations first
    by_quantile = (
        grams.join(tokens.select("feature_id", "top_key"), on="feature_id", how="left")
        .with_columns(hit=_text(pl.col("gram1")).str.to_lowercase() == pl.col("top_key"))
        .group_by("feature_id", "quantile")
        .agg(share=pl.col("hit").fill_null(False).mean())
        .sort("feature_id", pl.col("quantile").cast(pl.Int64).neg())
        .group_by("feature_id", maintain_order=True)
        .agg(coverage_by_quantile=pl.col("share").cast(pl.Float32))
    )
    table = (
        totals.join(tokens, on="feature_id", how="left")
        .join(ngram, on="feature_id", how="left")
        .join(by_quantile, on="feature_id", how="left")
        .sort("feature_id")
    )
    if coherence is not None:
        table = table.join(
            coherence.select(pl.col("feature_id").cast(table.schema["feature_id"]), "mean_pairwise_similarity"),
            on="feature_id",
            how="left",
        )
    else:
        table = table.with_columns(mean_pairwise_similarity=pl.lit(None, pl.Float64))
    table = table.select(
        "feature_id",
        "examples",
        tokens=pl.col("counted").fill_null(0),
        top_token=pl.col("top"),
        top_token_coverage=pl.col("top_count") / pl.col("counted"),
        top_tokens=pl.col("top_texts"),
        concentration=pl.when(pl.col("counted") >= 2).then(
            pl.col("same_pairs") / (pl.col("counted") * (pl.col("counted") - 1))
        ),
        top_ngram=pl.col("top_ngram"),
        top_ngram_coverage=pl.col("ngram_count") / pl.col("counted"),
        coverage_by_quantile=pl.col("coverage_by_quantile"),
        coherence=pl.col("mean_pairwise_similarity"),
    )
    return table.with_columns(pattern=pattern_of()).cast(dict(SCHEMA))  # type: ignore[arg-type]


def pattern_of() -> pl.Expr:
    """The pattern rule of the module's table, over the columns it names."""
    lexical = pl.max_horizontal("top_token_coverage", "top_ngram_coverage") >= LEXICAL
    return (
        pl.when(lexical)
        .then(pl.lit("lexical"))
        .when(pl.col("concentration") >= TOKEN_SET)
        .then(pl.lit("mixed"))
        .when(pl.col("coherence") >= COHERENT)
        .then(pl.lit("contextual"))
        .when(pl.col("coherence").is_not_null())
        .then(pl.lit("diffuse"))
        .otherwise(pl.lit(None, pl.String))
    )


def plan(context: StageContext) -> Plan:
    def execute(problems: Problems) -> Product:
        sampled = pl.read_parquet(
            context.path(layout.SAMPLED_EXAMPLES),
            columns=["feature_id", "prompt_id", "quantile", "max_activation", "activation_pairs"],
        )
        coherence = (
            context.read("activation_similarity", ["feature_id", "mean_pairwise_similarity"])
            if context.has("activation_similarity")
            else None
        )
        table = activation_patterns(sampled, context.prompt_tokens(), coherence)
        counts = table["pattern"].value_counts()
        statistics = {"features": table.height} | {
            str(pattern): int(count) for pattern, count in counts.iter_rows() if pattern is not None
        }
        notes = []
        if coherence is None:
            notes.append(
                "no activation similarity: latents that are neither lexical nor mixed get no pattern "
                "(contextual and diffuse need the examples' coherence)"
            )
        statistics["mean_top_token_coverage"] = float(np.nan_to_num(table["top_token_coverage"].mean() or 0.0))
        return Product(data=table, rows=table.height, statistics=statistics, notes=notes)

    return Plan(key={"lexical": LEXICAL, "token_set": TOKEN_SET, "coherent": COHERENT}, execute=execute)


STAGE = Stage(
    name="activation_patterns",
    output=layout.ACTIVATION_PATTERNS,
    version=1,
    plan=plan,
    reads=("activation_embeddings",),
    optional_reads=("activation_similarity",),
    description="what kind of latent each one is: the tokens at its peaks, their coverage, its pattern",
)
