"""Predictor on CPU: batch invariance, cached-feature path, top-k, device and precision."""

import pytest
import torch

from models import ImageQuestions, Predictor
from models.predictor import resolve_device, resolve_precision
from models.question import pad_questions
from tests.conftest import QUESTIONS


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _assert_batch_invariant(p: Predictor, pixels: torch.Tensor, questions: list[str]) -> None:
    """Each (image, question) alone == the same pair inside one mixed batch."""
    alone = [p.run([ImageQuestions([p.encode_question(q)], pixels=x)])[0].probs[0]
             for x, q in zip(pixels, questions)]
    batch = p.run([ImageQuestions([p.encode_question(q)], pixels=x) for x, q in zip(pixels, questions)])
    for a, b in zip(alone, batch):
        assert int(a.argmax()) == int(b.probs[0].argmax())
        torch.testing.assert_close(a, b.probs[0], atol=1e-4, rtol=0)


def test_batch_invariance_tiny(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(7)]  # mixed lengths (3..8 tokens)
    assert len({len(p.encode_question(q)) for q in qs}) > 1
    _assert_batch_invariant(p, _images(7, p.image_size), qs)


def test_batch_invariance_shipped_weights(shipped_weights):
    from training.data import load_easy_vqa
    from models.transforms import normalize

    p = Predictor.from_file(shipped_weights, device="cpu")
    test = load_easy_vqa("test", image_size=p.image_size)
    picks = [0, 5, 17, 42, 99, 123, 256, 511]  # different images, questions of mixed length
    qs = [test.questions[i] for i in picks]
    assert len({len(p.encode_question(q)) for q in qs}) > 2
    pixels = normalize(test.images[test.image_index[picks]], *(p.model.cfg.image.mean, p.model.cfg.image.std))
    _assert_batch_invariant(p, pixels, qs)


def test_cached_features_give_the_same_answers(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    x = _images(1, p.image_size)[0]
    qs = [p.encode_question(q) for q in QUESTIONS]
    first = p.run([ImageQuestions(qs, pixels=x)])[0]
    assert first.encoded and first.probs.shape == (len(QUESTIONS), len(p.answers))
    again = p.run([ImageQuestions(qs, features=first.features)])[0]
    assert not again.encoded
    torch.testing.assert_close(first.probs, again.probs)


def test_probabilities_and_top_k(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    out = p.run([ImageQuestions([p.encode_question(QUESTIONS[0])], pixels=_images(1, p.image_size)[0])])[0]
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(1))
    top = p.top_k(out.probs[0], 3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert top[0][0] == p.answers[int(out.probs[0].argmax())]
    assert len(p.top_k(out.probs[0], 100)) == len(p.answers)


def test_finite_flag_marks_only_the_image_with_a_non_finite_output(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    embed = p.model.cfg.image.embed_size
    q = [p.encode_question(QUESTIONS[0]), p.encode_question(QUESTIONS[1])]
    x = _images(2, p.image_size)
    out = p.run([ImageQuestions(q, pixels=x[0]),
                 ImageQuestions(q[:1], features=torch.full((embed,), float("nan"))),
                 ImageQuestions(q, pixels=x[1])])
    assert [a.finite for a in out] == [True, False, True]
    assert [len(a.probs) for a in out] == [2, 1, 2]


def test_empty_question_refused(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError):
        p.run([ImageQuestions([p.encode_question("???")], pixels=_images(1, p.image_size)[0])])


def test_bf16_autocast_path_runs_on_cpu(tiny_checkpoint):
    """The autocast branch the GPU uses, exercised on CPU with bf16."""
    p32 = Predictor(tiny_checkpoint, device="cpu", precision="fp32")
    ref = p32.predict(_images(4, p32.image_size), QUESTIONS, top_k=1)
    pbf = Predictor(tiny_checkpoint, device="cpu", precision="bf16")
    assert pbf.dtype_name == "bfloat16"
    out = pbf.run([ImageQuestions([pbf.encode_question(q)], pixels=x)
                   for x, q in zip(_images(4, pbf.image_size), QUESTIONS)])
    assert all(a.probs.dtype == torch.float32 and torch.isfinite(a.probs).all() for a in out)
    assert len(ref) == 4


def test_channels_last_path_gives_the_same_answers(tiny_checkpoint):
    """The NHWC branch CUDA uses, forced on CPU."""
    import copy

    x = _images(3, 32)
    ref = Predictor(copy.deepcopy(tiny_checkpoint), device="cpu", channels_last=False)
    nhwc = Predictor(copy.deepcopy(tiny_checkpoint), device="cpu", channels_last=True)
    assert nhwc.model.image_encoder.backbone.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    a = ref.run([ImageQuestions([ref.encode_question(QUESTIONS[0])], pixels=p) for p in x])
    b = nhwc.run([ImageQuestions([nhwc.encode_question(QUESTIONS[0])], pixels=p) for p in x])
    for u, v in zip(a, b):
        torch.testing.assert_close(u.probs, v.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref.encode_images(x), nhwc.encode_images(x), atol=1e-5, rtol=1e-4)


def test_device_and_precision_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError):
        resolve_precision("int3", cpu)


def test_warmup_runs(tiny_checkpoint):
    Predictor(tiny_checkpoint, device="cpu").warmup([1, 3])


def test_uint8_pixels_are_normalised_on_the_device(tiny_checkpoint):
    """The service hands raw uint8 pixels; the predictor normalises them exactly as the
    training/eval transform does (float pixels are taken as already normalised)."""
    from models.transforms import normalize

    p = Predictor(tiny_checkpoint, device="cpu")
    raw = torch.randint(0, 256, (3, 3, p.image_size, p.image_size), dtype=torch.uint8)
    cfg = p.model.cfg.image
    q = [p.encode_question(QUESTIONS[1])]
    from_raw = p.run([ImageQuestions(q, pixels=x) for x in raw])
    from_float = p.run([ImageQuestions(q, pixels=x) for x in normalize(raw, cfg.mean, cfg.std)])
    for a, b in zip(from_raw, from_float):
        torch.testing.assert_close(a.probs, b.probs)
    with pytest.raises(ValueError, match="mixes"):
        p.run([ImageQuestions(q, pixels=raw[0]), ImageQuestions(q, pixels=raw[1].float())])


def test_batchnorm_folding_keeps_the_shipped_models_outputs(shipped_weights):
    """The predictor serves a copy with BatchNorm merged into the convolutions; the loaded
    model itself is untouched and computes the same features and answers."""
    from torch import nn

    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(shipped_weights)
    bn_before = sum(isinstance(m, nn.BatchNorm2d) for m in ckpt.model.modules())
    assert bn_before > 0
    p = Predictor(ckpt, device="cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in p.model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ckpt.model.modules()) == bn_before
    x = _images(6, p.image_size)
    q = [p.encode_question(QUESTIONS[i % len(QUESTIONS)]) for i in range(6)]
    with torch.inference_mode():
        ref_feats = ckpt.model.encode_images(x)
        ids, lengths = pad_questions(q)
        ref_probs = torch.softmax(ckpt.model.answer_logits(ref_feats, ids, lengths), dim=-1)
    out = p.run([ImageQuestions([qq], pixels=xx) for qq, xx in zip(q, x)])
    torch.testing.assert_close(torch.stack([a.features for a in out]), ref_feats, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([a.probs for a in out]), ref_probs, atol=1e-5, rtol=1e-4)
    assert [int(a.probs[0].argmax()) for a in out] == [int(r.argmax()) for r in ref_probs]
