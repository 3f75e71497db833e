"""The VQA network: image encoder x question encoder -> fusion head -> answer logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .question import QuestionEncoder, QuestionEncoderConfig
from .vgg import ImageEncoder, ImageEncoderConfig


@dataclass(frozen=True)
class VQAConfig:
    image: ImageEncoderConfig
    question: QuestionEncoderConfig
    num_answers: int
    head_hidden: int = 1000
    dropout: float = 0.5
    # The L2-normalised image feature is multiplied by a learnable scale before fusion;
    # without it the unit vector's tiny entries starve the product of signal. Models trained
    # without one (learned_image_scale=False) fuse the unit vector itself.
    image_scale_init: float = 1.0
    learned_image_scale: bool = True

    def __post_init__(self) -> None:
        if self.image.embed_size != self.question.embed_size:
            raise ValueError(
                f"image and question embed sizes differ: {self.image.embed_size} != "
                f"{self.question.embed_size}"
            )

    def to_dict(self) -> dict:
        return {
            "image": self.image.to_dict(),
            "question": self.question.to_dict(),
            "num_answers": self.num_answers,
            "head_hidden": self.head_hidden,
            "dropout": self.dropout,
            "image_scale_init": self.image_scale_init,
            "learned_image_scale": self.learned_image_scale,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "VQAConfig":
        d = dict(d)
        return cls(
            image=ImageEncoderConfig.from_dict(d.pop("image")),
            question=QuestionEncoderConfig.from_dict(d.pop("question")),
            **d,
        )


class VQAModel(nn.Module):
    def __init__(self, cfg: VQAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image)
        self.question_encoder = QuestionEncoder(cfg.question)
        self.image_scale = (nn.Parameter(torch.tensor(float(cfg.image_scale_init)))
                            if cfg.learned_image_scale else None)
        embed = cfg.image.embed_size
        self.head = nn.Sequential(
            nn.Tanh(),
            nn.Dropout(cfg.dropout),
            nn.Linear(embed, cfg.head_hidden),
            nn.Tanh(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, cfg.num_answers),
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, embed] unit vectors (cacheable)."""
        return self.image_encoder(images)

    def answer_logits(
        self, image_features: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Fuse one image feature per question with its question: [B, embed] x [B, T] -> [B, A]."""
        q = self.question_encoder(ids, lengths)
        if self.image_scale is not None:
            image_features = self.image_scale * image_features
        fused = image_features.to(q.dtype) * q
        return self.head(fused)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.answer_logits(self.encode_images(images), ids, lengths)
