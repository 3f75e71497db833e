"""VGG16 image encoder (VGG19, 13 or 11 by the config's ``depth``).

At ``width=1.0``, ``batch_norm=False`` and ``pool_size=7`` the backbone *is* torchvision's
``vgg16`` (same modules, same parameter names) with the last classifier layer removed, so
ImageNet weights (``vgg16-397923af.pth``) or any VGG16-based checkpoint load into it; with
``depth=19`` it is torchvision's ``vgg19`` the same way. A width multiplier, BatchNorm and a
smaller pooled grid build the compact encoder the shipped easy-VQA model uses from the very
same code path; every such choice lives in :class:`ImageEncoderConfig` and is recorded in the
checkpoint, together with how images are resized for it (:class:`models.transforms.ImageTransform`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

# torchvision's VGG configurations by depth: VGG16 is "D" (13 conv layers in 5 blocks, "M" =
# 2x2 max-pool), VGG19 is "E" (16 conv layers).
VGG_CFGS = {11: cfgs["A"], 13: cfgs["B"], 16: cfgs["D"], 19: cfgs["E"]}
VGG16_CFG = VGG_CFGS[16]
# The last torchvision classifier layer (4096 -> 1000 ImageNet classes) is dropped.
_DROPPED_CLASSIFIER_PREFIX = "classifier.6."


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Everything needed to rebuild an image encoder; stored in checkpoints."""

    image_size: int = 224
    width: float = 1.0  # channel multiplier for conv layers and the classifier
    batch_norm: bool = False  # False keeps torchvision's plain `vgg16` parameter names
    pool_size: int = 7  # side of the adaptive-avg-pooled grid fed to the classifier
    embed_size: int = 1024
    dropout: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    depth: int = 16  # VGG11/13/16/19 (torchvision's configurations A/B/D/E)
    # How an image is resized to image_size (see models.transforms.ImageTransform).
    resample: str = "bilinear"
    reducing_gap: float | None = 2.0
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.depth not in VGG_CFGS:
            raise ValueError(f"depth must be one of {sorted(VGG_CFGS)}, got {self.depth}")
        _ = self.transform  # validates the resize fields
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (5 max-pools), got {self.image_size}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        if self.pool_size < 1 or self.embed_size < 1:
            raise ValueError("pool_size and embed_size must be positive")

    @property
    def conv_cfg(self) -> list[int | str]:
        return [v if v == "M" else max(1, round(int(v) * self.width)) for v in VGG_CFGS[self.depth]]

    @property
    def feature_channels(self) -> int:
        return int([v for v in self.conv_cfg if v != "M"][-1])

    @property
    def hidden_size(self) -> int:
        return max(1, round(4096 * self.width))

    @property
    def transform(self) -> ImageTransform:
        """The image -> input transform this encoder was trained with."""
        return ImageTransform(image_size=self.image_size, resample=self.resample,
                              reducing_gap=self.reducing_gap, jpeg_draft=self.jpeg_draft,
                              mean=self.mean, std=self.std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageEncoderConfig":
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(x) for x in d[key])
        return cls(**d)


class VGGBackbone(nn.Module):
    """torchvision's VGG (16 unless the config says otherwise) minus its last classifier layer: image -> ``hidden_size`` features.

    Module names (``features``, ``avgpool``, ``classifier``) and indices mirror
    ``torchvision.models.VGG`` so their state dicts are interchangeable.
    """

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.features = make_layers(cfg.conv_cfg, batch_norm=cfg.batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((cfg.pool_size, cfg.pool_size))
        in_features = cfg.feature_channels * cfg.pool_size * cfg.pool_size
        self.classifier = nn.Sequential(
            nn.Linear(in_features, cfg.hidden_size),
            nn.ReLU(True),
            nn.Dropout(p=cfg.dropout),
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
            nn.ReLU(True),
            nn.Dropout(p=cfg.dropout),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Same initialisation as torchvision.models.VGG(init_weights=True).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class ImageEncoder(nn.Module):
    """VGG backbone -> linear projection -> L2 normalisation (unit-norm ``embed_size``)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = VGGBackbone(cfg)
        self.projection = nn.Linear(cfg.hidden_size, cfg.embed_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(images))

    def embed(self, backbone_features: torch.Tensor) -> torch.Tensor:
        """Backbone output (e.g. cached features) -> the unit image embedding."""
        features = self.projection(backbone_features)
        # Normalise in float32 even under autocast: fp16 sums of squares overflow.
        return F.normalize(features.float(), p=2, dim=1)

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a ``torchvision.models.vgg16`` (``vgg19`` at depth 19) state dict strictly into the backbone.

        Only the dropped final classifier layer may be absent or extra; every other key
        must match in name and shape, otherwise a ``RuntimeError`` names the mismatch.
        """
        kept = {k: v for k, v in state_dict.items() if not k.startswith(_DROPPED_CLASSIFIER_PREFIX)}
        self.backbone.load_state_dict(kept, strict=True)

    def load_torchvision_weights_file(self, path: str | Path) -> None:
        """Initialise the backbone from a torchvision VGG16 weights file (e.g. the ImageNet
        ``vgg16-397923af.pth``), read with ``weights_only=True`` so no pickle code runs."""
        state_dict = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
        self.load_torchvision_state_dict(state_dict)
