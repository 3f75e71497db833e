"""vqa-import basic-vqa on narrow models in basic_vqa's exact layout (fast), and every way an
import can fail (each error names the file)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from app.pipeline.preprocessing import decode_pixels
from models import ImageQuestions, Predictor, load_checkpoint
from models.importers import ImportFailed, import_basic_vqa, main
from tests.models import basic_vqa_layout as bv

Q_WORDS = ["<pad>", "<unk>", "!", "'", "?", "a", "color", "is", "man", "name", "s", "the", "there",
           "this", "what", "how", "many"]
ANSWERS = ["<unk>", "yes", "no", "2", "red", "blue", "tennis"]
QUESTIONS = ["What is the man's name?", "what color is the zebra", "Is there a dog?!", "how many ?"]


def _jpeg(size, seed) -> bytes:
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


IMAGES = [_jpeg((640, 480), 1), _jpeg((90, 200), 2), _jpeg((224, 224), 3), _jpeg((64, 64), 5)]


def _narrow_model(seed: int = 0, cfg_name: str = "D") -> bv.VqaModel:
    torch.manual_seed(seed)
    m = bv.VqaModel(embed_size=24, qst_vocab_size=len(Q_WORDS), ans_vocab_size=len(ANSWERS),
                    word_embed_size=12, num_layers=2, hidden_size=10,
                    vgg=bv.NarrowVGG(cfg_name, width=1 / 16, pool=1)).eval()
    with torch.no_grad():
        vgg = m.img_encoder.model(torch.stack([bv.preprocess(i) for i in IMAGES]))
    vocab = bv.Vocab(Q_WORDS)
    return bv.make_answers_depend_on_inputs(m, vgg, torch.tensor([vocab.encode(q) for q in QUESTIONS]))


def _files(tmp_path: Path, model: bv.VqaModel, q_words=Q_WORDS, answers=ANSWERS) -> tuple[Path, Path, Path]:
    ckpt, vq, va = tmp_path / "model-epoch-07.ckpt", tmp_path / "vocab_questions.txt", tmp_path / "vocab_answers.txt"
    bv.save_like_train_py(model, ckpt)
    bv.write_vocab(vq, q_words)
    bv.write_vocab(va, answers)
    return ckpt, vq, va


def _reference(model: bv.VqaModel, image: bytes, question: str) -> torch.Tensor:
    vocab = bv.Vocab(Q_WORDS)
    with torch.no_grad():
        logits = model(bv.preprocess(image)[None], torch.tensor([vocab.encode(question)]))
    return torch.softmax(logits, 1)[0]


def test_import_reproduces_the_narrow_model(tmp_path: Path):
    model = _narrow_model()
    ckpt, vq, va = _files(tmp_path, model)
    out = tmp_path / "imported.safetensors"
    import_basic_vqa(ckpt, vq, va, out)
    loaded = load_checkpoint(out)
    cfg = loaded.model.cfg
    assert (cfg.image.depth, cfg.image.width, cfg.image.pool_size, cfg.image.embed_size) == (16, 1 / 16, 1, 24)
    assert (cfg.image.resample, cfg.image.reducing_gap, cfg.image.jpeg_draft) == ("lanczos", None, False)
    assert (cfg.question.padding, cfg.question.max_tokens, cfg.question.hidden_size) == ("fixed", 30, 10)
    assert cfg.question.tokenizer.keep_punctuation and not cfg.question.tokenizer.fold_spellings
    assert cfg.head_hidden == cfg.num_answers == len(ANSWERS) and not cfg.learned_image_scale
    assert loaded.info["source_epoch"] == 7 and loaded.name == "basic-vqa-vgg16-lstm"

    p = Predictor(loaded, device="cpu")
    worst, tops = 0.0, set()
    for img in IMAGES[:3]:
        pixels = decode_pixels(img, transform=cfg.image.transform, max_pixels=10**8)
        got = p.run([ImageQuestions([p.encode_question(q) for q in QUESTIONS], pixels=pixels)])[0].probs
        for q, probs in zip(QUESTIONS, got):
            ref = _reference(model, img, q)
            assert int(probs.argmax()) == int(ref.argmax())
            worst = max(worst, float((probs - ref).abs().max()))
            tops.add(int(ref.argmax()))
    assert worst < 1e-5, worst
    assert len(tops) > 1  # the answers depend on the input: the comparison is not vacuous


def test_unknown_words_and_punctuation_tokens(tmp_path: Path):
    ckpt, vq, va = _files(tmp_path, _narrow_model())
    import_basic_vqa(ckpt, vq, va, tmp_path / "m.safetensors")
    p = Predictor(load_checkpoint(tmp_path / "m.safetensors"), device="cpu")
    enc = p.encode_question("What is the man's name?")
    assert enc.tokens == ("what", "is", "the", "man", "'", "s", "name", "?") and enc.unknown_words == ()
    enc = p.encode_question("Is there a zebra?!")
    assert enc.tokens[-2:] == ("zebra", "?!") and enc.unknown_words == ("zebra", "?!")
    # No spelling folding, no contraction rewriting: basic_vqa never did either.
    assert p.encode_question("colour isn't").tokens == ("colour", "isn", "'", "t")


def test_vgg19_depth_is_read_from_the_tensors(tmp_path: Path):
    ckpt, vq, va = _files(tmp_path, _narrow_model(cfg_name="E"))
    c = import_basic_vqa(ckpt, vq, va, tmp_path / "m19.safetensors")
    assert c.model.cfg.image.depth == 19 and c.name == "basic-vqa-vgg19-lstm"


def test_unk_answer_is_served_as_is(tmp_path: Path):
    """When basic_vqa's <unk> class scores highest, the service answers "<unk>" with its
    probability (it is the model's answer: "none of my answers"), not the runner-up."""
    from tests.app.conftest import form, run, running_app

    model = _narrow_model()
    with torch.no_grad():
        model.fc2.bias[0] = 1000.0
    ckpt, vq, va = _files(tmp_path, model)
    import_basic_vqa(ckpt, vq, va, tmp_path / "m.safetensors")

    async def ask():
        async with running_app(weights=tmp_path / "m.safetensors") as (_, client):
            r = await client.post("/v1/answer", **form(IMAGES[3], "what color is this?", top_k=2))
            return r.status_code, r.json()

    status, body = run(ask())
    assert status == 200 and body["answer"] == "<unk>" and body["confidence"] > 0.99
    assert body["model"] == "basic-vqa-vgg16-lstm" and body["top_k"][1]["answer"] != "<unk>"


def test_service_counts_tokens_with_the_checkpoints_tokenizer(tmp_path: Path):
    """basic_vqa pads to 30 tokens and punctuation counts: 16 words and 15 commas are 31."""
    from tests.app.conftest import assert_error, form, run, running_app

    ckpt, vq, va = _files(tmp_path, _narrow_model())
    import_basic_vqa(ckpt, vq, va, tmp_path / "m.safetensors")
    thirty = ", ".join(["a"] * 15)  # 15 words + 14 commas = 29 tokens
    thirty_one = ", ".join(["a"] * 16)

    async def ask():
        async with running_app(weights=tmp_path / "m.safetensors") as (_, client):
            ok = await client.post("/v1/answer", **form(IMAGES[3], thirty + " ?"))
            too_long = await client.post("/v1/answer", **form(IMAGES[3], thirty_one))
            return ok, too_long

    ok, too_long = run(ask())
    assert ok.status_code == 200, ok.text
    assert_error(too_long, 422, "question_too_long")


def test_cli(tmp_path: Path, capsys):
    ckpt, vq, va = _files(tmp_path, _narrow_model())
    out = tmp_path / "cli.safetensors"
    main(["basic-vqa", str(ckpt), "--vocab-questions", str(vq), "--vocab-answers", str(va), "--out", str(out),
          "--name", "mine"])
    assert "wrote" in capsys.readouterr().out and load_checkpoint(out).name == "mine"
    with pytest.raises(SystemExit, match=r"vqa-import: .*nope\.ckpt: no such checkpoint file"):
        main(["basic-vqa", str(tmp_path / "nope.ckpt"), "--vocab-questions", str(vq), "--vocab-answers",
              str(va), "--out", str(out)])


# --- what is refused ------------------------------------------------------------------------


def _import(tmp_path, ckpt, vq=None, va=None):
    vq = vq or tmp_path / "vocab_questions.txt"
    va = va or tmp_path / "vocab_answers.txt"
    if not vq.exists():
        bv.write_vocab(vq, Q_WORDS)
    if not va.exists():
        bv.write_vocab(va, ANSWERS)
    return import_basic_vqa(ckpt, vq, va, tmp_path / "out.safetensors")


def test_garbage_and_foreign_files_are_refused(tmp_path: Path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(ImportFailed, match=r"junk\.ckpt: not a basic_vqa checkpoint: torch\.load\(weights_only=True\)"):
        _import(tmp_path, junk)
    st = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(st))
    with pytest.raises(ImportFailed, match=r"model\.safetensors: not a basic_vqa checkpoint"):
        _import(tmp_path, st)
    tv = tmp_path / "vgg16.pth"
    torch.save(bv.NarrowVGG().state_dict(), tv)  # a bare state dict, but not basic_vqa's
    with pytest.raises(ImportFailed, match=r"vgg16\.pth: not a basic_vqa checkpoint: unexpected tensors \['features"):
        _import(tmp_path, tv)
    other = tmp_path / "other.ckpt"
    torch.save({"epoch": 1, "model": {"a": 1}}, other)
    with pytest.raises(ImportFailed, match=r"other\.ckpt: not a basic_vqa checkpoint: no 'state_dict'"):
        _import(tmp_path, other)
    listy = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(ImportFailed, match=r"list\.ckpt: .*holds a list"):
        _import(tmp_path, listy)


def test_pickled_code_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"epoch": 1, "state_dict": {"x": Evil()}}, evil)
    with pytest.raises(ImportFailed, match=r"evil\.ckpt: .*weights_only"):
        _import(tmp_path, evil)
    assert not marker.exists()


def test_incomplete_or_inconsistent_tensors(tmp_path: Path):
    sd = _narrow_model().state_dict()
    missing = tmp_path / "missing.ckpt"
    torch.save({"epoch": 1, "state_dict": {k: v for k, v in sd.items() if not k.startswith("fc2.")}}, missing)
    with pytest.raises(ImportFailed, match=r"missing\.ckpt: not a basic_vqa checkpoint: tensor 'fc2\.weight' is missing"):
        _import(tmp_path, missing)
    bad = dict(sd)
    bad["fc1.weight"] = torch.zeros(len(ANSWERS), 5)
    path = tmp_path / "bad.ckpt"
    torch.save({"epoch": 1, "state_dict": bad}, path)
    with pytest.raises(ImportFailed, match=r"bad\.ckpt: inconsistent tensors: fc1 takes 5 inputs"):
        _import(tmp_path, path)
    nan = dict(sd)
    nan["fc2.bias"] = torch.full((len(ANSWERS),), float("nan"))
    path = tmp_path / "nan.ckpt"
    torch.save({"epoch": 1, "state_dict": nan}, path)
    with pytest.raises(ImportFailed, match=r"nan\.ckpt: tensor 'head\.5\.bias' contains NaN"):
        _import(tmp_path, path)


def test_vocab_files_must_match_the_tensors(tmp_path: Path):
    ckpt, vq, va = _files(tmp_path, _narrow_model())
    short = tmp_path / "short_questions.txt"
    bv.write_vocab(short, Q_WORDS[:-1])
    with pytest.raises(ImportFailed, match=rf"short_questions\.txt: {len(Q_WORDS) - 1} words, but .*word2vec has {len(Q_WORDS)} rows"):
        import_basic_vqa(ckpt, short, va, tmp_path / "o.safetensors")
    more = tmp_path / "more_answers.txt"
    bv.write_vocab(more, ANSWERS + ["extra"])
    with pytest.raises(ImportFailed, match=rf"more_answers\.txt: {len(ANSWERS) + 1} answers, but .*fc2 scores {len(ANSWERS)}"):
        import_basic_vqa(ckpt, vq, more, tmp_path / "o.safetensors")
    swapped = tmp_path / "swapped.txt"
    bv.write_vocab(swapped, ["<unk>", "<pad>"] + Q_WORDS[2:])
    with pytest.raises(ImportFailed, match=r"swapped\.txt: the first two lines must be <pad> and <unk>"):
        import_basic_vqa(ckpt, swapped, va, tmp_path / "o.safetensors")
    no_unk = tmp_path / "no_unk_answers.txt"
    bv.write_vocab(no_unk, ANSWERS[1:] + ["maybe"])  # right count, but not basic_vqa's layout
    with pytest.raises(ImportFailed, match=r"no_unk_answers\.txt: the first line must be <unk>"):
        import_basic_vqa(ckpt, vq, no_unk, tmp_path / "o.safetensors")
    dup = tmp_path / "dup_answers.txt"
    bv.write_vocab(dup, ANSWERS[:-1] + ["yes"])
    with pytest.raises(ImportFailed, match=r"dup_answers\.txt: .*duplicates"):
        import_basic_vqa(ckpt, vq, dup, tmp_path / "o.safetensors")
    with pytest.raises(ImportFailed, match=r"absent\.txt: no such vocabulary file"):
        import_basic_vqa(ckpt, tmp_path / "absent.txt", va, tmp_path / "o.safetensors")
