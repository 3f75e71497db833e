"""The inference routes' response bodies (app/edge/responses.py)."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from app.edge import responses
from app.edge.responses import answer_body, answers_body, top_k
from app.schemas import AnswerResponse, Explanation, MultiAnswerResponse


@pytest.mark.parametrize("n", [13, 3000])  # the Python sort and the numpy partial sort
def test_top_k_matches_torch_topk(n):
    probs = torch.softmax(torch.randn(n), 0)
    answers = [f"a{i}" for i in range(n)]
    for k in (1, 3, 12, n, n + 5):
        ref = torch.topk(probs, min(k, n))
        got = top_k(answers, probs, k)
        assert [s["confidence"] for s in got] == ref.values.tolist()
        if k <= 12:  # deep in a long list, float32 ties may be ordered either way
            assert [s["answer"] for s in got] == [answers[i] for i in ref.indices.tolist()]


def test_response_bodies_are_the_response_models_bytes():
    """The bodies are written from dicts: byte for byte what pydantic-core writes for the
    response models the routes declare."""
    gen = torch.Generator().manual_seed(0)
    answers = [f"a{i}" for i in range(13)]
    enc = type("Enc", (), {"text": "what is the colour of it?", "unknown_words": ("colour", "it")})()
    timing = {"queue_ms": 0.125, "inference_ms": 12.0, "total_ms": 1e-05, "batch_size": 7}
    expl_fields = {"method": "grad-cam", "answer": "a3", "layer": "features.22", "shape": [1, 2],
                   "grid": [[0.0, 1.0]], "explain_ms": 3.5}
    expl = Explanation(**expl_fields)
    for k in (1, 3, 13):
        probs = torch.softmax(torch.randn(13, generator=gen), 0)
        qa = responses.question_answer(answers, enc, probs, k)
        for explanation in (None, expl):
            model = AnswerResponse(**qa, model="m", image_cached=k == 3, timing=timing, explanation=explanation)
            assert answer_body(qa, "m", k == 3, timing, expl_fields if explanation else None) == \
                TypeAdapter(AnswerResponse).dump_json(model, exclude_none=True)
        multi = MultiAnswerResponse(model="m", image_cached=False, answers=[qa, qa], timing=timing)
        assert answers_body("m", False, [qa, qa], timing) == TypeAdapter(MultiAnswerResponse).dump_json(multi)
