"""What delphi's explainers and scorers produce for the synthetic latents.

Explainers paraphrase a latent's concept in their own style (a hit), describe another concept or
something vague (a miss), or fail with delphi's sentinel. Scorers then behave as if they had read
the explanation: per-example fuzz / detection verdicts are mostly right for hits and near chance
for misses (recall falling with the quantile), embedding-scorer similarities separate activating
examples only for hits, and simulation correlations are high only for hits. delphi's quirks are
reproduced: shuffled records, null batches of ``n_examples_shown``, ``"nan"`` correlations,
integer zeros for random negatives, float16-valued activations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sae_atlas.synth.concepts import CONCEPTS, VAGUE_DESCRIPTIONS
from sae_atlas.synth.latents import Latents
from sae_atlas.synth.text import PromptCorpus, display_token

MODELS = (
    ("llama", "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"),
    ("gwen", "Qwen/Qwen3-30B-A3B-Instruct-2507-FP8"),
    ("gemma", "google/gemma-3-27b-it"),
    ("gpt", "openai/gpt-oss-120b"),
    ("mistral", "mistralai/Mistral-Small-3.2-24B-Instruct-2506"),
    ("deepseek", "deepseek-ai/DeepSeek-V3.1"),
)
HIT_RATES = (0.85, 0.75, 0.65, 0.8, 0.7, 0.6)
SCORER_BIAS = (0.0, -0.03, 0.02, -0.01, 0.01, -0.02)
SENTINEL = "Explanation could not be parsed."
SENTINEL_RATE = 0.02
EXAMPLE_TOKENS = 8  # the study's score files keep 8-token windows
QUANTILES = 10
PER_QUANTILE = 5
NON_ACTIVATING = 50
EXAMPLES_SHOWN = 5
FAILED_BATCH_RATE = 0.02
NAN_RATE = 0.45


@dataclass(frozen=True)
class Model:
    """An LLM acting as explainer or scorer."""

    short: str
    name: str
    index: int


def models(count: int) -> list[Model]:
    if not 1 <= count <= len(MODELS):
        raise ValueError(f"between 1 and {len(MODELS)} explainers/scorers are supported, got {count}")
    return [Model(short, name, index) for index, (short, name) in enumerate(MODELS[:count])]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _style(explainer: Model, description: str, topic: str, words: list[str]) -> str:
    style = explainer.index % 4
    if style == 0:
        return f'{description}, such as "{words[0]}" and "{words[1]}".'
    if style == 1:
        return (
            f"The pattern involves {_lower_first(description)}, with the strongest activations on tokens like "
            f'"{words[0]}", "{words[1]}" or "{words[2]}", often in sentences about {topic}.'
        )
    if style == 2:
        return f"{description}."
    return f"Tokens referring to {topic} (e.g. “{words[0]}”, “{words[1]}”)"


@dataclass
class Explanation:
    feature_id: int
    explainer: Model
    text: str
    hit: bool
    sentinel: bool
    described: tuple[str, ...]
    # what the explanation does, planted: "hit", "other concept", "vague", "sentinel"; for a
    # lexical latent "names the token" or "misses the token" (its concept, not its word)
    kind: str = ""


def _names_word(explainer: Model, word: str) -> str:
    """A hit on a lexical latent: the explanation names its word, in the explainer's style."""
    style = explainer.index % 4
    if style == 0:
        return f'The word "{word}".'
    if style == 1:
        return f"The token {word}, wherever it occurs, whatever the sentence is about."
    if style == 2:
        return f"Occurrences of “{word}”."
    return f"Mentions of {word.lower()} in running text"


def _lexical(latents: Latents, latent: int, explainer: Model, hit: bool, rng: np.random.Generator) -> Explanation:
    """The explanation of a planted lexical latent: names its word (a hit) or describes its concept
    without the word (misses the token; scorers see a miss)."""
    word = latents.word[latent]
    concept = CONCEPTS[latents.concepts[latent][0]]
    if hit:
        return Explanation(
            latent, explainer, _names_word(explainer, word), True, False, (concept.name,), "names the token"
        )
    text = concept.descriptions[int(rng.integers(3))] + "."
    return Explanation(latent, explainer, text, False, False, (concept.name,), "misses the token")


def explain(
    latents: Latents,
    explained: np.ndarray,
    explainers: list[Model],
    n_concepts: int,
    rng: np.random.Generator,
    hit_rates: tuple[float, ...] | None = None,
) -> list[Explanation]:
    """One explanation per (explained latent, explainer); explainer i hits its latent's concept
    with probability ``hit_rates[i]`` (default: :data:`HIT_RATES`)."""
    hit_rates = hit_rates or HIT_RATES
    result = []
    for latent in explained.tolist():
        concepts = latents.concepts[latent]
        for explainer in explainers:
            if rng.random() < SENTINEL_RATE:
                result.append(Explanation(latent, explainer, SENTINEL, False, True, (), "sentinel"))
                continue
            hit = rng.random() < hit_rates[explainer.index]
            if latents.pattern_of(latent) == "lexical":
                result.append(_lexical(latents, latent, explainer, hit, rng))
                continue
            if hit:
                described = concepts
            elif rng.random() < 0.75:
                others = [index for index in range(n_concepts) if index not in concepts]
                described = (int(rng.choice(others)),)
            else:
                vague = VAGUE_DESCRIPTIONS[int(rng.integers(len(VAGUE_DESCRIPTIONS)))]
                result.append(Explanation(latent, explainer, vague + ".", False, False, (), "vague"))
                continue
            parts = [CONCEPTS[index] for index in described]
            description = " and ".join(
                [parts[0].descriptions[explainer.index % 3]]
                + [_lower_first(part.descriptions[explainer.index % 3]) for part in parts[1:]]
            )
            topic = " or ".join(part.topic for part in parts)
            words = [str(word) for part in parts for word in rng.choice(part.words, size=3, replace=False)]
            text = _style(explainer, description, topic, words)
            if rng.random() < 0.01:  # delphi keeps the LLM's newlines (escaped in the JSON file)
                text = text.replace(", ", ",\n", 1)
            names = tuple(part.name for part in parts)
            result.append(Explanation(latent, explainer, text, hit, False, names, "hit" if hit else "other concept"))
    return result


def copy_first_explainer(explanations: list[Explanation], share: float, rng: np.random.Generator) -> list[Explanation]:
    """On a random ``share`` of the latents, every explainer's explanation becomes the first
    explainer's, word for word (its hit too, so the scorers see the same text and behave alike)."""
    first: dict[int, Explanation] = {}
    for item in explanations:
        first.setdefault(item.feature_id, item)
    copied = {latent for latent in sorted(first) if rng.random() < share}
    return [
        replace(first[item.feature_id], explainer=item.explainer) if item.feature_id in copied else item
        for item in explanations
    ]


@dataclass
class Examples:
    """The test examples delphi drew for one latent (shared by every run, as in delphi)."""

    tokens: list[list[str]]
    activations: list[list]
    distance: list  # quantile 0..9 for activating examples, -1.0 for random negatives
    activating: np.ndarray


def _window(start: int, ctx: int) -> slice:
    start = int(min(max(start, 0), ctx - EXAMPLE_TOKENS))
    return slice(start, start + EXAMPLE_TOKENS)


def draw_examples(corpus: PromptCorpus, latents: Latents, latent: int, rng: np.random.Generator) -> Examples:
    """50 activating windows (5 per quantile, by rank) and 50 random non-activating ones."""
    n_prompts, ctx = corpus.tokens.shape
    triggers = latents.triggers(latent)
    hits = corpus.positions_of(triggers)
    windows, activation_rows = [], []
    n_activating = QUANTILES * PER_QUANTILE
    if len(hits):
        for prompt, position in hits[rng.integers(0, len(hits), n_activating)]:
            span = _window(position - int(rng.integers(0, EXAMPLE_TOKENS)), ctx)
            pieces = corpus.tokens[prompt, span]
            values = np.where(
                np.isin(pieces, triggers), latents.strength[latent] * rng.uniform(0.25, 1.0, EXAMPLE_TOKENS), 0.0
            )
            values[1:] = np.maximum(values[1:], values[:-1] * rng.uniform(0.0, 0.2, EXAMPLE_TOKENS - 1))
            windows.append(pieces)
            activation_rows.append(values.astype(np.float16).astype(float))
        order = np.argsort([-row.max() for row in activation_rows], kind="stable")
        windows = [windows[index] for index in order]
        activation_rows = [activation_rows[index].tolist() for index in order]
    distance: list = [rank // PER_QUANTILE for rank in range(len(windows))]
    for _ in range(NON_ACTIVATING):
        prompt = int(rng.integers(n_prompts))
        span = _window(int(rng.integers(ctx)), ctx)
        windows.append(corpus.tokens[prompt, span])
        activation_rows.append([0] * EXAMPLE_TOKENS)  # delphi writes random negatives as int zeros
        distance.append(-1.0)
    tokens = [[display_token(corpus.vocabulary[index]) for index in window] for window in windows]
    activating = np.array([value != -1.0 for value in distance])
    return Examples(tokens, activation_rows, distance, activating)


def _fail_batches(records: list[dict], rng: np.random.Generator, fields: tuple[str, ...]) -> None:
    for start in range(0, len(records), EXAMPLES_SHOWN):
        if rng.random() < FAILED_BATCH_RATE:
            for record in records[start : start + EXAMPLES_SHOWN]:
                for name in fields:
                    record[name] = None


def classifier_records(
    examples: Examples, *, good: bool, method: str, bias: float, rng: np.random.Generator, reliability: float = 1.0
) -> list[dict]:
    """fuzz / detection records (Gen 3 layout), shuffled, with null batches. ``reliability``: how
    far the scorer's verdicts follow the explanation's quality (0: a coin flip on every example)."""
    records = []
    for index in rng.permutation(len(examples.distance)):
        activating = bool(examples.activating[index])
        if activating:
            quantile = examples.distance[index]
            p_correct = (0.93 - 0.035 * quantile) if good else (0.35 - 0.01 * quantile)
            p_correct += bias - (0.04 if method == "fuzz" else 0.0)
        else:
            p_correct = (0.9 if good else 0.72) + bias / 2
        p_correct = reliability * min(max(p_correct, 0.02), 0.99) + (1.0 - reliability) * 0.5
        correct = bool(rng.random() < p_correct)
        records.append(
            {
                "str_tokens": examples.tokens[index],
                "activations": examples.activations[index],
                "distance": examples.distance[index],
                "activating": activating,
                "prediction": activating if correct else not activating,
                "probability": None,
                "correct": correct,
            }
        )
    _fail_batches(records, rng, ("prediction", "probability", "correct"))
    return records


def embedding_records(examples: Examples, *, good: bool, rng: np.random.Generator) -> list[dict]:
    """Embedding-scorer records: similarity of each example to the explanation query."""
    records = []
    for index in rng.permutation(len(examples.distance)):
        if good and examples.activating[index]:
            mean = 0.45 - 0.01 * examples.distance[index]
        else:
            mean = 0.22 if good else 0.27
        records.append(
            {
                "text": "".join(examples.tokens[index]),
                "distance": examples.distance[index],
                "similarity": round(float(rng.normal(mean, 0.08)), 4),
            }
        )
    return records


def simulation_records(*, good: bool, rng: np.random.Generator) -> list[dict]:
    """Simulation aggregates: quantile groups at outer distance 1..10, then the "all" group 0."""
    groups = []
    for distance in [*range(1, QUANTILES + 1), 0]:
        if good:
            value = float(rng.uniform(0.25, 0.75) - 0.03 * (distance - 1 if distance else 3))
        else:
            value = float(rng.normal(0.03, 0.06))
        nan = rng.random() < (NAN_RATE if distance else 0.05)
        groups.append(
            {
                "distance": distance,
                "scored_sequence_simulations": [],
                "ev_correlation_score": "nan" if nan else value,
                "rsquared_score": 0,
                "absolute_dev_explained_score": 0,
            }
        )
    return groups
