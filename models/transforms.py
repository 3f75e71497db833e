"""The one image -> model-input transform, shared by the service, training and evaluation,
so that what was measured offline is exactly what the server computes."""

from __future__ import annotations

from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image


def pil_to_uint8(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> [3, S, S] uint8, resized (whole image, aspect not preserved: every
    pixel may hold the answer) with a reducing gap so large photos shrink cheaply."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return TF.pil_to_tensor(img)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised with per-channel ``mean``/``std``."""
    x = pixels.to(torch.float32).div_(255.0)
    return TF.normalize(x, list(mean), list(std))
