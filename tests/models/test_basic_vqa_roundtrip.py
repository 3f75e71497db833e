"""The round trip of issue #11: a model in basic_vqa's exact layout (full torchvision VGG19,
random weights), saved the way its train.py saves, imported with ``vqa-import basic-vqa``,
served over HTTP by a real ``vqa-serve`` process (uvicorn on a TCP port, the safetensors file
as ``VQA_WEIGHTS``): the service's answers are that model's own forward pass, with its own
preprocessing (LANCZOS to 224, ToTensor, Normalize) and padding (``<pad>`` to 30, unpacked)."""

from __future__ import annotations

import gc
import io
import json
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from models.checkpoint import read_metadata
from models.importers import main as vqa_import
from tests.app.realserver import real_server
from tests.models import basic_vqa_layout as bv

Q_WORDS = ["<pad>", "<unk>", "'", "-", "?", "a", "are", "color", "dogs", "how", "is", "it", "like",
           "man", "many", "name", "raining", "s", "the", "there", "thing", "this", "what"]
ANSWERS = ["<unk>", "yes", "no", "1", "2", "3", "red", "white", "blue", "john", "tennis", "dog",
           "cat", "pizza", "snow", "kitchen"]
QUESTIONS = ["What is the man's name?", "what color is the zebra", "How many dogs are there?",
             "is this a xylophone-like thing?!", "Is it raining?"]


def _photo(size: tuple[int, int], seed: int, fmt: str, mode: str = "RGB") -> bytes:
    """A smooth random picture (upsampled noise), so resize filters see real gradients."""
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(12, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(small).resize(size, Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# Several sizes and both formats; the large JPEG would take libjpeg's reduced-scale decode
# under our own pipeline, which basic_vqa's full decode must not. COCO also holds grayscale
# JPEGs, which basic_vqa resized as they are and converted to RGB after.
IMAGES = [("photo.jpg", _photo((640, 480), 1, "JPEG"), "image/jpeg"),
          ("tall.png", _photo((97, 203), 2, "PNG"), "image/png"),
          ("square.png", _photo((224, 224), 3, "PNG"), "image/png"),
          ("big.jpg", _photo((1024, 768), 4, "JPEG"), "image/jpeg"),
          ("gray.jpg", _photo((333, 250), 5, "JPEG", mode="L"), "image/jpeg")]


@pytest.mark.slow
def test_basic_vqa_checkpoint_served_over_http_matches_its_own_forward_pass(tmp_path: Path):
    torch.manual_seed(0)
    vocab = bv.Vocab(Q_WORDS)
    model = bv.VqaModel(embed_size=64, qst_vocab_size=len(Q_WORDS), ans_vocab_size=len(ANSWERS),
                        word_embed_size=32, num_layers=2, hidden_size=32, vgg=bv.full_vgg(19)).eval()
    padded = torch.tensor([vocab.encode(q) for q in QUESTIONS])
    pixels = torch.stack([bv.preprocess(data) for _, data, _ in IMAGES])
    with torch.no_grad():
        vgg_features = model.img_encoder.model(pixels)  # one VGG19 pass for all images
        bv.make_answers_depend_on_inputs(model, vgg_features, padded)
        image_features = model.img_encoder.project(vgg_features)
        reference = torch.stack([torch.softmax(model.combine(f.expand(len(QUESTIONS), -1),
                                                             model.qst_encoder(padded)), 1)
                                 for f in image_features])  # [image, question, answer]
        # The decomposition above is the model's own forward pass:
        torch.testing.assert_close(torch.softmax(model(pixels[:1], padded[:1]), 1)[0], reference[0, 0],
                                   rtol=0, atol=1e-6)
        # What a packed LSTM (no padding read) would answer instead: the padding matters.
        unpadded = torch.stack([torch.softmax(model.combine(
            image_features[:1], model.qst_encoder(torch.tensor([vocab.encode(q)[: len(bv.tokenize(q))]]))), 1)[0]
            for q in QUESTIONS])
    assert (unpadded - reference[0]).abs().max() > 1e-3
    top1 = reference.argmax(-1)
    assert len(set(top1.flatten().tolist())) > 2, top1  # answers vary: the comparison is not vacuous

    ckpt, vq, va, out = (tmp_path / "model-epoch-01.ckpt", tmp_path / "vocab_questions.txt",
                         tmp_path / "vocab_answers.txt", tmp_path / "basic_vqa.safetensors")
    bv.save_like_train_py(model, ckpt, epoch=1)
    bv.write_vocab(vq, Q_WORDS)
    bv.write_vocab(va, ANSWERS)
    del model, vgg_features
    gc.collect()
    vqa_import(["basic-vqa", str(ckpt), "--vocab-questions", str(vq), "--vocab-answers", str(va),
                "--out", str(out)])
    ckpt.unlink()
    assert json.loads(read_metadata(out)["config"])["image"]["depth"] == 19  # read from the shapes

    settings = {"VQA_WEIGHTS": str(out), "VQA_MAX_TOP_K": str(len(ANSWERS)),
                "VQA_REQUEST_TIMEOUT_S": "600"}  # a VGG19 pass on a busy 2-core CI machine
    bodies = []
    with real_server(settings, log_path=tmp_path / "server.log") as srv, \
            httpx.Client(base_url=srv.url, timeout=600) as client:
        for name, data, mime in IMAGES:
            r = client.post("/v1/answers", files={"image": (name, data, mime)},
                            data={"questions": QUESTIONS, "top_k": str(len(ANSWERS))})
            assert r.status_code == 200, r.text
            bodies.append(r.json())

    worst = 0.0
    for i, body in enumerate(bodies):
        assert body["model"] == "basic-vqa-vgg19-lstm"
        for j, (q, got) in enumerate(zip(QUESTIONS, body["answers"])):
            probs = {s["answer"]: s["confidence"] for s in got["top_k"]}
            assert set(probs) == set(ANSWERS)
            assert got["answer"] == ANSWERS[int(top1[i, j])], (IMAGES[i][0], q)
            worst = max(worst, max(abs(probs[a] - float(reference[i, j, k])) for k, a in enumerate(ANSWERS)))
            unknown = [t for t in dict.fromkeys(bv.tokenize(q)) if t not in vocab.index]
            assert got["unknown_words"] == unknown
    print(f"\nbasic_vqa round trip: {len(IMAGES)} images x {len(QUESTIONS)} questions, "
          f"top-1 identical, max |dp| = {worst:.2e}")
    assert worst < 1e-4
