"""One safe, self-describing checkpoint file.

Tensors live in a safetensors file (no pickle, so loading runs no code); the model config,
both vocabularies and free-form training info are JSON strings in its metadata header.
Every failure raises :class:`CheckpointError` naming the file and the problem.

The config carries the model's whole pipeline, not only its layer sizes: how questions are
tokenized and padded, how images are resized, the VGG depth, the head. Format 2 added those
fields; a format-1 file has none of them and loads with their defaults, which are exactly
what format-1 models were trained with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .vocab import AnswerVocabulary, Vocabulary
from .vqa import VQAConfig, VQAModel

FORMAT_KEY = "vqa_serve_format"
FORMAT_VERSION = "2"
READABLE_FORMATS = ("1", "2")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model it describes."""


@dataclass
class Checkpoint:
    model: VQAModel
    vocab: Vocabulary
    answers: AnswerVocabulary
    name: str = "vqa"
    info: dict = field(default_factory=dict)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    path = Path(path)
    if ckpt.vocab.tokenizer != ckpt.model.cfg.question.tokenizer:
        raise ValueError(f"the vocabulary's tokenizer {ckpt.vocab.tokenizer} differs from the "
                         f"model config's {ckpt.model.cfg.question.tokenizer}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        "name": ckpt.name,
        "config": json.dumps(ckpt.model.cfg.to_dict()),
        "question_vocab": json.dumps(ckpt.vocab.words),
        "answers": json.dumps(ckpt.answers.answers),
        "info": json.dumps(ckpt.info),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # a shipped artefact: readable by the (non-root) service user
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint behind


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    meta = read_metadata(path)
    if meta.get(FORMAT_KEY) not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path}: not a vqa-serve checkpoint (metadata {FORMAT_KEY!r} is "
            f"{meta.get(FORMAT_KEY)!r}, expected one of {READABLE_FORMATS})"
        )
    try:
        cfg = VQAConfig.from_dict(json.loads(meta["config"]))
        vocab = Vocabulary(json.loads(meta["question_vocab"]), cfg.question.tokenizer)
        answers = AnswerVocabulary(json.loads(meta["answers"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid metadata ({type(e).__name__}: {e})") from None
    if len(vocab) != cfg.question.vocab_size:
        raise CheckpointError(
            f"{path}: question vocabulary has {len(vocab)} words, config says {cfg.question.vocab_size}"
        )
    if len(answers) != cfg.num_answers:
        raise CheckpointError(
            f"{path}: answer vocabulary has {len(answers)} answers, config says {cfg.num_answers}"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated tensor data ({e})") from None
    # Built without memory or initialisation (meta device): the file's tensors become the
    # parameters. A full-size VGG16 would otherwise spend seconds on random init first.
    with torch.device("meta"):
        model = VQAModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the model config "
            f"(missing: {missing[:5]}{'…' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'…' if len(unexpected) > 5 else ''})"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)}, model expects "
                f"{tuple(expected[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k!r} contains NaN or infinite values")
        if v.dtype != expected[k].dtype:
            tensors[k] = v.to(expected[k].dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()
    return Checkpoint(model=model, vocab=vocab, answers=answers, name=meta.get("name", "vqa"), info=info)
