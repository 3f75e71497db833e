"""Predictor on CPU: batch invariance, cached-feature path, top-k, device and precision."""

import pytest
import torch

from models import ImageQuestions, Predictor
from models.predictor import resolve_device, resolve_precision
from models.question import pad_questions
from tests.conftest import QUESTIONS, REPO


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


# ----------------------------------------------------------------------------- the CUDA path, on CPU
def test_question_encoder_runs_outside_autocast_in_float32(tiny_checkpoint):
    """Under CUDA autocast cuDNN's LSTM runs in fp16 whatever the autocast dtype: the question
    encoder leaves autocast on purpose, and the predictor reports it."""
    enc = tiny_checkpoint.model.question_encoder
    seen = []
    enc.lstm.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    ids, lengths = pad_questions([tiny_checkpoint.vocab.encode(q) for q in QUESTIONS])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(ids, lengths)
    assert seen == [False] and out.dtype == torch.float32
    p = Predictor(tiny_checkpoint, device="cpu", precision="bf16")
    assert p.precision == {"image_encoder": "bfloat16", "question_encoder": "float32", "head": "bfloat16"}
    assert Predictor(tiny_checkpoint, device="cpu").precision == dict.fromkeys(
        ("image_encoder", "question_encoder", "head"), "float32")


class _Recorder(torch.overrides.TorchFunctionMode):
    """Records the batch path's torch calls. With ``pinned``, stands in for a CUDA host: a
    ``pin_memory=True`` allocation is made as an ordinary one and remembered as pinned."""

    def __init__(self, device: torch.device, pinned: bool = False) -> None:
        super().__init__()
        self.device, self.pinned = device, pinned
        self.pinned_storage: set[int] = set()
        self.moves: list[tuple[bool, bool]] = []  # (from pinned memory, non_blocking) per copy to the device
        self.device_factories: list[str] = []  # tensors built from Python values on the device
        self.tensor_repeats: list[str] = []  # repeat_interleave with a tensor of repeats
        self.pin_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        # (on-device factories without host data -- zeros, arange -- are kernels, not copies)
        if name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
            self.device_factories.append(name)
        if name == "repeat_interleave" and any(isinstance(a, torch.Tensor) for a in [*args[1:], kwargs.get("repeats")]):
            self.tensor_repeats.append(name)
        if name == "pin_memory":
            self.pin_calls += 1
        if name == "is_pinned" and self.pinned:
            return args[0].untyped_storage().data_ptr() in self.pinned_storage
        if name == "to" and (kwargs.get("device") is not None
                             or any(isinstance(a, (torch.device, str)) for a in args[1:])):
            self.moves.append((args[0].untyped_storage().data_ptr() in self.pinned_storage,
                               bool(kwargs.get("non_blocking"))))
        pin = kwargs.pop("pin_memory", False) if self.pinned else False
        out = func(*args, **kwargs)
        if pin:
            self.pinned_storage.add(out.untyped_storage().data_ptr())
        return out


def _mixed_batch(p: Predictor) -> list[ImageQuestions]:
    """Two images to encode, one with a cached feature; one, two and one questions."""
    x = _images(2, p.image_size)
    raw = (x * 40 + 128).clamp(0, 255).to(torch.uint8)
    cached = p.run([ImageQuestions([p.encode_question(QUESTIONS[0])], pixels=raw[0])])[0].features
    q = [p.encode_question(t) for t in QUESTIONS]
    return [ImageQuestions(q[:1], pixels=raw[0]), ImageQuestions(q[1:3], features=cached),
            ImageQuestions(q[3:], pixels=raw[1])]


def test_batch_path_copies_each_tensor_once_and_never_syncs_on_repeats(tiny_checkpoint):
    """One host-to-device copy per batch tensor (pixels, cached features, token ids, row index)
    and none hidden elsewhere (packing unsorted questions copies a permutation to the device:
    the predictor sorts them on the host), no tensor built from Python values on the device per
    batch (each is a blocking copy), and no repeat_interleave with a tensor of repeats (on a GPU
    it waits for the device to size its output)."""
    p = Predictor(tiny_checkpoint, device="cpu")
    batch = _mixed_batch(p)
    reference = p.run(batch)
    rec = _Recorder(p.device)
    with rec:
        out = p.run(batch)
    assert rec.device_factories == [] and rec.tensor_repeats == []
    assert len(rec.moves) == 4, rec.moves
    for a, b in zip(out, reference):
        torch.testing.assert_close(a.probs, b.probs)


def test_cuda_host_path_stages_in_pinned_memory_without_extra_copies(tiny_checkpoint):
    """With pinned memory on (as on CUDA), every tensor the batch path sends to the device was
    written straight into pinned memory and is copied non-blocking; ``Tensor.pin_memory()``
    (a second, synchronous host copy of a finished tensor) is never called."""
    p = Predictor(tiny_checkpoint, device="cpu")
    batch = _mixed_batch(p)
    reference = p.run(batch)
    p.pin_memory = True
    rec = _Recorder(p.device, pinned=True)
    with rec:
        out = p.run(batch)
    assert rec.pin_calls == 0
    assert rec.moves == [(True, True)] * 4, rec.moves
    for a, b in zip(out, reference):
        torch.testing.assert_close(a.probs, b.probs)


def test_image_batches_are_padded_to_warmed_sizes(tiny_checkpoint):
    """On CUDA the image encoder must only meet the batch sizes warmed at start-up
    (cudnn.benchmark autotunes each new shape on live traffic otherwise): every size from 1 to
    the maximum is padded up to one, and the padding does not change any answer."""
    import copy

    from models.predictor import padded_batch_sizes

    sizes = padded_batch_sizes(32)
    assert sizes == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    plain = Predictor(copy.deepcopy(tiny_checkpoint), device="cpu")
    padded = Predictor(copy.deepcopy(tiny_checkpoint), device="cpu")
    padded.use_batch_buckets(sizes)
    seen: list[int] = []
    padded.model.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    x = (_images(32, p_size := plain.image_size) * 40 + 128).clamp(0, 255).to(torch.uint8)
    q = plain.encode_question(QUESTIONS[1])
    for n in (1, 5, 7, 17, 31, 32):
        reqs = [ImageQuestions([q], pixels=x[i]) for i in range(n)]
        for a, b in zip(padded.run(reqs), plain.run(reqs)):
            torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-4)
    assert seen == [1, 6, 8, 24, 32, 32]
    seen.clear()
    for n in range(1, 33):
        padded.run([ImageQuestions([q], pixels=x[i]) for i in range(n)])
    assert set(seen) <= set(sizes) and p_size > 0
    seen.clear()
    padded.warmup(sizes)
    assert seen == sizes  # warm-up runs exactly the sizes batches are padded to


def test_predictor_takes_over_a_model_without_batchnorm(tmp_path):
    """What the constructor's docstring says: with no BatchNorm to fold (full-size VGG16) the
    checkpoint's own model is served, put on the device and converted in place (no copy of its
    weights); with BatchNorm a folded copy is served and the loaded model is left as it was."""
    from torch import nn

    from bench.regimes import make_full_size_weights
    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(make_full_size_weights(tmp_path / "w.safetensors", image_size=32, width=1 / 16))
    p = Predictor(ckpt, device="cpu")
    assert p.model is ckpt.model and not ckpt.model.training
    assert ckpt.model.image_encoder.backbone.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    with_bn = load_checkpoint(REPO / "weights" / "easy-vqa.safetensors")
    q = Predictor(with_bn, device="cpu")
    assert q.model is not with_bn.model
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.model.modules())
    assert with_bn.model.image_encoder.backbone.features[0].weight.is_contiguous()
