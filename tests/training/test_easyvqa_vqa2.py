"""easy-VQA laid out as VQA v2 (training/easyvqa_vqa2.py): the official layout, readable by
the VQA v2 loader, ten annotators per question with the variants and disagreement the issue
describes, train and held-out images from easy-VQA's own train and test splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa", reason="needs the easy-vqa package (the test extra installs it)")

from training import easyvqa_vqa2, vqa_metric  # noqa: E402
from training.vqa2 import load_vqa2  # noqa: E402


def test_the_layout_loads_and_the_annotators_vary(tmp_path: Path):
    counts = easyvqa_vqa2.make(tmp_path, train_images=40, val_images=20, seed=0)
    train = load_vqa2(tmp_path, "train2014", annotations=True)
    val = load_vqa2(tmp_path, "val2014", annotations=True)
    assert len(train) == counts["train2014"] and len(val) == counts["val2014"]
    assert len(train.image_ids) == 40 and len(val.image_ids) == 20
    raw = Counter()
    all_identical = 0
    for ann in train.annotations:
        assert len(ann["answers"]) == 10 and [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        assert ann["answer_type"] in ("yes/no", "other")
        raw.update(a["answer"] for a in ann["answers"])
        all_identical += len({a["answer"] for a in ann["answers"]}) == 1
    # Case, periods and articles that the metric merges where annotators disagree; some all agree.
    assert any(a[0].isupper() for a in raw) and any(a.endswith(".") for a in raw)
    assert any(a.startswith("the ") for a in raw)
    assert 0 < all_identical < len(train.annotations)
    types = Counter(a["question_type"] for a in train.annotations)
    assert "what color is the" in types and "is there a" in types and "none of the above" not in types
    # Every normalised answer is one of easy-VQA's 13.
    assert {vqa_metric.normalize_answer(a) for a in raw} <= {"yes", "no", "circle", "rectangle", "triangle", "red",
                                                             "green", "blue", "black", "gray", "teal", "brown",
                                                             "yellow"}


def test_the_held_out_split_comes_from_easy_vqas_test_images(tmp_path: Path):
    import easy_vqa

    easyvqa_vqa2.make(tmp_path, train_images=10, val_images=10, seed=3)
    val_questions = json.loads((tmp_path / "Questions" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    test_q, _, test_ids = easy_vqa.get_test_questions()
    by_image = {}
    for q, i in zip(test_q, test_ids):
        by_image.setdefault(i + 1, []).append(q)
    for q in val_questions["questions"]:
        assert q["question"] in by_image[q["image_id"]]


def test_question_types_are_vqa_prefixes():
    assert easyvqa_vqa2.question_type("What color is the triangle?") == "what color is the"
    assert easyvqa_vqa2.question_type("is there a red shape?") == "is there a"
    assert easyvqa_vqa2.question_type("does the image contain a circle?") == "does the"


def test_easy_vqas_own_answers_are_what_the_annotators_were_drawn_around(tmp_path: Path):
    """``easy_answers`` maps each val2014 question id back to easy-VQA's answer: where the ten
    annotators agree (up to the metric's normalisation), it is their answer; and the plain
    accuracy by kind counts exactly the matches."""
    easyvqa_vqa2.make(tmp_path, train_images=4, val_images=12, seed=1)
    val = load_vqa2(tmp_path, "val2014", annotations=True)
    truth = easyvqa_vqa2.easy_answers(val.question_ids)
    agreed = 0
    for q, qid in enumerate(val.question_ids):
        forms = {vqa_metric.normalize_answer(a) for a in val.annotator_answers(q)}
        if len(forms) == 1:
            assert forms == {truth[qid]}
            agreed += 1
    assert agreed > len(val.question_ids) // 3
    answers = dict(truth)
    flipped = next(q for q, t in truth.items() if t in ("yes", "no"))
    answers[flipped] = "no" if truth[flipped] == "yes" else "yes"
    scored = easyvqa_vqa2.truth_accuracy(truth, answers)
    assert scored["accuracy"] == pytest.approx(1 - 1 / len(truth))
    assert scored["by_kind"]["shape"] == scored["by_kind"]["color"] == 1.0 > scored["by_kind"]["yes/no"]
