"""VQA v2 data in the official layout, read from one ``--data-root``:

```
Questions/v2_OpenEnded_mscoco_{split}_questions.json    {"questions": [{image_id, question, question_id}], ...}
Annotations/v2_mscoco_{split}_annotations.json          {"annotations": [{question_id, image_id, question_type,
                                                          answer_type, multiple_choice_answer,
                                                          answers: [{answer, answer_confidence, answer_id}] x 10}]}
Images/{split}/COCO_{split}_{image_id:012d}.jpg
```

as the official download unpacks (``split``: ``train2014``, ``val2014``, ``test2015``,
``test-dev2015`` whose images are those of ``test2015``). Everything is checked when loading;
a problem raises :class:`DatasetError` naming the file, never a traceback from deep inside.
Images are only listed here (and checked to exist); they are decoded when used, with the
checkpoint's own transform.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from models.transforms import ImageTransform
from models.vocab import UNK, UNK_ID, EncodedQuestion

from .vqa_metric import DEFAULT_REVISION, accuracy_of_count, compared, normalize_answer


class DatasetError(RuntimeError):
    """The data root does not hold what the official VQA v2 layout promises."""


def questions_path(root: Path, split: str) -> Path:
    return root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json"


def annotations_path(root: Path, split: str) -> Path:
    return root / "Annotations" / f"v2_mscoco_{split}_annotations.json"


def image_split(split: str) -> str:
    """The image folder of a question split (test-dev2015 asks about test2015 images)."""
    return split.replace("-dev", "")


def image_path(root: Path, split: str, image_id: int) -> Path:
    s = image_split(split)
    return root / "Images" / s / f"COCO_{s}_{image_id:012d}.jpg"


@dataclass
class VQA2Split:
    """One split: its questions, annotations (None for test splits) and images.

    ``image_ids`` are the split's distinct images (sorted); ``image_index[q]`` is the row in
    ``image_ids`` of question ``q``'s image.
    """

    root: Path
    split: str
    question_ids: list[int]
    questions: list[str]
    image_index: torch.Tensor
    image_ids: list[int]
    annotations: list[dict] | None  # in the annotation file's order (the metric's order)
    by_question: dict[int, dict] = field(default_factory=dict)  # question id -> annotation

    def __len__(self) -> int:
        return len(self.question_ids)

    @property
    def has_annotations(self) -> bool:
        return self.annotations is not None

    def image_paths(self) -> list[Path]:
        return [image_path(self.root, self.split, i) for i in self.image_ids]

    def annotator_answers(self, q: int, revision: str = DEFAULT_REVISION) -> list[str]:
        """Question ``q``'s annotator answers as the official metric compares them (normalised
        when the annotators disagree, only cleaned when they all gave the same answer)."""
        return [a["answer"] for a in self.compared(q, revision)[0]]

    def compared(self, q: int, revision: str = DEFAULT_REVISION) -> tuple[list[dict], bool]:
        """:func:`training.vqa_metric.compared` of question ``q``'s annotations."""
        assert self.annotations is not None
        return compared(self.by_question[self.question_ids[q]]["answers"], revision)

    def subset_images(self, rows: Sequence[int]) -> "VQA2Split":
        """The split restricted to the images at ``rows`` (with all their questions)."""
        remap = {r: i for i, r in enumerate(rows)}
        keep = [q for q in range(len(self)) if int(self.image_index[q]) in remap]
        kept_ids = {self.question_ids[q] for q in keep}
        return VQA2Split(
            root=self.root,
            split=self.split,
            question_ids=[self.question_ids[q] for q in keep],
            questions=[self.questions[q] for q in keep],
            image_index=torch.tensor([remap[int(self.image_index[q])] for q in keep], dtype=torch.long),
            image_ids=[self.image_ids[r] for r in rows],
            annotations=None if self.annotations is None
            else [a for a in self.annotations if a["question_id"] in kept_ids],
            by_question={k: v for k, v in self.by_question.items() if k in kept_ids},
        )


def _read_json(path: Path, what: str, root: Path, split: str) -> dict:
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        hint = f"; found there: {', '.join(found)}" if found else (
            f"; {path.parent} does not exist" if not path.parent.is_dir() else "")
        raise DatasetError(f"{path}: no such file ({what} of split {split!r} under --data-root "
                           f"{root}, official VQA v2 layout{hint})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise DatasetError(f"{path}: {message}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_vqa2(root: str | Path, split: str, *, annotations: bool | None = None,
              check_images: bool = True) -> VQA2Split:
    """Load ``split`` from ``root``. ``annotations``: True requires them (training, scoring),
    False skips them, None loads them when the file exists."""
    root = Path(root)
    qpath = questions_path(root, split)
    qdata = _read_json(qpath, "questions", root, split)
    qs = qdata.get("questions")
    _require(isinstance(qs, list) and len(qs) > 0, qpath, "no 'questions' list (or it is empty)")
    question_ids: list[int] = []
    texts: list[str] = []
    q_image: list[int] = []
    for i, q in enumerate(qs):
        _require(isinstance(q, dict) and _is_int(q.get("question_id")) and _is_int(q.get("image_id"))
                 and isinstance(q.get("question"), str), qpath,
                 f"question #{i} is not an object with integer 'question_id', 'image_id' and a "
                 f"string 'question'")
        question_ids.append(q["question_id"])
        texts.append(q["question"])
        q_image.append(q["image_id"])
    dup = [k for k, n in Counter(question_ids).items() if n > 1]
    _require(not dup, qpath, f"question_id {dup[0] if dup else ''} appears more than once")

    apath = annotations_path(root, split)
    anns: list[dict] | None = None
    by_question: dict[int, dict] = {}
    if annotations is True or (annotations is None and apath.is_file()):
        if not apath.is_file():
            raise DatasetError(
                f"{apath}: no such file: split {split!r} has no annotations here (test splits "
                f"ship questions only: answer them with --results and score on the evaluation "
                f"server), so it cannot be trained on or scored")
        adata = _read_json(apath, "annotations", root, split)
        anns = adata.get("annotations")
        _require(isinstance(anns, list) and len(anns) > 0, apath, "no 'annotations' list (or it is empty)")
        for i, a in enumerate(anns):
            ok = (isinstance(a, dict) and _is_int(a.get("question_id")) and _is_int(a.get("image_id"))
                  and isinstance(a.get("question_type"), str) and isinstance(a.get("answer_type"), str)
                  and isinstance(a.get("answers"), list) and len(a["answers"]) > 0
                  and all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"]))
            _require(ok, apath, f"annotation #{i} lacks question_id/image_id/question_type/answer_type "
                                f"or a non-empty 'answers' list of {{'answer': str, ...}}")
            _require(a["question_id"] not in by_question, apath,
                     f"question_id {a['question_id']} is annotated more than once")
            by_question[a["question_id"]] = a
        q_set, a_set = set(question_ids), set(by_question)
        if q_set != a_set:
            only_q, only_a = sorted(q_set - a_set), sorted(a_set - q_set)
            raise DatasetError(
                f"{apath}: question ids do not match {qpath.name}: {len(only_q)} question(s) "
                f"without an annotation{' (e.g. ' + str(only_q[0]) + ')' if only_q else ''}, "
                f"{len(only_a)} annotation(s) of unknown questions"
                f"{' (e.g. ' + str(only_a[0]) + ')' if only_a else ''}")
        for qid, img in zip(question_ids, q_image):
            if by_question[qid]["image_id"] != img:
                raise DatasetError(
                    f"{apath}: question {qid} is about image {by_question[qid]['image_id']} here "
                    f"but about image {img} in {qpath.name}")

    image_ids = sorted(set(q_image))
    row = {img: i for i, img in enumerate(image_ids)}
    if check_images:
        missing = [i for i in image_ids if not image_path(root, split, i).is_file()]
        if missing:
            raise DatasetError(
                f"{image_path(root, split, missing[0])}: no such image ({len(missing)} of the "
                f"{len(image_ids)} images that {qpath.name} asks about are missing)")
    return VQA2Split(
        root=root, split=split, question_ids=question_ids, questions=texts,
        image_index=torch.tensor([row[i] for i in q_image], dtype=torch.long),
        image_ids=image_ids, annotations=anns, by_question=by_question,
    )


def load_image(path: Path, transform: ImageTransform) -> torch.Tensor:
    """One dataset image -> [3, S, S] uint8, or a DatasetError naming the file."""
    try:
        return transform.open(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


class ImageFolder(torch.utils.data.Dataset):
    """A split's images by row, decoded with a checkpoint's transform (for a DataLoader)."""

    def __init__(self, paths: Sequence[Path], transform: ImageTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, load_image(self.paths[i], self.transform)
        except DatasetError as e:
            # Returned, not raised: a DataLoader worker would wrap it in its own traceback.
            # iter_images raises it again, as it is, in the process that iterates.
            return i, str(e)


def iter_images(paths: Sequence[Path], transform: ImageTransform, rows: Sequence[int],
                batch_size: int, workers: int = 0):
    """Yield ``(rows_chunk, [b, 3, S, S] uint8)`` for ``rows`` in order, ``batch_size`` at a
    time, decoded by ``workers`` processes (0: in this one). An unreadable image raises
    :class:`DatasetError` naming the file, whichever process decoded it."""
    folder = ImageFolder([paths[r] for r in rows], transform)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate)
    for idx, pixels in loader:
        if isinstance(pixels, str):
            raise DatasetError(pixels)
        yield [rows[i] for i in idx], pixels


def _collate(items):
    for _, p in items:
        if isinstance(p, str):
            return None, p  # the first unreadable image's message
    return [i for i, _ in items], torch.stack([p for _, p in items])


def nonempty(question: EncodedQuestion) -> EncodedQuestion:
    """A question without a single token (only punctuation, for a tokenizer that drops it)
    still needs one LSTM step: ``<unk>``. Training and evaluation both answer it that way."""
    return question if len(question) else EncodedQuestion(question.text, (UNK,), (UNK_ID,), ())


def answer_vocabulary(split: VQA2Split, num_answers: int, revision: str = DEFAULT_REVISION) -> list[str]:
    """The ``num_answers`` most frequent annotator answers of ``split`` in the form the official
    metric compares them (ties: alphabetical), empty answers left out: so each answer the model
    can give is one that scores as given. (Where all ten annotators typed "Yes", only "Yes"
    scores; where they disagree, every answer is normalised first, "yes" included.)"""
    counts: Counter[str] = Counter()
    for q in range(len(split)):
        counts.update(a for a in split.annotator_answers(q, revision) if a)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:num_answers]]


def soft_scores(split: VQA2Split, answer_index: dict[str, int],
                revision: str = DEFAULT_REVISION) -> list[dict[int, float]]:
    """Per question, answer id -> the official accuracy (0..1) that answer would score there,
    for the answers of the vocabulary with a non-zero one: the soft targets of training. An
    answer matching ``m`` of ``n`` annotators scores ``(m·min(1, (m-1)/3) + (n-m)·min(1, m/3)) / n``
    (0.3, 0.6, 0.9, then 1 for m = 1, 2, 3, 4+ of 10), as the metric's leave-one-out computes.
    Where the annotators disagree, a vocabulary answer is normalised before it is compared, as
    a result answer is (its normalised form is looked up; several entries may share one)."""
    return _per_answer(split, answer_index, revision, accuracy_of_count)


def answer_frequencies(split: VQA2Split, answer_index: dict[str, int],
                       revision: str = DEFAULT_REVISION) -> list[dict[int, float]]:
    """Per question, answer id -> the share of its annotators who gave that answer (in the form
    the metric compares, so a normalised vocabulary answer collects every annotator form that
    normalises to it where they disagree). Unlike the official accuracy, which is 1 for any
    answer four or more of ten gave, these keep the majority: seven "yes" and three "no" are
    0.7 and 0.3, not 1 and 0.9."""
    return _per_answer(split, answer_index, revision, lambda m, n: m / n)


def _per_answer(split: VQA2Split, answer_index: dict[str, int], revision: str,
                value: Callable[[int, int], float]) -> list[dict[int, float]]:
    """Per question, answer id -> ``value(m, n)`` for each vocabulary answer that ``m`` of its
    ``n`` annotators gave, compared as the metric compares them: where the annotators disagree
    every form is normalised (a vocabulary entry collects each annotator form that normalises
    to it; several entries may share one), where all agree only the form as typed matches."""
    by_form: dict[str, list[int]] = {}
    for answer, i in answer_index.items():
        by_form.setdefault(normalize_answer(answer), []).append(i)
    out = []
    for q in range(len(split)):
        answers, normalised = split.compared(q, revision)
        values: dict[int, float] = {}
        for form, m in Counter(a["answer"] for a in answers).items():
            ids = by_form.get(form, []) if normalised else ([answer_index[form]] if form in answer_index else [])
            for i in ids:
                values[i] = value(m, len(answers))
        out.append(values)
    return out
