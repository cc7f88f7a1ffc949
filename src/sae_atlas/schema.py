"""The schemas of every file sae-atlas writes.

The five master files keep the schema the study's downstream consumers already read (DESIGN.md §2):
their contract columns come first, in this order, and may never be renamed, retyped or dropped.
Columns sae-atlas adds go after them (``ADDED_COLUMNS``).
"""

from __future__ import annotations

import polars as pl

from sae_atlas import layout
from sae_atlas.score_methods import CLASSIFICATION_COLUMNS

DECODER_NEIGHBOUR = pl.Struct({"feature_id": pl.UInt32, "cosine_similarity": pl.Float32})
SEMANTIC_NEIGHBOUR = pl.Struct({"explainer": pl.Categorical(), "cosine_similarity": pl.Float32})
# The score methods the contract's ``scores`` struct of features.parquet holds, in its order. Other
# methods (intruder, …) live in stages/scores.parquet and reach users through the metric registry.
CONTRACT_SCORE_FIELDS = ("fuzz", "simulation", "detection", "embedding")
SCORER_SCORES = pl.Struct({"scorer": pl.String, **{method: pl.Float64 for method in CONTRACT_SCORE_FIELDS}})
ACTIVATION_PAIR = pl.Struct({"token_position": pl.UInt32, "activation_value": pl.Float32})

FEATURES = pl.Schema(
    {
        "feature_id": pl.Int64,
        "sae_id": pl.Categorical(),
        "explanation_method": pl.Categorical(),
        "llm_explainer": pl.Categorical(),
        "explanation_text": pl.String,
        "decoder_similarity": pl.List(DECODER_NEIGHBOUR),
        "semantic_similarity": pl.List(SEMANTIC_NEIGHBOUR),
        "scores": pl.List(SCORER_SCORES),
        # added: false for delphi's sentinel texts ("Explanation could not be parsed.", ...)
        "explanation_ok": pl.Boolean,
    }
)

EXPLANATION_EMBEDDINGS = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "sae_id": pl.Categorical(),
        "data_source": pl.Categorical(),
        "llm_explainer": pl.Categorical(),
        "explanation_text": pl.String,
        "embedding": pl.List(pl.Float32),
        "explanation_ok": pl.Boolean,
    }
)

ACTIVATION_EXAMPLES = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "sae_id": pl.Categorical(),
        "prompt_id": pl.UInt32,
        "prompt_tokens": pl.List(pl.String),
        "num_activations": pl.UInt32,
        "max_activation": pl.Float32,
        "activation_pairs": pl.List(ACTIVATION_PAIR),
    }
)

ACTIVATION_EMBEDDINGS = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "sae_id": pl.Categorical(),
        "prompt_ids": pl.List(pl.UInt32),
        "embeddings": pl.List(pl.List(pl.Float32)),
    }
)

ACTIVATION_EXAMPLE_SIMILARITY = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "sae_id": pl.Categorical(),
        "num_examples_sampled": pl.UInt32,
        "mean_pairwise_similarity": pl.Float32,
        "std_pairwise_similarity": pl.Float32,
        "min_pairwise_similarity": pl.Float32,
        "max_pairwise_similarity": pl.Float32,
    }
)

MASTER_SCHEMAS: dict[str, pl.Schema] = {
    layout.FEATURES: FEATURES,
    layout.EXPLANATION_EMBEDDINGS: EXPLANATION_EMBEDDINGS,
    layout.ACTIVATION_EXAMPLES: ACTIVATION_EXAMPLES,
    layout.ACTIVATION_EMBEDDINGS: ACTIVATION_EMBEDDINGS,
    layout.ACTIVATION_SIMILARITY: ACTIVATION_EXAMPLE_SIMILARITY,
}

# Columns sae-atlas appends after the contract ones; everything before them is the contract.
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    layout.FEATURES: ("explanation_ok",),
    layout.EXPLANATION_EMBEDDINGS: ("explanation_ok",),
}

# Intermediate stage outputs (stages/…): internal, but validated the same way.
STAGE_SCORES = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "data_source": pl.Categorical(),
        "llm_explainer": pl.Categorical(),
        "llm_scorer": pl.Categorical(),
        "method": pl.Categorical(),
        "score": pl.Float64,
        "n_examples": pl.UInt32,
        "n_failed": pl.UInt32,
        "variance": pl.Float64,
        # fuzz / detection: delphi's per-latent classification metrics (score_methods.classification)
        **CLASSIFICATION_COLUMNS,
        # from the run's log/hookpoint_firing_counts.pt: tokens the latent fired on, and that count
        # over the tokens cached (run_config cache_cfg.n_tokens)
        "firing_count": pl.UInt64,
        "firing_frequency": pl.Float64,
        # simulation: the pooled group's correlation (outer distance 0, the paper's headline);
        # the study's `score` stays the mean over every group
        "overall": pl.Float64,
        # the score per activation quantile (0 = the top one, as delphi counts): recall for fuzz /
        # detection, AUC against all non-activating examples for embedding, the group's correlation
        # for simulation
        "by_quantile": pl.List(pl.Struct({"quantile": pl.Int16, "score": pl.Float64, "examples": pl.UInt32})),
    }
)

STAGE_DECODER_SIMILARITY = pl.Schema({"feature_id": pl.UInt32, "decoder_similarity": pl.List(DECODER_NEIGHBOUR)})

# The examples stage 4 sampled and embedded, in the order embedded (feature, then its top example
# first), with their activations: what the query layer shows, without sampling again and without
# reading activation_examples.parquet.
STAGE_SAMPLED_EXAMPLES = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "prompt_id": pl.UInt32,
        "quantile": pl.UInt8,  # sampling bin, 0 = the lowest activations
        "max_activation": pl.Float32,
        "max_position": pl.UInt32,  # the window's centre: position of the largest activation
        "window_start": pl.UInt32,
        "window_stop": pl.UInt32,
        "activation_pairs": pl.List(ACTIVATION_PAIR),
    }
)


# The prompt table stage 0a writes beside the examples: each prompt's tokens once.
STAGE_PROMPTS = pl.Schema({"prompt_id": pl.UInt32, "prompt_tokens": pl.List(pl.String)})

# The stage outputs, checked by ``validate`` like the master files (leading columns, in order).
# Every scored record of fuzz, detection, embedding, intruder and example_embedding files, and every
# sequence of simulation files (scorer evidence): one row each, its example stored once per latent
# in STAGE_SCORE_EXAMPLES (every run of a study reuses them).
STAGE_SCORE_RECORDS = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "data_source": pl.String,
        "method": pl.String,
        "record": pl.UInt32,
        "activating": pl.Boolean,
        "quantile": pl.Int16,
        "prediction": pl.Boolean,
        "probability": pl.Float64,
        "correct": pl.Boolean,
        "outcome": pl.Float64,
        "example_id": pl.UInt32,
        # simulation's sequences only: the simulator's per-token activations and the true ones
        "simulated_activations": pl.List(pl.Float32),
        "true_activations": pl.List(pl.Float32),
    }
)
STAGE_SCORE_EXAMPLES = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "example_id": pl.UInt32,
        "str_tokens": pl.List(pl.String),
        "activations": pl.List(pl.Float32),
    }
)

# Every latent's firing count in each run that has delphi's counts (log/hookpoint_firing_counts.pt
# covers the whole SAE, explained or not), and that count over the tokens of the run's cache.
STAGE_FIRING = pl.Schema(
    {
        "data_source": pl.String,
        "feature_id": pl.UInt32,
        "firing_count": pl.UInt64,
        "firing_frequency": pl.Float64,
    }
)

# What kind of latent each one is (stages/activation_patterns.py): the tokens at its peaks, their
# coverage, its pattern.
STAGE_ACTIVATION_PATTERNS = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "examples": pl.UInt32,
        "tokens": pl.UInt32,  # activating tokens: at half their example's peak or more
        "top_token": pl.String,
        "top_token_coverage": pl.Float32,
        "top_tokens": pl.List(pl.String),
        "concentration": pl.Float32,  # the chance two activating tokens are the same token
        "top_ngram": pl.String,
        "top_ngram_coverage": pl.Float32,
        "coverage_by_quantile": pl.List(pl.Float32),  # index 0 = the top activations
        "coherence": pl.Float32,
        "pattern": pl.String,  # lexical, mixed, contextual, diffuse; null: not decidable
    }
)

# Why each explanation fails (stages/diagnosis.py): one row per (feature, explainer).
STAGE_DIAGNOSIS = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "explainer": pl.String,
        "pattern": pl.String,  # the latent's, from stages/activation_patterns.parquet
        "top_token": pl.String,
        "top_token_coverage": pl.Float32,
        "coherence": pl.Float32,
        "names_top_token": pl.Boolean,
        "names_top_tokens": pl.Float32,  # share of the latent's five top tokens the explanation names
        "agreement": pl.Float32,  # mean cosine to the other explainers' texts
        "claims": pl.UInt16,  # from stages/claims.parquet
        "corroborated_share": pl.Float32,  # of its claims, those another explainer also makes
        "fuzz": pl.Float32,
        "false_positive_rate": pl.Float32,
        "top_quantile_recall": pl.Float32,
        "low_quantile_recall": pl.Float32,
        "quantile_drop": pl.Float32,
        "cause": pl.String,
        "cause_evidence": pl.String,
    }
)

# What each explanation claims (stages/claims.py): one row per claim.
STAGE_CLAIMS = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "explainer": pl.String,
        "claim": pl.UInt16,  # its index in the explanation
        "text": pl.String,
        "quoted": pl.Boolean,  # a quoted example
        "closest_explainer": pl.String,  # whose claim about the same latent is closest
        "closest_cosine": pl.Float32,
        "corroborated": pl.Boolean,
    }
)

# Every latent's place on the map (stages/latent_map.py).
STAGE_LATENT_MAP = pl.Schema({"feature_id": pl.UInt32, "x": pl.Float32, "y": pl.Float32})

# Every latent's family and subfamily, named, with its map coordinates (stages/families.py).
STAGE_FAMILIES = pl.Schema(
    {
        "feature_id": pl.UInt32,
        "family_id": pl.UInt32,  # 0 = the largest family
        "family_size": pl.UInt32,
        "family_name": pl.String,  # null: no latent of the family is explained
        "subfamily_id": pl.UInt32,  # numbered across the study; nested in the family
        "subfamily_size": pl.UInt32,
        "subfamily_name": pl.String,
        "x": pl.Float32,
        "y": pl.Float32,
    }
)

# Pairs of decoder neighbours worth a look (stages/family_pairs.py): one row per pair and kind
# (per explainer for "same words").
STAGE_FAMILY_PAIRS = pl.Schema(
    {
        "feature_id": pl.UInt32,  # the lower id of the two
        "neighbour_id": pl.UInt32,
        "kind": pl.String,  # same words, split candidate, near-duplicate decoders
        "explainer": pl.String,  # same words: whose explanations; otherwise null
        "decoder_cosine": pl.Float32,
        "explanation_cosine": pl.Float32,  # same words: that explainer's; split: the highest over explainers
        "narrower_id": pl.UInt32,  # split candidates: the narrower latent of the two
        "same_family": pl.Boolean,
        "family_id": pl.UInt32,  # feature_id's family
        "evidence": pl.String,
    }
)

STAGE_SCHEMAS: dict[str, pl.Schema] = {
    layout.SCORES: STAGE_SCORES,
    layout.DECODER_SIMILARITY: STAGE_DECODER_SIMILARITY,
    layout.PROMPTS: STAGE_PROMPTS,
    layout.SAMPLED_EXAMPLES: STAGE_SAMPLED_EXAMPLES,
    layout.SCORE_RECORDS: STAGE_SCORE_RECORDS,
    layout.SCORE_EXAMPLES: STAGE_SCORE_EXAMPLES,
    layout.FIRING: STAGE_FIRING,
    layout.ACTIVATION_PATTERNS: STAGE_ACTIVATION_PATTERNS,
    layout.DIAGNOSIS: STAGE_DIAGNOSIS,
    layout.CLAIMS: STAGE_CLAIMS,
    layout.LATENT_MAP: STAGE_LATENT_MAP,
    layout.FAMILIES: STAGE_FAMILIES,
    layout.FAMILY_PAIRS: STAGE_FAMILY_PAIRS,
}


def contract_columns(name: str) -> pl.Schema:
    """The columns of master file ``name`` that downstream consumers rely on."""
    schema = MASTER_SCHEMAS[name]
    added = ADDED_COLUMNS.get(name, ())
    return pl.Schema({column: dtype for column, dtype in schema.items() if column not in added})


def schema_differences(actual: pl.Schema, expected: pl.Schema) -> list[str]:
    """How ``actual`` breaks ``expected``: missing, retyped or reordered leading columns.

    Extra columns after the expected ones are allowed (the contract lets files grow at the end).
    """
    problems = []
    actual_names = list(actual.names())
    for position, (name, dtype) in enumerate(expected.items()):
        if name not in actual:
            problems.append(f"column {name!r} is missing")
            continue
        if actual[name] != dtype:
            problems.append(f"column {name!r} is {actual[name]}, expected {dtype}")
        if actual_names.index(name) != position:
            problems.append(f"column {name!r} is at position {actual_names.index(name)}, expected {position}")
    return problems
