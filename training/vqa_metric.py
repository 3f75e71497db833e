"""The official VQA accuracy, computed as the VQA team's ``vqaEval.py`` computes it.

Reference: GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (class
``VQAEval``) at the repository's head, **commit a013f00** ("Fixed processing answers bug",
2021-03-11), and ``PythonHelperTools/vqaTools/vqa.py`` (``VQA.loadRes``). Written afresh from
reading them; every step below, quirks included, is what that code does. The Cloud-CV
evaluation server (the leaderboard) computes the same. Per question:

1. **Every annotator answer and the result answer**: newlines and tabs become spaces, the ends
   are stripped.
2. **Only if the annotator answers (after step 1) are not all identical**: each of them, and
   the result answer, gets :func:`process_punctuation` and then :func:`process_digit_article`
   (lower-case, number words ``zero``..``ten`` and ``none`` to digits, articles ``a an the``
   dropped, missing apostrophes put back: ``dont`` -> ``don't``). When they are all identical,
   neither side is normalised further: ten × ``"2"`` does not match ``"two"``, ten ×
   ``"yes"`` does not match ``"Yes."``.
3. **Accuracy of the question**: for each of the (ten) annotator answers, leave it out and count
   how many of the *others* equal the result answer exactly; that subset scores
   ``min(1, matches / 3)``; the question scores the mean over the subsets. "Leave it out" drops
   every answer record *equal* to it (answer, confidence and id), which with the official unique
   ``answer_id`` is exactly one.

``overall``, ``perQuestionType``, ``perAnswerType``: 100 x the mean over questions, by Python's
``round(x, 2)``, the per-question values themselves unrounded. Questions are taken in
annotation-file order (float sums are summed in that order).

Quirks kept:

* :func:`process_punctuation`: a punctuation mark is deleted (rather than turned into a space)
  when it touches a space anywhere in the text or the text contains a digit-comma-digit group
  anywhere; ``'``, ``:``, ``#``, ``$``, ``%``, ``&``, ``*`` are not in its list; a period is
  deleted unless a digit follows it (the code's ``(?!<=\\d)`` is a lookahead, not the
  lookbehind it looks like), and at most 32 periods are deleted (the code passes
  ``re.UNICODE``, 32, as ``sub``'s ``count``).
* :func:`process_digit_article`: the contraction table's capitalised keys (``Im``, ``Ive``,
  ``Id've``) can never match lower-cased words, and ``somebody'd`` maps to ``somebodyd``.
* Results (``loadRes``): a JSON list of ``{"question_id", "answer"}`` whose question ids are
  exactly the annotation file's, as a set; a question id given twice keeps the last answer.

Rounding: Python 3's ``round`` (ties to even on the exact binary value), as the official code
computes under Python 3; Python 2 rounded exact binary ties (e.g. 12.125) away from zero.

**The revision before** (a4f1afd, the v2.0 release of 2017, which this module followed until
issue 26) normalised the result answer always, and gave the annotator answers only
:func:`process_punctuation`, and only when they disagreed. It scores differently wherever the
annotators agree on an unnormalised form or carry articles or number words; numbers published
with it can be reproduced with ``revision="a4f1afd"`` (``vqa-eval --metric-revision a4f1afd``).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = re.UNICODE.value  # 32: the official code passes re.UNICODE as `count`


class ResultsError(ValueError):
    """A results file that the official loader would refuse (or crash on)."""


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # The conditions look at the *original* text; the replacements accumulate in `out`.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


# The revisions of vqaEval.py this module computes, by commit; the first is the default.
REVISIONS = {
    "a013f00": "GT-Vision-Lab/VQA head (2021-03-11, 'Fixed processing answers bug'); the evaluation "
               "server computes the same",
    "a4f1afd": "the v2.0 release (2017-10-02), before that fix: to reproduce numbers scored with it",
}
DEFAULT_REVISION = "a013f00"


def _check_revision(revision: str) -> None:
    if revision not in REVISIONS:
        raise ValueError(f"unknown vqaEval.py revision {revision!r}; one of {', '.join(REVISIONS)}")


def clean(answer: str) -> str:
    """Step 1: newlines and tabs to spaces, the ends stripped."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer as the metric compares it when the annotators disagree (step 1, then
    :func:`process_punctuation` and :func:`process_digit_article`)."""
    return process_digit_article(process_punctuation(clean(answer)))


def compared(gt_answers: Sequence[Mapping], revision: str = DEFAULT_REVISION) -> tuple[list[dict], bool]:
    """One question's annotator answer records as ``revision`` compares them (copies; the
    official code edits them in place), and whether the result answer is normalised
    (:func:`normalize_answer`) before it is compared with them (otherwise only cleaned)."""
    _check_revision(revision)
    answers = [dict(a) for a in gt_answers]
    if revision == "a4f1afd":
        if len({a["answer"] for a in answers}) > 1:
            for a in answers:
                a["answer"] = process_punctuation(a["answer"])
        return answers, True
    for a in answers:
        a["answer"] = clean(a["answer"])
    if len({a["answer"] for a in answers}) > 1:
        for a in answers:
            a["answer"] = process_digit_article(process_punctuation(a["answer"]))
        return answers, True
    return answers, False


def result_form(result_answer: str, normalised: bool) -> str:
    """The result answer as it is compared (see :func:`compared`)."""
    return normalize_answer(result_answer) if normalised else clean(result_answer)


def question_accuracy(result_answer: str, gt_answers: Sequence[Mapping], revision: str = DEFAULT_REVISION) -> float:
    """Official accuracy (0..1) of one result answer against one question's annotator
    answers (the ``answers`` list of an annotation: dicts with at least ``answer``)."""
    answers, normalised = compared(gt_answers, revision)
    res = result_form(result_answer, normalised)
    accs = []
    for left_out in answers:
        others = [a for a in answers if a != left_out]
        matching = sum(1 for a in others if a["answer"] == res)
        accs.append(min(1, float(matching) / 3))
    return float(sum(accs)) / len(accs)


def accuracy_of_count(matches: int, total: int) -> float:
    """:func:`question_accuracy` of an answer that ``matches`` of ``total`` annotator records
    equal (records with unique ids, as in the official files): leaving out one of the
    matching ones leaves ``matches - 1``, leaving out another leaves ``matches``."""
    if total <= 0:
        return 0.0
    return (matches * min(1.0, (matches - 1) / 3) + (total - matches) * min(1.0, matches / 3)) / total


def evaluate(annotations: Sequence[Mapping], answers: Mapping[int, str], n: int = 2,
             revision: str = DEFAULT_REVISION) -> dict:
    """Official accuracy of ``answers`` (question id -> answer) on ``annotations`` (the
    annotation file's ``annotations`` list, in file order), as vqaEval.py at ``revision``
    computes it. Returns ``{"overall", "perQuestionType", "perAnswerType"}`` in percent,
    rounded to ``n`` places, plus ``"perQuestion"`` (question id -> unrounded 0..1) and
    ``"revision"``."""
    _check_revision(revision)
    acc_qa: list[float] = []
    by_qtype: dict[str, list[float]] = OrderedDict()
    by_atype: dict[str, list[float]] = OrderedDict()
    per_question: dict[int, float] = {}
    if not annotations:
        raise ValueError("no annotations to score")
    for ann in annotations:
        qid = ann["question_id"]
        acc = question_accuracy(answers[qid], ann["answers"], revision)
        acc_qa.append(acc)
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)
        per_question[qid] = acc
    return {
        "overall": round(100 * float(sum(acc_qa)) / len(acc_qa), n),
        "perQuestionType": {k: round(100 * float(sum(v)) / len(v), n) for k, v in by_qtype.items()},
        "perAnswerType": {k: round(100 * float(sum(v)) / len(v), n) for k, v in by_atype.items()},
        "perQuestion": per_question,
        "revision": revision,
    }


def check_results(results: object, question_ids: Iterable[int], source: str) -> dict[int, str]:
    """A parsed results file -> question id -> answer, checked as ``VQA.loadRes`` checks it
    (plus clear errors where it would crash). ``source`` names the file in messages."""
    if not isinstance(results, list):
        raise ResultsError(f"{source}: results must be a JSON array of objects, got {type(results).__name__}")
    out: dict[int, str] = {}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "question_id" not in r or "answer" not in r:
            raise ResultsError(f"{source}: entry #{i} is not an object with 'question_id' and 'answer'")
        qid, ans = r["question_id"], r["answer"]
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise ResultsError(f"{source}: entry #{i} has a question_id that is not an integer: {qid!r}")
        if not isinstance(ans, str):
            raise ResultsError(f"{source}: entry #{i} (question {qid}) has an answer that is not a string")
        out[qid] = ans  # a repeated id keeps the last answer, as the official loader does
    expected = set(question_ids)
    missing, extra = expected - set(out), set(out) - expected
    if missing or extra:
        raise ResultsError(
            f"{source}: results do not correspond to the split's questions: "
            f"{len(missing)} question(s) without an answer{_examples(missing)}, "
            f"{len(extra)} answer(s) to questions not in the split{_examples(extra)}"
        )
    return out


def load_results(path: str | Path, question_ids: Iterable[int]) -> dict[int, str]:
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"{path}: not a readable JSON results file ({e})") from None
    return check_results(results, question_ids, str(path))


def _examples(ids: set[int]) -> str:
    return f" (e.g. {', '.join(map(str, sorted(ids)[:3]))})" if ids else ""
