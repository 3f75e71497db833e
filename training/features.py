"""Image features extracted once to disk, so a model with a frozen VGG can be trained on 82k
COCO images without running the VGG every epoch.

What is cached is the VGG backbone's output (the classifier minus its last layer: 4096 numbers
at full size), computed in eval mode; training then learns the projection, question encoder
and head on top. Layout of ``--features-cache DIR``::

    DIR/manifest.json                 what made the features (backbone fingerprint, transform)
    DIR/{split}/shard-00000.safetensors  "image_ids" [n] int64, "features" [n, D] float32

Shards hold ``shard_size`` images of the split's sorted image ids, each written atomically
(a temporary name, then a rename), so an interrupted extraction resumes at the first missing
shard. A cache made by another backbone or transform is refused, not silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.transforms import ImageTransform
from models.vgg import VGGBackbone

from .vqa2 import iter_images

CACHE_FORMAT = 1


class FeatureCacheError(RuntimeError):
    """The features cache is unusable for this run (another model made it, or it is corrupt)."""


def backbone_fingerprint(backbone: VGGBackbone) -> str:
    """sha256 over the backbone's tensors (names, shapes, bytes): equal iff same weights."""
    h = hashlib.sha256()
    for k, v in sorted(backbone.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _manifest(backbone: VGGBackbone, transform: ImageTransform, shard_size: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "backbone_sha256": backbone_fingerprint(backbone),
        "transform": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(transform).items()},
        "shard_size": shard_size,
    }


def _check_manifest(cache: Path, wanted: dict) -> None:
    path = cache / "manifest.json"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted, indent=2))
        tmp.replace(path)
        return
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FeatureCacheError(f"{path}: unreadable manifest ({e}); delete the cache directory") from None
    for key in ("format", "backbone_sha256", "transform", "shard_size"):
        if have.get(key) != wanted[key]:
            raise FeatureCacheError(
                f"{path}: this features cache was made with a different {key.replace('_', ' ')} "
                f"({have.get(key)!r} != {wanted[key]!r}); use another --features-cache directory "
                f"or delete this one")


def _shard_path(cache: Path, split: str, n: int) -> Path:
    return cache / split / f"shard-{n:05d}.safetensors"


def _read_shard(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # torn or corrupt: recomputed
    if set(t) != {"image_ids", "features"} or len(t["image_ids"]) != len(t["features"]):
        return None
    return t


def extract_features(backbone: VGGBackbone, transform: ImageTransform, cache: str | Path, split: str,
                     image_ids: Sequence[int], paths: Sequence[Path], *, device: torch.device,
                     shard_size: int = 1000, batch_size: int = 32, workers: int = 0,
                     progress: bool = True) -> torch.Tensor:
    """Features of ``image_ids`` (sorted ascending, ``paths`` alike): read from the cache where
    present, extracted and written where not. Returns [N, D] float32 in ``image_ids`` order."""
    cache = Path(cache)
    if list(image_ids) != sorted(image_ids):
        raise ValueError("image_ids must be sorted")
    _check_manifest(cache, _manifest(backbone, transform, shard_size))
    (cache / split).mkdir(parents=True, exist_ok=True)
    n_shards = (len(image_ids) + shard_size - 1) // shard_size
    parts: list[torch.Tensor | None] = [None] * n_shards
    todo = []
    for s in range(n_shards):
        ids = torch.tensor(image_ids[s * shard_size : (s + 1) * shard_size], dtype=torch.long)
        shard = _read_shard(_shard_path(cache, split, s))
        if shard is not None and torch.equal(shard["image_ids"], ids):
            parts[s] = shard["features"].float()
        else:
            todo.append(s)
    done = len(image_ids) - sum(min(shard_size, len(image_ids) - s * shard_size) for s in todo)
    bar = tqdm(total=len(image_ids), initial=done, desc=f"features {split}", unit="img",
               disable=not progress, dynamic_ncols=True)
    was_training = backbone.training
    backbone.eval()
    try:
        for s in todo:
            rows = list(range(s * shard_size, min((s + 1) * shard_size, len(image_ids))))
            feats = []
            for _, pixels in iter_images(paths, transform, rows, batch_size, workers):
                with torch.inference_mode():
                    x = transform.normalize(pixels).to(device)
                    feats.append(backbone(x).float().cpu())
                bar.update(len(pixels))
            out = {"image_ids": torch.tensor([image_ids[r] for r in rows], dtype=torch.long),
                   "features": torch.cat(feats).contiguous()}
            path = _shard_path(cache, split, s)
            tmp = path.with_name(path.name + ".tmp")
            save_file(out, str(tmp))
            os.replace(tmp, path)  # atomic: an interrupted run never leaves a torn shard
            parts[s] = out["features"]
    finally:
        bar.close()
        backbone.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0)  # type: ignore[arg-type]
