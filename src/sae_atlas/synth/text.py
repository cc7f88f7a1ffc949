"""Natural-looking prompts for the synthetic corpus, tokenised the SentencePiece way.

Sentences come from templates per word kind ("The {X} was old than we expected ." with a concept
word for X). Each prompt has a theme: most of its sentences carry words of one concept, some of a
second, the rest are other concepts or filler. Tokens are SentencePiece pieces: ``▁`` marks a word
start, punctuation attaches without it, some long filler words split into two pieces, and a
newline is the byte-fallback piece ``<0x0A>`` (the word after it has no ``▁``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from sae_atlas.synth.concepts import CONCEPTS, Concept

WORD_MARK = "▁"
NEWLINE = "<0x0A>"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
BYTE_PIECES = tuple(f"<0x{value:02X}>" for value in range(256))

_NOUNS = (
    "morning evening meeting window door garden street room village box letter story idea plan problem question "
    "answer market office park corner friend neighbour crowd journey picture message report kitchen hallway "
    "basement notebook envelope staircase courtyard"
).split()
_PLURALS = "boxes letters stones coins baskets bottles papers candles buttons pebbles".split()
_ADJECTIVES = (
    "old new quiet busy strange simple familiar important early late ordinary empty narrow bright distant crowded "
    "peaceful unusual"
).split()
_PEOPLE = "visitor manager child woman man guide stranger driver neighbour".split()

TEMPLATES: dict[str, tuple[str, ...]] = {
    "noun": (
        "The {X} was more {a} than we expected .",
        "She noticed a {a} {X} near the {n} .",
        "Everyone talked about the {X} during the {n} .",
        "We finally found the {X} behind the {n} .",
        "The {p} pointed at the {X} and smiled .",
        "There was a {X} in the {n} , but nobody cared .",
    ),
    "person": (
        "The {X} arrived at the {n} early .",
        "My {X} said the {n} was {a} .",
        "A {X} from the village helped us with the {n} .",
    ),
    "place": (
        "They travelled to {X} last year .",
        "The {n} in {X} was {a} .",
        "Many people from {X} came to the {n} .",
        "We spent a week in {X} with the {p} .",
    ),
    "name": (
        "{X} said that the {n} was ready .",
        "According to {X} , the {n} had been moved .",
        "I met {X} at the {n} yesterday .",
        "{X} wrote a letter about the {n} .",
    ),
    "time": (
        "The {n} was moved to {X} .",
        "In {X} , the {n} finally opened .",
        "We will see the {p} again in {X} .",
        "By {X} the {n} looked {a} .",
    ),
    "number": (
        "There were {X} {ns} near the {n} .",
        "She counted {X} {ns} before the {n} .",
        "Only {X} of the {ns} were {a} .",
    ),
    "verb": (
        "The {p} {X} across the {n} .",
        "After the {n} , the {p} {X} again .",
        "Yesterday she {X} for a long time .",
        "He {X} while the {p} waited .",
    ),
    "adjective": (
        "It was a {X} {n} .",
        "The {n} looked {X} in the morning light .",
        "Nobody expected such a {X} {n} .",
        "The {p} called it {X} .",
    ),
    "unit": (
        "The {n} is about twelve {X} away .",
        "It cost nearly forty {X} in the end .",
        "They waited for several {X} near the {n} .",
    ),
    "filler": (
        "The {n} was {a} , and nobody said anything .",
        "It was {a} outside the {n} .",
        "The {p} opened the {n} slowly .",
        "Later that day the {p} left the {n} .",
    ),
}

# Share of a prompt's sentences about its first theme, its second theme, another concept; the rest
# are filler.
THEME_SHARES = (0.75, 0.1, 0.05)
NEWLINE_RATE = 0.08


def _concept_words() -> set[str]:
    return {word.lower() for concept in CONCEPTS for word in concept.words}


def _filler(words: list[str]) -> list[str]:
    taken = _concept_words()
    return [word for word in words if word.lower() not in taken]


NOUNS, PLURALS, ADJECTIVES, PEOPLE = (_filler(words) for words in (_NOUNS, _PLURALS, _ADJECTIVES, _PEOPLE))
_CONCEPT_WORDS = _concept_words()


def word_pieces(word: str, *, after_newline: bool = False) -> list[str]:
    """SentencePiece pieces of one word: punctuation attaches, long filler words split in two."""
    if word in {",", "."}:
        return [word]
    mark = "" if after_newline else WORD_MARK
    if len(word) >= 8 and word.lower() not in _CONCEPT_WORDS and sum(map(ord, word)) % 2 == 0:
        return [mark + word[:4], word[4:]]
    return [mark + word]


@dataclass
class PromptCorpus:
    """Prompts as a matrix of piece ids, with the piece vocabulary and each prompt's themes."""

    tokens: np.ndarray  # [n_prompts, ctx] int32 piece ids
    vocabulary: list[str]  # id -> piece
    themes: np.ndarray  # [n_prompts, 2] concept indices
    concept_of_piece: np.ndarray  # [vocabulary] concept index, -1 for non-concept pieces

    def pieces(self, prompt: int) -> list[str]:
        return [self.vocabulary[index] for index in self.tokens[prompt]]

    @cached_property
    def _piece_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token position (``prompt * ctx + position``) grouped by piece id, ascending."""
        order = np.argsort(self.tokens.ravel(), kind="stable")
        starts = np.searchsorted(self.tokens.ravel()[order], np.arange(len(self.vocabulary) + 1))
        return order, starts

    def positions_of(self, pieces: np.ndarray) -> np.ndarray:
        """(prompt, position) of every occurrence of ``pieces``, in row-major order: what
        ``np.argwhere(np.isin(tokens, pieces))`` gives, without scanning every token."""
        order, starts = self._piece_positions
        flat = np.sort(np.concatenate([order[starts[piece] : starts[piece + 1]] for piece in pieces] or [order[:0]]))
        return np.stack([flat // self.tokens.shape[1], flat % self.tokens.shape[1]], axis=1)


def _sentence(rng: random.Random, concept: Concept | None) -> list[str]:
    kind = concept.kind if concept else "filler"
    template = rng.choice(TEMPLATES[kind])
    words = []
    for word in template.split():
        if word == "{X}":
            words.append(rng.choice(concept.words))
        elif word == "{n}":
            words.append(rng.choice(NOUNS))
        elif word == "{ns}":
            words.append(rng.choice(PLURALS))
        elif word == "{a}":
            words.append(rng.choice(ADJECTIVES))
        elif word == "{p}":
            words.append(rng.choice(PEOPLE))
        else:
            words.append(word)
    for position in range(len(words) - 1):
        if words[position] == "a" and words[position + 1][:1].lower() in "aeiou":
            words[position] = "an"
    if words[0][:1].islower():
        words[0] = words[0][:1].upper() + words[0][1:]
    return words


def build_prompts(n_prompts: int, ctx: int, n_concepts: int, rng: np.random.Generator, *, bos: bool) -> PromptCorpus:
    """``n_prompts`` prompts of exactly ``ctx`` pieces (the first one ``<bos>`` when ``bos``)."""
    text_rng = random.Random(int(rng.integers(2**63)))
    themes = np.stack([rng.integers(0, n_concepts, n_prompts), rng.integers(0, n_concepts, n_prompts)], axis=1)
    first, second, other = THEME_SHARES
    piece_lists = []
    for prompt in range(n_prompts):
        pieces = ["<bos>"] if bos else []
        newline = False
        while len(pieces) < ctx:
            draw = text_rng.random()
            if draw < first:
                concept = CONCEPTS[themes[prompt, 0]]
            elif draw < first + second:
                concept = CONCEPTS[themes[prompt, 1]]
            elif draw < first + second + other:
                concept = CONCEPTS[text_rng.randrange(n_concepts)]
            else:
                concept = None
            for position, word in enumerate(_sentence(text_rng, concept)):
                pieces.extend(word_pieces(word, after_newline=newline and position == 0))
            newline = text_rng.random() < NEWLINE_RATE
            if newline:
                pieces.append(NEWLINE)
        piece_lists.append(pieces[:ctx])

    observed = sorted({piece for pieces in piece_lists for piece in pieces} - set(SPECIAL_TOKENS) - set(BYTE_PIECES))
    vocabulary = [*SPECIAL_TOKENS, *BYTE_PIECES, *observed]
    index = {piece: position for position, piece in enumerate(vocabulary)}
    tokens = np.array([[index[piece] for piece in pieces] for pieces in piece_lists], dtype=np.int32)
    tokens = tokens.reshape(n_prompts, ctx)
    word_concept = {word: position for position, concept in enumerate(CONCEPTS[:n_concepts]) for word in concept.words}
    concept_of_piece = np.array(
        [word_concept.get(piece.removeprefix(WORD_MARK), -1) for piece in vocabulary], dtype=np.int32
    )
    return PromptCorpus(tokens, vocabulary, themes, concept_of_piece)


def display_token(piece: str) -> str:
    """A piece as delphi's per-token decode shows it: ``▁the`` → `` the``, ``<0x0A>`` → newline."""
    if piece == NEWLINE:
        return "\n"
    return piece.replace(WORD_MARK, " ")
