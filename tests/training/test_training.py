"""Training and evaluation commands: a smoke run (a few steps, never a full training) and the
shipped weights' accuracy on the *whole* easy-VQA test split."""

import json

import pytest
import torch
from pathlib import Path

from models import load_checkpoint
from training import evaluate, model_card, train
from training.data import image_attribute_labels, load_easy_vqa, question_kind


def test_shipped_weights_accuracy_on_the_whole_test_split(shipped_weights, capsys):
    evaluate.main([str(shipped_weights), "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["questions"] == 9673 and report["images"] == 1000
    assert report["accuracy"] >= 0.998, report
    assert set(report["by_kind"]) == {"yes/no", "color", "shape"}
    assert sum(k["questions"] for k in report["by_kind"].values()) == 9673
    assert report["expected_calibration_error"] < 0.01  # confidences mean what they say
    # The same test images asked in held-out natural phrasings (training/phrasings.py: EVAL).
    natural = report["natural_phrasings"]
    assert natural["questions"] == 9673 and natural["accuracy"] >= 0.97, natural
    assert natural["expected_calibration_error"] < 0.02
    # weights/README.md is generated from the committed weights/eval/easy-vqa.json: it must be
    # this file's measurement, and what this run measures
    committed = json.loads(model_card.RESULTS["shipped"].read_text())
    assert committed["checkpoint_sha256"] == report["checkpoint_sha256"]
    for part in ((committed, report), (committed["natural_phrasings"], natural)):
        assert part[0]["correct"] == part[1]["correct"] and part[0]["questions"] == part[1]["questions"]
        assert part[0]["expected_calibration_error"] == pytest.approx(part[1]["expected_calibration_error"], abs=1e-4)


def test_model_card_is_generated_from_the_committed_results():
    card = model_card.CARD.read_text()
    results = model_card.load_results()
    assert model_card.render(card, results, load_checkpoint(model_card.SHIPPED).info) == card, \
        "weights/README.md is out of date: python -m training.model_card"
    assert f"sha256 `{results['shipped']['checkpoint_sha256']}`" in card
    assert "| **this checkpoint** |" in card and "82.34% (7,965/9,673)" in card  # the previous checkpoint's row
    # the project README quotes the same figures
    readme = " ".join((model_card.WEIGHTS_DIR.parent / "README.md").read_text().replace("*", "").split())
    shipped = results["shipped"]
    assert f"{100 * shipped['accuracy']:.2f}% on the easy-VQA test split" in readme
    assert f"{100 * shipped['natural_phrasings']['accuracy']:.2f}% on the same questions asked the way people talk" in readme
    assert f"expected calibration error {100 * shipped['expected_calibration_error']:.2f} points" in readme


def test_expected_calibration_error():
    conf = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    right = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    # bin of 0.9: accuracy 0.75 (gap 0.15, weight 4/6); bin of 0.6: accuracy 0.5 (gap 0.1, weight 2/6)
    assert evaluate.expected_calibration_error(conf, right) == pytest.approx(0.15 * 4 / 6 + 0.1 * 2 / 6)
    assert evaluate.expected_calibration_error(torch.ones(4), torch.ones(4)) == 0


def test_shipped_checkpoint_records_how_it_was_made(shipped_weights):
    info = load_checkpoint(shipped_weights).info
    assert info["seed"] == 0 and info["selected_epoch"] >= 1
    assert info["val_images"] == 400 and info["train_images"] == 3600  # validation held out of train
    assert info["hyperparameters"]["rephrase_prob"] == 0.5  # trained with natural phrasings
    defaults = vars(train.resolve_defaults(train.build_parser().parse_args([])))  # as vqa-train's main()
    assert {k: defaults[k] for k in info["hyperparameters"]} == info["hyperparameters"]  # vqa-train's defaults
    assert "test" not in info["dataset"]
    assert shipped_weights.stat().st_size <= 25 * 1024 * 1024


def test_train_smoke_run_writes_a_loadable_checkpoint(tmp_path: Path, capsys):
    out = tmp_path / "smoke.safetensors"
    train.main(["--out", str(out), "--epochs", "1", "--limit-images", "64", "--batch-images", "16",
                "--quiet", "--device", "cpu"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["selected_epoch"] == 1
    ckpt = load_checkpoint(out)
    assert ckpt.info["train_images"] + ckpt.info["val_images"] == 64
    assert len(ckpt.answers) == 13


def test_eval_text_report(tmp_path: Path, capsys, shipped_weights):
    evaluate.main([str(shipped_weights), "--device", "cpu"])
    text = capsys.readouterr().out
    assert "accuracy" in text and "yes/no" in text and "9673 questions" in text
    assert "natural phrasings" in text and "examples:" in text


def test_attribute_labels_agree_with_answers():
    split = load_easy_vqa("test")
    shape, color = image_attribute_labels(split)
    assert (shape >= 0).float().mean() > 0.8 and (color >= 0).float().mean() > 0.8
    # every "what shape" answer agrees with the derived label of its image
    for q, a, row in zip(split.questions, split.answers, split.image_index.tolist()):
        if question_kind(a) == "shape":
            from training.data import SHAPES
            assert SHAPES[int(shape[row])] == a
