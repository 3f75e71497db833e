"""The two model regimes the benchmark measures, and how many requests each cell sends.

* ``compact``: the shipped easy-VQA checkpoint (quarter-width VGG16, 64×64 PNG uploads).
* ``full``: torchvision-layout VGG16 at full width and 224×224 (JPEG uploads) with the
  classic VQA-baseline question encoder and head, built with **random weights** into a temp
  dir: speed does not depend on the weights' values, and no download is needed. Its answers
  are meaningless; only its timings are reported.

Request counts: a cell sends ``max(base, rounds × concurrency)`` requests, a fixed number per
cell. ``base`` keeps low-concurrency cells long enough to be stable; ``rounds`` gives every
worker of a high-concurrency cell several requests, so the cell is not one burst. Full VGG16
costs ~0.1 s per image on 2 quiet CPU cores (several times that when they are shared), so its
cache-miss cells are kept small; its cache-hit requests skip the image encoder and are cheap,
so they get as many as compact's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from app.settings import DEFAULT_WEIGHTS
from models import (
    Checkpoint,
    ImageEncoderConfig,
    QuestionEncoderConfig,
    VQAConfig,
    VQAModel,
    load_checkpoint,
    save_checkpoint,
)

from .workloads import ImageFormat

WORKLOADS = ("miss", "hit")


@dataclass(frozen=True)
class Regime:
    name: str
    title: str
    image_format: ImageFormat
    miss_requests: int  # base request count of a cache-miss cell
    hit_requests: int  # base request count of a cache-hit cell
    rounds: int  # every cell sends at least rounds × concurrency requests
    ceiling_min_s: float  # time each ceiling batch size is measured for, at least
    random_width: float | None = None  # None: the shipped weights; else random VGG16 at this width
    hit_pool: int = 16  # distinct images the cache-hit workload cycles through
    # Idle latency (bench/idle.py): blocks of concurrency-1 requests, each alternating with
    # the in-process reference on the same images.
    idle_blocks: int = 8
    idle_requests: int = 256  # per block

    def cell_requests(self, workload: str, concurrency: int) -> int:
        base = self.miss_requests if workload == "miss" else self.hit_requests
        return max(base, self.rounds * concurrency)


def default_regimes(quick: bool = False, full_image_size: int = 224, full_width: float = 1.0
                    ) -> dict[str, Regime]:
    """The default request counts keep the whole CPU run near 5 minutes on 2 quiet cores (up
    to ~15 on a busy machine); ``quick`` shrinks them ~4× for a look at the numbers' shape,
    not their value."""
    compact = Regime("compact", "shipped compact model (easy-VQA weights)", ImageFormat(64, "PNG"),
                     miss_requests=2048, hit_requests=2048, rounds=16, ceiling_min_s=2.0,
                     idle_blocks=8, idle_requests=256)
    full = Regime("full", f"full-size VGG16 {full_image_size}×{full_image_size} (random weights)",
                  ImageFormat(full_image_size, "JPEG"),
                  miss_requests=48, hit_requests=512, rounds=3, ceiling_min_s=3.0,
                  random_width=full_width, idle_blocks=8, idle_requests=8)
    if quick:
        compact = replace(compact, miss_requests=128, hit_requests=128, rounds=2, ceiling_min_s=1.0,
                          idle_blocks=4, idle_requests=64)
        full = replace(full, miss_requests=8, hit_requests=128, rounds=1, ceiling_min_s=1.0,
                       idle_blocks=2, idle_requests=4)
    return {"compact": compact, "full": full}


def full_size_config(vocab_size: int, num_answers: int, image_size: int = 224, width: float = 1.0
                     ) -> VQAConfig:
    """VGG16 at ``width`` 1.0 / 224×224 is torchvision's ``vgg16`` exactly; the question
    encoder and head take the VQA baseline's sizes (LSTM 2×512, 1024-d fusion, 1000 hidden)."""
    return VQAConfig(
        image=ImageEncoderConfig(image_size=image_size, width=width, batch_norm=False, pool_size=7,
                                 embed_size=1024),
        question=QuestionEncoderConfig(vocab_size=vocab_size, embed_size=1024),
        num_answers=num_answers,
    )


def make_full_size_weights(path: Path, image_size: int = 224, width: float = 1.0, seed: int = 0) -> Path:
    """A random-weight full-size checkpoint with the shipped model's vocabularies, so the same
    easy-VQA questions tokenise identically in both regimes."""
    shipped = load_checkpoint(DEFAULT_WEIGHTS)
    torch.manual_seed(seed)
    model = VQAModel(full_size_config(len(shipped.vocab), len(shipped.answers), image_size, width)).eval()
    save_checkpoint(path, Checkpoint(
        model=model, vocab=shipped.vocab, answers=shipped.answers,
        name=f"vgg16-{image_size}-random",
        info={"note": f"random weights (seed {seed}) for speed measurements only; answers are meaningless"},
    ))
    return path


def weights_for(regime: Regime, workdir: Path) -> Path:
    """The checkpoint a regime serves: the shipped file, or random full-size weights built
    into ``workdir``."""
    if regime.random_width is None:
        return DEFAULT_WEIGHTS
    return make_full_size_weights(workdir / f"{regime.name}-random.safetensors",
                                  regime.image_format.size, regime.random_width)
