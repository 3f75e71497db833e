"""VQA v2 in the official layout: loading and its errors, answer vocabulary and soft scores,
training and evaluation on a generated fixture, the features cache, full-size VGG16 smoke."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from models import AnswerVocabulary, Checkpoint, VQAModel, Vocabulary, load_checkpoint, save_checkpoint
from models.vgg import ImageEncoderConfig, VGGBackbone
from training import evaluate, recipe, train, vqa_metric
from training.features import FeatureCacheError, extract_features
from training.vqa2 import (
    DatasetError,
    annotations_path,
    answer_vocabulary,
    image_path,
    iter_images,
    load_image,
    load_vqa2,
    questions_path,
    soft_scores,
)
from tests.training.vqa2_fixture import make_vqa2_fixture


@pytest.fixture
def root_copy(vqa2_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(vqa2_root, tmp_path / "vqa"))


@pytest.fixture
def one_thread():
    """The compact models here train as fast on one thread as on two, and far faster when the
    CPU is shared (two-thread barriers stall on a busy core); ``--threads`` sets the process's
    thread count, restored afterwards for the tests that follow."""
    n = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(n)


# --- the layout and its errors --------------------------------------------------------------


def test_loads_the_official_layout(vqa2_root: Path):
    s = load_vqa2(vqa2_root, "train2014", annotations=True)
    assert len(s.image_ids) == 240 and 240 * 3 <= len(s) <= 240 * 5
    assert all(len(s.by_question[q]["answers"]) == 10 for q in s.question_ids)
    assert s.image_paths()[0].name == f"COCO_train2014_{s.image_ids[0]:012d}.jpg"
    test = load_vqa2(vqa2_root, "test2015")
    assert not test.has_annotations and len(test.image_ids) == 8
    # realistic disagreement: most questions are not unanimous, a few are
    unanimous = sum(len({a["answer"] for a in s.by_question[q]["answers"]}) == 1 for q in s.question_ids)
    assert 0.05 * len(s) < unanimous < 0.6 * len(s)


def test_missing_files_are_named(root_copy: Path):
    with pytest.raises(DatasetError, match=r"v2_OpenEnded_mscoco_val2015_questions\.json: no such file .*found there: "
                                           r"v2_OpenEnded_mscoco_test2015"):
        load_vqa2(root_copy, "val2015")
    with pytest.raises(DatasetError, match=r"v2_mscoco_test2015_annotations\.json: no such file: split 'test2015' has no annotations"):
        load_vqa2(root_copy, "test2015", annotations=True)
    victim = image_path(root_copy, "val2014", load_vqa2(root_copy, "val2014").image_ids[3])
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"{victim.name}: no such image \(1 of the 80 images"):
        load_vqa2(root_copy, "val2014")
    with pytest.raises(DatasetError, match=r"Questions/v2_OpenEnded_mscoco_train2014_questions\.json: no such file .*does not exist"):
        load_vqa2(root_copy / "nowhere", "train2014")


def test_unreadable_image_is_named(root_copy: Path, one_thread):
    s = load_vqa2(root_copy, "train2014")
    bad = s.image_paths()[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    transform = ImageEncoderConfig(image_size=32).transform
    with pytest.raises(DatasetError, match=rf"{bad.name}: not a readable image"):
        load_image(bad, transform)
    # Decoded by a DataLoader worker process: the same one-line error, not the worker's traceback.
    with pytest.raises(DatasetError) as caught:
        list(iter_images(s.image_paths(), transform, [1, 0, 2], batch_size=2, workers=1))
    assert str(caught.value).startswith(f"{bad}: not a readable image") and "Traceback" not in str(caught.value)
    with pytest.raises(SystemExit, match=rf"vqa-train: .*{bad.name}: not a readable image"):
        train.main(["--dataset", "vqa2", "--data-root", str(root_copy), "--epochs", "1", "--quiet",
                    "--device", "cpu", "--image-size", "32", "--pool-size", "1", "--out", str(root_copy / "x.st"),
                    *one_thread])


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_mismatched_ids_and_bad_json(root_copy: Path):
    apath, qpath = annotations_path(root_copy, "val2014"), questions_path(root_copy, "val2014")
    _edit(apath, lambda d: d["annotations"].pop())
    with pytest.raises(DatasetError, match=r"v2_mscoco_val2014_annotations\.json: question ids do not match "
                                           r"v2_OpenEnded_mscoco_val2014_questions\.json: 1 question\(s\) without"):
        load_vqa2(root_copy, "val2014", annotations=True)
    _edit(qpath, lambda d: d["questions"].pop())  # now both lack the same question: consistent again
    load_vqa2(root_copy, "val2014", annotations=True)

    def move_image(d):
        d["annotations"][0]["image_id"] += 1
    _edit(apath, move_image)
    with pytest.raises(DatasetError, match=r"annotations\.json: question \d+ is about image \d+ here but about image"):
        load_vqa2(root_copy, "val2014", annotations=True)
    _edit(qpath, lambda d: d["questions"][0].pop("image_id"))
    with pytest.raises(DatasetError, match=r"questions\.json: question #0 is not an object with integer"):
        load_vqa2(root_copy, "val2014")
    qpath.write_text("{not json")
    with pytest.raises(DatasetError, match=r"questions\.json: not a readable JSON file"):
        load_vqa2(root_copy, "val2014")


# --- answers ----------------------------------------------------------------------------------


def test_answer_vocabulary_holds_the_forms_the_metric_compares(vqa2_root: Path):
    s = load_vqa2(vqa2_root, "train2014", annotations=True)
    raw = Counter(a["answer"] for q in s.question_ids for a in s.by_question[q]["answers"])
    assert raw["Two"] > 0 and raw["red."] > 0 and raw["the circle"] > 0  # the fixture's variants
    vocab = answer_vocabulary(s, 1000)
    # Where annotators disagree, their answers are normalised: number words -> digits, articles
    # and periods dropped, lower case; where all ten agree, the form they typed is compared.
    forms = Counter()
    for q in range(len(s)):
        forms.update(s.annotator_answers(q))
    assert set(vocab) == {a for a in forms if a}
    assert "2" in vocab and "red" in vocab and "circle" in vocab
    for q in range(len(s)):
        answers, normalised = s.compared(q)
        if normalised:
            assert all(a["answer"] == vqa_metric.normalize_answer(a["answer"]) for a in answers)
        else:
            assert len({a["answer"] for a in answers}) == 1
    assert len(vocab) == len(set(vocab))
    top3 = answer_vocabulary(s, 3)
    assert top3 == vocab[:3] and len(top3) == 3


def test_soft_scores_are_the_official_accuracy_of_each_answer(vqa2_root: Path):
    s = load_vqa2(vqa2_root, "train2014", annotations=True)
    vocab = answer_vocabulary(s, 1000)
    index = {a: i for i, a in enumerate(vocab)}
    scores = soft_scores(s, index)
    for q in range(80):
        gt = s.by_question[s.question_ids[q]]["answers"]
        expected = {i: vqa_metric.question_accuracy(a, gt) for a, i in index.items()}
        assert scores[q] == pytest.approx({i: v for i, v in expected.items() if v > 0})


# --- training and evaluation on the fixture ---------------------------------------------------


def _majority_baseline(train_split, val_split) -> float:
    """Every validation question answered with the training split's most frequent answer."""
    overall: Counter = Counter()
    for q in range(len(train_split)):
        overall.update(train_split.annotator_answers(q))
    top = overall.most_common(1)[0][0]
    return vqa_metric.evaluate(val_split.annotations, {qid: top for qid in val_split.question_ids})["overall"]


def _blind_baseline(train_split, val_split) -> float:
    """The best a model that never looks at the image can be expected to do: each validation
    question answered with the training answer most often given to the very same question text."""
    votes: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for q, text in enumerate(train_split.questions):
        answers = train_split.annotator_answers(q)
        votes[text].update(answers)
        overall.update(answers)
    guess = {qid: (votes[t] or overall).most_common(1)[0][0]
             for qid, t in zip(val_split.question_ids, val_split.questions)}
    return vqa_metric.evaluate(val_split.annotations, guess)["overall"]


@pytest.mark.slow
def test_vqa2_training_learns_and_eval_writes_official_results(vqa2_root: Path, tmp_path: Path, capsys,
                                                               one_thread):
    out = tmp_path / "vqa2.safetensors"
    train.main(["--dataset", "vqa2", "--data-root", str(vqa2_root), "--out", str(out), "--epochs", "12",
                "--image-size", "32", "--pool-size", "1", "--quiet", "--device", "cpu", *one_thread])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = load_checkpoint(out)
    assert ckpt.info["validation"].startswith("24 images held out of train2014")
    assert ckpt.name == "vqa2-vgg16-lstm" and 1 <= summary["selected_epoch"] <= 12

    results = tmp_path / "val_results.json"
    evaluate.main([str(out), "--dataset", "vqa2", "--data-root", str(vqa2_root), "--split", "val2014",
                   "--results", str(results), "--json", "--device", "cpu"])
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"overall", "perAnswerType", "perQuestionType", "revision"}
    assert scores["revision"] == "a013f00"
    assert set(scores["perAnswerType"]) == {"yes/no", "number", "other"}
    val = load_vqa2(vqa2_root, "val2014", annotations=True)
    written = json.loads(results.read_text())
    assert [r["question_id"] for r in written] == val.question_ids  # every question exactly once
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in written)

    train_split = load_vqa2(vqa2_root, "train2014", annotations=True)
    blind = _blind_baseline(train_split, val)
    majority = _majority_baseline(train_split, val)
    with capsys.disabled():
        print(f"\nvqa2 fixture: official accuracy on val2014 {scores['overall']:.2f} (majority answer "
              f"{majority:.2f}, blind question-only baseline {blind:.2f}); by answer type "
              f"{scores['perAnswerType']}; selected epoch {summary['selected_epoch']}, "
              f"{summary['train_seconds']:.0f}s")
    assert blind > majority  # the question-only baseline is the stronger of the two
    assert scores["overall"] >= blind + 10, (scores, blind)

    # Scoring the written file alone gives the same figures, and its text report names them.
    evaluate.main(["--dataset", "vqa2", "--data-root", str(vqa2_root), "--split", "val2014",
                   "--score-results", str(results), "--json"])
    assert json.loads(capsys.readouterr().out) == scores
    evaluate.main(["--dataset", "vqa2", "--data-root", str(vqa2_root), "--split", "val2014",
                   "--score-results", str(results)])
    text = capsys.readouterr().out
    assert f"overall  {scores['overall']:.2f}" in text and "how many" in text

    # A test split has no annotations: answers are written, nothing is scored.
    test_results = tmp_path / "test_results.json"
    evaluate.main([str(out), "--dataset", "vqa2", "--data-root", str(vqa2_root), "--split", "test2015",
                   "--results", str(test_results), "--device", "cpu"])
    assert "no annotations" in capsys.readouterr().out
    assert len(json.loads(test_results.read_text())) == len(load_vqa2(vqa2_root, "test2015"))
    with pytest.raises(SystemExit, match="has no annotations to score"):
        evaluate.main([str(out), "--dataset", "vqa2", "--data-root", str(vqa2_root), "--split", "test2015"])


def _tiny_checkpoint(path: Path, questions: list[str], answers: list[str]) -> None:
    """An untrained compact model (enough to answer; what it answers does not matter here)."""
    torch.manual_seed(0)
    args = train.build_parser().parse_args(["--image-size", "32", "--pool-size", "1", "--width", "0.0625",
                                            "--embed-size", "8", "--word-dim", "8", "--hidden-size", "8",
                                            "--head-hidden", "8"])
    vocab = Vocabulary.build(questions)
    model = VQAModel(recipe.compact_config(len(vocab), len(answers), args)).eval()
    save_checkpoint(path, Checkpoint(model=model, vocab=vocab, answers=AnswerVocabulary(answers), name="tiny"))


def test_eval_answers_every_question_once_and_names_unreadable_images(root_copy: Path, tmp_path: Path, capsys):
    qpath = questions_path(root_copy, "val2014")
    _edit(qpath, lambda d: d["questions"][0].update(question="?!"))  # no word at all: still answered
    val = load_vqa2(root_copy, "val2014", annotations=True)
    ckpt = tmp_path / "tiny.safetensors"
    _tiny_checkpoint(ckpt, val.questions, ["yes", "no", "2", "red"])
    results = tmp_path / "results.json"
    evaluate.main([str(ckpt), "--dataset", "vqa2", "--data-root", str(root_copy), "--split", "val2014",
                   "--results", str(results), "--json", "--device", "cpu", "--workers", "1"])
    scores = json.loads(capsys.readouterr().out)
    written = json.loads(results.read_text())
    assert [r["question_id"] for r in written] == val.question_ids  # each question once, in file order
    assert {r["answer"] for r in written} <= {"yes", "no", "2", "red"}
    assert scores["overall"] == vqa_metric.evaluate(val.annotations, {r["question_id"]: r["answer"] for r in written})["overall"]

    bad = val.image_paths()[5]
    bad.write_bytes(b"GIF89a truncated")
    for workers in ("0", "1"):
        with pytest.raises(SystemExit) as caught:
            evaluate.main([str(ckpt), "--dataset", "vqa2", "--data-root", str(root_copy), "--split", "val2014",
                           "--results", str(results), "--device", "cpu", "--workers", workers])
        assert str(caught.value).startswith(f"vqa-eval: {bad}: not a readable image"), caught.value
        assert "Traceback" not in str(caught.value)


def test_score_results_errors(vqa2_root: Path, tmp_path: Path):
    res = tmp_path / "partial.json"
    res.write_text(json.dumps([{"question_id": load_vqa2(vqa2_root, "val2014").question_ids[0], "answer": "yes"}]))
    with pytest.raises(SystemExit, match=r"vqa-eval: .*partial\.json: results do not correspond .*without an answer"):
        evaluate.main(["--dataset", "vqa2", "--data-root", str(vqa2_root), "--split", "val2014",
                       "--score-results", str(res)])
    with pytest.raises(SystemExit, match=r"vqa-eval: .*test2015_annotations\.json: no such file"):
        evaluate.main(["--dataset", "vqa2", "--data-root", str(vqa2_root), "--split", "test2015",
                       "--score-results", str(res)])


# --- the features cache -----------------------------------------------------------------------


def _small_backbone(seed: int = 0) -> tuple[VGGBackbone, ImageEncoderConfig]:
    torch.manual_seed(seed)
    cfg = ImageEncoderConfig(image_size=32, width=1 / 16, batch_norm=True, pool_size=1, embed_size=8)
    return VGGBackbone(cfg).eval(), cfg


def test_features_cache_is_sharded_resumable_and_refuses_another_model(vqa2_root: Path, tmp_path: Path, capsys):
    s = load_vqa2(vqa2_root, "val2014")
    backbone, cfg = _small_backbone()
    cache = tmp_path / "cache"
    kw = dict(device=torch.device("cpu"), shard_size=32, batch_size=16)
    feats = extract_features(backbone, cfg.transform, cache, "val2014", s.image_ids, s.image_paths(), **kw)
    assert feats.shape == (80, cfg.hidden_size)
    shards = sorted((cache / "val2014").glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert "features val2014" in capsys.readouterr().err  # the tqdm progress bar
    # The same features as running the backbone directly on the service's transform.
    pix = torch.stack([cfg.transform.open(p) for p in s.image_paths()[:4]])
    with torch.no_grad():
        torch.testing.assert_close(feats[:4], backbone(cfg.transform.normalize(pix)))

    # Resumable: a lost shard (and a torn one) are recomputed, the others are read back.
    shards[1].unlink()
    shards[2].write_bytes(b"torn")
    calls = []
    hook = backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    again = extract_features(backbone, cfg.transform, cache, "val2014", s.image_ids, s.image_paths(), **kw)
    hook.remove()
    assert sum(calls) == 32 + 16  # shard 1 (32 images) and shard 2 (the last 16), not shard 0
    torch.testing.assert_close(again, feats)

    other, _ = _small_backbone(seed=1)
    with pytest.raises(FeatureCacheError, match=r"manifest\.json: this features cache was made with a different backbone sha256"):
        extract_features(other, cfg.transform, cache, "val2014", s.image_ids, s.image_paths(), **kw)


@pytest.mark.slow
def test_full_size_vgg16_features_and_training_smoke(tmp_path: Path, capsys):
    """Full VGG16 (torchvision layout, random weights, 224x224): features extracted to disk,
    training from them with the VGG frozen, the checkpoint answers through vqa-eval."""
    root = make_vqa2_fixture(tmp_path / "vqa", seed=3, train_images=5, val_images=2, test_images=0)
    out, cache = tmp_path / "full.safetensors", tmp_path / "features"
    train.main(["--dataset", "vqa2", "--data-root", str(root), "--out", str(out), "--features-cache", str(cache),
                "--width", "1", "--image-size", "224", "--pool-size", "7", "--no-batch-norm",
                "--embed-size", "64", "--word-dim", "16", "--hidden-size", "16", "--head-hidden", "32",
                "--num-answers", "20", "--epochs", "2", "--val-split", "val2014", "--quiet", "--device", "cpu"])
    shards = list((cache / "train2014").glob("*.safetensors")) + list((cache / "val2014").glob("*.safetensors"))
    assert len(shards) == 2
    ckpt = load_checkpoint(out)
    cfg = ckpt.model.cfg.image
    assert (cfg.width, cfg.image_size, cfg.pool_size, cfg.batch_norm, cfg.hidden_size) == (1.0, 224, 7, False, 4096)
    assert ckpt.info["image_features"] == "cached, frozen backbone" and ckpt.info["validation"] == "split val2014"
    # The frozen backbone in the checkpoint is the one the cache was made with.
    from training.features import backbone_fingerprint
    manifest = json.loads((cache / "manifest.json").read_text())
    assert backbone_fingerprint(ckpt.model.image_encoder.backbone) == manifest["backbone_sha256"]
    del ckpt
    capsys.readouterr()
    evaluate.main([str(out), "--dataset", "vqa2", "--data-root", str(root), "--split", "val2014", "--json",
                   "--device", "cpu"])
    assert 0 <= json.loads(capsys.readouterr().out)["overall"] <= 100
