"""``vqa-eval --dataset vqa2``: answer a VQA v2 split and/or score answers officially.

* With a checkpoint: answers every question of ``--split`` with the same predictor and image
  transform the service uses (each image encoded once), writes ``--results FILE`` in the
  official results format (``[{"question_id": int, "answer": str}]``, one per question, what
  the evaluation server takes) and, when the split has annotations, scores it.
* ``--score-results FILE`` (no checkpoint): scores any results file, ours or another model's.

Accuracy is :mod:`training.vqa_metric`, the official ``vqaEval.py`` computation at
GT-Vision-Lab/VQA's head (a013f00), or at the v2.0 release with ``--metric-revision a4f1afd``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from models import ImageQuestions, Predictor

from . import vqa_metric
from .vqa2 import VQA2Split, iter_images, load_vqa2, nonempty


def answer_split(predictor: Predictor, split: VQA2Split, batch_images: int = 32,
                 workers: int = 0) -> dict[int, str]:
    """Top-1 answer (as the service would give it) to every question of ``split``."""
    by_image: dict[int, list[int]] = {}
    for q, row in enumerate(split.image_index.tolist()):
        by_image.setdefault(row, []).append(q)
    rows = sorted(by_image)
    transform = predictor.model.cfg.image.transform
    out: dict[int, str] = {}
    for chunk, pixels in iter_images(split.image_paths(), transform, rows, batch_images, workers):
        reqs = [ImageQuestions(questions=[nonempty(predictor.encode_question(split.questions[q]))
                                          for q in by_image[r]],
                               pixels=pixels[i]) for i, r in enumerate(chunk)]
        for r, ans in zip(chunk, predictor.run(reqs)):
            for q, a in zip(by_image[r], ans.probs.argmax(dim=1).tolist()):
                out[split.question_ids[q]] = predictor.answers[a]
    return out


def write_results(path: Path, split: VQA2Split, answers: dict[int, str]) -> None:
    """The official results format, one entry per question in the questions file's order."""
    results = [{"question_id": qid, "answer": answers[qid]} for qid in split.question_ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results))
    tmp.replace(path)


def score(split: VQA2Split, answers: dict[int, str], revision: str = vqa_metric.DEFAULT_REVISION) -> dict:
    acc = vqa_metric.evaluate(split.annotations, answers, revision=revision)  # type: ignore[arg-type]
    return {k: acc[k] for k in ("overall", "perAnswerType", "perQuestionType", "revision")}


def format_scores(scores: dict, split: VQA2Split, source: str) -> str:
    lines = [f"{source}", f"split    {split.split}: {len(split)} questions about {len(split.image_ids)} images",
             f"official VQA accuracy (vqaEval.py at {scores['revision']}: "
             f"{vqa_metric.REVISIONS[scores['revision']]})", f"overall  {scores['overall']:.2f}",
             "per answer type:"]
    lines += [f"  {k:<24} {v:.2f}" for k, v in sorted(scores["perAnswerType"].items())]
    lines.append("per question type:")
    lines += [f"  {k:<24} {v:.2f}" for k, v in sorted(scores["perQuestionType"].items())]
    return "\n".join(lines)


def run(args) -> str:
    """The vqa2 branch of ``vqa-eval``; returns what to print."""
    if not args.data_root:
        raise SystemExit("vqa-eval --dataset vqa2 needs --data-root DIR (the official VQA v2 layout)")
    if args.score_results:
        split = load_vqa2(args.data_root, args.split, annotations=True, check_images=False)
        answers = vqa_metric.load_results(args.score_results, split.question_ids)
        scores = score(split, answers, args.metric_revision)
        return json.dumps(scores, indent=2) if args.json else format_scores(scores, split, f"results  {args.score_results}")
    predictor = Predictor.from_file(args.weights, device=args.device, precision=args.precision)
    split = load_vqa2(args.data_root, args.split, annotations=None)
    if not split.has_annotations and not args.results:
        raise SystemExit(f"vqa-eval: split {args.split!r} has no annotations to score; pass "
                         f"--results FILE to write its answers")
    t0 = time.perf_counter()
    with torch.inference_mode():
        answers = answer_split(predictor, split, workers=args.workers)
    seconds = time.perf_counter() - t0
    # Notes go to stderr, so that --json leaves stdout pure JSON.
    print(f"answered {len(answers)} questions in {seconds:.1f}s on {predictor.device}", file=sys.stderr)
    if args.results:
        write_results(args.results, split, answers)
        print(f"wrote {args.results} ({len(split)} results, official format)", file=sys.stderr)
    if not split.has_annotations:
        return f"split {args.split} has no annotations: wrote its answers, nothing to score here"
    scores = score(split, answers, args.metric_revision)
    if args.json:
        return json.dumps(scores, indent=2)
    return format_scores(scores, split, f"checkpoint {args.weights}")
