"""The one image -> model-input transform, shared by the service, training and evaluation,
so that what was measured offline is exactly what the server computes.

How an image is resized is part of the model (a model trained on LANCZOS-resized photos sees
slightly different pixels through a bilinear filter), so the choices are fields of the image
encoder's config, stored in the checkpoint; :class:`ImageTransform` is built from them. The
defaults are this project's own pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def pil_to_uint8(img: Image.Image, image_size: int, resample: str = "bilinear",
                 reducing_gap: float | None = 2.0) -> torch.Tensor:
    """RGB PIL image -> [3, S, S] uint8, resized (whole image, aspect not preserved: every
    pixel may hold the answer). The default bilinear filter with a reducing gap shrinks large
    photos cheaply; ``reducing_gap=None`` is PIL's plain (exact) ``resize``."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), RESAMPLING[resample], reducing_gap=reducing_gap)
    return TF.pil_to_tensor(img)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised with per-channel ``mean``/``std``
    (the same numbers as torchvision's ``ToTensor`` then ``Normalize``)."""
    x = pixels.to(torch.float32).div_(255.0)
    return TF.normalize(x, list(mean), list(std))


@dataclass(frozen=True)
class ImageTransform:
    """A decoded image -> the model's input, as its checkpoint says.

    ``jpeg_draft`` lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (never below
    ``image_size``) before the resize: far cheaper, but not bit-identical to resizing the full
    decode, so a model trained on full decodes turns it off.
    """

    image_size: int
    resample: str = "bilinear"
    reducing_gap: float | None = 2.0
    jpeg_draft: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLING:
            raise ValueError(f"unknown resample filter {self.resample!r}: use one of {sorted(RESAMPLING)}")
        if self.reducing_gap is not None and self.reducing_gap < 1:
            raise ValueError(f"reducing_gap must be >= 1 or None, got {self.reducing_gap}")

    def draft(self, img: Image.Image) -> None:
        """Before decoding (``img.load()``): choose a reduced JPEG decode scale, if allowed."""
        if self.jpeg_draft and img.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEG (phones)
            img.draft("RGB", (self.image_size, self.image_size))

    def resize(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> [3, S, S] uint8."""
        return pil_to_uint8(img, self.image_size, self.resample, self.reducing_gap)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalize(pixels, self.mean, self.std)

    def open(self, path) -> torch.Tensor:
        """An image file (trusted: a dataset on disk) -> [3, S, S] uint8, decoded as the
        service decodes uploads (draft, EXIF orientation, RGB, resize)."""
        from PIL import ImageOps

        with Image.open(path) as img:
            self.draft(img)
            img.load()
            img = ImageOps.exif_transpose(img)
            return self.resize(img if img.mode == "RGB" else img.convert("RGB"))
