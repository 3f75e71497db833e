from models.vocab import PAD_ID, UNK_ID, AnswerVocabulary, Vocabulary, tokenize

import pytest


def test_tokenize_lowercases_and_splits_on_non_word_characters():
    assert tokenize("What COLOR is the shape?!") == ["what", "color", "is", "the", "shape"]
    assert tokenize("  red,blue;green  ") == ["red", "blue", "green"]
    assert tokenize("") == []
    assert tokenize("???") == []


def test_contractions_keep_their_negation():
    assert tokenize("Isn't there a circle?") == ["is", "not", "there", "a", "circle"]
    assert tokenize("Doesn't the image contain a triangle") == ["does", "not", "the", "image", "contain", "a", "triangle"]


def test_reserved_ids_and_build():
    v = Vocabulary.build(["what color is it", "what shape"])
    assert v.words[PAD_ID] == "<pad>" and v.words[UNK_ID] == "<unk>"
    assert len(v) == 2 + 5
    assert v.words[2:] == sorted(v.words[2:])


def test_unknown_words_are_reported_not_silently_guessed():
    v = Vocabulary.build(["what color is the shape"])
    enc = v.encode("what colour is the purple blob blob")
    # "colour" is a spelling variant of a known word: normalised, not unknown
    assert enc.tokens[:2] == ("what", "color")
    assert enc.unknown_words == ("purple", "blob")
    assert enc.ids[-3:] == (UNK_ID, UNK_ID, UNK_ID)


def test_british_spellings_mean_the_same_question():
    v = Vocabulary.build(["what color is the gray shape"])
    assert v.encode("What colour is the grey shape?").ids == v.encode("what color is the gray shape").ids
    # a variant is only rewritten when the vocabulary lacks the original
    v2 = Vocabulary.build(["grey gray"])
    assert v2.encode("grey").tokens == ("grey",)


def test_max_tokens_cuts():
    v = Vocabulary.build(["a b c d"])
    assert len(v.encode("a b c d a b", max_tokens=4)) == 4


def test_duplicates_rejected():
    with pytest.raises(ValueError):
        Vocabulary(["<pad>", "<unk>", "a", "a"])
    with pytest.raises(ValueError):
        AnswerVocabulary(["yes", "yes"])
    with pytest.raises(ValueError):
        AnswerVocabulary([])


def test_encode_with_the_callers_words_is_encode():
    """``words`` (the caller's own ``tokenize(text)``) spares a second tokenisation, nothing else."""
    v = Vocabulary.build(["what color is the gray shape", "is there not a circle"])
    for text in ("What colour is the grey shape?", "Isn't there a purple blob blob", "", "a b c d e f"):
        for cut in (None, 3):
            assert v.encode(text, cut, words=v.tokenize(text)) == v.encode(text, cut)
