"""The training recipe both datasets share (``vqa-train``, ``vqa-train --dataset vqa2``).

What made the compact VGG16 + LSTM learn to *see* on easy-VQA, on this project's 2-core CPU,
and what of it carries over to VQA v2 (issue 26 measured each part on easy-VQA laid out as VQA
v2; ``weights/README.md`` and ``docs/own-models.md`` have the figures):

* **a learnable scale on the L2-normalised image feature** (``VQAConfig.image_scale_init``):
  a unit vector fused by element-wise product with the question feature gives the head
  logits too small to learn from; both datasets.
* **a lower learning rate for the image encoder** (``--image-lr`` 3e-4, the rest ``--lr``
  1e-3), one cosine decay over the run: both datasets.
* **light augmentation**: +-``image_size / 16`` px shifts (edge-replicated) on both;
  horizontal flips on easy-VQA only, where no question is about left and right (VQA v2 asks
  "what is on the left?": a flipped picture would be trained with the wrong answer).
* **an auxiliary head on the image feature alone**, training only, so the encoder is pushed to
  encode what the questions ask about before the fusion learns to use it. On easy-VQA it
  predicts the shape and colour read off the questions (:class:`training.train.AuxHead`); VQA v2
  has no such labels, so :class:`QuestionTypeHead` answers each *kind* of open-ended question
  (the annotations' ``question_type``) from the image alone, one softmax per kind -- the same
  signal in a form any VQA dataset has. Without an auxiliary head neither dataset learns shapes
  within 10 epochs (issue 26 measured it); one softmax over all of an image's answers
  (:class:`AnswerBagHead`, or colour and shape 0.5/0.5) learns colours but not shapes, and a kind
  that asks about different things (easy-VQA's "what is the": its shape, or its colour) is
  left out for the same reason (:func:`consistent_question_types`).
* **model selection** on a validation split held out from the training images; the split to
  report is only read by ``vqa-eval``.
"""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import ImageEncoderConfig, QuestionEncoderConfig, VQAConfig, VQAModel

AUGMENTATIONS = ("none", "shift", "flip-shift")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compact_config(vocab_size: int, num_answers: int, args: argparse.Namespace) -> VQAConfig:
    return VQAConfig(
        image=ImageEncoderConfig(
            image_size=args.image_size,
            width=args.width,
            batch_norm=not args.no_batch_norm,
            pool_size=args.pool_size,
            embed_size=args.embed_size,
            dropout=args.dropout,
            depth=args.vgg_depth,
        ),
        question=QuestionEncoderConfig(
            vocab_size=vocab_size,
            word_dim=args.word_dim,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            embed_size=args.embed_size,
            max_tokens=32,
        ),
        num_answers=num_answers,
        head_hidden=args.head_hidden,
        dropout=args.dropout,
        image_scale_init=args.image_scale_init,
    )


def augment(images: torch.Tensor, gen: torch.Generator, shift: int = 4, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip (``flip``) and +-``shift`` px translation (edge-replicated) per
    image of a ``[b, 3, h, w]`` batch."""
    b, _, h, w = images.shape
    if flip:
        flips = torch.rand(b, generator=gen) < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    if shift <= 0:
        return images
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def augmenter(kind: str, image_size: int, gen: torch.Generator):
    """The augmentation ``kind`` (``AUGMENTATIONS``) as a function of a batch, or None for
    ``none``. Shifts are ``image_size / 16`` px (4 at 64 x 64, 14 at 224 x 224)."""
    if kind == "none":
        return None
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; one of {', '.join(AUGMENTATIONS)}")
    shift = max(1, image_size // 16)
    flip = kind == "flip-shift"
    return lambda images: augment(images, gen, shift, flip)


def optimizer_and_schedule(model: VQAModel, extra: list[nn.Parameter], image_lr: float, lr: float,
                           total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with the image encoder's trainable parameters at ``image_lr`` and everything else
    (the rest of the model, ``extra``: auxiliary heads) at ``lr``; one cosine decay to 0 over
    ``total_steps``."""
    image_params = [p for p in model.image_encoder.parameters() if p.requires_grad]
    in_image = {id(p) for p in model.image_encoder.parameters()}
    other = [p for p in model.parameters() if id(p) not in in_image] + list(extra)
    optimizer = torch.optim.Adam([{"params": image_params, "lr": image_lr}, {"params": other, "lr": lr}])
    steps = max(1, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    return optimizer, scheduler


class AnswerBagHead(nn.Module):
    """Training-only: from an image's (scaled) feature alone, which answers its questions have.

    The target of an image is, per vocabulary answer, the highest soft score that answer has
    among the image's questions (0 where none): a multi-label target learnt with a binary
    cross-entropy. Answers every image has (``yes``, ``no``) carry little; the colours, shapes,
    counts and objects a picture's questions are answered with carry the rest."""

    def __init__(self, embed: int, num_answers: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed, num_answers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats)

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / max(1, logits.shape[0])


def answer_bags(scores: list[dict[int, float]], image_index: torch.Tensor, num_images: int) -> list[dict[int, float]]:
    """Per image, answer id -> the highest soft score it has among the image's questions."""
    bags: list[dict[int, float]] = [{} for _ in range(num_images)]
    for q, row in enumerate(image_index.tolist()):
        bag = bags[row]
        for a, s in scores[q].items():
            if s > bag.get(a, 0.0):
                bag[a] = s
    return bags


class QuestionTypeHead(nn.Module):
    """Training-only: from an image's (scaled) feature alone, for each *kind* of open-ended
    question (the annotations' ``question_type``: "what color is the", "what shape is", "how
    many", ...), the answer -- one softmax per kind, so that learning what colour a picture is
    does not compete with learning what shape it is. Each open-ended question of an image is a
    training example of its kind's head; yes/no questions say nothing without their words."""

    def __init__(self, embed: int, num_answers: int, num_types: int) -> None:
        super().__init__()
        self.num_answers, self.num_types = num_answers, num_types
        self.linear = nn.Linear(embed, num_answers * num_types)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats).view(-1, self.num_types, self.num_answers)

    @staticmethod
    def loss(logits: torch.Tensor, rows: torch.Tensor, types: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``rows``/``types``/``target``: per open-ended question, its image's row in ``logits``,
        its kind and its answer distribution."""
        if len(rows) == 0:
            return logits.sum() * 0
        return F.cross_entropy(logits[rows, types], target / target.sum(1, keepdim=True))


def consistent_question_types(split, targets: list[dict[int, float]], open_ended: list[bool],
                              min_agreement: float = 0.8) -> list[str]:
    """The open-ended question types whose questions about one image get one answer: where an
    image is asked two questions of the type, their top answers agree at least
    ``min_agreement`` of the time. A type that asks about different things (easy-VQA's "what
    is the": its shape, or its colour) would teach a head a blend of both answers; it is left
    out. Types never asked twice about an image are kept."""
    by_type: dict[str, dict[int, list[int]]] = {}
    for q, qid in enumerate(split.question_ids):
        if not open_ended[q] or not targets[q]:
            continue
        kind = split.by_question[qid]["question_type"]
        top = max(targets[q], key=targets[q].get)
        by_type.setdefault(kind, {}).setdefault(int(split.image_index[q]), []).append(top)
    kept = []
    for kind, images in sorted(by_type.items()):
        pairs = agree = 0
        for tops in images.values():
            for i in range(1, len(tops)):
                pairs += 1
                agree += tops[i] == tops[0]
        if pairs == 0 or agree / pairs >= min_agreement:
            kept.append(kind)
    return kept
