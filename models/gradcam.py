"""Grad-CAM ("where did it look"): which cells of the image drove the model's top answer.

Selvaraju et al., *Grad-CAM* (ICCV 2017): take the feature maps ``A`` of a convolutional layer,
the gradient of the answer's logit with respect to them, average that gradient over space to
weigh each channel, and keep the positive part of the weighted sum of maps:
``cam = relu(sum_c mean_xy(d logit / d A_c) * A_c)``, scaled to [0, 1] by its maximum.
HiResCAM (Draelos & Carin, 2020) skips the spatial average: ``relu(sum_c dlogit/dA_c * A_c)``
cell by cell; it is the default (see :data:`DEFAULT_METHOD`), both come from the same pass.

**Which score.** The gradient is that of the top answer's log-probability rather than of its
raw logit (see :func:`_contrastive_score`): on the shipped model the raw logit's heat fell
largely on the background, evidence for every shape answer at once.

**Which layer.** The output of the last convolution (after its ReLU) of a VGG16 block, before
that block's max-pool: the *deepest* block whose grid is still at least
:data:`MIN_GRID` cells a side. Deeper maps are more about the answer, shallower ones are
finer; 8x8 is the coarsest grid that still shows where a shape is. With VGG16's four
max-pools before block 5, block *k* sees the input at 1/2^(k-1) scale:

* shipped easy-VQA model, 64x64 input: block 4 (8x8); block 5 would give 4x4;
* full-size VGG16, 224x224: block 5, the last convolutional block (14x14).

Runs with gradients (no ``inference_mode``) and in float32 (no autocast), on a model in eval
mode, so it needs its own call, never a batched forward pass. Only the part of the network
after the chosen layer is differentiated (the feature maps are the leaf), and no parameter
gradient is computed or kept. Knows nothing of HTTP or batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vqa import VQAModel

MIN_GRID = 8


@dataclass(frozen=True)
class CamLayer:
    block: int  # 1-based VGG16 block
    cut: int  # index in ``backbone.features`` of the max-pool that ends the block
    grid: int  # side of the block's output grid at the model's input size
    convs: int = 3  # convolutions in the block: the explained one is conv<block>_<convs>
    depth: int = 16  # VGG depth of the backbone

    @property
    def name(self) -> str:
        return f"VGG{self.depth} block {self.block}: conv{self.block}_{self.convs} after ReLU, before its max-pool"


def block_grid_sides(image_size: int, blocks: int = 5) -> list[int]:
    """Side of each VGG16 block's convolution output for a square ``image_size`` input."""
    sides, s = [], image_size
    for _ in range(blocks):
        sides.append(s)
        s //= 2  # the block's 2x2 max-pool (floor)
    return sides


def cam_layer(model: VQAModel, min_grid: int = MIN_GRID) -> CamLayer:
    """The layer Grad-CAM explains for ``model`` (see the module docstring)."""
    features = model.image_encoder.backbone.features
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    sides = block_grid_sides(model.cfg.image.image_size, len(pools))
    usable = [k for k, s in enumerate(sides) if s >= min_grid]
    k = usable[-1] if usable else 0  # tiny inputs: the finest grid there is
    start = pools[k - 1] if k else 0
    convs = sum(isinstance(m, nn.Conv2d) for m in features[start : pools[k]])
    return CamLayer(block=k + 1, cut=pools[k], grid=sides[k], convs=convs, depth=model.cfg.image.depth)


METHODS = ("grad-cam", "hirescam")
# Served by default: HiResCAM. Grad-CAM's channel weights average the gradient over the grid,
# which is exact only when the layers after the explained one are a global average pool and a
# linear map. Here block 5, a 2x2 pool and the position-aware VGG classifier follow block 4, and
# on the shipped model HiResCAM put clearly more of its heat in the shape's box than Grad-CAM
# (bench/results/explain.json has both, side by side, beside the uniform-heat baseline).
DEFAULT_METHOD = "hirescam"


@dataclass
class GradCam:
    heatmap: torch.Tensor  # [rows, cols] float32 in [0, 1] on the CPU; row 0 is the image's top
    answer_index: int  # the answer explained (the top answer of this pass)
    probs: torch.Tensor  # [num_answers] this pass's answer probabilities
    layer: CamLayer
    method: str = "grad-cam"


def _contrastive_score(logits: torch.Tensor, target: int) -> torch.Tensor:
    """A score whose gradient is that of the answer's log-probability, up to a positive factor:
    ``d log p_t = (1 - p_t) * d(z_t - sum_j w_j z_j)`` with ``w`` the softmax of the other logits
    (held constant). "Why this answer rather than the others": evidence that raises every
    answer's logit alike (the background, for a shape question) cancels out, which the raw
    logit's gradient keeps. Computed this way it never saturates, however sure the model is
    (``1 - p_t`` rounds to 0 in float32 at p_t > 0.99999994; the map is scaled to its maximum)."""
    if logits.numel() == 1:
        return logits[0]
    others = torch.cat([logits[:target], logits[target + 1 :]])
    weights = torch.softmax(others.detach(), dim=0)
    return logits[target] - (weights * others).sum()


def grad_cam(model: VQAModel, pixels: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
             layer: CamLayer | None = None, answer_index: int | None = None,
             method: str = "grad-cam") -> GradCam:
    """Grad-CAM of one image and one question.

    ``pixels``: [1, 3, H, W] normalised, on the model's device; ``ids``/``lengths``: the
    question, [1, T] / [1]. Explains ``answer_index`` (default: the top answer). ``method``:
    ``grad-cam`` weighs each channel by its gradient averaged over the grid; ``hirescam``
    (Draelos & Carin, 2020) multiplies gradient and activation cell by cell before summing over
    channels, so a cell counts only where the gradient itself points at it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if pixels.shape[0] != 1 or ids.shape[0] != 1:
        raise ValueError("grad_cam explains one image and one question")
    if model.training:
        raise ValueError("grad_cam needs the model in eval mode (dropout and BatchNorm fixed)")
    layer = layer or cam_layer(model)
    backbone = model.image_encoder.backbone
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            maps = backbone.features[: layer.cut](pixels.clone().float())
            # The question does not depend on the image: encoded without a graph (a cuDNN LSTM
            # cannot even run backward in eval mode).
            q = model.question_encoder(ids.clone(), lengths.clone())
        # A fresh leaf: the backward pass stops here and touches no parameter's .grad.
        maps = maps.detach().clone().requires_grad_(True)
        x = backbone.features[layer.cut :](maps)
        x = torch.flatten(backbone.avgpool(x), 1)
        feature = model.image_encoder.embed(backbone.classifier(x))
        # VQAModel.answer_logits with the question already encoded (imported checkpoints may
        # fuse the unit feature without a learned scale).
        if model.image_scale is not None:
            feature = model.image_scale * feature
        logits = model.head(feature.to(q.dtype) * q).float()
        target = int(logits[0].argmax()) if answer_index is None else int(answer_index)
        (grad,) = torch.autograd.grad(_contrastive_score(logits[0], target), maps)
    with torch.no_grad():
        if method == "grad-cam":
            weights = grad.mean(dim=(2, 3), keepdim=True)  # [1, C, 1, 1]: one weight per channel
        else:
            weights = grad  # [1, C, h, w]: per cell
        cam = torch.relu((weights * maps).sum(dim=1))[0].float()  # [h, w]
        peak = cam.max()
        cam = cam / peak if peak > 0 else torch.zeros_like(cam)
        probs = torch.softmax(logits[0], dim=0)
    return GradCam(heatmap=cam.float().cpu(), answer_index=target, probs=probs.cpu(), layer=layer, method=method)
