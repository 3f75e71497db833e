"""Predictor: owns device placement, precision, eval mode and inference mode.

It knows nothing of HTTP or batching policy: it takes a list of images (pixels, or image
features computed earlier) each with one or more questions, runs one batched forward pass,
and returns per-question answer probabilities plus each image's feature for caching.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .checkpoint import Checkpoint, load_checkpoint
from .gradcam import DEFAULT_METHOD, GradCam, cam_layer, grad_cam
from .question import pad_questions
from .transforms import normalize
from .vocab import EncodedQuestion
from .vqa import VQAModel

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": None, "float32": None, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> first CUDA device when available, else CPU; ``cpu``, ``cuda``, ``cuda:N``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"invalid device {spec!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain float32. ``auto``: bf16 (fp16 on GPUs without bf16)
    on CUDA, float32 on CPU."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in _PRECISIONS:
        raise ValueError(f"invalid precision {spec!r}: use auto, fp32, fp16 or bf16")
    dtype = _PRECISIONS[spec]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 autocast is not supported on CPU; use bf16 or fp32")
    return dtype


@dataclass
class ImageQuestions:
    """One image and its questions. The image is ``pixels`` [3, H, W] -- uint8 RGB (normalised
    by the predictor, on the device) or float32 already normalised -- or a cached ``features``
    [E] from an earlier pass."""

    questions: Sequence[EncodedQuestion]
    pixels: torch.Tensor | None = None
    features: torch.Tensor | None = None


@dataclass
class ImageAnswers:
    probs: torch.Tensor  # [num_questions, num_answers] float32 on CPU
    features: torch.Tensor  # [embed] float32 on CPU, the image's unit feature
    encoded: bool  # whether the image encoder ran for this image (False: features given)
    finite: bool = True  # its feature and every probability are finite numbers


def fold_batchnorm(model: VQAModel) -> VQAModel:
    """An inference copy of ``model`` whose eval-mode BatchNorm layers are merged into the
    convolution each follows (one pass over the activations fewer per layer). Returns
    ``model`` itself when it has none (full-size VGG16 has none: no copy of its 0.5 GB)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.image_encoder.backbone.features):
        return model
    folded = copy.deepcopy(model).eval()
    out: list[nn.Module] = []
    layers = list(folded.image_encoder.backbone.features)
    i = 0
    while i < len(layers):
        conv = layers[i]
        bn = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            out.append(fuse_conv_bn_eval(conv, bn))
            i += 2
        else:
            out.append(conv)
            i += 1
    folded.image_encoder.backbone.features = nn.Sequential(*out)
    return folded


class Predictor:
    def __init__(self, ckpt: Checkpoint, device: str = "auto", precision: str = "auto",
                 channels_last: bool | None = None) -> None:
        """``channels_last`` (NHWC convolutions) defaults to on: tensor cores want it on CUDA,
        and oneDNN's CPU convolutions ran the shipped model's batch of 32 in half the time
        (docs/performance.md). BatchNorm layers are folded into the convolutions before them,
        in a copy: ``ckpt.model`` is left as loaded."""
        self.ckpt = ckpt
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.channels_last = True if channels_last is None else channels_last
        self.pin_memory = self.device.type == "cuda"
        self.model = fold_batchnorm(ckpt.model.eval()).to(self.device)
        self.vocab = ckpt.vocab
        self.answers = ckpt.answers
        self.image_size = ckpt.model.cfg.image.image_size
        if self.device.type == "cuda":
            # Fixed input shapes: let cuDNN pick the fastest conv algorithms once per shape.
            torch.backends.cudnn.benchmark = True
        if self.channels_last:
            self.model.image_encoder.to(memory_format=torch.channels_last)

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto", precision: str = "auto") -> "Predictor":
        return cls(load_checkpoint(path), device=device, precision=precision)

    @property
    def name(self) -> str:
        return self.ckpt.name

    @property
    def dtype_name(self) -> str:
        return "float32" if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")

    @property
    def max_tokens(self) -> int:
        return self.model.cfg.question.max_tokens

    def encode_question(self, text: str) -> EncodedQuestion:
        return self.vocab.encode(text, max_tokens=self.max_tokens)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin_memory:
            # Pinned host memory makes the copy asynchronous w.r.t. the host thread.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _images_to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self._to_device(pixels)
        if x.dtype == torch.uint8:
            cfg = self.model.cfg.image
            x = normalize(x, cfg.mean, cfg.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, embed] float32 unit features on the CPU."""
        with self._autocast():
            feats = self.model.encode_images(self._images_to_device(pixels))
        return feats.float().cpu()

    @torch.inference_mode()
    def run(self, requests: Sequence[ImageQuestions]) -> list[ImageAnswers]:
        """One batched forward pass over every image and question in ``requests``."""
        if not requests:
            return []
        to_encode = [i for i, r in enumerate(requests) if r.features is None]
        features: list[torch.Tensor | None] = [r.features for r in requests]
        with self._autocast():
            if to_encode:
                parts = [requests[i].pixels for i in to_encode]
                if len({p.dtype for p in parts}) > 1:  # type: ignore[union-attr]
                    raise ValueError("a batch mixes uint8 and float pixels")
                pixels = torch.stack(parts)  # type: ignore[arg-type]
                encoded = self.model.encode_images(self._images_to_device(pixels)).float()
                for j, i in enumerate(to_encode):
                    features[i] = encoded[j]
            img = torch.stack([f.to(self.device, non_blocking=True) for f in features])  # type: ignore[union-attr]
            counts = [len(r.questions) for r in requests]
            questions = [q for r in requests for q in r.questions]
            rows = torch.repeat_interleave(
                torch.arange(len(requests), device=self.device),
                torch.tensor(counts, device=self.device),
            )
            ids, lengths = self._pad(questions)
            logits = self.model.answer_logits(img[rows], ids, lengths)
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        img_cpu = img.float().cpu()
        # Finiteness for the whole batch at once (per image it was six small torch calls).
        row_ok = torch.isfinite(probs).all(dim=1).tolist()
        image_ok = torch.isfinite(img_cpu).all(dim=1).tolist()
        out: list[ImageAnswers] = []
        start = 0
        encoded_set = set(to_encode)
        for i, n in enumerate(counts):
            out.append(ImageAnswers(probs=probs[start : start + n], features=img_cpu[i],
                                    encoded=i in encoded_set,
                                    finite=image_ok[i] and all(row_ok[start : start + n])))
            start += n
        return out

    def _pad(self, questions: Sequence[EncodedQuestion]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths = pad_questions(questions)
        return self._to_device(ids), lengths  # lengths stay on CPU for packing

    def top_k(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """[num_answers] probabilities -> the ``k`` best (answer, probability), best first."""
        k = max(1, min(k, len(self.answers)))
        values, indices = torch.topk(probs, k)
        return [(self.answers[int(i)], float(v)) for v, i in zip(values, indices)]

    def predict(self, pixels: torch.Tensor, texts: Sequence[str], top_k: int = 1) -> list[list[tuple[str, float]]]:
        """Convenience: one question per image, [B, 3, H, W] + B texts -> top-k per pair."""
        reqs = [ImageQuestions(questions=[self.encode_question(t)], pixels=p) for p, t in zip(pixels, texts)]
        return [self.top_k(a.probs[0], top_k) for a in self.run(reqs)]

    def explain(self, pixels: torch.Tensor, question: EncodedQuestion, method: str = DEFAULT_METHOD) -> GradCam:
        """Grad-CAM of the top answer for one image ([3, H, W], as in :meth:`run`) and one
        question (``models/gradcam.py``). Float32 with gradients, so its own pass: call it on
        the thread that owns the device, between batches, never inside :meth:`run`."""
        x = self._images_to_device(pixels[None])
        ids, lengths = self._pad([question])
        return grad_cam(self.model, x, ids, lengths, cam_layer(self.model), method=method)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the shapes the service will see so first requests pay no lazy-init cost
        (cuDNN autotuning, CUDA context, allocator growth)."""
        s = self.image_size
        q = self.encode_question("what color is the shape")
        if len(q) == 0:
            q = self.vocab.encode("x")
        for b in batch_sizes:
            reqs = [ImageQuestions(questions=[q], pixels=torch.zeros(3, s, s, dtype=torch.uint8))
                    for _ in range(b)]
            self.run(reqs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
