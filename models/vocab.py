"""Question tokenizer and vocabularies.

Tokenisation is deliberately simple (lower-case, split on non-word characters) because the
model was trained that way; what it adds over a plain split is honesty: words the model has
never seen are *reported* to the caller instead of silently mapped to ``<unk>``, and common
spelling variants (British/American) are folded onto the training spelling first so that
"What colour is the shape?" means exactly what "What color is the shape?" means.

How a question is split is part of the model (a model trained with punctuation tokens sees a
different input without them), so the choices live in :class:`TokenizerConfig`, stored in the
checkpoint's config; the defaults are this project's own tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1

_WORD_RE = re.compile(r"\w+", re.UNICODE)
# Runs of non-word characters, kept by the split (a capture group) as tokens of their own.
_SPLIT_KEEP_RE = re.compile(r"(\W+)", re.UNICODE)

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


@dataclass(frozen=True)
class TokenizerConfig:
    """How question text becomes tokens; stored in checkpoints (defaults: this project's own).

    ``keep_punctuation``: split on runs of non-word characters and keep each run, stripped of
    whitespace, as a token (``"what is it?"`` -> ``what, is, it, ?``), as tokenizers written
    with ``re.split(r"(\\W+)")`` do; otherwise punctuation is dropped (``\\w+`` words only).
    ``expand_contractions``: ``isn't`` -> ``is not`` (so negation survives the split).
    ``fold_spellings``: British spellings map onto the American one when only that is known.
    """

    keep_punctuation: bool = False
    expand_contractions: bool = True
    fold_spellings: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return cls(**d)


def tokenize(text: str, cfg: TokenizerConfig = TokenizerConfig()) -> list[str]:
    """Lower-case ``text`` and split it as ``cfg`` says (default: on non-word characters)."""
    text = text.lower()
    if cfg.keep_punctuation:
        words = [t.strip() for t in _SPLIT_KEEP_RE.split(text)]
        words = [t for t in words if t]
    else:
        words = _WORD_RE.findall(text)
    if not cfg.expand_contractions:
        return words
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        # "isn't" is ("isn", "t") without punctuation tokens, ("isn", "'", "t") with them.
        tail = 2 if words[i + 1 : i + 3] == ["'", "t"] else 1 if words[i + 1 : i + 2] == ["t"] else 0
        if w in _CONTRACTIONS and tail:
            out.extend(_CONTRACTIONS[w])
            i += 1 + tail
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
    """Word <-> id mapping with ``<pad>`` = 0 and ``<unk>`` = 1 reserved, and the tokenizer
    that turns a question into its words."""

    def __init__(self, words: Iterable[str], tokenizer: TokenizerConfig | None = None) -> None:
        self.tokenizer = tokenizer or TokenizerConfig()
        words = list(words)
        if words[:2] != [PAD, UNK]:
            words = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary contains duplicate words")
        self.words: list[str] = words
        self.index: dict[str, int] = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1,
              tokenizer: TokenizerConfig | None = None) -> "Vocabulary":
        tokenizer = tokenizer or TokenizerConfig()
        counts: dict[str, int] = {}
        for text in texts:
            for tok in tokenize(text, tokenizer):
                counts[tok] = counts.get(tok, 0) + 1
        kept = sorted(w for w, c in counts.items() if c >= min_count and w not in (PAD, UNK))
        return cls([PAD, UNK, *kept], tokenizer)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def tokenize(self, text: str) -> list[str]:
        """``text`` split into tokens as this vocabulary's model was trained (before any cut)."""
        return tokenize(text, self.tokenizer)

    def normalize(self, token: str) -> str:
        if token in self.index or not self.tokenizer.fold_spellings:
            return token
        variant = SPELLING_VARIANTS.get(token)
        if variant is not None and variant in self.index:
            return variant
        return token

    def encode(self, text: str, max_tokens: int | None = None,
               words: Sequence[str] | None = None) -> EncodedQuestion:
        """Tokenise ``text``; unknown words map to ``<unk>`` and are listed (deduplicated,
        in order of appearance) in ``unknown_words``. Tokens beyond ``max_tokens`` are cut.
        ``words``: ``self.tokenize(text)`` when the caller has it already (the service checks
        the word count first; tokenising twice was ~1/3 of a question's cost)."""
        tokens = [self.normalize(t) for t in (self.tokenize(text) if words is None else words)]
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
