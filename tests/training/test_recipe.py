"""The training recipe both datasets share (training/recipe.py): augmentation, the optimiser's
two learning rates and its schedule, the answer-bag auxiliary head's targets and loss."""

from __future__ import annotations

import pytest
import torch

from training.recipe import AnswerBagHead, answer_bags, augment, augmenter, optimizer_and_schedule
from tests.conftest import make_tiny_checkpoint


def _images(b: int = 4, size: int = 16) -> torch.Tensor:
    return torch.arange(b * 3 * size * size, dtype=torch.float32).reshape(b, 3, size, size) % 251


def test_shift_only_never_flips_and_moves_by_at_most_the_shift():
    images = _images()
    out = augment(images, torch.Generator().manual_seed(0), shift=2, flip=False)
    assert out.shape == images.shape
    for i in range(len(images)):
        # Some offset (dy, dx) within +-2 maps the input onto the output's interior.
        found = any(torch.equal(out[i, :, 2:-2, 2:-2], images[i, :, 2 - dy:14 - dy, 2 - dx:14 - dx])
                    for dy in range(-2, 3) for dx in range(-2, 3))
        assert found, i


def test_flips_happen_only_with_flip_shift():
    images = _images(64)
    gen = torch.Generator().manual_seed(1)
    flipped = augment(images, gen, shift=0, flip=True)
    n_flipped = sum(torch.equal(flipped[i], images[i].flip(-1)) for i in range(64))
    assert 10 < n_flipped < 54  # about half
    assert augmenter("none", 64, gen) is None
    shift_only = augmenter("shift", 64, torch.Generator().manual_seed(1))(images)
    assert not any(torch.equal(shift_only[i], images[i].flip(-1)) for i in range(64))
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmenter("rotate", 64, gen)


def test_uint8_pixels_stay_uint8():
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = augmenter("flip-shift", 32, torch.Generator().manual_seed(0))(pixels)
    assert out.dtype == torch.uint8 and out.shape == pixels.shape


def test_the_image_encoder_learns_at_its_own_rate_and_every_parameter_is_trained_once():
    model = make_tiny_checkpoint().model
    extra = torch.nn.Linear(4, 2)
    opt, sched = optimizer_and_schedule(model, list(extra.parameters()), image_lr=3e-4, lr=1e-3, total_steps=10)
    image, other = opt.param_groups
    assert image["lr"] == pytest.approx(3e-4) and other["lr"] == pytest.approx(1e-3)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())) + 2
    assert {id(p) for p in model.image_encoder.parameters()} == {id(p) for p in image["params"]}
    for _ in range(5):
        opt.step()
        sched.step()
    assert other["lr"] == pytest.approx(1e-3 * 0.5)  # half way down the cosine
    for _ in range(10):
        opt.step()
        sched.step()
    assert other["lr"] == pytest.approx(0.0, abs=1e-12)


def test_answer_bags_keep_each_answers_best_score_per_image():
    scores = [{0: 1.0, 3: 0.3}, {3: 0.9}, {1: 0.6}, {}]
    bags = answer_bags(scores, torch.tensor([0, 0, 1, 1]), 3)
    assert bags == [{0: 1.0, 3: 0.9}, {1: 0.6}, {}]


def test_answer_bag_loss_is_lowest_for_the_right_bag():
    head = AnswerBagHead(8, 4)
    target = torch.tensor([[1.0, 0.0, 0.9, 0.0]])
    right = torch.tensor([[9.0, -9.0, 4.0, -9.0]])
    wrong = -right
    assert AnswerBagHead.loss(right, target) < AnswerBagHead.loss(wrong, target)
    assert head(torch.zeros(2, 8)).shape == (2, 4)
