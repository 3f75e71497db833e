"""A question's validation and encoding, before anything else of the request is done."""

from __future__ import annotations

import re

from models import EncodedQuestion

from ..backends.protocol import ModelView
from ..errors import ApiError
from ..settings import Settings

# Unicode categories Cc (C0, DEL, C1; fixed by Unicode's stability policy) and Cs (surrogates),
# tab, newline and carriage return allowed: one regex scan instead of a category lookup per
# character (tests/app/pipeline/test_questions.py compares it with unicodedata over every code point).
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def parse_question(text: str, settings: Settings, model: ModelView) -> EncodedQuestion:
    """The question's token ids (tokenised once), or ApiError 422 saying what is wrong."""
    q = text.strip()
    if not q:
        raise ApiError(422, "empty_question", "question is empty")
    if len(q) > settings.max_question_chars:
        raise ApiError(422, "question_too_long",
                       f"question has {len(q)} characters; the limit is {settings.max_question_chars}")
    if CONTROL.search(q):
        raise ApiError(422, "invalid_question", "question contains control characters")
    words = model.vocab.tokenize(q)  # type: ignore[attr-defined]
    if len(words) > model.max_tokens:
        raise ApiError(422, "question_too_long", f"question has more than {model.max_tokens} words")
    enc = model.encode_question(q, words)
    if len(enc) == 0:
        raise ApiError(422, "question_has_no_words", "question contains no words")
    return enc


def check_top_k(top_k: int, settings: Settings, model: ModelView) -> int:
    if not 1 <= top_k <= settings.max_top_k:
        raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {settings.max_top_k}")
    return min(top_k, len(model.answers))  # type: ignore[attr-defined]
