"""The official VQA accuracy against cases computed by hand, quirks of vqaEval.py included,
at GT-Vision-Lab/VQA's head (a013f00, the default) and at the v2.0 release (a4f1afd).

Per question: for each of the ten annotator answers, leave it out, count the others equal to
the result answer (both normalised only where the annotators disagree), score
min(1, count / 3); average the ten scores.
"""

import json

import pytest

from training.vqa_metric import (
    ResultsError,
    accuracy_of_count,
    check_results,
    evaluate,
    load_results,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
)


def gts(*answers: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def acc(result: str, *answers: str) -> float:
    return question_accuracy(result, gts(*answers))


# --- per-question accuracy, both revisions ---------------------------------------------------
# (result, annotator answers, accuracy by the head a013f00, by the v2.0 release a4f1afd),
# each computed by hand. The head cleans both sides (newlines, tabs, ends), then normalises both
# sides only when the ten annotators are not all identical; a4f1afd normalised the result
# always and gave disagreeing annotators punctuation processing only.
R = "red"
CASES = [
    # all ten identical: the head compares raw (only cleaned)
    ("yes", ["yes"] * 10, 1.0, 1.0),  # 9 others match in every subset: min(1, 9/3)
    ("no", ["yes"] * 10, 0.0, 0.0),
    ("Yes", ["yes"] * 10, 0.0, 1.0),  # not lower-cased any more
    ("yes.", ["yes"] * 10, 0.0, 1.0),  # nor its period stripped
    ("Yes.", ["yes"] * 10, 0.0, 1.0),
    (" yes\n", ["yes"] * 10, 1.0, 1.0),  # newlines/tabs to spaces, ends stripped: both
    ("2", ["two"] * 10, 0.0, 0.0),
    ("two", ["2"] * 10, 0.0, 1.0),  # a4f1afd turned the result's "two" into "2"
    ("two", ["two"] * 10, 1.0, 0.0),  # ...and so could never match ten "two"s
    ("a dog", ["dog"] * 10, 0.0, 1.0),
    ("a dog", ["a dog"] * 10, 1.0, 0.0),
    ("red.", ["red."] * 10, 1.0, 0.0),
    ("red", ["red."] * 10, 0.0, 0.0),
    ("YES", ["Yes"] * 10, 0.0, 0.0),
    ("yes", [" yes"] * 10, 1.0, 0.0),  # the head cleans annotator answers too; a4f1afd compared " yes"
    # disagreeing annotators: leave-one-out over the others
    (R, [R] + ["blue"] * 9, 0.3, 0.3),  # (1 x 0 + 9 x 1/3) / 10
    (R, [R] * 2 + ["blue"] * 8, 0.6, 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
    (R, [R] * 3 + ["blue"] * 7, 0.9, 0.9),  # (3 x 2/3 + 7 x 1) / 10: three annotators is 90%
    (R, [R] * 4 + ["blue"] * 6, 1.0, 1.0),
    ("blue", [R] * 2 + ["blue"] * 8, 1.0, 1.0),
    ("green", [R] * 2 + ["blue"] * 8, 0.0, 0.0),
    # ...whose answers carry articles, number words, case or punctuation
    (R, ["the red", "the red", R] + ["blue"] * 7, 0.9, 0.3),  # head: 3 x "red"; a4f1afd: 1
    (R, ["the red"] * 3 + ["blue"] * 7, 0.9, 0.0),
    ("2", ["two", "2", "2"] + ["3"] * 7, 0.9, 0.6),  # head: 3 x "2"; a4f1afd: 2
    ("two", ["two", "2", "2"] + ["3"] * 7, 0.9, 0.6),
    ("2", ["two"] * 4 + ["2"] * 6, 1.0, 1.0),
    ("yes", ["Yes"] * 8 + ["yes"] * 2, 1.0, 0.6),  # head: all "yes"; a4f1afd: Yes stays Yes
    ("yes", ["Yes"] * 4 + ["yes"] * 6, 1.0, 1.0),
    (R, ["red."] * 3 + ["blue"] * 7, 0.9, 0.9),
    ("an apple", ["apple"] * 3 + ["pear"] * 7, 0.9, 0.9),
    ("a dog", ["a dog"] * 5 + ["dog"] * 5, 1.0, 1.0),
    ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9, 0.9),
    ("isnt", ["isn't"] * 3 + ["no"] * 7, 0.9, 0.9),
    # empty result answers
    ("", ["yes"] * 10, 0.0, 0.0),
    ("", [""] * 10, 1.0, 1.0),
    ("  ", [""] * 10, 1.0, 1.0),
    ("", [""] * 3 + ["yes"] * 7, 0.9, 0.9),
    ("the", [""] * 3 + ["yes"] * 7, 0.9, 0.9),  # what normalises to nothing matches empty answers
    ("?", [""] * 3 + ["yes"] * 7, 0.9, 0.9),
    ("the", ["the"] * 10, 1.0, 0.0),
]


@pytest.mark.parametrize("result,answers,head,v20", CASES)
def test_question_accuracy_by_revision(result, answers, head, v20):
    assert acc(result, *answers) == pytest.approx(head)  # the default: the head
    assert question_accuracy(result, gts(*answers), "a013f00") == pytest.approx(head)
    assert question_accuracy(result, gts(*answers), "a4f1afd") == pytest.approx(v20)


def test_the_revisions_disagree_where_the_issue_says():
    """The cases named in issue 26, each scored differently by the two revisions."""
    disagree = [(r, a) for r, a, head, v20 in CASES if head != v20]
    assert ("two", ["2"] * 10) in disagree and ("Yes.", ["yes"] * 10) in disagree
    assert (R, ["the red", "the red", R] + ["blue"] * 7) in disagree
    assert ("2", ["two", "2", "2"] + ["3"] * 7) in disagree


def test_an_unknown_revision_is_refused():
    with pytest.raises(ValueError, match="unknown vqaEval.py revision"):
        question_accuracy("yes", gts("yes"), "HEAD")


def test_leave_one_out_drops_every_equal_record():
    """The official code leaves out `item != gtAnsDatum`: a record duplicated verbatim (same
    answer, confidence and id) drops out twice. With unique answer ids, as in the official
    files, this is the plain leave-one-out."""
    dup = {"answer": "red", "answer_confidence": "yes", "answer_id": 1}
    answers = [dup, dict(dup)] + gts(*["blue"] * 8)[0:8]
    for i, a in enumerate(answers[2:]):
        a["answer_id"] = i + 2
    # leaving out either red removes both: 0 (2 subsets); leaving a blue out: 2 reds -> 2/3 (8)
    assert question_accuracy("red", answers) == pytest.approx(8 * (2 / 3) / 10)  # 0.5333, not 0.6


def test_accuracy_of_count_is_the_leave_one_out_mean():
    for m in range(11):
        answers = ["x"] * m + ["y"] * (10 - m)
        assert accuracy_of_count(m, 10) == pytest.approx(acc("x", *answers))
    assert [round(accuracy_of_count(m, 10), 6) for m in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]


def test_the_official_code_edits_nothing_we_pass():
    answers = gts("The red", "red", "blue")
    before = [dict(a) for a in answers]
    question_accuracy("red", answers)
    assert answers == before


# --- punctuation ---------------------------------------------------------------------------


def test_punctuation_rules():
    assert process_punctuation("yes, it is") == "yes it is"  # ", " occurs: ',' is deleted
    assert process_punctuation("red,blue") == "red blue"  # no space next to it: a space
    assert process_punctuation("1,000") == "1000"  # digit,digit anywhere: all marks deleted
    assert process_punctuation("2,000 dogs-cats") == "2000 dogscats"
    assert process_punctuation("hello-world") == "hello world"
    assert process_punctuation("left - right") == "left  right"
    assert process_punctuation("3.5") == "3.5"  # a period before a digit stays
    assert process_punctuation("u.s.a.") == "usa"
    assert process_punctuation("man's 3:00 #1 & 50%") == "man's 3:00 #1 & 50%"  # not in its list
    # At most 32 periods are deleted: the official call passes re.UNICODE (32) as `count`.
    assert process_punctuation("." * 40) == "." * 8


# --- articles, number words, contractions --------------------------------------------------


def test_digit_article_rules():
    assert process_digit_article("the the Cat") == "cat"
    assert process_digit_article("Two") == "2" and process_digit_article("none") == "0"
    assert process_digit_article("ten eleven") == "10 eleven"  # only zero..ten and none
    assert process_digit_article("dont know") == "don't know"
    assert process_digit_article("Im here") == "im here"  # the table's "Im" key never matches
    assert process_digit_article("somebody'd") == "somebodyd"  # the table maps it that way
    assert normalize_answer("  A  Red. ") == "red"


# --- aggregation, rounding -----------------------------------------------------------------


def _ann(qid, qtype, atype, answers):
    return {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": answers[0], "answers": gts(*answers)}


def test_overall_per_type_rounded_to_two_places():
    anns = [_ann(1, "is the", "yes/no", ["yes"] * 10),  # 1.0
            _ann(2, "what color is the", "other", ["red"] * 2 + ["blue"] * 8),  # 0.6
            _ann(3, "is the", "yes/no", ["no"] * 10)]  # 0.0
    out = evaluate(anns, {1: "yes", 2: "red", 3: "yes"})
    assert out["revision"] == "a013f00"
    assert out["overall"] == 53.33  # 100 * 1.6 / 3 = 53.333...
    assert out["perQuestionType"] == {"is the": 50.0, "what color is the": 60.0}
    assert out["perAnswerType"] == {"yes/no": 50.0, "other": 60.0}
    assert out["perQuestion"][2] == pytest.approx(0.6)


def test_rounding_is_pythons_round():
    # 1 right of 800: 100 * 1 / 800 = 0.125 exactly; Python 3 rounds the tie to 0.12
    # (Python 2's round gave 0.13).
    anns = [_ann(i, "how many", "number", ["1"] * 10) for i in range(800)]
    answers = {i: "0" for i in range(800)}
    answers[0] = "1"
    assert evaluate(anns, answers)["overall"] == 0.12


# --- results files -------------------------------------------------------------------------


def test_results_must_cover_the_questions_exactly(tmp_path):
    assert check_results([{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "b"}], [1, 2], "r") == {1: "a", 2: "b"}
    # A repeated question id keeps the last answer, as the official loader does.
    assert check_results([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "c"}], [1], "r") == {1: "c"}
    with pytest.raises(ResultsError, match=r"r: .*1 question\(s\) without an answer \(e\.g\. 2\), 0 answer"):
        check_results([{"question_id": 1, "answer": "a"}], [1, 2], "r")
    with pytest.raises(ResultsError, match=r"1 answer\(s\) to questions not in the split \(e\.g\. 9\)"):
        check_results([{"question_id": 1, "answer": "a"}, {"question_id": 9, "answer": "a"}], [1], "r")
    with pytest.raises(ResultsError, match="JSON array"):
        check_results({"question_id": 1}, [1], "r")
    with pytest.raises(ResultsError, match="not a string"):
        check_results([{"question_id": 1, "answer": 3}], [1], "r")
    with pytest.raises(ResultsError, match="not an integer"):
        check_results([{"question_id": True, "answer": "x"}], [1], "r")
    bad = tmp_path / "res.json"
    bad.write_text("[{")
    with pytest.raises(ResultsError, match=r"res\.json: not a readable JSON results file"):
        load_results(bad, [1])
    with pytest.raises(ResultsError, match=r"nope\.json: no such results file"):
        load_results(tmp_path / "nope.json", [1])
    good = tmp_path / "ok.json"
    good.write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
    assert load_results(good, [1]) == {1: "yes"}
