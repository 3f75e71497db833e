"""``vqa-train``: train the VQA model on easy-VQA (or VQA v2 data) and write a checkpoint.

``--dataset vqa2 --data-root DIR`` trains on VQA v2 in the official layout instead
(:mod:`training.train_vqa2`); the architecture flags below apply to both.

Reproducible: a fixed seed drives the validation split, initialisation, batch order and
augmentation. Model selection (best epoch) uses a validation split of *train* images held
out by image, so no question about a validation image is ever trained on; the test split is
never read here (``vqa-eval`` reports it).

Recipe (:mod:`training.recipe`, shared with VQA v2; ``weights/README.md`` has the measured
result): the image encoder learns at a lower rate than the rest, the L2-normalised image
feature gets a learnable scale, light augmentation (horizontal flips, +-4 px shifts), and an
auxiliary training-only head predicts the image's shape and colour from its feature so the
encoder is pushed to see both.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import AnswerVocabulary, Checkpoint, VQAModel, Vocabulary, save_checkpoint
from models.predictor import resolve_device
from models.question import pad_questions
from models.transforms import normalize

from .data import COLORS, SHAPES, VQASplit, image_attribute_labels, load_easy_vqa
from .phrasings import Rephraser, with_rephrasings
from .recipe import AUGMENTATIONS, augmenter, compact_config, optimizer_and_schedule, seed_everything
from .train_vqa2 import train_vqa2
from .vqa2 import DatasetError
from .features import FeatureCacheError

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "weights" / "easy-vqa.safetensors"


def encode_questions(vocab: Vocabulary, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_questions([vocab.encode(t, max_tokens=max_tokens) for t in texts])


class AuxHead(nn.Module):
    """Training-only: predict the image's shape and colour from its (scaled) feature."""

    def __init__(self, embed: int) -> None:
        super().__init__()
        self.shape = nn.Linear(embed, len(SHAPES))
        self.color = nn.Linear(embed, len(COLORS))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shape(feats), self.color(feats)


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
    if args.aux_weight is None:
        args.aux_weight = 0.5
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

    steps_per_epoch = math.ceil(len(train_split.images) / args.batch_images)
    optimizer, scheduler = optimizer_and_schedule(model, list(aux.parameters()), args.image_lr, args.lr,
                                                  steps_per_epoch * args.epochs)
    gen = torch.Generator().manual_seed(args.seed + 1)
    augment = augmenter(args.augment or "flip-shift", args.image_size, gen)
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
            images = train_split.images[rows]
            pixels = normalize(augment(images) if augment is not None else images, mean, std).to(device)

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
    p.add_argument("--aux-weight", type=float, default=None,
                   help="weight of the auxiliary loss on the image feature (training/recipe.py; default 0.5 for "
                   "easy-VQA's shape/colour head, 1 for vqa2's question-type head); 0 = none")
    p.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                   help="training augmentation (default: flip-shift for easy-VQA, shift for vqa2: VQA v2 asks "
                   "about left and right, which a flip would swap)")
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
    vqa2.add_argument("--aux", choices=("question-types", "answer-bag"), default="question-types",
                      help="the auxiliary head on the image feature (training/recipe.py): each consistent kind of "
                      "open-ended question answered from the image alone, or one multi-label answer bag per image")
    vqa2.add_argument("--target", choices=("frequency", "accuracy"), default="frequency",
                      help="each question's training target: the share of annotators who gave each answer "
                      "(frequency), or the official accuracy each answer would score (accuracy: 1 for four or "
                      "more annotators of ten, so a 7-3 split teaches almost nothing)")
    vqa2.add_argument("--features-cache", type=Path,
                      help="extract VGG features once into this folder (resumable) and train from them, VGG frozen")
    vqa2.add_argument("--workers", type=int, default=0, help="image decoding processes (0: in the training process)")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on ``--dataset`` (``None`` when not given)."""
    vqa2 = args.dataset == "vqa2"
    if args.aux_weight is None:
        args.aux_weight = 1.0 if vqa2 else 0.5
    args.out = args.out or (Path("vqa2.safetensors") if vqa2 else DEFAULT_OUT)
    args.name = args.name or (f"vqa2-vgg{args.vgg_depth}-lstm" if vqa2 else "easy-vqa-vgg16q-lstm")
    return args


def main(argv: list[str] | None = None) -> None:
    args = resolve_defaults(build_parser().parse_args(argv))
    if args.dataset == "vqa2":
        try:
            info = train_vqa2(args)
        except (DatasetError, FeatureCacheError) as e:
            raise SystemExit(f"vqa-train: {e}") from None
    else:
        info = train(args)
    if args.quiet:
        print(json.dumps({k: info[k] for k in ("selected_epoch", "val_accuracy", "train_seconds")}))


if __name__ == "__main__":
    main()
