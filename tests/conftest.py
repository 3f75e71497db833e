"""Shared fixtures: a tiny random-weight model (fast) and the shipped checkpoint (real)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from models import (
    AnswerVocabulary,
    Checkpoint,
    ImageEncoderConfig,
    QuestionEncoderConfig,
    VQAConfig,
    VQAModel,
    Vocabulary,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = REPO / "weights" / "easy-vqa.safetensors"
ANSWERS = ["circle", "rectangle", "triangle", "red", "blue", "yes", "no"]
QUESTIONS = ["what shape is in the image", "what color is the shape", "is there a red circle",
             "is there not a blue triangle in the image"]


def tiny_config(vocab_size: int, num_answers: int = len(ANSWERS), image_size: int = 32) -> VQAConfig:
    return VQAConfig(
        image=ImageEncoderConfig(image_size=image_size, width=1 / 16, batch_norm=True, pool_size=1,
                                 embed_size=16, dropout=0.0),
        question=QuestionEncoderConfig(vocab_size=vocab_size, word_dim=8, hidden_size=8, num_layers=2,
                                       embed_size=16),
        num_answers=num_answers, head_hidden=16, dropout=0.0, image_scale_init=4.0,
    )


def make_tiny_checkpoint(seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    vocab = Vocabulary.build(QUESTIONS)
    model = VQAModel(tiny_config(len(vocab))).eval()
    # BatchNorm running stats start at 0/1; give them non-trivial values so eval mode matters.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return Checkpoint(model=model, vocab=vocab, answers=AnswerVocabulary(ANSWERS), name="tiny-test",
                      info={"note": "random weights for tests"})


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests need a real GPU: skipped here, saying so, when there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                   "bench/gpu_check.sh runs these on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def tiny_checkpoint() -> Checkpoint:
    return make_tiny_checkpoint()


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, make_tiny_checkpoint())
    return path


@pytest.fixture(scope="session")
def shipped_weights() -> Path:
    assert SHIPPED_WEIGHTS.is_file(), f"shipped weights missing: {SHIPPED_WEIGHTS}"
    return SHIPPED_WEIGHTS


def png_bytes(color=(200, 30, 30), size=(64, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()
