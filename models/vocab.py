"""Question tokenizer and vocabularies.

Tokenisation is deliberately simple (lower-case, split on non-word characters) because the
model was trained that way; what it adds over a plain split is honesty: words the model has
never seen are *reported* to the caller instead of silently mapped to ``<unk>``, and common
spelling variants (British/American) are folded onto the training spelling first so that
"What colour is the shape?" means exactly what "What color is the shape?" means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1

_WORD_RE = re.compile(r"\w+", re.UNICODE)

# British spellings -> the American spelling easy-VQA uses.
# Applied before vocabulary look-up; a variant is only rewritten when the vocabulary lacks it.
SPELLING_VARIANTS: dict[str, str] = {
    "colour": "color",
    "colours": "colors",
    "coloured": "colored",
    "colouring": "coloring",
    "grey": "gray",
    "greys": "grays",
    "greyish": "grayish",
    "centre": "center",
    "centred": "centered",
    "favourite": "favorite",
}

# Contractions split by the tokenizer ("isn't" -> "isn", "t") are rewritten to full words so
# that negation survives: "isn't there a circle" -> "is not there a circle".
_CONTRACTIONS: dict[str, list[str]] = {
    "isn": ["is", "not"],
    "doesn": ["does", "not"],
    "aren": ["are", "not"],
    "don": ["do", "not"],
}


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it on non-word characters."""
    words = _WORD_RE.findall(text.lower())
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in _CONTRACTIONS and i + 1 < len(words) and words[i + 1] == "t":
            out.extend(_CONTRACTIONS[w])
            i += 2
            continue
        out.append(w)
        i += 1
    return out


@dataclass(frozen=True)
class EncodedQuestion:
    """A question as the model sees it, plus what the caller should know about it."""

    text: str
    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    unknown_words: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.ids)


class Vocabulary:
    """Word <-> id mapping with ``<pad>`` = 0 and ``<unk>`` = 1 reserved."""

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        if words[:2] != [PAD, UNK]:
            words = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary contains duplicate words")
        self.words: list[str] = words
        self.index: dict[str, int] = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> "Vocabulary":
        counts: dict[str, int] = {}
        for text in texts:
            for tok in tokenize(text):
                counts[tok] = counts.get(tok, 0) + 1
        kept = sorted(w for w, c in counts.items() if c >= min_count)
        return cls([PAD, UNK, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def normalize(self, token: str) -> str:
        if token in self.index:
            return token
        variant = SPELLING_VARIANTS.get(token)
        if variant is not None and variant in self.index:
            return variant
        return token

    def encode(self, text: str, max_tokens: int | None = None) -> EncodedQuestion:
        """Tokenise ``text``; unknown words map to ``<unk>`` and are listed (deduplicated,
        in order of appearance) in ``unknown_words``. Tokens beyond ``max_tokens`` are cut."""
        tokens = [self.normalize(t) for t in tokenize(text)]
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        ids = tuple(self.index.get(t, UNK_ID) for t in tokens)
        unknown = tuple(dict.fromkeys(t for t in tokens if t not in self.index))
        return EncodedQuestion(text=text, tokens=tuple(tokens), ids=ids, unknown_words=unknown)


class AnswerVocabulary:
    """The fixed list of answers the model scores, in logit order."""

    def __init__(self, answers: Sequence[str]) -> None:
        answers = list(answers)
        if not answers:
            raise ValueError("answer vocabulary is empty")
        if len(set(answers)) != len(answers):
            raise ValueError("answer vocabulary contains duplicates")
        self.answers = answers
        self.index = {a: i for i, a in enumerate(answers)}

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, i: int) -> str:
        return self.answers[i]
