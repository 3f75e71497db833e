"""A small VQA v2 dataset in the exact official layout, generated (nothing can be downloaded).

Images are JPEGs of several sizes showing one to three shapes of one kind and colour on a
noisy background; questions follow VQA v2's question types ("what color is the", "is the",
"how many", "what shape is the", "is there a") with their answer types (other, yes/no,
number). Each question has ten annotator answers with realistic disagreement: most give the
right answer, some in another surface form the official normalisation merges ("Two" / "2",
"red." / "red", "the circle" / "circle") or does not ("two" next to "2"), some a wrong one.

``python -m tests.training.vqa2_fixture DIR`` writes one to DIR (for trying the commands).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (215, 35, 35), "green": (35, 160, 50), "blue": (35, 70, 215),
          "yellow": (235, 215, 40), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    count: int


def _draw(scene: Scene, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    base = rng.randint(90, 170)
    img = Image.effect_noise((w, h), 18).convert("RGB")
    tint = Image.new("RGB", (w, h), (base, base + rng.randint(-15, 15), base + rng.randint(-15, 15)))
    img = Image.blend(img, tint, 0.75)
    d = ImageDraw.Draw(img)
    color = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[scene.color])
    cells = rng.sample(range(4), scene.count)  # one shape per quadrant, so they never overlap
    for cell in cells:
        cx0, cy0 = (cell % 2) * w // 2, (cell // 2) * h // 2
        r = rng.randint(max(6, min(w, h) // 7), max(7, min(w, h) // 4 - 1))
        x = cx0 + rng.randint(r, max(r, w // 2 - r))
        y = cy0 + rng.randint(r, max(r, h // 2 - r))
        box = (x - r, y - r, x + r, y + r)
        if scene.shape == "circle":
            d.ellipse(box, fill=color)
        elif scene.shape == "square":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    return img


def _variant(answer: str, kind: str, rng: random.Random) -> str:
    """The same answer as an annotator might type it."""
    u = rng.random()
    if kind == "number":
        if u < 0.06:
            return NUMBER_WORDS[int(answer)]  # "two": the metric never maps annotators' words
        if u < 0.09:
            return NUMBER_WORDS[int(answer)].capitalize()
        return answer
    if u < 0.03:
        return answer + "."
    if u < 0.05 and kind == "other":
        return "the " + answer
    if u < 0.07:
        return answer.capitalize()
    return answer


def _annotators(truth: str, kind: str, wrong: list[str], rng: random.Random) -> list[dict]:
    p_right = rng.choice((1.0, 1.0, 0.95, 0.9, 0.8, 0.7, 0.6))
    answers = []
    for i in range(10):
        a = _variant(truth, kind, rng) if rng.random() < p_right else rng.choice(wrong)
        answers.append({"answer": a, "answer_confidence": rng.choice(("yes", "yes", "yes", "maybe", "no")),
                        "answer_id": i + 1})
    return answers


def _questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(question, question_type, answer_type, true answer) about ``scene``."""
    s, c, n = scene.shape, scene.color, scene.count
    noun = s if n == 1 else s + "s"
    other_c = rng.choice([x for x in COLORS if x != c])
    asked_c = c if rng.random() < 0.5 else other_c
    other_s = rng.choice([x for x in SHAPES if x != s])
    asked_s = s if rng.random() < 0.5 else other_s
    pool = [
        (f"What color is the {s}?", "what color is the", "other", c),
        (f"What color are the {noun}?" if n > 1 else f"What color is the {s} in the picture?",
         "what color is the" if n == 1 else "what color are the", "other", c),
        (f"Is the {s} {asked_c}?", "is the", "yes/no", "yes" if asked_c == c else "no"),
        (f"How many {s}s are there?", "how many", "number", str(n)),
        (f"What shape is the {c} object?", "what shape is the", "other", s),
        (f"Is there a {asked_s} in the image?", "is there a", "yes/no", "yes" if asked_s == s else "no"),
    ]
    return rng.sample(pool, rng.randint(3, 5))


WRONG = {"other": list(COLORS) + list(SHAPES), "yes/no": ["yes", "no"], "number": ["1", "2", "3", "4"]}


def write_split(root: Path, split: str, image_ids: list[int], rng: random.Random,
                annotations: bool = True) -> None:
    img_dir = root / "Images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    questions, anns = [], []
    for image_id in image_ids:
        scene = Scene(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(1, 3))
        size = (rng.randint(48, 112), rng.randint(48, 112))
        _draw(scene, size, rng).save(img_dir / f"COCO_{split}_{image_id:012d}.jpg", quality=90)
        for k, (q, qtype, atype, truth) in enumerate(_questions(scene, rng)):
            qid = image_id * 1000 + k  # VQA v2's own numbering
            questions.append({"image_id": image_id, "question": q, "question_id": qid})
            wrong = [w for w in WRONG[atype] if w != truth]
            answers = _annotators(truth, atype, wrong, rng)
            raw = [a["answer"] for a in answers]
            anns.append({"question_type": qtype, "multiple_choice_answer": max(set(raw), key=raw.count),
                         "answers": answers, "image_id": image_id, "answer_type": atype,
                         "question_id": qid})
    common = {"info": {"description": "vqa-serve test fixture in the VQA v2 layout", "version": "2.0"},
              "license": {"name": "generated for tests", "url": ""}, "data_subtype": split}
    (root / "Questions").mkdir(parents=True, exist_ok=True)
    (root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
        {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    if annotations:
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
            {**common, "data_type": "mscoco", "annotations": anns}))


def make_vqa2_fixture(root: Path, seed: int = 0, train_images: int = 240, val_images: int = 80,
                      test_images: int = 8) -> Path:
    """train2014 and val2014 with annotations, test2015 with questions only."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 581_930), train_images + val_images + test_images)
    write_split(root, "train2014", sorted(ids[:train_images]), rng)
    write_split(root, "val2014", sorted(ids[train_images : train_images + val_images]), rng)
    if test_images:
        write_split(root, "test2015", sorted(ids[train_images + val_images :]), rng, annotations=False)
    return root


if __name__ == "__main__":
    out = make_vqa2_fixture(Path(sys.argv[1]))
    print(f"wrote a VQA v2-layout fixture to {out}")
