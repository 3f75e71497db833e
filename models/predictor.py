"""Predictor: owns device placement, precision, eval mode and inference mode.

It knows nothing of HTTP or batching policy: it takes a list of images (pixels, or image
features computed earlier) each with one or more questions, runs one batched forward pass,
and returns per-question answer probabilities plus each image's feature for caching.

On CUDA the batch path is written for the device as it really runs:

* **Precision.** The image encoder and the fusion head run under autocast (bf16, or fp16 on
  GPUs without bf16); the LSTM question encoder always runs in float32 (models/question.py):
  under autocast cuDNN's RNN would silently run in fp16 whatever the autocast dtype, and
  re-flatten its weights into a new fp16 buffer on every call. :attr:`Predictor.precision`
  reports each part.
* **Shapes.** ``cudnn.benchmark`` autotunes the convolutions once per input shape, so the image
  encoder only ever sees the batch sizes warmed up at start-up: a batch of other size is padded
  with blank images up to the next warmed size (:meth:`Predictor.use_batch_buckets`).
* **Copies.** Each batch's pixels, cached features, token ids and row index are written once
  into pinned host memory and copied to the device without blocking the host; nothing in the
  batch path waits for the device except the single copy of the results back.
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
from .vocab import EncodedQuestion
from .vqa import VQAModel

log = logging.getLogger(__name__)

# On CPU the image encoder runs in chunks whose largest activations (a convolution's input and
# output) fit this budget, so one forward pass cannot add more than this to the process's
# resident memory. Full VGG16 at 224x224 needs ~25 MB per image: a batch of 32 raised resident
# memory by 784 MB for its forward pass, 8 by 195 MB; it now runs as chunks of 10. Its ceiling
# at batch 8 was no lower than at 32 (bench/results/cpu.json: 12.98 vs 12.62 images/s), so this
# costs no throughput; the shipped model (0.5 MB per image) is never chunked. Not on CUDA: device
# memory is bounded by the OOM split, and GPUs want whole batches.
CPU_ACTIVATION_BUDGET = 256 * 1024 * 1024

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
    feature_finite: bool = True  # the image's feature is finite (safe to cache and reuse)
    rows_finite: Sequence[bool] | None = None  # per question: its probabilities are finite (None: all)

    @property
    def finite(self) -> bool:
        """The feature and every probability are finite numbers."""
        return self.feature_finite and (self.rows_finite is None or all(self.rows_finite))


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes an image batch is padded up to on CUDA (warmed once each at start-up):
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... (powers of two and the midpoints between them) up to
    and including ``max_batch_size``. Padding wastes at most 2/7 of a batch (17 images in a
    batch of 24), with 10 shapes to autotune for the default maximum of 32."""
    sizes, b = {max_batch_size}, 1
    while b < max_batch_size:
        sizes.update(x for x in (b, b + b // 2) if x < max_batch_size)
        b *= 2
    return sorted(sizes)


def activation_bytes_per_image(model: VQAModel) -> int:
    """The largest input + output of one convolution of the image encoder, per image, float32:
    what a forward pass holds at its peak (inference frees each activation once used)."""
    side = model.cfg.image.image_size
    channels, peak = 3, 0
    for m in model.image_encoder.backbone.features:
        if isinstance(m, nn.Conv2d):
            out = (side + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
            peak = max(peak, channels * side * side + m.out_channels * out * out)
            channels, side = m.out_channels, out
        elif isinstance(m, nn.MaxPool2d):
            side = side // m.stride if isinstance(m.stride, int) else side // m.stride[0]
    return 4 * peak


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
        (docs/performance.md).

        The predictor takes ``ckpt.model`` over: it is put in eval mode, and when it has no
        BatchNorm to fold (full-size VGG16) it is served itself -- moved to the device and
        converted to channels_last in place, so that its 0.5 GB of weights are not copied. With
        BatchNorm, a copy with the BatchNorm layers folded into the convolutions is served and
        ``ckpt.model`` stays where and as it was loaded."""
        self.ckpt = ckpt
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.channels_last = True if channels_last is None else channels_last
        self.pin_memory = self.device.type == "cuda"
        self.model = fold_batchnorm(ckpt.model.eval()).to(self.device)
        self.vocab = ckpt.vocab
        self.answers = ckpt.answers
        self.image_size = ckpt.model.cfg.image.image_size
        cfg = self.model.cfg.image
        # On the device once, not rebuilt from Python lists (a host-to-device copy) per batch.
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1).to(self.device)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1).to(self.device)
        self.batch_buckets: tuple[int, ...] = ()  # see use_batch_buckets
        # Images per image-encoder pass (0: the whole batch); see CPU_ACTIVATION_BUDGET.
        self.encoder_chunk = (max(1, CPU_ACTIVATION_BUDGET // activation_bytes_per_image(self.model))
                              if self.device.type == "cpu" else 0)
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
        """The autocast dtype of the image encoder and the head ("float32": no autocast)."""
        return "float32" if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")

    @property
    def precision(self) -> dict[str, str]:
        """What each part of the model computes in. The question encoder is float32 always
        (models/question.py says why); the image encoder and head follow the autocast dtype."""
        return {"image_encoder": self.dtype_name, "question_encoder": "float32", "head": self.dtype_name}

    def use_batch_buckets(self, sizes: Sequence[int]) -> None:
        """Pad every image batch up to the next of ``sizes`` (blank images, whose outputs are
        dropped); a batch larger than all of them runs as it is. For CUDA with
        ``cudnn.benchmark``: warm exactly these sizes and live traffic never autotunes."""
        if any(b < 1 for b in sizes):
            raise ValueError("batch sizes must be >= 1")
        self.batch_buckets = tuple(sorted(set(sizes)))

    def _bucket(self, n: int) -> int:
        for b in self.batch_buckets:
            if b >= n:
                return b
        return n

    @property
    def max_tokens(self) -> int:
        return self.model.cfg.question.max_tokens

    def encode_question(self, text: str, words: Sequence[str] | None = None) -> EncodedQuestion:
        """``words``: ``self.vocab.tokenize(text)``, when the caller has it already."""
        return self.vocab.encode(text, max_tokens=self.max_tokens, words=words)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host staging tensor, pinned on CUDA: the batch is written into it once and copied
        to the device without blocking (``t.pin_memory()`` on a finished tensor would be a
        second, synchronous host copy). Pinned blocks are reused by torch's host allocator."""
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.pin_memory)

    def _stage(self, parts: Sequence[torch.Tensor], rows: int | None = None) -> torch.Tensor:
        """Stack ``parts`` into one staging tensor of ``rows`` rows (the rest zero)."""
        rows = len(parts) if rows is None else rows
        out = self._host_empty((rows, *parts[0].shape), parts[0].dtype)
        torch.stack(list(parts), out=out[: len(parts)])
        if rows > len(parts):
            out[len(parts):].zero_()
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # non_blocking only helps (and is only safe to count on) from pinned memory.
        return t.to(self.device, non_blocking=self.pin_memory and t.is_pinned())

    def _images_to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self._to_device(pixels)
        if x.dtype == torch.uint8:
            # The same operations as models.transforms.normalize (training, evaluation), with
            # the mean and std already on the device.
            x = x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Staged pixels -> float32 features on the device, in chunks of ``encoder_chunk``."""
        step = self.encoder_chunk or len(pixels)
        if step >= len(pixels):
            return self.model.encode_images(self._images_to_device(pixels)).float()
        return torch.cat([self.model.encode_images(self._images_to_device(pixels[i : i + step])).float()
                          for i in range(0, len(pixels), step)])

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, embed] float32 unit features on the CPU."""
        with self._autocast():
            feats = self._encode(pixels)
        return feats.cpu()

    @torch.inference_mode()
    def run(self, requests: Sequence[ImageQuestions]) -> list[ImageAnswers]:
        """One batched forward pass over every image and question in ``requests``."""
        if not requests:
            return []
        to_encode = [i for i, r in enumerate(requests) if r.features is None]
        cached = [i for i, r in enumerate(requests) if r.features is not None]
        counts = [len(r.questions) for r in requests]
        questions = [q for r in requests for q in r.questions]
        owner = [i for i, n in enumerate(counts) for _ in range(n)]  # each question's image
        # Longest question first, ordered here on the host: packed into the LSTM unsorted, the
        # batch would need a permutation copied to the device on every call.
        order = sorted(range(len(questions)), key=lambda k: -len(questions[k]))
        if order == list(range(len(order))):
            order = None
        else:
            questions, owner = [questions[k] for k in order], [owner[k] for k in order]
        ids, lengths = pad_questions(questions, pin_memory=self.pin_memory)  # lengths stay on CPU
        ids = self._to_device(ids)
        rows = None  # question -> its image's row, built on the host (None: row i is image i)
        if owner != list(range(len(requests))):
            rows = self._to_device(torch.tensor(owner, pin_memory=self.pin_memory))
        with self._autocast():
            feats: list[torch.Tensor] = [None] * len(requests)  # type: ignore[list-item]
            if to_encode:
                parts = [requests[i].pixels for i in to_encode]
                if len({p.dtype for p in parts}) > 1:  # type: ignore[union-attr]
                    raise ValueError("a batch mixes uint8 and float pixels")
                pixels = self._stage(parts, self._bucket(len(parts)))  # type: ignore[arg-type]
                encoded = self._encode(pixels)
                for j, i in enumerate(to_encode):
                    feats[i] = encoded[j]
            if cached:
                known = self._to_device(self._stage([requests[i].features.float() for i in cached]))  # type: ignore[union-attr]
                for j, i in enumerate(cached):
                    feats[i] = known[j]
            # One tensor of image features, in request order (padding rows dropped).
            img = encoded[: len(to_encode)] if not cached else torch.stack(feats)
            logits = self.model.answer_logits(img if rows is None else img.index_select(0, rows), ids, lengths)
        probs = torch.softmax(logits.float(), dim=-1)
        if self.device.type == "cpu":
            img_cpu = img
        else:  # one copy back (one wait for the device) for the probabilities and the features
            both = torch.cat([probs.flatten(), img.flatten()]).cpu()
            probs, img_cpu = both[: probs.numel()].view(probs.shape), both[probs.numel():].view(img.shape)
        if order is not None:  # back to request order, on the host
            probs = probs[torch.tensor(order).argsort()]
        # Finiteness for the whole batch at once (per image it was six small torch calls).
        row_ok = torch.isfinite(probs).all(dim=1).tolist()
        image_ok = torch.isfinite(img_cpu).all(dim=1).tolist()
        out: list[ImageAnswers] = []
        start = 0
        encoded_set = set(to_encode)
        for i, n in enumerate(counts):
            out.append(ImageAnswers(probs=probs[start : start + n], features=img_cpu[i],
                                    encoded=i in encoded_set, feature_finite=image_ok[i],
                                    rows_finite=row_ok[start : start + n]))
            start += n
        return out

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
        ids, lengths = pad_questions([question])  # lengths stay on CPU for packing
        ids = self._to_device(ids)
        return grad_cam(self.model, x, ids, lengths, cam_layer(self.model), method=method)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the shapes the service will see so first requests pay no lazy-init cost
        (cuDNN autotuning, CUDA context, allocator growth). With batch buckets, warm exactly
        those (each image batch is padded up to one of them)."""
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
