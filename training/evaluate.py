"""``vqa-eval``: accuracy of a checkpoint on the easy-VQA test split (9,673 questions).

Runs the same predictor and image transform the service uses, each image encoded once.
Prints overall accuracy, accuracy by question kind (yes/no, color, shape), calibration and the
most frequent confusions, then the same for the **natural-phrasing set**: every test question
asked once more in a held-out wording (``training/phrasings.py``: ``EVAL``, never trained on);
``--json`` prints both as JSON.

``--dataset vqa2 --data-root DIR --split S`` answers a VQA v2 split instead and scores it with
the official metric (:mod:`training.eval_vqa2`); ``--score-results FILE`` scores a results file
without a checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import torch

from models import CheckpointError, ImageQuestions, Predictor

from . import eval_vqa2
from .data import VQASplit, load_easy_vqa, question_kind
from .phrasings import natural_split
from .train import DEFAULT_OUT
from .vqa2 import DatasetError
from .vqa_metric import DEFAULT_REVISION, REVISIONS, ResultsError


def evaluate(predictor: Predictor, split: VQASplit, batch_images: int = 64) -> dict:
    by_image: dict[int, list[int]] = {}
    for q, row in enumerate(split.image_index.tolist()):
        by_image.setdefault(row, []).append(q)
    predictions: list[str] = [""] * len(split)
    confidences = torch.zeros(len(split))
    rows = sorted(by_image)
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch_images):
        chunk = rows[start : start + batch_images]
        pixels = split.images[chunk]  # uint8, normalised by the predictor as in the service
        reqs = [ImageQuestions(questions=[predictor.encode_question(split.questions[q]) for q in by_image[r]],
                               pixels=pixels[i]) for i, r in enumerate(chunk)]
        for r, ans in zip(chunk, predictor.run(reqs)):
            conf, best = ans.probs.max(dim=1)
            for q, a, c in zip(by_image[r], best.tolist(), conf.tolist()):
                predictions[q] = predictor.answers[a]
                confidences[q] = c
    seconds = time.perf_counter() - t0

    correct = [p == a for p, a in zip(predictions, split.answers)]
    kinds: dict[str, list[bool]] = {}
    for ok, a in zip(correct, split.answers):
        kinds.setdefault(question_kind(a), []).append(ok)
    confusions = Counter((a, p) for p, a, ok in zip(predictions, split.answers, correct) if not ok)
    ece = expected_calibration_error(confidences, torch.tensor(correct, dtype=torch.float32))
    return {
        "questions": len(split),
        "images": len(split.images),
        "correct": sum(correct),
        "accuracy": sum(correct) / len(split),
        "by_kind": {k: {"questions": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(kinds.items())},
        "mean_confidence": float(confidences.mean()),
        "expected_calibration_error": ece,
        "confusions": [{"expected": a, "predicted": p, "count": n} for (a, p), n in confusions.most_common(10)],
        "seconds": round(seconds, 2),
        "device": str(predictor.device),
    }


def _examples(predictor: Predictor, split: VQASplit, n: int = 6) -> list[dict]:
    """The first ``n`` questions of ``split`` with the model's answers, for the report."""
    reqs = [ImageQuestions(questions=[predictor.encode_question(split.questions[q])],
                           pixels=split.images[int(split.image_index[q])]) for q in range(n)]
    return [{"question": split.questions[q], "expected": split.answers[q],
             "predicted": predictor.answers[int(a.probs[0].argmax())]} for q, a in enumerate(predictor.run(reqs))]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Standard ECE: |accuracy - mean confidence| per equal-width confidence bin, weighted by the
    bin's share of questions. 0 means the confidences are as likely to be right as they claim."""
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


def format_report(report: dict, weights: Path) -> str:
    lines = [f"checkpoint  {weights}"] + _format_part(report, "test split")
    if "natural_phrasings" in report:
        lines += ["", *_format_part(report["natural_phrasings"], "natural phrasings (held-out wordings of the test split)")]
        lines += ["examples:", *[f"  {e['question']!r} -> {e['predicted']} (expected {e['expected']})"
                                 for e in report["natural_phrasings"]["examples"]]]
    return "\n".join(lines)


def _format_part(report: dict, title: str) -> list[str]:
    lines = [
        f"{title}: {report['questions']} questions about {report['images']} images",
        f"accuracy    {100 * report['accuracy']:.2f}%  ({report['correct']}/{report['questions']})",
    ]
    for kind, r in report["by_kind"].items():
        lines.append(f"  {kind:<8}  {100 * r['accuracy']:.2f}%  ({r['questions']} questions)")
    lines.append(f"calibration mean confidence {100 * report['mean_confidence']:.2f}%, "
                 f"expected calibration error {100 * report['expected_calibration_error']:.2f} points")
    if report["confusions"]:
        lines.append("most frequent confusions (expected -> predicted):")
        lines += [f"  {c['expected']} -> {c['predicted']}: {c['count']}" for c in report["confusions"]]
    else:
        lines.append("no confusions")
    lines.append(f"evaluated in {report['seconds']}s on {report['device']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vqa-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="?", type=Path, default=DEFAULT_OUT, help="checkpoint to evaluate")
    p.add_argument("--dataset", choices=("easy-vqa", "vqa2"), default="easy-vqa",
                   help="easy-VQA test split, or a VQA v2 split in the official layout under --data-root")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help="auto, fp32, fp16 or bf16")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-natural", action="store_true", help="skip the natural-phrasing set")
    vqa2 = p.add_argument_group("VQA v2 (--dataset vqa2)")
    vqa2.add_argument("--data-root", type=Path, help="folder with Questions/, Annotations/, Images/ (official layout)")
    vqa2.add_argument("--split", default="val2014", help="split to answer or score")
    vqa2.add_argument("--results", type=Path, help="write the answers here in the official results format")
    vqa2.add_argument("--score-results", type=Path, metavar="FILE",
                      help="score this results file (no checkpoint needed); any model's")
    vqa2.add_argument("--workers", type=int, default=0, help="image decoding processes")
    vqa2.add_argument("--metric-revision", choices=list(REVISIONS), default=DEFAULT_REVISION,
                      help="which revision of the official vqaEval.py (GT-Vision-Lab/VQA) to compute: "
                      + "; ".join(f"{k}: {v}" for k, v in REVISIONS.items()) + f" (default: {DEFAULT_REVISION})")
    args = p.parse_args(argv)
    if args.dataset == "vqa2":
        try:
            print(eval_vqa2.run(args))
        except (DatasetError, ResultsError, CheckpointError) as e:
            raise SystemExit(f"vqa-eval: {e}") from None
        return
    if args.score_results or args.results:
        p.error("--results and --score-results need --dataset vqa2")
    predictor = Predictor.from_file(args.weights, device=args.device, precision=args.precision)
    split = load_easy_vqa("test", image_size=predictor.image_size)
    with torch.inference_mode():
        report = {"checkpoint_sha256": _sha256(args.weights), **evaluate(predictor, split)}
        if not args.no_natural:
            natural = natural_split(split)
            report["natural_phrasings"] = evaluate(predictor, natural)
            report["natural_phrasings"]["examples"] = _examples(predictor, natural)
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.weights))


if __name__ == "__main__":
    main()
