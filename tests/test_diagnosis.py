"""Diagnosis: each latent's activation pattern and each explanation's claims and cause, checked by
hand on small tables (a latent that fires on " Paris", explanations that name it or not, counts
worked out) and against what synth plants (pattern kinds, explanations that miss the token)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from sae_atlas import Atlas, layout
from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline
from sae_atlas.query import diagnosis_rates
from sae_atlas.query.resampling import Resamples
from sae_atlas.stages import activation_patterns, claims, diagnosis
from sae_atlas.synth import SynthOptions, synthesize

# Two prompts of six tokens, SentencePiece-style word marks.
PROMPTS = pl.Series(
    [
        ["<bos>", "▁We", "▁flew", "▁to", "▁Paris", "▁today"],
        ["<bos>", "▁Paris", "▁is", "▁big", "▁and", "▁old"],
    ]
)


def example(feature: int, prompt: int, quantile: int, pairs: list[tuple[int, float]]) -> dict:
    return {
        "feature_id": feature,
        "prompt_id": prompt,
        "quantile": quantile,
        "max_activation": max(value for _, value in pairs),
        "activation_pairs": [{"token_position": position, "activation_value": value} for position, value in pairs],
    }


def sampled(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "feature_id": pl.UInt32,
            "prompt_id": pl.UInt32,
            "quantile": pl.UInt8,
            "max_activation": pl.Float32,
            "activation_pairs": pl.List(pl.Struct({"token_position": pl.UInt32, "activation_value": pl.Float32})),
        },
    )


def test_a_latent_that_fires_on_paris_is_lexical_and_one_on_varied_tokens_is_not():
    rows = [
        # latent 7 peaks on " Paris" in both prompts; the spill after it (0.2 of the peak) is not counted
        example(7, 0, 1, [(4, 10.0), (5, 2.0)]),
        example(7, 1, 0, [(1, 8.0), (2, 1.0)]),
        # latent 9: four activating tokens, all different ("to" twice would be concentration 1/6)
        example(9, 0, 0, [(2, 5.0), (3, 5.0)]),
        example(9, 1, 1, [(3, 4.0), (5, 3.0)]),
    ]
    coherence = pl.DataFrame({"feature_id": [7, 9], "mean_pairwise_similarity": [0.6, 0.2]})
    table = activation_patterns.activation_patterns(sampled(rows), PROMPTS, coherence)
    paris, varied = table.to_dicts()
    assert (paris["pattern"], paris["top_token"], paris["tokens"], paris["top_token_coverage"]) == (
        "lexical",
        "Paris",
        2,
        1.0,
    )
    assert paris["concentration"] == 1.0 and paris["top_tokens"] == ["Paris"]
    # the top token's share per quantile, the top activations first: quantile 1 is the higher bin
    assert paris["coverage_by_quantile"] == [1.0, 1.0]
    assert paris["top_ngram"] == "to Paris" and paris["top_ngram_coverage"] == 0.5
    # four tokens, no two the same: concentration 0 / (4 · 3); coherence 0.2 < 0.35: diffuse
    assert varied["tokens"] == 4 and varied["concentration"] == 0.0 and varied["top_token_coverage"] == 0.25
    assert varied["pattern"] == "diffuse"
    # without the coherence, a latent that is neither lexical nor mixed is undecided, not guessed
    undecided = activation_patterns.activation_patterns(sampled(rows), PROMPTS, None)
    assert undecided["pattern"].to_list() == ["lexical", None]


def test_concentration_is_simpsons_index_by_hand():
    # latent 3: tokens flew, to | to, Paris, today (prompt 0 twice): counts {to: 2, flew, Paris,
    # today: 1} → same ordered pairs 2·1 = 2 of 5·4 = 20; the top token "to" is 2 of 5
    rows = [example(3, 0, 0, [(2, 1.0), (3, 1.0)]), example(3, 0, 1, [(3, 1.0), (4, 1.0), (5, 1.0)])]
    [row] = activation_patterns.activation_patterns(sampled(rows), PROMPTS, None).to_dicts()
    assert row["concentration"] == pytest.approx(2 / 20) and row["top_token"] == "to"
    assert row["top_token_coverage"] == pytest.approx(0.4)
    assert row["pattern"] == "mixed"  # 0.4 < 0.5 is no single token; 0.1 ≥ 0.07 is a small set


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("the word Paris", True),
        ("Mentions of “paris” in travel writing", True),
        ('The token "Paris".', True),
        ("European capitals", False),
        ("Parisian culture", False),  # a word that merely contains the token does not name it
    ],
)
def test_an_explanation_names_the_top_token_as_a_word(text, named):
    explanations = pl.DataFrame({"feature_id": [7], "explainer": ["e"], "explanation_text": [text]})
    patterns = pl.DataFrame({"feature_id": [7], "top_tokens": [["▁Paris", "▁to", ","]]})
    [row] = diagnosis.named_tokens(explanations, patterns).to_dicts()
    assert row["names_top_token"] is named
    # "," is not a word to name: the share is over the two word tokens
    assert row["names_top_tokens"] == (0.5 if named else 0.0)


def scores_row(explainer: str, method: str, fp: int, tn: int, recalls: list[float], score: float = 0.5) -> dict:
    return {
        "feature_id": 1,
        "llm_explainer": explainer,
        "method": method,
        "score": score,
        "false_positives": fp,
        "true_negatives": tn,
        "by_quantile": [{"quantile": q, "score": value, "examples": 5} for q, value in enumerate(recalls)],
    }


def test_false_positives_pool_scorers_and_recall_compares_the_top_and_lowest_quantiles():
    recalls = [1.0, 0.8, 0.9, 0.5, 0.4, 0.3, 0.2]  # quantiles 0 (top) … 6
    scores = pl.DataFrame(
        [
            scores_row("e", "fuzz", 3, 7, recalls),
            scores_row("e", "detection", 1, 9, recalls),
            scores_row("e", "embedding", 10, 0, recalls),  # not a classifier: left out
        ]
    )
    [row] = diagnosis.classifier_evidence(scores).to_dicts()
    assert row["false_positive_rate"] == pytest.approx(4 / 20)
    assert row["top_quantile_recall"] == pytest.approx(0.9)  # (1.0 + 0.8 + 0.9) / 3
    assert row["low_quantile_recall"] == pytest.approx(0.3)  # quantiles 4, 5, 6


def test_each_cause_holds_by_its_rule_and_cites_its_numbers():
    explanations = pl.DataFrame(
        {
            "feature_id": [1, 1, 1, 1],
            "explainer": ["misses", "broad", "top", "fine"],
            "explanation_text": ["European capitals", "Anything at all", "the word Paris", "the word Paris"],
            "explanation_ok": [True] * 4,
            "agreement": [0.9] * 4,
        }
    )
    high, flat = [1.0, 1.0, 1.0, 0.5, 0.4, 0.3, 0.2], [0.9] * 7
    scores = pl.DataFrame(
        [
            scores_row("misses", "fuzz", 1, 9, flat, score=0.5),
            scores_row("broad", "fuzz", 9, 1, flat, score=0.8),
            scores_row("top", "fuzz", 0, 10, high, score=0.8),
            scores_row("fine", "fuzz", 0, 10, flat, score=0.9),
        ]
    )
    patterns = pl.DataFrame(
        {
            "feature_id": [1],
            "pattern": ["lexical"],
            "top_token": ["Paris"],
            "top_token_coverage": [0.9],
            "coherence": [0.5],
            "top_tokens": [["Paris"]],
        }
    )
    table = diagnosis.diagnose(explanations, scores, patterns)
    causes = dict(table.select("explainer", "cause").iter_rows())
    assert causes == {
        "misses": "misses the token pattern",
        "broad": "too broad",
        "top": "describes the top activations only",
        "fine": None,
    }
    evidence = dict(table.select("explainer", "cause_evidence").iter_rows())
    assert "“Paris” is 90 %" in evidence["misses"] and "fuzz 0.5 < 0.7" in evidence["misses"]
    assert "90 % of non-activating examples" in evidence["broad"]
    assert "recall 1.0 on the top 3 quantiles, 0.3 on the lowest 3" in evidence["top"]
    # without activations: no pattern, no token named, and no cause that needs them
    bare = diagnosis.diagnose(explanations, scores, None)
    assert bare["pattern"].is_null().all() and bare["names_top_token"].is_null().all()
    assert "misses the token pattern" not in bare["cause"].to_list()


PLANTED_QUALITY = (0.95, 0.75, 0.45)  # each explainer's hit rate: the rates must rank them so


@pytest.fixture(scope="module")
def planted(tmp_path_factory, embedder):
    corpus = synthesize(
        tmp_path_factory.mktemp("planted"),
        SynthOptions(
            features=1024,
            explained=200,
            explainers=3,
            scorers=2,
            prompts=1000,
            seed=7,
            plant_patterns=True,
            explainer_quality=PLANTED_QUALITY,
        ),
    )
    config = load_config(corpus.config)
    Pipeline(config, embedder=embedder).run()
    return corpus, config


@pytest.mark.slow
def test_the_planted_patterns_and_explanations_that_miss_the_token_are_recovered(planted):
    corpus, config = planted
    truth = pl.read_parquet(corpus.ground_truth)
    found = pl.read_parquet(config.output_dir / layout.ACTIVATION_PATTERNS).join(
        truth.select("feature_id", planted="pattern"), on="feature_id"
    )
    assert set(found["planted"]) == {"lexical", "mixed", "contextual", "diffuse"}
    assert (found["pattern"] == found["planted"]).mean() >= 0.9
    kinds = truth.select("feature_id", "explanations").explode("explanations").unnest("explanations")
    table = pl.read_parquet(config.output_dir / layout.DIAGNOSIS).join(
        kinds.select("feature_id", "explainer", "kind"), on=["feature_id", "explainer"]
    )
    planted_misses, flagged = table["kind"] == "misses the token", table["cause"] == "misses the token pattern"
    assert planted_misses.sum() >= 20
    hits = (planted_misses & flagged).sum()
    assert hits / flagged.sum() >= 0.9 and hits / planted_misses.sum() >= 0.9
    # claims: those of explanations that describe the latent's concept are corroborated, the others not
    aligned = pl.read_parquet(config.output_dir / layout.CLAIMS).join(
        kinds.select("feature_id", "explainer", "kind"), on=["feature_id", "explainer"]
    )
    share = dict(aligned.group_by("kind").agg(pl.col("corroborated").mean()).iter_rows())
    assert share["hit"] >= 0.3 and share["other concept"] <= 0.05 and share["vague"] <= 0.05
    # a named token is named: every planted "names the token" explanation names its latent's top token
    assert table.filter(pl.col("kind") == "names the token")["names_top_token"].mean() >= 0.95
    # and the atlas carries it: a registry column, the feature page's section
    atlas = Atlas(config.output_dir)
    latent = int(table.filter(flagged)["feature_id"][0])
    record = atlas.feature(latent)["diagnosis"]
    assert record["pattern"]["pattern"] == "lexical"
    assert "misses the token pattern" in {row["cause"] for row in record["explanations"].values()}
    assert atlas.features(limit=None)["names_top_tokens"].drop_nulls().len() > 0


@pytest.mark.slow
def test_without_activations_the_activation_columns_are_null_and_the_run_says_why(small_corpus, embedder, tmp_path):
    config = load_config(small_corpus.config)
    config = config.model_copy(update={"activations": None, "output_dir": tmp_path / "out"})
    report = Pipeline(config, embedder=embedder).run()
    stage = next(outcome for outcome in report.outcomes if outcome.name == "diagnosis")
    assert stage.status == "ran" and any("no activations" in note for note in stage.notes)
    table = pl.read_parquet(config.output_dir / layout.DIAGNOSIS)
    assert table["pattern"].is_null().all() and table["names_top_tokens"].is_null().all()
    assert table["false_positive_rate"].drop_nulls().len() == table.height - table["fuzz"].null_count()
    note = Atlas(config.output_dir).feature(int(table["feature_id"][0]))["diagnosis"]["note"]
    assert "no activations" in note


def test_explainer_rates_are_means_over_latents_with_their_intervals_by_hand():
    # two explainers over four latents; latent 4 has no explanation by "b"
    table = pl.DataFrame(
        {
            "feature_id": [1, 1, 2, 2, 3, 3, 4],
            "explainer": ["a", "b", "a", "b", "a", "b", "a"],
            "pattern": ["lexical", "lexical", "lexical", "lexical", "contextual", "contextual", "contextual"],
            "names_top_token": [True, False, True, True, None, None, None],
            "fuzz": [0.9, 0.5, 0.8, 0.7, 0.6, 0.6, 0.4],
            "false_positive_rate": [0.1] * 7,
            "cause": [None, "misses the token pattern", None, None, "too broad", None, None],
        }
    )
    resamples = Resamples(400, 0)
    rates = diagnosis_rates.explainer_rates(table, ["a", "b"], resamples=resamples, confidence=0.9)
    value = {(row["quantity"], row["explainer"], row["kind"]): row for row in rates["rates"]}
    misses = value["cause", "b", "misses the token pattern"]
    assert (misses["mean"], misses["n"]) == (pytest.approx(1 / 3), 3)  # latents 1, 2, 3; latent 4 has no b
    assert value["cause", "a", "too broad"]["mean"] == pytest.approx(1 / 4)
    assert value["names", "a", "lexical"]["mean"] == 1.0 and value["names", "b", "lexical"]["mean"] == 0.5
    fuzz = value["fuzz", "a", "lexical"]
    half = stats.t.ppf(0.95, 1) * np.std([0.9, 0.8], ddof=1) / np.sqrt(2)  # two latents: Student-t
    assert (fuzz["mean"], fuzz["ci_low"], fuzz["ci_high"], fuzz["interval"]) == (
        pytest.approx(0.85),
        pytest.approx(0.85 - half),
        pytest.approx(0.85 + half),
        "t",
    )
    # the gap lexical − contextual: the point by hand; two latents a side: Welch's interval by hand
    [gap_a, gap_b] = rates["gaps"]
    assert gap_a["gap"] == pytest.approx(0.85 - 0.5) and gap_b["gap"] == pytest.approx(0.6 - 0.6)
    a, b = np.var([0.9, 0.8], ddof=1) / 2, np.var([0.6, 0.4], ddof=1) / 2
    freedom = (a + b) ** 2 / (a**2 + b**2)
    half = stats.t.isf(0.05, freedom) * np.sqrt(a + b)
    assert (gap_a["ci_low"], gap_a["ci_high"]) == pytest.approx((0.35 - half, 0.35 + half))
    assert gap_b["ci_low"] is None  # one contextual latent of b: no interval
    assert rates["patterns"] == {"lexical": 2, "contextual": 2}
    [lexical_best, contextual_best] = rates["best"]
    assert (lexical_best["kind"], lexical_best["explainer"]) == ("lexical", "a")
    assert contextual_best["kind"] == "contextual"


def test_the_gap_between_kinds_is_bootstrapped_over_latents_when_both_kinds_are_many():
    rng = np.random.default_rng(1)
    n = 240  # 120 of each kind: the bootstrap, not Welch
    kinds = np.array(["lexical", "contextual"] * (n // 2))
    fuzz = np.where(kinds == "lexical", 0.8, 0.6) + rng.normal(0, 0.1, n)
    table = pl.DataFrame(
        {
            "feature_id": np.arange(n),
            "explainer": ["a"] * n,
            "pattern": kinds,
            "names_top_token": [True] * n,
            "fuzz": fuzz,
            "false_positive_rate": [0.1] * n,
            "cause": [None] * n,
        },
        schema_overrides={"cause": pl.String},
    )
    resamples = Resamples(300, 4)
    [gap] = diagnosis_rates.explainer_rates(table, ["a"], resamples=resamples, confidence=0.9)["gaps"]
    counts = resamples.counts(n).astype(np.float64)
    lexical = kinds == "lexical"
    means = [(counts[:, mask] @ fuzz[mask]) / counts[:, mask].sum(axis=1) for mask in (lexical, ~lexical)]
    expected = np.percentile(means[0] - means[1], [5, 95])
    assert gap["gap"] == pytest.approx(fuzz[lexical].mean() - fuzz[~lexical].mean())
    assert (gap["ci_low"], gap["ci_high"]) == pytest.approx(tuple(expected), abs=1e-4)


@pytest.mark.slow
def test_the_comparison_ranks_the_planted_explainers_by_their_misses(planted):
    _, config = planted
    atlas = Atlas(config.output_dir)
    from sae_atlas.serve.pages import with_people_and_diagnosis

    rates = with_people_and_diagnosis(atlas, {}, {"resamples": 500})["diagnosis"]
    by = {(row["quantity"], row["explainer"], row["kind"]): row["mean"] for row in rates["rates"]}
    explainers = atlas.explainers  # in the order of PLANTED_QUALITY
    misses = [by["cause", explainer, "misses the token pattern"] for explainer in explainers]
    names = [by["names", explainer, "lexical"] for explainer in explainers]
    assert misses == sorted(misses) and misses[0] < misses[-1]  # the best explainer misses least
    assert names == sorted(names, reverse=True) and names[0] > names[-1]
    assert rates["sentences"] and all("latents" in sentence for sentence in rates["sentences"])


def test_an_explanation_is_split_into_clauses_list_items_and_quoted_examples():
    explanations = pl.DataFrame(
        {
            "feature_id": [1, 1],
            "explainer": ["a", "b"],
            "explanation_ok": [True, True],
            "explanation_text": [
                'Names of plants such as oak or rose, often in sentences about trees and flowers; "tulip" and "iris"',
                "Tokens referring to calendar months (e.g. “May”, “June”), and sometimes seasons",
            ],
        }
    )
    split = claims.split_claims(explanations)
    assert split.filter(pl.col("explainer") == "a").select("text", "quoted").rows() == [
        ("Names of plants", False),
        ("oak or rose", False),
        ("in sentences about trees and flowers", False),
        ("tulip", True),
        ("iris", True),  # the "and" between the two quotes is no claim
    ]
    assert split.filter(pl.col("explainer") == "b")["text"].to_list() == [
        "Tokens referring to calendar months",
        "sometimes seasons",
        "May",
        "June",
    ]
    assert split["claim"].to_list() == [0, 1, 2, 3, 4, 0, 1, 2, 3]


def test_a_claim_is_corroborated_by_the_closest_claim_of_another_explainer_of_the_same_latent():
    table = pl.DataFrame(
        {
            "feature_id": [1, 1, 1, 2, 2],
            "explainer": ["a", "a", "b", "a", "b"],
            "claim": [0, 1, 0, 0, 0],
            "text": ["x", "y", "z", "u", "v"],
            "quoted": [False] * 5,
        }
    )
    angle = np.deg2rad([0, 10, 40, 0, 70])  # unit vectors in a plane: cosine = cos(angle difference)
    vectors = np.column_stack([np.cos(angle), np.sin(angle)]).astype(np.float32)
    rows = claims.corroborate(table, vectors).select("closest_explainer", "closest_cosine", "corroborated").rows()
    # a0's own other claim (10°) is closer but the same explainer's: its match is b's, 40° away
    # (cosines are kept to 4 decimals: an engine's or a cache's last bits must not change them)
    assert rows[0][0] == "b" and rows[0][1] == pytest.approx(np.cos(np.deg2rad(40)), abs=5e-5) and rows[0][2] is True
    assert rows[2][0] == "a" and rows[2][1] == pytest.approx(np.cos(np.deg2rad(30)), abs=5e-5)  # b0's best: a1
    # latent 2: 70° apart, cosine 0.34 < 0.6; a latent's claims never meet another latent's
    assert rows[3][1] == pytest.approx(np.cos(np.deg2rad(70)), abs=5e-5) and rows[3][2] is False
    left, right = claims._pairs(np.array([1, 1, 1, 2, 2]))
    assert sorted(zip(left.tolist(), right.tolist(), strict=True)) == [
        (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 4), (4, 3)
    ]  # fmt: skip
