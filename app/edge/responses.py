"""The inference routes' response bodies: plain dicts and lists with the response models'
fields in the models' order (app/schemas.py), serialised by pydantic-core's ``to_json``: the
same bytes as the models' own JSON (tests/app/edge/test_responses.py checks it), at a third of
the cost of building the models per answer."""

from __future__ import annotations

import numpy as np
from pydantic_core import to_json

from ..pipeline.service import Asked, Explained

_to_json = to_json


def top_k(answers: list[str], probs, k: int) -> list[dict]:
    """The ``k`` best answers as AnswerScore fields (``{"answer", "confidence"}``), best first
    (ties: the lower index first, as ``torch.topk`` on CPU), without a torch call per request: a
    sort in Python for a short answer list, numpy's partial sort for a long one (VQA v2
    checkpoints score thousands of answers)."""
    n = len(answers)
    k = max(1, min(k, n))
    if n <= 256:
        row = probs.tolist()
        best = sorted(range(n), key=row.__getitem__, reverse=True)[:k]
        return [{"answer": answers[i], "confidence": row[i]} for i in best]
    p = probs.numpy() if hasattr(probs, "numpy") else np.asarray(probs)
    best = np.argpartition(-p, k - 1)[:k] if k < n else np.arange(n)
    best = best[np.argsort(-p[best], kind="stable")]
    return [{"answer": answers[i], "confidence": float(p[i])} for i in best.tolist()]


def question_answer(answers: list[str], enc, probs, k: int) -> dict:
    """QuestionAnswer's fields, in its order."""
    best = top_k(answers, probs, k)
    return {"question": enc.text, "answer": best[0]["answer"], "confidence": best[0]["confidence"],
            "top_k": best, "unknown_words": list(enc.unknown_words)}


def timing(asked: Asked) -> dict:
    """Timing's fields, in its order."""
    r = asked.result
    return {"queue_ms": round(r.queued_s * 1000, 3), "inference_ms": round(r.run_s * 1000, 3),
            "total_ms": round(asked.total_s * 1000, 3), "batch_size": r.batch_size}


def explanation(e: Explained) -> dict:
    """Explanation's fields, in its order."""
    grid = e.cam.heatmap
    return {"method": e.cam.method, "answer": e.answer, "layer": e.cam.layer.name, "shape": list(grid.shape),
            "grid": [[round(v, 4) for v in row] for row in grid.tolist()], "explain_ms": round(e.seconds * 1000, 3)}


def answer_body(qa: dict, model: str, image_cached: bool, timing: dict, explanation=None) -> bytes:
    """AnswerResponse's JSON (``explanation``, an Explanation, only when there is one)."""
    body = {**qa, "model": model, "image_cached": image_cached, "timing": timing}
    if explanation is not None:
        body["explanation"] = explanation
    return _to_json(body)


def answers_body(model: str, image_cached: bool, answers: list[dict], timing: dict) -> bytes:
    """MultiAnswerResponse's JSON."""
    return _to_json({"model": model, "image_cached": image_cached, "answers": answers, "timing": timing})


