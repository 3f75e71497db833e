"""The checkpoint carries its pipeline: tokenizer, padding, resize, VGG depth, image scale.
Defaults are the project's own pipeline; format-1 checkpoints load with them unchanged."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.pipeline import preprocessing
from app.pipeline.preprocessing import decode_pixels
from models import CheckpointError, ImageEncoderConfig, QuestionEncoderConfig, VQAModel, load_checkpoint, save_checkpoint
from models.question import QuestionEncoder, pad_questions
from models.transforms import ImageTransform
from models.vgg import VGGBackbone
from models.vocab import TokenizerConfig, Vocabulary, tokenize
from tests.conftest import make_tiny_checkpoint

KEEP = TokenizerConfig(keep_punctuation=True, expand_contractions=False, fold_spellings=False)


def test_tokenizer_keeping_punctuation():
    assert tokenize("What is the man's name?", KEEP) == ["what", "is", "the", "man", "'", "s", "name", "?"]
    assert tokenize("  red , blue?!  ", KEEP) == ["red", ",", "blue", "?!"]
    assert tokenize("???", KEEP) == ["???"]
    assert tokenize("isn't it", TokenizerConfig(keep_punctuation=True)) == ["is", "not", "it"]
    # the default is unchanged
    assert tokenize("What is the man's name?") == ["what", "is", "the", "man", "s", "name"]


def test_spelling_folding_is_a_field():
    words = ["what", "color"]
    assert Vocabulary(words).encode("colour").tokens == ("color",)
    assert Vocabulary(words, KEEP).encode("colour").unknown_words == ("colour",)


def _encoder(padding: str) -> QuestionEncoder:
    torch.manual_seed(0)
    return QuestionEncoder(QuestionEncoderConfig(vocab_size=12, word_dim=6, hidden_size=5, num_layers=2,
                                                 embed_size=4, max_tokens=10, padding=padding)).eval()


def test_fixed_padding_reads_the_pads_and_is_batch_invariant():
    v = Vocabulary(["a", "b", "c", "d"])
    qs = [v.encode("a b"), v.encode("a b c d a b c")]
    ids, lengths = pad_questions(qs)
    fixed, packed = _encoder("fixed"), _encoder("packed")
    packed.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        both = fixed(ids, lengths)
        alone = fixed(*pad_questions(qs[:1]))
        manual = fixed.fc(torch.tanh(torch.cat(fixed.lstm(torch.tanh(fixed.embedding(
            torch.nn.functional.pad(ids[:1, :2], (0, 8)))))[1], 2).transpose(0, 1).reshape(1, -1)))
        torch.testing.assert_close(both[0], alone[0])
        torch.testing.assert_close(alone, manual)
        assert (packed(ids, lengths)[0] - both[0]).abs().max() > 1e-3  # the pads matter
    with pytest.raises(ValueError, match="padding"):
        QuestionEncoderConfig(vocab_size=3, padding="ragged")


def test_vgg19_depth_is_torchvision_vgg19():
    with torch.device("meta"):
        ours = VGGBackbone(ImageEncoderConfig(depth=19)).state_dict()
        tv = torchvision.models.vgg19(weights=None).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tv.items() if not k.startswith("classifier.6.")}
    with pytest.raises(ValueError, match="depth"):
        ImageEncoderConfig(depth=17)


def test_no_learned_image_scale():
    ckpt = make_tiny_checkpoint()
    cfg = ckpt.model.cfg
    from dataclasses import replace

    model = VQAModel(replace(cfg, learned_image_scale=False))
    assert "image_scale" not in model.state_dict() and "image_scale" in ckpt.model.state_dict()


def _photo(size, fmt="PNG") -> bytes:
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(9, 11, 3, generator=g) * 255).to(torch.uint8).numpy()).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def test_lanczos_transform_is_pils_plain_resize():
    t = ImageTransform(224, resample="lanczos", reducing_gap=None, jpeg_draft=False)
    data = _photo((500, 300))
    expected = torch.from_numpy(np.array(
        Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.LANCZOS))).permute(2, 0, 1)
    got = decode_pixels(data, transform=t, max_pixels=10**8)
    assert torch.equal(got, expected)
    default = decode_pixels(data, image_size=224, max_pixels=10**8)
    assert not torch.equal(default, expected)  # bilinear with a reducing gap is another input
    with pytest.raises(ValueError, match="image_size 64 differs"):
        decode_pixels(data, image_size=64, transform=t, max_pixels=10**8)
    with pytest.raises(ValueError, match="resample"):
        ImageTransform(64, resample="sinc")


def test_jpeg_draft_is_a_field(monkeypatch):
    sizes = []
    real = preprocessing.pil_to_uint8
    monkeypatch.setattr(preprocessing, "pil_to_uint8", lambda img, *a: sizes.append(img.size) or real(img, *a))
    data = _photo((1600, 1200), "JPEG")
    decode_pixels(data, image_size=64, max_pixels=10**8)
    decode_pixels(data, transform=ImageTransform(64, jpeg_draft=False), max_pixels=10**8)
    assert sizes == [(200, 150), (1600, 1200)]  # libjpeg's 1/8 decode, then the full decode


def test_format_1_checkpoint_loads_with_default_pipeline(tmp_path: Path, shipped_weights: Path):
    with safe_open(str(shipped_weights), framework="pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    loaded = load_checkpoint(shipped_weights)
    if meta["vqa_serve_format"] == "1":  # the shipped file predates the pipeline fields
        assert "tokenizer" not in cfg["question"] and "depth" not in cfg["image"]
    c = loaded.model.cfg
    assert (c.image.depth, c.image.resample, c.image.reducing_gap, c.image.jpeg_draft) == (16, "bilinear", 2.0, True)
    assert c.question.padding == "packed" and c.question.tokenizer == TokenizerConfig() and c.learned_image_scale
    assert loaded.vocab.tokenizer == TokenizerConfig()

    # A format-1 file written by the old code: the same tensors, the old config keys only.
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, make_tiny_checkpoint())
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    old = json.loads(meta["config"])
    for key in ("depth", "resample", "reducing_gap", "jpeg_draft"):
        del old["image"][key]
    del old["question"]["padding"], old["question"]["tokenizer"], old["learned_image_scale"]
    meta.update(config=json.dumps(old), vqa_serve_format="1")
    save_file(load_file(str(path)), str(path), metadata=meta)
    assert load_checkpoint(path).model.cfg == make_tiny_checkpoint().model.cfg

    meta["vqa_serve_format"] = "3"
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"old\.safetensors: not a vqa-serve checkpoint .*'3'"):
        load_checkpoint(path)


def test_vocabulary_and_config_tokenizers_must_agree(tmp_path: Path):
    ckpt = make_tiny_checkpoint()
    ckpt.vocab = Vocabulary(ckpt.vocab.words, KEEP)
    with pytest.raises(ValueError, match="tokenizer"):
        save_checkpoint(tmp_path / "x.safetensors", ckpt)
