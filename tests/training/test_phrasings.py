"""Natural phrasings (training/phrasings.py): templates parse into what they ask, the held-out
evaluation wordings are not training wordings (not even as the model sees them), and the
evaluation set is large, deterministic and answer-preserving."""

from __future__ import annotations

import random

import pytest

from models import Vocabulary
from training.data import COLORS, SHAPES, load_easy_vqa, question_kind
from training.phrasings import EVAL, TRAIN, Frame, Rephraser, natural_split, parse_template, with_rephrasings


@pytest.fixture(scope="module")
def test_split():
    return load_easy_vqa("test")


@pytest.fixture(scope="module")
def template_vocab():
    import easy_vqa

    return Vocabulary.build(easy_vqa.get_train_questions()[0])


def test_every_easy_vqa_question_parses_into_the_frame_its_answer_needs():
    import easy_vqa

    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        for q, a in zip(questions, answers):
            f = parse_template(q)
            assert {"present": "yes/no", "color": "color", "shape": "shape"}[f.kind] == question_kind(a), q
            assert f.shape is None or f.shape in q and f.shape in SHAPES
            assert f.color is None or f.color in q and f.color in COLORS
            assert f.negated == (" not " in q or q.startswith("is no ")), q


def test_parse_examples_and_refusal():
    assert parse_template("is there not a red shape in the image?") == Frame("present", color="red", negated=True)
    assert parse_template("is no circle present?") == Frame("present", shape="circle", negated=True)
    assert parse_template("what is the color of the triangle?") == Frame("color", shape="triangle")
    assert parse_template("what is the teal shape?") == Frame("shape", color="teal")
    with pytest.raises(ValueError):
        parse_template("can you see a circle?")


def _model_view(pattern: str, vocab: Vocabulary) -> tuple[str, ...]:
    text = pattern.format(obj="circle", target="circle", color="red")
    return tuple(t if t in vocab else "<unk>" for t in vocab.encode(text).tokens)


def test_evaluation_wordings_are_never_training_wordings(template_vocab):
    train_text = set(TRAIN.all_patterns()) | set(TRAIN.prefixes) | set(TRAIN.suffixes)
    eval_text = set(EVAL.all_patterns()) | set(EVAL.prefixes) | set(EVAL.suffixes)
    assert not train_text & eval_text
    # As the model sees them (unknown words are all <unk>): still no evaluation pattern is a
    # training pattern or an easy-VQA template.
    import easy_vqa

    trained = {_model_view(p, template_vocab) for p in TRAIN.all_patterns()}
    trained |= {_model_view(q.replace("?", ""), template_vocab) for q in easy_vqa.get_train_questions()[0]}
    overlap = [p for p in EVAL.all_patterns() if _model_view(p, template_vocab) in trained]
    assert not overlap


def test_natural_split_is_large_deterministic_and_keeps_images_and_answers(test_split, template_vocab):
    nat = natural_split(test_split)
    assert len(nat) == len(test_split) >= 1000
    assert nat.answers == test_split.answers and nat.image_index.equal(test_split.image_index)
    assert natural_split(test_split).questions == nat.questions  # same set every run
    templates = set(test_split.questions)
    assert not any(q in templates for q in nat.questions)
    # Every frame kind is asked, in many wordings, and the wording changes the tokens.
    assert len(set(nat.questions)) > 2000
    changed = sum(template_vocab.encode(n).ids != template_vocab.encode(t).ids
                  for n, t in zip(nat.questions, test_split.questions))
    assert changed == len(nat)


def test_natural_questions_still_report_their_unknown_words(test_split, template_vocab):
    nat = natural_split(test_split)
    with_unknown = [template_vocab.encode(q) for q in nat.questions]
    assert sum(bool(e.unknown_words) for e in with_unknown) > 0.8 * len(nat)
    enc = template_vocab.encode("Please tell me, can you see a circle in this picture??")
    assert enc.unknown_words == ("please", "tell", "me", "can", "you", "see", "this", "picture")
    # British spellings are folded, not unknown
    assert template_vocab.encode("What colour is the grey shape?").unknown_words == ()


def test_rephraser_is_seeded_and_rewords_about_the_share_asked(test_split):
    qs = test_split.questions[:2000]
    a, b = Rephraser(seed=3)(qs), Rephraser(seed=3)(qs)
    assert a == b
    assert Rephraser(seed=4)(qs) != a
    changed = sum(x != y for x, y in zip(a, qs)) / len(qs)
    assert 0.5 < changed < 0.7  # 50% reworded, plus fillers in 20% of all
    assert Rephraser(prob=0, filler_prob=0)(qs) == list(qs)


def test_validation_with_rephrasings_doubles_the_questions_only(test_split):
    sub = test_split.subset_images(list(range(20)))
    v = with_rephrasings(sub, seed=1)
    n = len(sub)
    assert len(v) == 2 * n and v.questions[:n] == sub.questions and v.answers == sub.answers * 2
    assert v.image_index[n:].equal(sub.image_index) and v.images is sub.images
    rng = random.Random(0)
    assert all(TRAIN.render(parse_template(q), rng) for q in sub.questions)
