"""easy-VQA loaded into memory: images as one uint8 tensor, questions grouped by image.

Images are stored once and questions point at them, so a training step encodes each image
once however many questions it carries (~10 per image in easy-VQA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from models.transforms import pil_to_uint8

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def question_kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    return "other"


@dataclass
class VQASplit:
    images: torch.Tensor  # [N_images, 3, S, S] uint8
    questions: list[str]
    answers: list[str]
    image_index: torch.Tensor  # [N_questions] long: row of `images` each question is about
    image_ids: list[int]  # dataset image id of each row of `images`

    def __len__(self) -> int:
        return len(self.questions)

    def subset_images(self, rows: list[int]) -> "VQASplit":
        """The split restricted to the images at ``rows`` (with all their questions)."""
        remap = {r: i for i, r in enumerate(rows)}
        keep = [q for q in range(len(self)) if int(self.image_index[q]) in remap]
        return VQASplit(
            images=self.images[rows],
            questions=[self.questions[q] for q in keep],
            answers=[self.answers[q] for q in keep],
            image_index=torch.tensor([remap[int(self.image_index[q])] for q in keep], dtype=torch.long),
            image_ids=[self.image_ids[r] for r in rows],
        )


def load_easy_vqa(split: str, image_size: int = 64) -> VQASplit:
    """Load the easy-VQA ``train`` or ``test`` split (PyPI package ``easy-vqa``)."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("easy-VQA data needs the 'easy-vqa' package: pip install -e '.[train]'") from e
    if split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"unknown split {split!r}")
    image_ids = sorted(paths)
    row = {img_id: i for i, img_id in enumerate(image_ids)}
    images = torch.empty((len(image_ids), 3, image_size, image_size), dtype=torch.uint8)
    for img_id in image_ids:
        with Image.open(paths[img_id]) as im:
            images[row[img_id]] = pil_to_uint8(im.convert("RGB"), image_size)
    return VQASplit(
        images=images,
        questions=list(questions),
        answers=list(answers),
        image_index=torch.tensor([row[i] for i in ids], dtype=torch.long),
        image_ids=image_ids,
    )


def image_attribute_labels(split: VQASplit) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (shape, colour) class labels read off the questions, -1 where unknown.

    Used only by the auxiliary training head: "what shape is in the image?" -> circle gives the
    shape, "what is the blue shape?" -> circle gives both, and so on.
    """
    shape = torch.full((len(split.images),), -1, dtype=torch.long)
    color = torch.full((len(split.images),), -1, dtype=torch.long)
    for q, a, row in zip(split.questions, split.answers, split.image_index.tolist()):
        words = set(q.lower().replace("?", " ").split())
        if a in SHAPES:
            shape[row] = SHAPES.index(a)
            for c in COLORS:
                if c in words:
                    color[row] = COLORS.index(c)
        elif a in COLORS:
            color[row] = COLORS.index(a)
            for s in SHAPES:
                if s in words:
                    shape[row] = SHAPES.index(s)
    return shape, color
