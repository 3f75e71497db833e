"""``vqa-train``: train the VQA model on easy-VQA (or VQA v2 data) and write a checkpoint.

``--dataset vqa2 --data-root DIR`` trains on VQA v2 in the official layout instead
(:mod:`training.train_vqa2`); the architecture flags below apply to both.

Reproducible: a fixed seed drives the validation split, initialisation, batch order and
augmentation. Model selection (best epoch) uses a validation split of *train* images held
out by image, so no question about a validation image is ever trained on; the test split is
never read here (``vqa-eval`` reports it).

Recipe (see ``weights/README.md`` for the measured result): the image encoder learns at a
lower rate than the rest, the L2-normalised image feature gets a learnable scale, light
augmentation (horizontal flips, +-4 px shifts), and an auxiliary training-only head predicts
the image's shape and colour from its feature so the encoder is pushed to see both.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import (
    AnswerVocabulary,
    Checkpoint,
    ImageEncoderConfig,
    QuestionEncoderConfig,
    VQAConfig,
    VQAModel,
    Vocabulary,
    save_checkpoint,
)
from models.predictor import resolve_device
from models.transforms import normalize
from models.question import pad_questions

from .data import COLORS, SHAPES, VQASplit, image_attribute_labels, load_easy_vqa
from .phrasings import Rephraser, with_rephrasings

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "weights" / "easy-vqa.safetensors"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_questions(vocab: Vocabulary, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_questions([vocab.encode(t, max_tokens=max_tokens) for t in texts])


def augment(images: torch.Tensor, gen: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random horizontal flip and +-``shift`` px translation (edge-replicated) per image."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=gen) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


class AuxHead(nn.Module):
    """Training-only: predict the image's shape and colour from its (scaled) feature."""

    def __init__(self, embed: int) -> None:
        super().__init__()
        self.shape = nn.Linear(embed, len(SHAPES))
        self.color = nn.Linear(embed, len(COLORS))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shape(feats), self.color(feats)


def compact_config(vocab_size: int, num_answers: int, args: argparse.Namespace) -> VQAConfig:
    return VQAConfig(
        image=ImageEncoderConfig(
            image_size=args.image_size,
            width=args.width,
            batch_norm=not args.no_batch_norm,
            pool_size=args.pool_size,
            embed_size=args.embed_size,
            dropout=args.dropout,
            depth=args.vgg_depth,
        ),
        question=QuestionEncoderConfig(
            vocab_size=vocab_size,
            word_dim=args.word_dim,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            embed_size=args.embed_size,
            max_tokens=32,
        ),
        num_answers=num_answers,
        head_hidden=args.head_hidden,
        dropout=args.dropout,
        image_scale_init=args.image_scale_init,
    )


@torch.no_grad()
def evaluate_split(model: VQAModel, split: VQASplit, ids: torch.Tensor, lengths: torch.Tensor,
                   targets: torch.Tensor, device: torch.device, batch_images: int = 256) -> tuple[float, float]:
    """(accuracy, mean loss) of ``model`` on ``split``, each image encoded once."""
    model.eval()
    mean, std = model.cfg.image.mean, model.cfg.image.std
    feats = torch.cat([
        model.encode_images(normalize(split.images[i : i + batch_images], mean, std).to(device))
        for i in range(0, len(split.images), batch_images)
    ])
    correct, loss_sum = 0, 0.0
    for i in range(0, len(split), 2048):
        sl = slice(i, i + 2048)
        logits = model.answer_logits(feats[split.image_index[sl].to(device)], ids[sl].to(device), lengths[sl])
        loss_sum += F.cross_entropy(logits, targets[sl].to(device), reduction="sum").item()
        correct += (logits.argmax(1).cpu() == targets[sl]).sum().item()
    return correct / len(split), loss_sum / len(split)


def train(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t_start = time.perf_counter()

    full = load_easy_vqa("train", image_size=args.image_size)
    if args.limit_images:  # smoke runs only: a seeded subset of the train images
        full = full.subset_images(sorted(torch.randperm(len(full.images), generator=torch.Generator()
                                                        .manual_seed(args.seed))[: args.limit_images].tolist()))
    answers = AnswerVocabulary(sorted(set(full.answers)))
    vocab = Vocabulary.build(full.questions)

    # Validation split held out from train *by image*.
    perm = torch.randperm(len(full.images), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = int(round(len(perm) * args.val_fraction))
    train_split = full.subset_images(sorted(perm[n_val:]))
    val_split = full.subset_images(sorted(perm[:n_val]))
    # Natural phrasings (training/phrasings.py): validation also asks each question reworded.
    rephrase = Rephraser(prob=args.rephrase_prob, seed=args.seed + 2) if args.rephrase_prob > 0 else None
    if rephrase is not None:
        val_split = with_rephrasings(val_split, seed=args.seed + 3)

    cfg = compact_config(len(vocab), len(answers), args)
    model = VQAModel(cfg).to(device)
    if args.imagenet_weights:
        model.image_encoder.load_torchvision_weights_file(args.imagenet_weights)
    aux = AuxHead(cfg.image.embed_size).to(device)

    q_ids, q_len = encode_questions(vocab, train_split.questions, cfg.question.max_tokens)
    q_tgt = torch.tensor([answers.index[a] for a in train_split.answers])
    v_ids, v_len = encode_questions(vocab, val_split.questions, cfg.question.max_tokens)
    v_tgt = torch.tensor([answers.index[a] for a in val_split.answers])
    shape_lbl, color_lbl = image_attribute_labels(train_split)
    # questions of each image, so a step gathers all questions of its images
    by_image: list[list[int]] = [[] for _ in range(len(train_split.images))]
    for q, row in enumerate(train_split.image_index.tolist()):
        by_image[row].append(q)

    image_params = list(model.image_encoder.parameters())
    image_ids = {id(p) for p in image_params}
    other_params = [p for p in model.parameters() if id(p) not in image_ids] + list(aux.parameters())
    optimizer = torch.optim.Adam([
        {"params": image_params, "lr": args.image_lr},
        {"params": other_params, "lr": args.lr},
    ])
    steps_per_epoch = math.ceil(len(train_split.images) / args.batch_images)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    mean, std = cfg.image.mean, cfg.image.std

    history = []
    best = {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(1, args.epochs + 1):
        model.train()
        aux.train()
        order = torch.randperm(len(train_split.images), generator=gen)
        loss_sum = correct = seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", leave=False,
                   disable=args.quiet, file=sys.stderr)
        for step in bar:
            rows = order[step * args.batch_images : (step + 1) * args.batch_images]
            qs = torch.tensor([q for r in rows.tolist() for q in by_image[r]], dtype=torch.long)
            local = {r: i for i, r in enumerate(rows.tolist())}
            q_rows = torch.tensor([local[int(train_split.image_index[q])] for q in qs], dtype=torch.long)
            pixels = normalize(augment(train_split.images[rows], gen), mean, std).to(device)

            feats = model.encode_images(pixels)
            lengths = q_len[qs]
            ids = q_ids[qs][:, : int(lengths.max())]
            if rephrase is not None:
                ids, lengths = encode_questions(vocab, rephrase([train_split.questions[q] for q in qs]),
                                                cfg.question.max_tokens)
            ids = ids.to(device)
            logits = model.answer_logits(feats[q_rows.to(device)], ids, lengths)
            target = q_tgt[qs].to(device)
            loss = F.cross_entropy(logits, target)
            s_logits, c_logits = aux(model.image_scale * feats)
            aux_loss = F.cross_entropy(s_logits, shape_lbl[rows].to(device), ignore_index=-1) + \
                F.cross_entropy(c_logits, color_lbl[rows].to(device), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            (loss + args.aux_weight * aux_loss).backward()
            optimizer.step()
            scheduler.step()

            n = len(qs)
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == target).sum().item()
            seen += n
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        val_acc, val_loss = evaluate_split(model, val_split, v_ids, v_len, v_tgt, device)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_loss": val_loss, "val_acc": val_acc, "elapsed_s": time.perf_counter() - t_start}
        history.append(row)
        print(f"epoch {epoch:2d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
              f"val loss {val_loss:.4f} acc {val_acc:.4f}  ({row['elapsed_s']:.0f}s)", flush=True)
        if (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"]):
            best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    assert best_state is not None
    model.load_state_dict(best_state)
    model.cpu().eval()
    train_seconds = time.perf_counter() - t_start
    info = {
        "dataset": "easy-VQA (PyPI easy-vqa) train split",
        "train_images": len(train_split.images),
        "train_questions": len(train_split),
        "val_images": len(val_split.images),
        "val_questions": len(val_split),
        "seed": args.seed,
        "selected_epoch": best["epoch"],
        "val_accuracy": best["val_acc"],
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "quiet")},
    }
    save_checkpoint(args.out, Checkpoint(model=model, vocab=vocab, answers=answers, name=args.name, info=info))
    print(f"best epoch {best['epoch']} (val acc {best['val_acc']:.4f}); wrote {args.out} "
          f"in {train_seconds:.0f}s", flush=True)
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqa-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("easy-vqa", "vqa2"), default="easy-vqa",
                   help="easy-VQA (the PyPI package) or VQA v2 data in the official layout under --data-root")
    p.add_argument("--out", type=Path, default=None,
                   help=f"checkpoint to write (default: {DEFAULT_OUT} for easy-VQA, ./vqa2.safetensors for vqa2)")
    p.add_argument("--name", default=None,
                   help="model name stored in the checkpoint (default: easy-vqa-vgg16q-lstm, vqa2-vgg<depth>-lstm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-images", type=int, default=32, help="images per step (all their questions ride along)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate outside the image encoder")
    p.add_argument("--image-lr", type=float, default=3e-4, help="image encoder learning rate")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the shape/colour auxiliary loss")
    p.add_argument("--val-fraction", type=float, default=0.1, help="train images held out for model selection")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=float, default=0.25, help="VGG16 channel multiplier (1.0 = torchvision vgg16)")
    p.add_argument("--pool-size", type=int, default=2, help="pooled grid side before the VGG classifier (7 at 224px)")
    p.add_argument("--no-batch-norm", action="store_true", help="plain VGG16 (needed for ImageNet weights)")
    p.add_argument("--imagenet-weights", type=Path, help="torchvision vgg16 weights file to initialise from")
    p.add_argument("--embed-size", type=int, default=256)
    p.add_argument("--word-dim", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--head-hidden", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--image-scale-init", type=float, default=8.0)
    p.add_argument("--rephrase-prob", type=float, default=0.5,
                   help="share of training questions reworded (training/phrasings.py); 0 = templates only")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--limit-images", type=int, default=0, help="train on this many images only (smoke tests)")
    p.add_argument("--vgg-depth", type=int, choices=(11, 13, 16, 19), default=16, help="VGG depth (torchvision's layouts)")
    vqa2 = p.add_argument_group("VQA v2 (--dataset vqa2)")
    vqa2.add_argument("--data-root", type=Path, help="folder with Questions/, Annotations/, Images/ (official layout)")
    vqa2.add_argument("--split", default="train2014", help="split to train on")
    vqa2.add_argument("--val-split", help="split for model selection (default: --val-fraction of the training images)")
    vqa2.add_argument("--num-answers", type=int, default=1000, help="answer vocabulary: the most frequent normalised answers")
    vqa2.add_argument("--features-cache", type=Path,
                      help="extract VGG features once into this folder (resumable) and train from them, VGG frozen")
    vqa2.add_argument("--workers", type=int, default=0, help="image decoding processes (0: in the training process)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.dataset == "vqa2":
        from .train_vqa2 import train_vqa2
        from .vqa2 import DatasetError
        from .features import FeatureCacheError

        args.out = args.out or Path("vqa2.safetensors")
        args.name = args.name or f"vqa2-vgg{args.vgg_depth}-lstm"
        try:
            info = train_vqa2(args)
        except (DatasetError, FeatureCacheError) as e:
            raise SystemExit(f"vqa-train: {e}") from None
    else:
        args.out = args.out or DEFAULT_OUT
        args.name = args.name or "easy-vqa-vgg16q-lstm"
        info = train(args)
    if args.quiet:
        print(json.dumps({k: info[k] for k in ("selected_epoch", "val_accuracy", "train_seconds")}))


if __name__ == "__main__":
    main()
