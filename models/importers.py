"""``vqa-import``: translate a model trained elsewhere into a vqa-serve checkpoint.

An importer only translates: it reads the foreign file, renames its tensors to ours, reads
every size from the tensors' shapes, and writes into the checkpoint's config each way the
foreign pipeline differs from ours (tokenizer, padding, image resize, VGG depth, head). The
server then builds that pipeline from the config like any other; it never learns where a
model came from.

``vqa-import basic-vqa CHECKPOINT --vocab-questions vocab_questions.txt --vocab-answers
vocab_answers.txt --out model.safetensors`` imports what tbmoon/basic_vqa's ``train.py`` saves
(``torch.save({'epoch': ..., 'state_dict': model.state_dict()})``). That model is:

* image: torchvision ``vgg19`` (or any torchvision VGG) with the classifier's last layer
  removed, ``img_encoder.fc`` to ``embed_size``, L2-normalised, no learnable scale;
* question: ``qst_encoder.word2vec`` embedding, tanh, ``qst_encoder.lstm`` over the question
  padded with ``<pad>`` to ``max_qst_length`` (30) and *not* packed, (hidden, cell) of every
  layer concatenated, tanh, ``qst_encoder.fc`` to ``embed_size``;
* fusion: product, tanh, dropout, ``fc1`` (embed -> answers), tanh, dropout, ``fc2``;
* its tokenizer: lower case, ``re.split(r"(\\W+)")``, each piece stripped, empty ones dropped:
  punctuation runs such as ``?`` are tokens; unknown words map to ``<unk>``;
* its images: the whole image resized to 224x224 with PIL's LANCZOS filter (its
  ``resize_images.py``), then torchvision ``ToTensor`` and ImageNet ``Normalize``.

The pickle is read only here, with ``torch.load(weights_only=True)`` (tensors and plain
containers only: no code runs); the server reads the safetensors file this writes.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import torch

from .checkpoint import Checkpoint, save_checkpoint
from .question import QuestionEncoderConfig
from .vgg import VGG_CFGS, ImageEncoderConfig
from .vocab import PAD, UNK, AnswerVocabulary, TokenizerConfig, Vocabulary
from .vqa import VQAConfig, VQAModel

BASIC_VQA_MAX_QST_LENGTH = 30
BASIC_VQA_IMAGE_SIZE = 224
# basic_vqa's choices where they differ from ours (models/ builds the pipeline from these).
BASIC_VQA_TOKENIZER = TokenizerConfig(keep_punctuation=True, expand_contractions=False, fold_spellings=False)
BASIC_VQA_IMAGE = dict(resample="lanczos", reducing_gap=None, jpeg_draft=False)

# basic_vqa tensor name prefix -> ours. The VGG's own names (features.N, classifier.N) are
# torchvision's in both.
_RENAMES = (
    ("img_encoder.model.features.", "image_encoder.backbone.features."),
    ("img_encoder.model.classifier.", "image_encoder.backbone.classifier."),
    ("img_encoder.fc.", "image_encoder.projection."),
    ("qst_encoder.word2vec.", "question_encoder.embedding."),
    ("qst_encoder.lstm.", "question_encoder.lstm."),
    ("qst_encoder.fc.", "question_encoder.fc."),
    ("fc1.", "head.2."),
    ("fc2.", "head.5."),
)
_CONVS_TO_DEPTH = {sum(1 for v in cfg if v != "M"): depth for depth, cfg in VGG_CFGS.items()}


class ImportFailed(RuntimeError):
    """The input is not what the importer expects; the message names the file and why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_basic_vqa_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """``torch.save({'epoch', 'state_dict'})`` file -> (state dict, epoch). A bare
    ``model.state_dict()`` is accepted too, as is DataParallel's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only: nothing ran; report what torch said
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImportFailed(f"{path}: not a basic_vqa checkpoint: torch.load(weights_only=True) "
                           f"cannot read it ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise ImportFailed(f"{path}: not a basic_vqa checkpoint: it holds a {type(obj).__name__}, "
                           f"not a dict with 'state_dict'")
    epoch = obj.get("epoch")
    state = obj.get("state_dict", obj if any(isinstance(v, torch.Tensor) for v in obj.values()) else None)
    if not isinstance(state, dict) or not state:
        raise ImportFailed(f"{path}: not a basic_vqa checkpoint: no 'state_dict' (keys: {sorted(map(str, obj))[:8]})")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ImportFailed(f"{path}: not a basic_vqa checkpoint: 'state_dict' holds something other than tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, epoch if isinstance(epoch, int) else None


def _rename(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for k, v in state.items():
        for theirs, ours in _RENAMES:
            if k.startswith(theirs):
                out[ours + k[len(theirs):]] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise ImportFailed(f"{path}: not a basic_vqa checkpoint: unexpected tensors {unknown[:5]}"
                           f"{'…' if len(unknown) > 5 else ''} (expected img_encoder.model.*, "
                           f"img_encoder.fc, qst_encoder.word2vec/lstm/fc, fc1, fc2)")
    return out


def _shape(state: dict[str, torch.Tensor], key: str, path: Path, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ImportFailed(f"{path}: not a basic_vqa checkpoint: tensor {key!r} is missing")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ImportFailed(f"{path}: tensor {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def basic_vqa_config(state: dict[str, torch.Tensor], path: Path, *, image_size: int = BASIC_VQA_IMAGE_SIZE,
                     max_qst_length: int = BASIC_VQA_MAX_QST_LENGTH) -> VQAConfig:
    """Our config for a basic_vqa state dict (its names), every size read from the shapes."""
    conv_re = re.compile(r"img_encoder\.model\.features\.(\d+)\.weight$")
    convs = sorted((int(m.group(1)), tuple(v.shape)) for k, v in state.items()
                   if (m := conv_re.match(k)) and v.dim() == 4)
    if len(convs) not in _CONVS_TO_DEPTH:
        raise ImportFailed(f"{path}: not a torchvision VGG image encoder: {len(convs)} convolution layers "
                           f"in img_encoder.model.features (VGG11/13/16/19 have "
                           f"{', '.join(map(str, sorted(_CONVS_TO_DEPTH)))})")
    depth = _CONVS_TO_DEPTH[len(convs)]
    batch_norm = any(k.startswith("img_encoder.model.features.") and k.endswith("running_mean") for k in state)
    width = convs[0][1][0] / 64
    last_channels = convs[-1][1][0]
    hidden, flat = _shape(state, "img_encoder.model.classifier.0.weight", path, 2)
    pool = round((flat / last_channels) ** 0.5)
    if pool * pool * last_channels != flat:
        raise ImportFailed(f"{path}: img_encoder.model.classifier.0 takes {flat} inputs, not a square "
                           f"grid of the last convolution's {last_channels} channels")
    embed, img_hidden = _shape(state, "img_encoder.fc.weight", path, 2)
    vocab_size, word_dim = _shape(state, "qst_encoder.word2vec.weight", path, 2)
    lstm_keys = [k for k in state if k.startswith("qst_encoder.lstm.")]
    if any("reverse" in k or "weight_hr" in k for k in lstm_keys):
        raise ImportFailed(f"{path}: qst_encoder.lstm is bidirectional or projected; basic_vqa's is neither")
    num_layers = sum(1 for k in lstm_keys if re.fullmatch(r"qst_encoder\.lstm\.weight_ih_l\d+", k))
    four_h, lstm_in = _shape(state, "qst_encoder.lstm.weight_ih_l0", path, 2)
    q_embed, q_in = _shape(state, "qst_encoder.fc.weight", path, 2)
    head_hidden, head_in = _shape(state, "fc1.weight", path, 2)
    num_answers, fc2_in = _shape(state, "fc2.weight", path, 2)
    lstm_hidden = four_h // 4
    checks = [
        (img_hidden == hidden, f"img_encoder.fc takes {img_hidden} inputs, the VGG gives {hidden}"),
        (lstm_in == word_dim, f"qst_encoder.lstm takes {lstm_in} inputs, word2vec gives {word_dim}"),
        (q_in == 2 * num_layers * lstm_hidden,
         f"qst_encoder.fc takes {q_in} inputs, (hidden, cell) of {num_layers} layers give {2 * num_layers * lstm_hidden}"),
        (q_embed == embed, f"question embedding {q_embed} != image embedding {embed}"),
        (head_in == embed, f"fc1 takes {head_in} inputs, the fused feature has {embed}"),
        (fc2_in == head_hidden, f"fc2 takes {fc2_in} inputs, fc1 gives {head_hidden}"),
    ]
    for ok, why in checks:
        if not ok:
            raise ImportFailed(f"{path}: inconsistent tensors: {why}")
    try:
        image = ImageEncoderConfig(image_size=image_size, width=width, batch_norm=batch_norm, pool_size=pool,
                                   embed_size=embed, dropout=0.5, depth=depth, **BASIC_VQA_IMAGE)
        question = QuestionEncoderConfig(vocab_size=vocab_size, word_dim=word_dim, hidden_size=lstm_hidden,
                                         num_layers=num_layers, embed_size=embed, max_tokens=max_qst_length,
                                         padding="fixed", tokenizer=BASIC_VQA_TOKENIZER)
        return VQAConfig(image=image, question=question, num_answers=num_answers, head_hidden=head_hidden,
                         dropout=0.5, learned_image_scale=False)
    except ValueError as e:
        raise ImportFailed(f"{path}: {e}") from None


def read_vocab_file(path: str | Path) -> list[str]:
    """One entry a line, each stripped, as basic_vqa's ``load_str_list`` reads it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f.readlines()]
    except FileNotFoundError:
        raise ImportFailed(f"{path}: no such vocabulary file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImportFailed(f"{path}: unreadable vocabulary file ({e})") from None


def import_basic_vqa(checkpoint: str | Path, vocab_questions: str | Path, vocab_answers: str | Path,
                     out: str | Path, *, name: str | None = None, image_size: int = BASIC_VQA_IMAGE_SIZE,
                     max_qst_length: int = BASIC_VQA_MAX_QST_LENGTH) -> Checkpoint:
    checkpoint, vocab_questions, vocab_answers = Path(checkpoint), Path(vocab_questions), Path(vocab_answers)
    state, epoch = read_basic_vqa_checkpoint(checkpoint)
    ours = _rename(state, checkpoint)  # first: a file of other tensors is named as such
    cfg = basic_vqa_config(state, checkpoint, image_size=image_size, max_qst_length=max_qst_length)

    words = read_vocab_file(vocab_questions)
    if len(words) != cfg.question.vocab_size:
        raise ImportFailed(f"{vocab_questions}: {len(words)} words, but {checkpoint.name}'s "
                           f"qst_encoder.word2vec has {cfg.question.vocab_size} rows: not this model's vocabulary")
    if words[:2] != [PAD, UNK]:
        raise ImportFailed(f"{vocab_questions}: the first two lines must be {PAD} and {UNK} "
                           f"(basic_vqa's layout), found {words[:2]}")
    answers = read_vocab_file(vocab_answers)
    if len(answers) != cfg.num_answers:
        raise ImportFailed(f"{vocab_answers}: {len(answers)} answers, but {checkpoint.name}'s fc2 "
                           f"scores {cfg.num_answers}: not this model's answer vocabulary")
    if answers[:1] != [UNK] or PAD in answers:
        raise ImportFailed(f"{vocab_answers}: the first line must be {UNK} and {PAD} must not appear "
                           f"(basic_vqa's answer vocabulary), found {answers[:2]}: is it the "
                           f"questions file?")
    try:
        vocab = Vocabulary(words, cfg.question.tokenizer)
    except ValueError as e:
        raise ImportFailed(f"{vocab_questions}: {e}") from None
    try:
        answer_vocab = AnswerVocabulary(answers)
    except ValueError as e:
        raise ImportFailed(f"{vocab_answers}: {e}") from None

    with torch.device("meta"):
        model = VQAModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ImportFailed(f"{checkpoint}: not a basic_vqa checkpoint: tensors missing for {missing[:5]}")
    for k, v in ours.items():
        if k not in expected:
            raise ImportFailed(f"{checkpoint}: unexpected tensor for {k!r}")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ImportFailed(f"{checkpoint}: tensor for {k!r} has shape {tuple(v.shape)}, a "
                               f"{cfg.image.depth}-layer VGG of width {cfg.image.width:g} expects "
                               f"{tuple(expected[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ImportFailed(f"{checkpoint}: tensor {k!r} contains NaN or infinite values")
        if v.dtype != expected[k].dtype:
            ours[k] = v.to(expected[k].dtype)
    model.load_state_dict(ours, strict=True, assign=True)
    model.eval()
    info = {
        "imported_from": "basic_vqa (tbmoon/basic_vqa) train.py checkpoint",
        "source_file": checkpoint.name,
        "source_sha256": _sha256(checkpoint),
        "source_epoch": epoch,
        "vocab_questions": vocab_questions.name,
        "vocab_answers": vocab_answers.name,
        "unknown_answer": f"answers[0] is {UNK!r}, basic_vqa's class for answers outside its "
                          f"vocabulary; served as is when it scores highest",
        "pipeline": "basic_vqa's: VGG%d, punctuation kept as tokens, padded to %d tokens with %s and "
                    "run unpacked, LANCZOS resize to %dx%d, ImageNet mean/std, no learnable image "
                    "scale, head %d -> %d -> %d" % (cfg.image.depth, max_qst_length, PAD, image_size,
                                                    image_size, cfg.image.embed_size, cfg.head_hidden,
                                                    cfg.num_answers),
    }
    ckpt = Checkpoint(model=model, vocab=vocab, answers=answer_vocab,
                      name=name or f"basic-vqa-vgg{cfg.image.depth}-lstm", info=info)
    save_checkpoint(out, ckpt)
    return ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vqa-import", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    b = sub.add_parser("basic-vqa", help="a checkpoint saved by tbmoon/basic_vqa's train.py",
                       description="Import what tbmoon/basic_vqa's train.py saves, with its two vocabulary files.")
    b.add_argument("checkpoint", type=Path, help="model-epoch-NN.ckpt (torch.save of {'epoch', 'state_dict'})")
    b.add_argument("--vocab-questions", type=Path, required=True, help="its vocab_questions.txt (<pad>, <unk> first)")
    b.add_argument("--vocab-answers", type=Path, required=True, help="its vocab_answers.txt (<unk> first)")
    b.add_argument("--out", type=Path, required=True, help="vqa-serve checkpoint to write (.safetensors)")
    b.add_argument("--name", help="model name the service reports (default: basic-vqa-vgg<depth>-lstm)")
    b.add_argument("--image-size", type=int, default=BASIC_VQA_IMAGE_SIZE, help="its resize_images.py --image_size")
    b.add_argument("--max-qst-length", type=int, default=BASIC_VQA_MAX_QST_LENGTH, help="its train.py --max_qst_length")
    args = p.parse_args(argv)
    try:
        ckpt = import_basic_vqa(args.checkpoint, args.vocab_questions, args.vocab_answers, args.out,
                                name=args.name, image_size=args.image_size, max_qst_length=args.max_qst_length)
    except ImportFailed as e:
        raise SystemExit(f"vqa-import: {e}") from None
    cfg = ckpt.model.cfg
    print(f"wrote {args.out}: {ckpt.name}, VGG{cfg.image.depth}, {len(ckpt.vocab)} question words, "
          f"{len(ckpt.answers)} answers; serve it with VQA_WEIGHTS={args.out} vqa-serve")


if __name__ == "__main__":
    main()
