"""``vqa-train --dataset vqa2``: train on VQA v2 data in the official layout.

* Answers: the ``--num-answers`` most frequent annotator answers of the training questions,
  after the official normalisation (:mod:`training.vqa_metric`), so the model's answers are
  already in the form the metric compares.
* Loss: soft cross-entropy against a distribution over the vocabulary per question
  (questions none of whose answers is in the vocabulary carry no loss), rather than one
  sampled answer: by default (``--target frequency``) the share of the ten annotators who gave
  each answer; ``--target accuracy`` uses the official accuracy each answer would score
  (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ matching annotators), normalised. Plus
  ``--aux-weight`` (default 1) x the loss of an auxiliary head on the image feature alone:
  by default one softmax per consistent question type (:class:`training.recipe.QuestionTypeHead`),
  or ``--aux answer-bag`` (:class:`training.recipe.AnswerBagHead`).
* The rest of the recipe is easy-VQA's (:mod:`training.recipe`): a lower learning rate for the
  image encoder, a learnable scale on its feature, one cosine decay, shifts as augmentation
  (``--augment``; not with ``--features-cache``, where the backbone runs once per image).
* Model selection: the official accuracy on a held-out part of the training split (by image,
  ``--val-fraction``), or on ``--val-split`` when one is named. The split you report on is
  only read by ``vqa-eval``.
* ``--features-cache DIR``: the VGG backbone is frozen and run once per image (features on
  disk, resumable, see :mod:`training.features`); training then runs from the features.
  Without it the whole model trains end to end from pixels.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import AnswerVocabulary, Checkpoint, VQAModel, Vocabulary, save_checkpoint
from models.predictor import resolve_device
from models.question import pad_questions

from . import vqa_metric
from .features import extract_features
from .recipe import (AnswerBagHead, QuestionTypeHead, answer_bags, augmenter, compact_config,
                     consistent_question_types, optimizer_and_schedule, seed_everything)
from .vqa2 import VQA2Split, answer_frequencies, answer_vocabulary, iter_images, load_vqa2, nonempty, soft_scores


def _dense(scores: list[dict[int, float]], rows: torch.Tensor, num_answers: int) -> torch.Tensor:
    out = torch.zeros(len(rows), num_answers)
    for i, q in enumerate(rows.tolist()):
        for a, s in scores[q].items():
            out[i, a] = s
    return out


class _Images:
    """Image embeddings of a split's rows: from cached backbone features, or from pixels."""

    def __init__(self, model: VQAModel, split: VQA2Split, features: torch.Tensor | None,
                 device: torch.device, workers: int) -> None:
        self.model, self.split, self.features, self.device = model, split, features, device
        self.paths = split.image_paths()
        self.transform = model.cfg.image.transform
        self.workers = workers

    def batches(self, rows: list[int], batch_size: int, augment=None):
        """Yield (rows_chunk, [b, embed] image embeddings, with grad where training);
        ``augment`` (uint8 pixels -> pixels) is applied to decoded images, not to cached features."""
        if self.features is not None:
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                yield chunk, self.model.image_encoder.embed(self.features[chunk].to(self.device))
        else:
            for chunk, pixels in iter_images(self.paths, self.transform, rows, batch_size, self.workers):
                if augment is not None:
                    pixels = augment(pixels)
                yield chunk, self.model.encode_images(self.transform.normalize(pixels).to(self.device))


def _questions_by_image(split: VQA2Split) -> list[list[int]]:
    by_image: list[list[int]] = [[] for _ in range(len(split.image_ids))]
    for q, row in enumerate(split.image_index.tolist()):
        by_image[row].append(q)
    return by_image


@torch.no_grad()
def predict(model: VQAModel, images: _Images, vocab: Vocabulary, answers: AnswerVocabulary,
            batch_images: int = 64) -> dict[int, str]:
    """Top-1 answer to every question of ``images.split`` (question id -> answer)."""
    model.eval()
    split = images.split
    by_image = _questions_by_image(split)
    max_tokens = model.cfg.question.max_tokens
    out: dict[int, str] = {}
    for chunk, feats in images.batches(list(range(len(split.image_ids))), batch_images):
        qs = [q for r in chunk for q in by_image[r]]
        if not qs:
            continue
        local = {r: i for i, r in enumerate(chunk)}
        ids, lengths = _encode(vocab, [split.questions[q] for q in qs], max_tokens)
        rows = torch.tensor([local[int(split.image_index[q])] for q in qs], device=feats.device)
        logits = model.answer_logits(feats[rows], ids.to(feats.device), lengths)
        for q, a in zip(qs, logits.argmax(1).tolist()):
            out[split.question_ids[q]] = answers[a]
    return out


def _encode(vocab: Vocabulary, texts: list[str], max_tokens: int):
    return pad_questions([nonempty(vocab.encode(t, max_tokens=max_tokens)) for t in texts])


def official_accuracy(split: VQA2Split, predictions: dict[int, str]) -> float:
    """Mean official accuracy (0..1, unrounded) of ``predictions`` on ``split``."""
    per_q = vqa_metric.evaluate(split.annotations, predictions)["perQuestion"]  # type: ignore[arg-type]
    return sum(per_q.values()) / len(per_q)


class Auxiliary:
    """The auxiliary head on the image feature (training/recipe.py) and the targets it learns."""

    def __init__(self, kind: str, head: torch.nn.Module, device: torch.device, bags=None, kind_of=None) -> None:
        self.kind, self.head, self.device = kind, head, device
        self.bags, self.kind_of = bags, kind_of

    @classmethod
    def build(cls, args, split: VQA2Split, targets, scores, embed: int, num_answers: int,
              device: torch.device) -> "Auxiliary | None":
        if args.aux_weight <= 0:
            return None
        if args.aux == "answer-bag":
            bags = answer_bags(scores, split.image_index, len(split.image_ids))
            return cls("answer-bag", AnswerBagHead(embed, num_answers).to(device), device, bags=bags)
        types = [split.by_question[qid]["question_type"] for qid in split.question_ids]
        open_ended = [split.by_question[qid]["answer_type"] != "yes/no" for qid in split.question_ids]
        kinds = consistent_question_types(split, targets, open_ended)
        if not kinds:
            return None
        kind_of = torch.tensor([kinds.index(t) if o and t in kinds else -1 for t, o in zip(types, open_ended)])
        return cls("question-types", QuestionTypeHead(embed, num_answers, len(kinds)).to(device), device,
                   kind_of=kind_of)

    def loss(self, feats: torch.Tensor, chunk: list[int], qs: torch.Tensor, q_rows: torch.Tensor,
             target: torch.Tensor) -> torch.Tensor:
        """``feats``: the step's images' (scaled) features; ``qs``/``q_rows``/``target``: its
        questions, the row of each one's image, and their answer targets."""
        if self.kind == "answer-bag":
            bag = _dense(self.bags, torch.tensor(chunk), self.head.linear.out_features).to(self.device)
            return AnswerBagHead.loss(self.head(feats), bag)
        opened = self.kind_of[qs] >= 0
        return QuestionTypeHead.loss(self.head(feats), q_rows[opened].to(self.device),
                                     self.kind_of[qs][opened].to(self.device), target[opened].to(self.device))


def train_vqa2(args: argparse.Namespace) -> dict:
    if args.aux_weight is None:
        args.aux_weight = 1.0
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t_start = time.perf_counter()
    if not args.data_root:
        raise SystemExit("vqa-train --dataset vqa2 needs --data-root DIR (the official VQA v2 layout)")

    full = load_vqa2(args.data_root, args.split, annotations=True)
    if args.limit_images:  # smoke runs only: a seeded subset of the images
        pick = torch.randperm(len(full.image_ids), generator=torch.Generator().manual_seed(args.seed))
        full = full.subset_images(sorted(pick[: args.limit_images].tolist()))
    if args.val_split:
        train_rows = list(range(len(full.image_ids)))
        val_full = load_vqa2(args.data_root, args.val_split, annotations=True)
        val_rows = list(range(len(val_full.image_ids)))
        val_split, val_source = val_full, f"split {args.val_split}"
    else:
        perm = torch.randperm(len(full.image_ids), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = max(1, int(round(len(perm) * args.val_fraction)))
        train_rows, val_rows = sorted(perm[n_val:]), sorted(perm[:n_val])
        val_full = full
        val_split = full.subset_images(val_rows)
        val_source = f"{len(val_rows)} images held out of {args.split} (seed {args.seed})"
    train_split = full.subset_images(train_rows)

    answer_list = answer_vocabulary(train_split, args.num_answers)
    if not answer_list:
        raise SystemExit(f"{args.split}: no non-empty answers to learn from")
    answers = AnswerVocabulary(answer_list)
    vocab = Vocabulary.build(train_split.questions)
    scores = soft_scores(train_split, answers.index)
    answerable = sum(1 for s in scores if s)
    targets = answer_frequencies(train_split, answers.index) if args.target == "frequency" else scores

    cfg = compact_config(len(vocab), len(answers), args)
    model = VQAModel(cfg).to(device)
    if args.imagenet_weights:
        model.image_encoder.load_torchvision_weights_file(args.imagenet_weights)

    frozen = bool(args.features_cache)
    train_feats = val_feats = None
    if frozen:
        backbone = model.image_encoder.backbone
        backbone.requires_grad_(False)
        common = dict(device=device, batch_size=args.batch_images, workers=args.workers,
                      progress=not args.quiet)
        all_feats = extract_features(backbone, cfg.image.transform, args.features_cache, args.split,
                                     full.image_ids, full.image_paths(), **common)
        train_feats = all_feats[train_rows]
        if args.val_split:
            val_feats = extract_features(backbone, cfg.image.transform, args.features_cache,
                                         args.val_split, val_full.image_ids, val_full.image_paths(), **common)
        else:
            val_feats = all_feats[val_rows]
    train_images = _Images(model, train_split, train_feats, device, args.workers)
    val_images = _Images(model, val_split, val_feats, device, args.workers)

    q_ids, q_len = _encode(vocab, train_split.questions, cfg.question.max_tokens)
    by_image = _questions_by_image(train_split)
    aux = Auxiliary.build(args, train_split, targets, scores, cfg.image.embed_size, len(answers), device)
    n_train = len(train_split.image_ids)
    steps_per_epoch = math.ceil(n_train / args.batch_images)
    optimizer, scheduler = optimizer_and_schedule(
        model, list(aux.head.parameters()) if aux is not None else [],
        args.lr if frozen else args.image_lr, args.lr, steps_per_epoch * args.epochs)  # frozen: projection only
    gen = torch.Generator().manual_seed(args.seed + 1)
    augment = None if frozen else augmenter(args.augment or "shift", cfg.image.image_size,
                                            torch.Generator().manual_seed(args.seed + 4))

    history = []
    best = {"val_accuracy": -1.0, "epoch": 0}
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(1, args.epochs + 1):
        model.train()
        if aux is not None:
            aux.head.train()
        if frozen:
            model.image_encoder.backbone.eval()
        order = torch.randperm(n_train, generator=gen).tolist()
        loss_sum, seen = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", leave=False,
                   disable=args.quiet, file=sys.stderr)
        for chunk, feats in train_images.batches(order, args.batch_images, augment):
            qs = torch.tensor([q for r in chunk for q in by_image[r]], dtype=torch.long)
            target = _dense(targets, qs, len(answers))
            keep = target.sum(1) > 0
            bar.update(1)
            if not keep.any():
                continue
            qs, target = qs[keep], target[keep]
            local = {r: i for i, r in enumerate(chunk)}
            q_rows = torch.tensor([local[int(train_split.image_index[q])] for q in qs], dtype=torch.long)
            lengths = q_len[qs]
            ids = q_ids[qs][:, : int(lengths.max())].to(device)
            logits = model.answer_logits(feats[q_rows.to(device)], ids, lengths)
            loss = F.cross_entropy(logits, (target / target.sum(1, keepdim=True)).to(device))
            total = loss
            if aux is not None:
                scaled = model.image_scale * feats if model.image_scale is not None else feats
                total = loss + args.aux_weight * aux.loss(scaled, chunk, qs, q_rows, target)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(qs)
            seen += len(qs)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        val_acc = official_accuracy(val_split, predict(model, val_images, vocab, answers))
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_accuracy": val_acc,
               "elapsed_s": time.perf_counter() - t_start}
        history.append(row)
        print(f"epoch {epoch:2d}  train loss {row['train_loss']:.4f}  val VQA accuracy "
              f"{100 * val_acc:.2f}  ({row['elapsed_s']:.0f}s)", flush=True)
        if val_acc > best["val_accuracy"]:
            best = {"val_accuracy": val_acc, "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    assert best_state is not None
    model.load_state_dict(best_state)
    model.cpu().eval()
    model.requires_grad_(True)
    train_seconds = time.perf_counter() - t_start
    info = {
        "dataset": f"VQA v2 layout, split {args.split}",
        "train_images": n_train,
        "train_questions": len(train_split),
        "train_questions_with_an_answer_in_vocabulary": answerable,
        "validation": val_source,
        "val_images": len(val_split.image_ids),
        "val_questions": len(val_split),
        "seed": args.seed,
        "selected_epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "val_metric": f"official VQA accuracy (vqaEval.py at {vqa_metric.DEFAULT_REVISION}), 0..1",
        "image_features": "cached, frozen backbone" if frozen else "end to end from pixels",
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "hyperparameters": {k: (str(v) if v is not None and not isinstance(v, (int, float, bool, str)) else v)
                            for k, v in vars(args).items() if k not in ("out", "quiet")},
    }
    save_checkpoint(args.out, Checkpoint(model=model, vocab=vocab, answers=answers, name=args.name, info=info))
    print(f"best epoch {best['epoch']} (val VQA accuracy {100 * best['val_accuracy']:.2f}); wrote "
          f"{args.out} in {train_seconds:.0f}s", flush=True)
    return info
