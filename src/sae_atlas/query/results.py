"""What the query layer returns, typed: one pydantic model per result of
:class:`~sae_atlas.query.atlas.Atlas` (and of the page data functions built on it).

The JSON API declares these as its response models (so the OpenAPI schema documents every field);
the HTML pages, the CLI's ``--json``, ``report`` and the exports read the same dicts. Models whose
fields follow the metric registry (a column per metric) or the contract (the ``scores`` struct of
features.parquet) are generated from them, so a new metric needs no edit here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from sae_atlas import metrics
from sae_atlas.schema import CONTRACT_SCORE_FIELDS


def _metric_fields(chosen) -> dict:
    return {metric.name: (float | None, Field(description=metric.description)) for metric in chosen}


# One entry of the contract's ``scores`` struct of features.parquet.
ScorerScores = create_model(
    "ScorerScores", scorer=(str, ...), **{field: (float | None, None) for field in CONTRACT_SCORE_FIELDS}
)

# Every score metric of the registry, per scorer.
ScorerMetrics = create_model("ScorerMetrics", scorer=(str, ...), **_metric_fields(metrics.SCORE_METRICS))


class SemanticSimilarity(BaseModel):
    explainer: str
    cosine_similarity: float | None


class QuantileScore(BaseModel):
    scorer: str
    method: str
    quantile: int = Field(description="activation quantile, 0 = the top one (delphi's convention)")
    score: float | None = Field(
        description="fuzz / detection: recall; embedding: AUC against every non-activating example; "
        "simulation: the quantile group's correlation"
    )
    examples: int


class Explanation(BaseModel):
    explainer: str
    explanation_text: str
    explanation_ok: bool
    explanation_method: str | None
    scores: list[ScorerScores] = Field(description="the contract's scores struct, as features.parquet holds it")
    semantic_similarity: list[SemanticSimilarity]
    metrics: list[ScorerMetrics] = Field(description="every score metric, per scorer")
    by_quantile: list[QuantileScore] = Field(description="each score method's value per activation quantile")


class NeighbourExplanation(BaseModel):
    explainer: str
    text: str
    ok: bool


class Neighbour(BaseModel):
    feature_id: int
    cosine_similarity: float
    explanations: list[NeighbourExplanation]


class ActivationSimilarity(BaseModel):
    num_examples_sampled: int
    mean_pairwise_similarity: float | None
    std_pairwise_similarity: float | None
    min_pairwise_similarity: float | None
    max_pairwise_similarity: float | None


class ActivationExample(BaseModel):
    prompt_id: int
    quantile: int = Field(description="sampling bin, 0 = lowest activations")
    max_activation: float
    max_position: int
    window: list[int] = Field(description="[start, stop) of the embedded window")
    tokens: list[str]
    activations: list[float] = Field(description="activation value of every token")


class ActivationPattern(BaseModel):
    """What kind of latent it is, from the tokens it activates on (stages/activation_patterns.py)."""

    pattern: str | None = Field(description="lexical, mixed, contextual or diffuse (rules in the stage's docstring)")
    examples: int
    tokens: int = Field(description="activating tokens: at half their example's peak or more")
    top_token: str | None
    top_token_coverage: float | None = Field(description="share of the activating tokens that are the top token")
    top_tokens: list[str] | None
    concentration: float | None = Field(description="chance that two activating tokens are the same token")
    top_ngram: str | None
    top_ngram_coverage: float | None
    coverage_by_quantile: list[float] | None = Field(description="the top token's share per quantile, top first")
    coherence: float | None = Field(description="mean pairwise similarity of the examples' windows")


class Claim(BaseModel):
    """One claim of an explanation (stages/claims.py)."""

    claim: int = Field(description="its index in the explanation")
    text: str
    quoted: bool = Field(description="a quoted example")
    corroborated: bool = Field(description="another explainer of the latent makes a claim within the cosine")
    closest_explainer: str | None
    closest_cosine: float | None


class ExplanationDiagnosis(BaseModel):
    """What an explanation claims against what its latent does, and its cause (stages/diagnosis.py)."""

    claims: int | None = Field(description="how many claims it makes")
    corroborated_share: float | None = Field(description="of its claims, those another explainer also makes")
    claim_list: list[Claim]

    names_top_token: bool | None
    names_top_tokens: float | None = Field(description="share of the latent's five top tokens it names")
    false_positive_rate: float | None = Field(description="non-activating examples the scorers called activating")
    top_quantile_recall: float | None
    low_quantile_recall: float | None
    quantile_drop: float | None
    cause: str | None
    cause_evidence: str | None = Field(description="the numbers that triggered the cause")


class FeatureDiagnosis(BaseModel):
    pattern: ActivationPattern | None
    explanations: dict[str, ExplanationDiagnosis] = Field(description="by explainer")
    note: str | None = Field(description="why parts are missing")


class FamilyPair(BaseModel):
    feature_id: int
    neighbour_id: int
    kind: str = Field(description="same words, split candidate or near-duplicate decoders")
    explainer: str | None = Field(description="same words: whose explanations")
    decoder_cosine: float
    explanation_cosine: float | None
    narrower_id: int | None = Field(description="split candidates: the narrower latent")
    same_family: bool | None
    evidence: str = Field(description="the numbers behind the pair")


class FeatureFamily(BaseModel):
    family_id: int
    family_name: str | None = Field(description="the words of its explanations that most set it apart")
    family_size: int
    subfamily_id: int
    subfamily_name: str | None
    subfamily_size: int
    members: list[int] = Field(description="latents of its subfamily (the first few)")
    x: float | None
    y: float | None
    pairs: list[FamilyPair] = Field(description="the pairs worth a look this latent is in")


class Feature(BaseModel):
    feature_id: int
    sae_id: str | None
    explanations: list[Explanation]
    decoder_neighbours: list[Neighbour]
    activation_similarity: ActivationSimilarity | None
    activation_examples: list[ActivationExample]
    diagnosis: FeatureDiagnosis
    family: FeatureFamily | None = Field(None, description="its family and pairs (none: no decoder weights)")


# One row of the feature table: a column per metric of the registry.
FeatureRow = create_model(
    "FeatureRow",
    feature_id=(int, ...),
    explainer=(str, ...),
    explanation_text=(str, ...),
    explanation_ok=(bool, ...),
    **_metric_fields(metrics.METRICS),
    verdict=(str | None, Field(None, description="people's current verdict on the explanation")),
    causes=(list[str] | None, Field(None, description="the causes that label gives")),
    label_stale=(bool | None, Field(None, description="the label judged an earlier text of the explanation")),
)


class SearchHit(BaseModel):
    feature_id: int
    explainer: str
    explanation_text: str
    similarity: float


class FeaturePage(BaseModel):
    total: int = Field(description="rows matching the filters, before limit and offset")
    limit: int
    offset: int
    rows: list[FeatureRow]
    hits: list[SearchHit] | None = Field(None, description="with q: the closest explanations")


class SearchResult(BaseModel):
    query: str
    hits: list[SearchHit]


class Histogram(BaseModel):
    metric: str
    description: str
    edges: list[float]
    counts: list[int]
    count: int
    missing: int


class ScatterPoint(BaseModel):
    feature_id: int
    explainer: str
    x: float
    y: float


class Scatter(BaseModel):
    x: str
    y: str
    points: list[ScatterPoint]
    total: int = Field(description="rows with both metrics")
    shown: int = Field(description="points returned (a fixed sample above 5,000)")
    correlation: float | None


class Plots(BaseModel):
    histogram: Histogram
    scatter: Scatter


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")
    sae_id: str | None
    features: int
    rows: int
    explainers: list[str]
    scorers: list[str]
    files: dict[str, int | None]
    metrics: dict[str, str]
    mean_scores: list[dict]
    mean_semantic_similarity: list[dict]
    mean_activation_similarity: float | None


Interval = Literal["bootstrap", "t"]
INTERVAL = "percentile bootstrap over latents, or Student-t below settings.small_sample latents"


class ComparisonSettings(BaseModel):
    resamples: int
    seed: int
    confidence: float
    metrics: list[str]
    latents: Literal["common", "all"] = Field(
        description="common: every metric on the latents every explainer × scorer run scored; all: every latent "
        "with a value"
    )
    exclude_identical: bool = Field(description="latents where two explainers wrote the same text left out")
    small_sample: int = Field(description="below this many latents an interval is Student-t, not bootstrap")
    weights: str | None = Field(description="what the weighted means are weighted by (None: no firing counts)")


class MetricSelection(BaseModel):
    metric: str
    with_values: int = Field(description="latents with a value of the metric in any run")
    common: int = Field(description="latents every explainer × scorer run scored")
    used: int = Field(description="latents the metric is compared on")


class Selection(BaseModel):
    latents: Literal["common", "all"]
    identical_latents: int = Field(description="latents where two explainers wrote the same text")
    excluded_identical: int = Field(description="of those, left out of every statistic")
    metrics: list[MetricSelection]


class RankedExplainer(BaseModel):
    explainer: str
    rank: int
    mean: float = Field(description="mean over the common latents of the score averaged over scorers")
    ci_low: float | None = Field(description="none where there is no interval (a single latent)")
    ci_high: float | None
    interval: Interval


class Ranking(BaseModel):
    metric: str
    latents: int
    chance: float = Field(description="the metric's chance level")
    explainers: list[RankedExplainer]


class HeadlinePair(BaseModel):
    metric: str
    first: str = Field(description="the explainer ranked higher")
    second: str
    latents: int
    mean_difference: float = Field(description="first minus second, averaged over scorers, then over latents")
    ci_low: float | None = Field(description="none where there is no interval (a single latent)")
    ci_high: float | None
    interval: Interval = Field(description=INTERVAL + "; latents resampled with all their scorers")
    wilcoxon_p: float | None
    holm_p: float | None = Field(description="Holm-adjusted over the headline family")
    significant: bool = Field(description="holm_p below 1 − confidence")
    per_scorer: dict[str, float] = Field(description="the mean difference by each scorer alone")
    scorers_agreeing: int = Field(description="scorers whose own difference has the averaged difference's sign")
    interaction_p: float | None = Field(description="does the difference depend on the scorer (not adjusted)")
    interaction_test: str | None
    identical_texts: int = Field(description="of the latents, those where both explainers wrote the same text")


class Headline(BaseModel):
    metrics: list[str] = Field(description="the headline metrics the output has: the Holm family's metrics")
    family: str = Field(description="the fixed Holm family")
    rankings: list[Ranking]
    pairs: list[HeadlinePair]
    sentences: list[str]


class SummaryRow(BaseModel):
    explainer: str
    scorer: str
    metric: str
    latents: int
    mean: float
    median: float
    ci_low: float | None
    ci_high: float | None
    interval: Interval
    weighted_mean: float | None = Field(description="mean weighted by firing frequency, as delphi weights F1")


class PairedRow(BaseModel):
    first: str
    second: str
    scorer: str
    metric: str
    latents: int = Field(description="latents both explainers explained and the scorer scored")
    mean_difference: float = Field(description="first minus second")
    ci_low: float | None
    ci_high: float | None
    interval: Interval
    wilcoxon_p: float | None = Field(description="not adjusted: exploratory (the headline holds the tests)")
    wins: int
    ties: int
    losses: int


class ScorerAgreementRow(BaseModel):
    explainer: str = Field(description="agreement is measured on one explainer's explanations at a time")
    metric: str
    first: str
    second: str
    latents: int
    spearman: float | None
    spearman_low: float | None
    spearman_high: float | None
    kendall: float | None = Field(description="Kendall's τ-b")
    top_decile_overlap: float | None = Field(description="ties at the boundary averaged over every tie-break")
    top_decile_chance: float | None = Field(description="the overlap of two random deciles")


class ReliabilityRow(BaseModel):
    explainer: str
    metric: str
    scorers: int
    latents: int
    alpha: float | None = Field(description="Krippendorff's α, interval metric, latents as units")
    ci_low: float | None
    ci_high: float | None


class RankingAgreement(BaseModel):
    metric: str
    consensus: list[str] = Field(description="the headline's order of the explainers")
    orders: dict[str, list[str]] = Field(description="each scorer's own order")
    agreeing: int
    scorers: int


class ProfilePoint(BaseModel):
    explainer: str
    latents: int
    mean: float
    ci_low: float | None
    ci_high: float | None
    interval: Interval


class QuantilePoint(ProfilePoint):
    method: str
    quantile: int = Field(description="activation quantile, 0 = the top activations")


class FiringPoint(ProfilePoint):
    metric: str
    bin: int
    frequency_low: float
    frequency_high: float


class ErrorRate(ProfilePoint):
    scorer: str
    method: str
    quantile: int = Field(description="activation quantile (0 = top); -1: the non-activating examples")
    kind: Literal["false negatives", "false positives"]


class Profiles(BaseModel):
    by_quantile: list[QuantilePoint]
    by_firing: list[FiringPoint]


class SmallSample(BaseModel):
    where: str
    latents: int


class Disagreement(BaseModel):
    feature_id: int
    cosine: float
    first_text: str | None
    second_text: str | None


class ExplainerAgreementRow(BaseModel):
    first: str
    second: str
    latents: int
    mean: float
    min: float
    q1: float
    median: float
    q3: float
    max: float
    correlation_with_scores: dict[str, float | None]
    disagreements: list[Disagreement]


class ComparabilityWarning(BaseModel):
    setting: str = Field(description="the run_config setting, or the data check, that fired")
    message: str
    severity: str = "warning"
    latents: int | None = Field(None, description="data checks: the latents concerned")
    feature_ids: list[int] = Field(default_factory=list, description="data checks: the first of those latents")


class RunSettings(BaseModel):
    data_source: str
    explainer: str
    scorer: str
    settings: dict


class Comparability(BaseModel):
    runs: list[RunSettings]
    warnings: list[ComparabilityWarning]
    not_recorded: list[str]
    comparable: bool = Field(description="no setting differs and no data check fired")


class DiagnosisRate(BaseModel):
    quantity: Literal["cause", "names", "corroborated", "fuzz"] = Field(
        description="cause: the share of explanations with that cause; names: the share naming the top token "
        "of lexical latents; corroborated: the mean share of an explanation's claims another explainer makes; "
        "fuzz: the mean fuzz on latents of that kind"
    )
    explainer: str
    kind: str = Field(description="the cause, or the kind of latent")
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    interval: Interval
    n: int = Field(description="latents with a value")


class DiagnosisGap(BaseModel):
    explainer: str
    gap: float | None = Field(description="mean fuzz on lexical latents minus on contextual ones")
    ci_low: float | None
    ci_high: float | None


class BestOnKind(BaseModel):
    kind: str
    explainer: str
    fuzz: float
    latents: int
    runner_up: str | None
    clear: bool = Field(description="its interval lies above the runner-up's")


class DiagnosisRates(BaseModel):
    latents: int
    unit: str = Field(description="the unit of resampling")
    family: str = Field(description="the multiple-testing family (none: descriptive intervals)")
    patterns: dict[str, int] = Field(description="latents of each kind")
    rates: list[DiagnosisRate]
    gaps: list[DiagnosisGap]
    best: list[BestOnKind]
    sentences: list[str]


class SameWordsRate(BaseModel):
    explainer: str
    pairs: int = Field(description="decoder-neighbour pairs it explained both latents of")
    same_words: int = Field(description="of them, those it explained in near-identical words")
    rate: float | None = Field(description="same_words / pairs: lower is better")
    low: float | None
    high: float | None


class SameWordsRates(BaseModel):
    threshold: float = Field(description="explanation-embedding cosine at which two explanations are the same words")
    unit: str = Field(description="the unit of resampling")
    family: str = Field(description="the multiple-testing family (none: descriptive intervals)")
    confidence: float
    explainers: list[SameWordsRate]


class MapPoints(BaseModel):
    colour: str = Field(description="what the points are coloured by")
    total: int
    categories: list[str] | None = Field(description="a category colour's names, by code; none: numbers")
    x_range: list[float | None]
    y_range: list[float | None]
    feature_id: list[int]
    x: list[float]
    y: list[float]
    family_id: list[int]
    family_names: list[str | None] = Field(description="each family's name, by family id")
    family_sizes: list[int] = Field(description="each family's size, by family id")
    value: list[float | int | None] = Field(description="each point's colour value (a category's code)")
    colours: list[str] = Field(description="what the points can be coloured by")
    explainer: str | None
    note: str | None = Field(None, description="why the map is empty")


class MapExplanations(BaseModel):
    feature_id: int
    family_name: str | None
    explanations: list[dict[str, str | None]]


class Comparison(BaseModel):
    settings: ComparisonSettings
    explainers: list[str]
    scorers: list[str]
    metrics: dict[str, str]
    selection: Selection
    headline: Headline
    summary: list[SummaryRow]
    paired: list[PairedRow]
    scorer_agreement: list[ScorerAgreementRow]
    scorer_reliability: list[ReliabilityRow]
    ranking_agreement: list[RankingAgreement]
    profiles: Profiles
    explainer_agreement: list[ExplainerAgreementRow]
    comparability: Comparability
    identical_text_control: list[PairedRow] = Field(
        description="paired differences on the latents where two explainers wrote the same text: the "
        "scorers' noise, which should cover 0"
    )
    error_anatomy: list[ErrorRate] = Field(
        description="per explainer × scorer × method, the mean error rate on activating examples by quantile "
        "(false negatives) and on non-activating ones (false positives), from the scored records"
    )
    small_samples: list[SmallSample] = Field(description="the intervals that are Student-t because n is small")
    people: AgainstPeople | None = Field(
        None, description="the scorers and explainers against people's current labels (none: nothing labelled)"
    )
    diagnosis: DiagnosisRates | None = Field(
        None, description="each explainer's causes, named tokens and scores by kind of latent (none: no diagnosis)"
    )
    same_words: SameWordsRates | None = Field(
        None, description="how often each explainer explains distinct decoder neighbours in the same words"
    )


Verdict = Literal["correct", "wrong", "failed"]


class EvidenceRun(BaseModel):
    data_source: str
    explainer: str
    scorer: str


class EvidenceExample(BaseModel):
    example_id: int
    str_tokens: list[str]
    activations: list[float] | None
    activating: bool | None
    quantile: int | None = Field(description="activation quantile, 0 = top; null for non-activating examples")
    verdicts: list[Verdict | None] = Field(description="per run (in ``runs``' order); null: not scored by it")
    spread: float = Field(description="max − min over explainers of their share of correct verdicts")
    disagree: bool = Field(description="two scorers of one explainer's explanation decided differently")
    all_miss: bool = Field(description="every explainer was judged on it and none of its runs got it right")
    failed: bool = Field(description="a run's batch failed on it")


class MethodEvidence(BaseModel):
    method: str
    examples: list[EvidenceExample]
    total: int
    counts: dict[str, int] = Field(description="examples disagreed on, missed by all, failed")


class Evidence(BaseModel):
    feature_id: int
    show: Literal["all", "disagree", "all_miss", "failed"]
    runs: list[EvidenceRun]
    methods: list[MethodEvidence]


class Label(BaseModel):
    label_id: str
    feature_id: int
    explainer: str | None = Field(description="none: a label of the latent itself")
    verdict: Literal["good", "partial", "bad", "unsure"]
    causes: list[str]
    note: str
    author: str
    created_at: str
    origin: str = Field(description="where it was given: triage:<order>, feature, cli, api")
    stale: bool = Field(description="the explanation's text changed since it was judged")


class TriageItem(BaseModel):
    feature_id: int
    explainer: str
    explanation_text: str
    priority: float | None = Field(description="the order's measure: larger is judged first")


class Triage(BaseModel):
    order: str
    order_used: str = Field(description="the order the queue has (uncertainty falls back until it can be trained)")
    note: str
    unbiased: bool = Field(description="labels taken in this order estimate explainers' shares without bias")
    explainer: str | None
    position: int
    total: int = Field(description="explanations not yet labelled, in this order")
    item: TriageItem | None
    feature: Feature | None
    labels: list[Label] = Field(description="the current labels of this latent")
    verdicts: list[str]
    causes: list[str]


class LabelProgress(BaseModel):
    explainer: str
    explanations: int
    labelled: int
    good: int
    partial: int
    bad: int
    unsure: int


class ScorerAgainstPeople(BaseModel):
    scorer: str
    n: int
    n_good: int
    n_bad: int
    auc: float | None = Field(description="ROC-AUC of the score for good against bad verdicts")
    auc_low: float | None
    auc_high: float | None
    spearman: float | None = Field(description="Spearman's rho of the score and the verdict (bad < partial < good)")
    spearman_low: float | None
    spearman_high: float | None


class ExplainerAgainstPeople(BaseModel):
    explainer: str
    n: int
    share_good: float
    low: float | None
    high: float | None


class AgainstPeople(BaseModel):
    n: int
    scorers: list[ScorerAgainstPeople]
    explainers: list[ExplainerAgainstPeople]
    origins: dict[str, int] = Field(description="labels used, by where they were given")
    unbiased: bool = Field(description="every label used came from the random triage order")
    resamples: int
    confidence: float
    unit: str = Field(description="the unit of resampling of every interval")


class LabelSummary(BaseModel):
    metric: str | None = Field(description="the score the scorers are judged by")
    progress: list[LabelProgress]
    latent_labels: int = Field(description="labels of latents themselves")
    stale: int = Field(description="labels whose explanation changed since")
    people: AgainstPeople | None


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Problem(BaseModel):
    """Why a request was refused (404, 414, 422): one line."""

    detail: str


Comparison.model_rebuild()
