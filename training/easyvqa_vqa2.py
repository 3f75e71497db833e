"""easy-VQA laid out as VQA v2: try the VQA v2 commands on real pictures, no COCO needed.

    python -m training.easyvqa_vqa2 write DIR                 # 4,000 train, 1,000 held-out images
    vqa-train --dataset vqa2 --data-root DIR --out easy-as-vqa2.safetensors \\
        --image-size 64 --width 0.25 --pool-size 2 --epochs 10
    vqa-eval easy-as-vqa2.safetensors --dataset vqa2 --data-root DIR --split val2014 --results r.json

    python -m training.easyvqa_vqa2 run --output training/results/easyvqa-vqa2.json
        # all of the above, for the recipe and for each part of it left out (the figures of
        # docs/own-models.md)

Writes the official layout (``Questions/``, ``Annotations/``, ``Images/{split}/COCO_{split}_
{id:012d}.jpg``, as :mod:`training.vqa2` reads it): ``train2014`` holds a seeded sample of
easy-VQA's *train* images with all their questions, ``val2014`` a sample of its *test* images
(never trained on: the held-out split to report). Images are easy-VQA's own (64 x 64 PNGs,
written as JPEG, quality 95). Each question gets ten annotator answers as people type them:
most give the right answer, a few in another surface form that the official metric's
normalisation merges where annotators disagree ("Red", "red.", "the red"), some a wrong answer
of the same kind (another colour, another shape, the other of yes/no); per question the share
of right answers is one of 100%, 100%, 95%, 90%, 80%, 70%, 60%. Question types are VQA v2's
own prefixes ("what color is the", "is there a", ...), answer types ``yes/no`` or ``other``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image

from models import load_checkpoint

from . import evaluate, train, vqa_metric
from .data import COLORS, SHAPES
from .vqa2 import load_vqa2
from .vqa_metric import DEFAULT_REVISION

# VQA v2 question types (prefixes of the official list) that easy-VQA's templates start with;
# the longest matching one is a question's type.
QUESTION_TYPES = ("what color is the", "what color is", "what is the", "what is", "what shape is",
                  "what", "is there a", "is there", "is the", "is this", "is", "does the", "does this",
                  "does", "are there", "are")
RIGHT_SHARES = (1.0, 1.0, 0.95, 0.9, 0.8, 0.7, 0.6)


def question_type(question: str) -> str:
    words = " ".join(question.lower().replace("?", " ").split())
    return max((t for t in QUESTION_TYPES if words == t or words.startswith(t + " ")), key=len, default="none of the above")


def variant(answer: str, rng: random.Random) -> str:
    """``answer`` as one annotator types it."""
    u = rng.random()
    if u < 0.03:
        return answer + "."
    if u < 0.05 and answer not in ("yes", "no"):
        return "the " + answer
    if u < 0.08:
        return answer.capitalize()
    return answer


def wrong_answers(answer: str) -> list[str]:
    kind = SHAPES if answer in SHAPES else COLORS if answer in COLORS else ("yes", "no")
    return [a for a in kind if a != answer]


def annotators(truth: str, rng: random.Random) -> list[dict]:
    share = rng.choice(RIGHT_SHARES)
    wrong = wrong_answers(truth)
    return [{"answer": variant(truth, rng) if rng.random() < share else rng.choice(wrong),
             "answer_confidence": rng.choice(("yes", "yes", "yes", "maybe", "no")), "answer_id": i + 1}
            for i in range(10)]


def write_split(root: Path, split: str, easy_split: str, n_images: int, rng: random.Random) -> int:
    """``n_images`` images of easy-VQA's ``easy_split`` (a seeded sample) as VQA v2 ``split``;
    returns the number of questions written."""
    import easy_vqa

    if easy_split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    chosen = sorted(rng.sample(sorted(paths), min(n_images, len(paths))))
    keep = set(chosen)
    img_dir = root / "Images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    for easy_id in chosen:
        with Image.open(paths[easy_id]) as im:
            im.convert("RGB").save(img_dir / f"COCO_{split}_{easy_id + 1:012d}.jpg", quality=95)
    qs, anns, per_image = [], [], {}
    for text, truth, easy_id in zip(questions, answers, ids):
        if easy_id not in keep:
            continue
        image_id = easy_id + 1
        k = per_image[image_id] = per_image.get(image_id, -1) + 1
        qid = image_id * 1000 + k  # VQA v2's own numbering
        qs.append({"image_id": image_id, "question": text, "question_id": qid})
        given = annotators(truth, rng)
        raw = [a["answer"] for a in given]
        anns.append({"question_type": question_type(text), "multiple_choice_answer": max(set(raw), key=raw.count),
                     "answers": given, "image_id": image_id,
                     "answer_type": "yes/no" if truth in ("yes", "no") else "other", "question_id": qid})
    common = {"info": {"description": f"easy-VQA {easy_split} images in the VQA v2 layout (vqa-serve)",
                       "version": "2.0"},
              "license": {"name": "easy-VQA (MIT)", "url": "https://github.com/vzhou842/easy-VQA"},
              "data_subtype": split}
    (root / "Questions").mkdir(parents=True, exist_ok=True)
    (root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
        {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": qs}))
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
        {**common, "data_type": "mscoco", "annotations": anns}))
    return len(qs)


def make(root: Path, train_images: int = 1500, val_images: int = 500, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {"train2014": write_split(root, "train2014", "train", train_images, rng),
            "val2014": write_split(root, "val2014", "test", val_images, rng)}


COMPACT = ["--image-size", "64", "--width", "0.25", "--pool-size", "2"]
# The recipe (training/recipe.py) and each of its VQA v2 parts changed or left out.
VARIANTS = {
    "recipe": [],
    "answer-bag-head": ["--aux", "answer-bag"],
    "aux-weight-0.5": ["--aux-weight", "0.5"],
    "no-aux-head": ["--aux-weight", "0"],
    "accuracy-targets": ["--target", "accuracy"],
    "no-augmentation": ["--augment", "none"],
    "with-flips": ["--augment", "flip-shift"],
    # what `vqa-train --dataset vqa2` did before issue 26: no auxiliary head, no augmentation,
    # the official accuracy as each answer's target
    "plain": ["--aux-weight", "0", "--augment", "none", "--target", "accuracy"],
}
# The easy-VQA path on the same pictures and budget (its own test split, plain accuracy).
EASY_VARIANTS = {"easy-vqa": [], "easy-vqa-no-aux-head": ["--aux-weight", "0"]}


def _machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def run_variant(root: Path, work: Path, name: str, extra: list[str], epochs: int, seed: int) -> dict:
    """``vqa-train --dataset vqa2`` with the compact flags and ``extra``, then ``vqa-eval`` on
    val2014 (``--results``), scored by both metric revisions."""
    out, results = work / f"{name}.safetensors", work / f"{name}.results.json"
    started = time.perf_counter()
    train.main(["--dataset", "vqa2", "--data-root", str(root), "--out", str(out), "--epochs", str(epochs),
                "--seed", str(seed), "--quiet", *COMPACT, *extra])
    train_s = time.perf_counter() - started
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate.main([str(out), "--dataset", "vqa2", "--data-root", str(root), "--split", "val2014",
                       "--results", str(results), "--json"])
    val = load_vqa2(root, "val2014", annotations=True, check_images=False)
    answers = vqa_metric.load_results(results, val.question_ids)
    scores = {rev: {k: v for k, v in vqa_metric.evaluate(val.annotations, answers, revision=rev).items()
                    if k in ("overall", "perAnswerType")} for rev in vqa_metric.REVISIONS}
    info = load_checkpoint(out).info
    return {"variant": name, "flags": extra, "scores": scores,
            "truth_accuracy": truth_accuracy(easy_answers(val.question_ids), answers),
            "train_seconds": round(train_s, 1),
            "selected_epoch": info["selected_epoch"], "model_selection_accuracy": info["val_accuracy"],
            "history": [{k: round(v, 4) for k, v in h.items()} for h in info["history"]]}


def easy_answers(question_ids: list[int]) -> dict[int, str]:
    """The answer easy-VQA itself gives each ``val2014`` question (its test split), by the
    question ids :func:`write_split` gives them: the truth behind the ten simulated annotators."""
    import easy_vqa

    _, answers, ids = easy_vqa.get_test_questions()
    seen: dict[int, int] = {}
    truth = {}
    for answer, easy_id in zip(answers, ids):
        k = seen[easy_id + 1] = seen.get(easy_id + 1, -1) + 1
        truth[(easy_id + 1) * 1000 + k] = answer
    return {q: truth[q] for q in question_ids}


def truth_accuracy(truth: dict[int, str], answers: dict[int, str]) -> dict:
    """Plain accuracy of ``answers`` against easy-VQA's own answers, overall and by kind: the
    measure the easy-VQA path is scored by, so the two paths compare directly."""
    right: Counter = Counter()
    total: Counter = Counter()
    for q, t in truth.items():
        kind = "yes/no" if t in ("yes", "no") else "shape" if t in SHAPES else "color"
        total[kind] += 1
        right[kind] += answers.get(q) == t
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())),
            "by_kind": {k: right[k] / total[k] for k in total}}


def baselines(root: Path) -> dict:
    """Two answerers that never look at the image, on val2014 (new metric): the training
    split's most frequent answer for every question; and per question text, the training answer
    most often given to it."""
    train_split = load_vqa2(root, "train2014", annotations=True, check_images=False)
    val = load_vqa2(root, "val2014", annotations=True, check_images=False)
    votes: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for q, text in enumerate(train_split.questions):
        given = train_split.annotator_answers(q)
        votes[text].update(given)
        overall.update(given)
    top = overall.most_common(1)[0][0]
    blind = {qid: (votes[t] or overall).most_common(1)[0][0] for qid, t in zip(val.question_ids, val.questions)}
    question_only = vqa_metric.evaluate(val.annotations, blind)
    return {"majority_answer": vqa_metric.evaluate(val.annotations, {q: top for q in val.question_ids})["overall"],
            "question_only": question_only["overall"], "question_only_by_type": question_only["perAnswerType"]}


def run_easy(work: Path, name: str, extra: list[str], train_images: int, epochs: int, seed: int) -> dict:
    """``vqa-train`` (the easy-VQA path) on ``train_images`` of its train split, then ``vqa-eval``
    on its test split: plain accuracy, by question kind."""
    out = work / f"{name}.safetensors"
    started = time.perf_counter()
    train.main(["--out", str(out), "--epochs", str(epochs), "--seed", str(seed), "--quiet",
                "--limit-images", str(train_images), *COMPACT, *extra])
    train_s = time.perf_counter() - started
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        evaluate.main([str(out), "--json", "--no-natural"])
    report = json.loads(buf.getvalue())
    return {"variant": name, "flags": extra, "accuracy": report["accuracy"],
            "by_kind": {k: v["accuracy"] for k, v in report["by_kind"].items()},
            "train_seconds": round(train_s, 1), "selected_epoch": load_checkpoint(out).info["selected_epoch"]}


def experiment(output: Path, variants: list[str], train_images: int, val_images: int, epochs: int,
               seed: int, easy: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="easyvqa-vqa2-") as tmp:
        root, work = Path(tmp) / "data", Path(tmp) / "work"
        work.mkdir()
        counts = make(root, train_images, val_images, seed)
        results = {
            "schema": "easyvqa-vqa2/1",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "training.easyvqa_vqa2", *sys.argv[1:]]),
            "machine": _machine(),
            "data": {"train_images": train_images, "val_images": val_images, "questions": counts, "seed": seed},
            "train_flags": [*COMPACT, "--epochs", str(epochs)],
            "baselines": baselines(root),
            "runs": [],
        }
        for name in variants:
            print(f"[easyvqa-vqa2] {name}: vqa-train {' '.join(VARIANTS[name])}", file=sys.stderr, flush=True)
            results["runs"].append(run_variant(root, work, name, VARIANTS[name], epochs, seed))
            r = results["runs"][-1]
            print(f"[easyvqa-vqa2] {name}: {r['scores']} in {r['train_seconds']}s", file=sys.stderr, flush=True)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=1) + "\n")
        results["easy_vqa"] = []
        for name in easy:
            print(f"[easyvqa-vqa2] {name}: vqa-train {' '.join(EASY_VARIANTS[name])}", file=sys.stderr, flush=True)
            results["easy_vqa"].append(run_easy(work, name, EASY_VARIANTS[name], train_images, epochs, seed))
            output.write_text(json.dumps(results, indent=1) + "\n")
    return results


def rescore(output: Path, root: Path, work: Path) -> dict:
    """Add ``truth_accuracy`` to the runs of a results file from the ``val2014`` results files
    its run wrote (``work/<variant>.results.json``, data under ``root``), and recompute its
    baselines (with their split by answer type)."""
    results = json.loads(output.read_text())
    val = load_vqa2(root, "val2014", annotations=True, check_images=False)
    truth = easy_answers(val.question_ids)
    results["baselines"] = baselines(root)
    for r in results["runs"]:
        answers = vqa_metric.load_results(work / f"{r['variant']}.results.json", val.question_ids)
        r["truth_accuracy"] = truth_accuracy(truth, answers)
    output.write_text(json.dumps(results, indent=1) + "\n")
    return results


def render(results: dict) -> str:
    """The results as the ``results:easyvqa-vqa2`` section of docs/own-models.md."""
    head = DEFAULT_REVISION
    d, m = results["data"], results["machine"]
    lines = [f"`{results['command']}` on {m['cpu']} ({m['cpus']} CPUs; Python {m['python']}, torch {m['torch']}), "
             f"{results['created']}: {d['train_images']} easy-VQA train images as `train2014` "
             f"({d['questions']['train2014']:,} questions), {d['val_images']} easy-VQA *test* images as "
             f"`val2014` ({d['questions']['val2014']:,} questions, held out), seed {d['seed']}; "
             f"`vqa-train --dataset vqa2 {' '.join(results['train_flags'])}`, then `vqa-eval --split val2014 "
             f"--results`. Official accuracy on `val2014`:", "",
             f"| `vqa-train` | official accuracy ({head}) | yes/no | other | by the v2.0 file (a4f1afd) | "
             f"easy-VQA's answer matched: all / yes/no / shape / color | epoch chosen | training time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        new, old = r["scores"][head], r["scores"]["a4f1afd"]
        flags = " ".join(r["flags"]) or "defaults (the recipe)"
        t = r.get("truth_accuracy")
        matched = (f"{100 * t['accuracy']:.2f} / " + " / ".join(f"{100 * t['by_kind'].get(k, 0):.2f}"
                                                             for k in ("yes/no", "shape", "color"))) if t else "-"
        lines.append(f"| {r['variant']}: `{flags}` | **{new['overall']:.2f}** | {new['perAnswerType'].get('yes/no', 0):.2f} | "
                     f"{new['perAnswerType'].get('other', 0):.2f} | {old['overall']:.2f} | {matched} | "
                     f"{r['selected_epoch']} | {r['train_seconds']:.0f} s |")
    easy = results.get("easy_vqa") or []
    if easy:
        lines += ["", f"The easy-VQA path (`vqa-train`, its own labels) on the same {d['train_images']} pictures and "
                  f"budget, scored on its whole test split (plain accuracy; every question has one answer):", "",
                  "| `vqa-train` | accuracy | yes/no | shape | color | epoch chosen | training time |",
                  "|---|---|---|---|---|---|---|"]
        for r in easy:
            k = r["by_kind"]
            lines.append(f"| {r['variant']}: `{' '.join(r['flags']) or 'defaults'}` | **{100 * r['accuracy']:.2f}** | "
                         f"{100 * k.get('yes/no', 0):.2f} | {100 * k.get('shape', 0):.2f} | {100 * k.get('color', 0):.2f} | "
                         f"{r['selected_epoch']} | {r['train_seconds']:.0f} s |")
    b = results["baselines"]
    by_type = b.get("question_only_by_type", {})
    split = (f"; yes/no {by_type['yes/no']:.2f}, other {by_type['other']:.2f}" if by_type else "")
    lines += ["", f"Without looking at the image (official accuracy): {b['question_only']:.2f} (each question "
              f"text's most frequent training answer{split}), {b['majority_answer']:.2f} (the most frequent answer "
              f"for every question)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.easyvqa_vqa2", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the data set to a folder")
    rs = sub.add_parser("rescore", help="add the match with easy-VQA's own answers to a results file's runs")
    rs.add_argument("--output", type=Path, required=True, help="the results JSON of a run")
    rs.add_argument("--data", type=Path, required=True, help="the data folder of that run (or `write` with its seed)")
    rs.add_argument("--work", type=Path, required=True, help="the folder holding its <variant>.results.json files")
    w.add_argument("root", type=Path, help="folder to write (Questions/, Annotations/, Images/)")
    r = sub.add_parser("run", help="write it to a temporary folder, train and evaluate each variant")
    r.add_argument("--output", type=Path, required=True, help="results JSON")
    r.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of {', '.join(VARIANTS)}")
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--easy", default=",".join(EASY_VARIANTS),
                   help=f"easy-VQA path runs to compare, comma separated, of {', '.join(EASY_VARIANTS)} ('' for none)")
    for q in (w, r):
        q.add_argument("--train-images", type=int, default=4000, help="easy-VQA train images as train2014 (all: 4000)")
        q.add_argument("--val-images", type=int, default=1000, help="easy-VQA test images as val2014, held out (all: 1000)")
        q.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "rescore":
        rescore(args.output, args.data, args.work)
        return
    if args.command == "write":
        counts = make(args.root, args.train_images, args.val_images, args.seed)
        print(f"wrote {args.root}: " + ", ".join(f"{k} {v} questions" for k, v in counts.items()))
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(names) - set(VARIANTS):
        p.error(f"unknown variant(s) {sorted(unknown)}")
    easy = [v.strip() for v in args.easy.split(",") if v.strip()]
    if unknown := set(easy) - set(EASY_VARIANTS):
        p.error(f"unknown easy-VQA variant(s) {sorted(unknown)}")
    experiment(args.output, names, args.train_images, args.val_images, args.epochs, args.seed, easy)


if __name__ == "__main__":
    main()
