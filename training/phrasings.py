"""Questions asked the way people talk: easy-VQA templates rephrased, for training and for a
held-out evaluation.

easy-VQA asks 24 fixed templates ("is there not a circle in the image?"). People ask "please
tell me, can you see a circle?". Every template means one of four things, a :class:`Frame`:

* ``present``: is there a <shape> / a <colour> shape (optionally negated: answer flips);
* ``color``:   what colour is the shape / the <shape>;
* ``shape``:   what shape is in the image / what is the <colour> shape.

A frame can be rendered in other words without changing its answer. There are two disjoint
sets of renderings:

* :data:`TRAIN` (``vqa-train`` rephrases about half of the training questions with it, adds
  filler words and stray unknown words), and
* :data:`EVAL` (``vqa-eval`` rephrases every test-split question with it: the
  natural-phrasing figure in ``weights/README.md``). No EVAL pattern is a TRAIN pattern, also
  not as the model sees it (known words, every other word ``<unk>``), so the figure measures
  generalisation to unseen phrasings, not recall of trained ones (``tests/training``).

The question vocabulary is still built from the template questions only: the new words map to
``<unk>`` and are reported in ``unknown_words`` as before. What the model learns is to read
past them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from .data import COLORS, SHAPES, VQASplit

_S = "|".join(SHAPES)
_C = "|".join(COLORS)
_OBJ = rf"(?:(?P<shape>{_S})|(?P<color>{_C}) shape)"


@dataclass(frozen=True)
class Frame:
    """What a template question asks, independent of its wording."""

    kind: str  # "present", "color" or "shape"
    shape: str | None = None  # the shape named in the question, if any
    color: str | None = None  # the colour named in the question, if any
    negated: bool = False  # present only: "is there not a ..." (the answer flips)


_TEMPLATES: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"^does the image (?P<neg>not )?contain a {_OBJ}\?$"), "present"),
    (re.compile(rf"^is (?:a|(?P<neg>no)) {_OBJ} present\?$"), "present"),
    (re.compile(rf"^is there (?P<neg>not )?a {_OBJ}(?: in the image)?\?$"), "present"),
    (re.compile(rf"^what color is the (?:shape|(?P<shape>{_S}))\?$"), "color"),
    (re.compile(rf"^what is the color of the (?:shape|(?P<shape>{_S}))\?$"), "color"),
    (re.compile(rf"^what is the (?P<color>{_C}) shape\?$"), "shape"),
    (re.compile(r"^what shape (?:does the image contain|is in the image|is present)\?$"), "shape"),
]


def parse_template(question: str) -> Frame:
    """The :class:`Frame` of an easy-VQA template question; ``ValueError`` if it is none."""
    q = question.strip().lower()
    for pattern, kind in _TEMPLATES:
        m = pattern.match(q)
        if m is not None:
            g = m.groupdict()
            return Frame(kind=kind, shape=g.get("shape"), color=g.get("color"), negated=bool(g.get("neg")))
    raise ValueError(f"not an easy-VQA template question: {question!r}")


@dataclass(frozen=True)
class Phrasings:
    """Renderings of each frame kind. Placeholders: ``{obj}`` (``circle`` / ``red shape``) in
    ``present``/``absent``; ``{target}`` (``circle`` / ``shape``) in ``color``; ``{color}`` in
    ``shape_of_color``. ``prefixes``/``suffixes`` are wrapped around a rendering."""

    present: Sequence[str]
    absent: Sequence[str]  # the negated present frame
    color: Sequence[str]
    shape: Sequence[str]  # no colour named
    shape_of_color: Sequence[str]
    prefixes: Sequence[str] = field(default=())
    suffixes: Sequence[str] = field(default=())

    def patterns(self, frame: Frame) -> Sequence[str]:
        if frame.kind == "present":
            return self.absent if frame.negated else self.present
        if frame.kind == "color":
            return self.color
        return self.shape_of_color if frame.color else self.shape

    def all_patterns(self) -> list[str]:
        return [*self.present, *self.absent, *self.color, *self.shape, *self.shape_of_color]

    def render(self, frame: Frame, rng: random.Random, wrap_prob: float = 0.0) -> str:
        """``frame`` in one of these phrasings (picked by ``rng``), wrapped with a prefix
        and/or a suffix each with probability ``wrap_prob``."""
        pattern = rng.choice(self.patterns(frame))
        obj = frame.shape if frame.shape else f"{frame.color} shape"
        text = pattern.format(obj=obj, target=frame.shape or "shape", color=frame.color)
        if self.prefixes and rng.random() < wrap_prob:
            text = f"{rng.choice(self.prefixes)} {text}"
        if self.suffixes and rng.random() < wrap_prob:
            text = f"{text} {rng.choice(self.suffixes)}"
        return text


# Used by vqa-train. Keep these apart from EVAL (a test checks they share no pattern).
TRAIN = Phrasings(
    present=[
        "do you see a {obj} in the image", "is there a {obj} in the photo",
        "is a {obj} shown", "tell me if there is a {obj}", "is there any {obj} at all",
        "would you say there is a {obj} in the image", "does this image contain a {obj}",
        "does the picture have a {obj}", "there is a {obj} in the image, right",
        "is there a {obj} anywhere", "a {obj}: is there one",
        "has the image got a {obj}", "is there a {obj} drawn",
    ],
    absent=[
        "is there no {obj} in the photo", "is it true that there is no {obj}",
        "does this image not contain a {obj}", "is there not a {obj} anywhere",
        "is no {obj} shown", "does the picture not have a {obj}",
        "tell me if there is no {obj}", "there is no {obj} in the image, right",
        "is there not any {obj} at all", "is there no {obj} drawn",
    ],
    color=[
        "which color is the {target}", "what color does the {target} have", "tell me the color of the {target}",
        "what is the color of the {target} in the photo", "what color is the {target} in the image",
        "the {target} is what color", "what color is that {target}", "name the color of the {target}",
        "do you know what color the {target} is", "what is the {target} color",
    ],
    shape=[
        "which shape is in the image", "what shape is shown", "what shape is in the photo",
        "tell me what shape is present", "what shape is drawn in the image", "what is the shape in the image",
        "name the shape", "what kind of shape is present", "what shape do we have",
    ],
    shape_of_color=[
        "which shape is {color}", "what is the {color} shape in the image", "what shape is the {color} one",
        "the {color} shape is what", "tell me what the {color} shape looks like", "what {color} shape is there",
    ],
    prefixes=["hey", "ok", "quick question:", "hi there,", "excuse me,", "so", "please answer:",
              "question:", "look,", "hello!", "tell me,", "um,"],
    suffixes=["thanks", "for me", "right", "if you can", "now", "ok", "then", "exactly"],
)

# Used only by vqa-eval's natural-phrasing set (includes issue #12's examples).
EVAL = Phrasings(
    present=[
        "can you see a {obj}", "can you see a {obj} in this picture", "I wonder whether there is a {obj} here",
        "is there a {obj} somewhere in the image", "do we have a {obj} in this picture",
        "is a {obj} visible in the image", "is there a {obj} in this picture",
        "am I right that there is a {obj}", "could there be a {obj} in the image",
    ],
    absent=[
        "is there no {obj} in this picture", "I wonder whether there is no {obj} here",
        "is it the case that the image does not contain a {obj}", "is no {obj} visible in the image",
        "am I right that there is no {obj}", "so there is not a {obj} in this picture",
    ],
    color=[
        "what color is the {target} in this picture", "what colour would you say the {target} is",
        "I wonder what color the {target} is", "what is the colour of the {target} here",
        "which colour has the {target} got", "can you tell me the color of that {target}",
        "what color is the {target} painted",
    ],
    shape=[
        "what shape can you see in this picture", "I wonder what shape is in the image",
        "what shape do you see here", "which shape does the image contain",
        "can you tell me what shape this is", "what sort of shape is in this picture",
    ],
    shape_of_color=[
        "what is the {color} shape in this picture", "can you tell me what the {color} shape is",
        "I wonder what the {color} shape is", "which shape is the {color} one here",
    ],
    prefixes=["please tell me,", "quick one:", "could you tell me,", "honestly,", "sorry, one more question:",
              "dear model,", "alright,", "well,"],
    suffixes=["please", "thank you", "if you know", "by the way"],
)

# Stray words dropped into training questions at random places (all unknown to the model).
TRAIN_FILLERS = ("um", "uh", "like", "really", "actually", "just", "maybe", "basically", "erm", "kindly",
                 "perhaps", "honestly", "x", "hmm", "pls")

_BRITISH = {"color": "colour", "gray": "grey"}


class Rephraser:
    """Training-time augmentation: ``rephraser(texts) -> texts``. Each template question is,
    independently: rephrased with :data:`TRAIN` (probability ``prob``, then wrapped with a
    prefix/suffix each with probability ``wrap_prob``), and given 1-2 stray filler words at
    random positions (probability ``filler_prob``). Deterministic for a seed."""

    def __init__(self, prob: float = 0.5, wrap_prob: float = 0.3, filler_prob: float = 0.2, seed: int = 0,
                 phrasings: Phrasings = TRAIN) -> None:
        self.prob, self.wrap_prob, self.filler_prob = prob, wrap_prob, filler_prob
        self.phrasings = phrasings
        self.rng = random.Random(seed)
        self._frames: dict[str, Frame] = {}

    def one(self, text: str) -> str:
        rng = self.rng
        if rng.random() < self.prob:
            frame = self._frames.get(text)
            if frame is None:
                frame = self._frames[text] = parse_template(text)
            text = self.phrasings.render(frame, rng, self.wrap_prob)
        if rng.random() < self.filler_prob:
            words = text.split()
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randint(0, len(words)), rng.choice(TRAIN_FILLERS))
            text = " ".join(words)
        return text

    def __call__(self, texts: Sequence[str]) -> list[str]:
        return [self.one(t) for t in texts]


def with_rephrasings(split: VQASplit, phrasings: Phrasings = TRAIN, seed: int = 0) -> VQASplit:
    """``split`` plus one rephrasing of each of its questions (same image, same answer): the
    validation split ``vqa-train`` selects its epoch on, so robustness counts in the choice."""
    rng = random.Random(seed)
    extra = [phrasings.render(parse_template(q), rng, 0.3) for q in split.questions]
    return VQASplit(images=split.images, questions=split.questions + extra, answers=split.answers * 2,
                    image_index=split.image_index.repeat(2), image_ids=split.image_ids)


def natural_question(template: str, rng: random.Random, phrasings: Phrasings = EVAL) -> str:
    """One held-out natural phrasing of ``template``: an EVAL rendering, wrapped (40% each
    side), with British spellings (half the time), a capital first letter (half the time) and
    assorted end punctuation."""
    text = phrasings.render(parse_template(template), rng, wrap_prob=0.4)
    if rng.random() < 0.5:
        for us, uk in _BRITISH.items():
            text = re.sub(rf"\b{us}\b", uk, text)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + rng.choice(["?", "??", "?!", "...?", "", " ?", "?!!"])


def natural_split(split: VQASplit, seed: int = 0) -> VQASplit:
    """The natural-phrasing evaluation set: every question of ``split`` (the easy-VQA *test*
    split) asked once in a held-out phrasing, about the same image, with the same answer."""
    rng = random.Random(seed)
    return VQASplit(images=split.images, questions=[natural_question(q, rng) for q in split.questions],
                    answers=list(split.answers), image_index=split.image_index.clone(), image_ids=split.image_ids)
