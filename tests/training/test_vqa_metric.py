"""The official VQA accuracy against cases computed by hand, quirks of vqaEval.py included.

Per question: for each of the ten annotator answers, leave it out, count the others equal to
the (normalised) result answer, score min(1, count / 3); average the ten scores.
"""

import json

import pytest

from training.vqa_metric import (
    ResultsError,
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


# --- identical answers ---------------------------------------------------------------------


def test_identical_answers():
    assert acc("yes", *["yes"] * 10) == 1.0  # 9 others match in every subset: min(1, 9/3)
    assert acc("no", *["yes"] * 10) == 0.0
    assert acc("Yes", *["yes"] * 10) == 1.0  # the result answer is lower-cased
    assert acc(" yes\n", *["yes"] * 10) == 1.0  # newlines/tabs to spaces, ends stripped


# --- disagreeing annotators ----------------------------------------------------------------


def test_disagreeing_annotators_leave_one_out():
    # 1 of 10 said red: leaving it out leaves 0 (1 subset), leaving a blue out leaves 1 -> 1/3
    # (9 subsets): (0 + 9/3) / 10 = 0.3
    assert acc("red", "red", *["blue"] * 9) == pytest.approx(0.3)
    # 2 said red: (2 x 1/3 + 8 x 2/3) / 10 = 0.6
    assert acc("red", "red", "red", *["blue"] * 8) == pytest.approx(0.6)
    # 3 said red: (3 x 2/3 + 7 x 1) / 10 = 0.9 ("3 annotators" is 90%, not 100%)
    assert acc("red", *["red"] * 3, *["blue"] * 7) == pytest.approx(0.9)
    # 4 said red: every subset still has >= 3: 1.0
    assert acc("red", *["red"] * 4, *["blue"] * 6) == 1.0
    assert acc("blue", "red", "red", *["blue"] * 8) == 1.0
    assert acc("green", "red", "red", *["blue"] * 8) == 0.0


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


def test_annotator_answers_are_not_lower_cased():
    assert acc("yes", *["Yes"] * 4, *["yes"] * 6) == 1.0  # 6 lower-case matches suffice
    assert acc("YES", *["Yes"] * 10) == 0.0  # "yes" never equals "Yes"
    assert acc("yes", *["Yes"] * 8, "yes", "yes") == pytest.approx(0.6)


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


def test_punctuation_in_answers():
    assert acc("yes.", *["yes"] * 10) == 1.0  # the result answer is always cleaned
    assert acc("red", *["red."] * 3, *["blue"] * 7) == pytest.approx(0.9)  # disagreement: cleaned
    # Quirk: identical annotator answers are compared raw, so "red." x 10 is never matched.
    assert acc("red.", *["red."] * 10) == 0.0
    assert acc("red", *["red."] * 10) == 0.0


# --- articles, number words, contractions --------------------------------------------------


def test_articles():
    assert process_digit_article("the the Cat") == "cat"
    assert acc("a dog", *["dog"] * 10) == 1.0
    assert acc("an apple", *["apple"] * 3, *["pear"] * 7) == pytest.approx(0.9)
    # Annotator answers never lose their articles: "a dog" x 10 cannot be matched.
    assert acc("a dog", *["a dog"] * 10) == 0.0
    assert acc("a dog", *["a dog"] * 5, *["dog"] * 5) == 1.0  # via the five plain "dog"s


def test_number_words():
    assert process_digit_article("Two") == "2" and process_digit_article("none") == "0"
    assert process_digit_article("ten eleven") == "10 eleven"  # only zero..ten and none
    assert acc("two", *["2"] * 10) == 1.0
    assert acc("2", *["two"] * 4, *["2"] * 6) == 1.0  # the six digits suffice
    assert acc("two", *["two"] * 4, *["2"] * 6) == 1.0  # "two" becomes "2" before comparing
    # Annotator words are never turned into digits: "two" x 10 cannot be matched at all.
    assert acc("two", *["two"] * 10) == 0.0
    assert acc("2", *["two"] * 10) == 0.0


def test_contractions():
    assert process_digit_article("dont know") == "don't know"
    assert acc("dont know", *["don't know"] * 10) == 1.0
    assert acc("isnt", *["isn't"] * 3, *["no"] * 7) == pytest.approx(0.9)
    assert process_digit_article("Im here") == "im here"  # the table's "Im" key never matches
    assert process_digit_article("somebody'd") == "somebodyd"  # the table maps it that way


# --- empty answers -------------------------------------------------------------------------


def test_empty_answers():
    assert acc("", *["yes"] * 10) == 0.0
    assert acc("", *[""] * 3, *["yes"] * 7) == pytest.approx(0.9)
    # What normalises to nothing matches empty annotator answers too.
    assert acc("the", *[""] * 3, *["yes"] * 7) == pytest.approx(0.9)
    assert acc("?", *[""] * 3, *["yes"] * 7) == pytest.approx(0.9)
    assert acc("", *[""] * 10) == 1.0
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
