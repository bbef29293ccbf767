# SPDX-License-Identifier: Apache-2.0
"""What the toy model is taught: questions about toy scenes in exactly the engine's prompt format, with answers.

Every question is one of the engine's own prompts (``ego_ros.engine.prompts``), built into the chat template by
the engine's backend, so the model meets at inference the very token sequences it was trained on:

    keywords   KEYWORDS                                  -> "red, mug, stripes"     (the main subject)
    area       AREA                                      -> "14"                    (its mask, % of the image)
    presence   RECOGNIZE with "a red mug with stripes"   -> "Yes" / "No"
    caption    CAPTION                                   -> "A red mug with stripes and a blue ball."
    choice     CONCEPTS_HEADER "NAME is <memory>.\\n" <image> choice("What colour is NAME?", "red", "blue") -> "A"
    concept    "NAME is <memory>.\\n" <image> RECOGNIZE(NAME)            -> "Yes" / "No"
               CONCEPTS_HEADER + several such intros + <image> RECOGNIZE(NAME) or LOCATE(NAME)

A concept's memory in training is made *without* Ego: the visual tokens that the instance's mask covers in one
reference view or several (concatenated, as the engine keeps a concept registered from several views), or a random
share of all of each view's tokens, or (rarely) its keywords as text. So the model learns to use
a memory, never Ego's particular choice of tokens, and comparing Ego with other choices on it stays fair.

Positives show the instance in a new scene (as the main subject, or small among others); negatives show a look-alike
(same kind and colour, another pattern or accent colour) or other objects: recognising *my* mug, not *a* mug.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ego_ros.engine import prompts

from .world import COLOURS, KINDS, PATTERNS, Instance, Scene, look_alike, random_instance, render_scene

TOKEN_PX = 28  # one Qwen2.5-VL visual token covers a 28 x 28 px block (2 x 2 patches of 14 px)
# Two phases: first the model learns to see (describing scenes, one image a question, cheap), then to use memories.
# Without the first, the concept task alone gives the vision tower too weak a signal to learn colours from.
DESCRIBE_WEIGHTS = {"keywords": 0.35, "area": 0.15, "presence": 0.35, "caption": 0.15}
TASK_WEIGHTS = {"keywords": 0.14, "area": 0.06, "presence": 0.13, "caption": 0.06, "concept": 0.55, "choice": 0.06}
MASK_COVERAGE = 0.25  # a token belongs to an object's memory when the object covers this share of its block
LOOK_ALIKE_SHARE = 0.35  # of the negatives of a concept question: a look-alike rather than another instance
# A memory holds the tokens of 1 to MEMORY_VIEWS reference views, concatenated in view order as the engine keeps a
# concept registered from several views; SINGLE_VIEW_SHARE of memories have one
MEMORY_VIEWS = 5
SINGLE_VIEW_SHARE = 0.5


@dataclass(frozen=True)
class ImageRef:
    """Stands for image ``index`` of the sample, until the trainer has encoded it."""

    index: int


@dataclass(frozen=True)
class MemoryRef:
    """Stands for the visual tokens ``tokens`` (raster indices) of image ``index``: soft tokens of a concept."""

    index: int
    tokens: tuple[int, ...]


ORDERS = ("concept_first", "image_first")  # where a concept question puts its memories: the engine's two orders


@dataclass
class Sample:
    task: str
    parts: list  # str | ImageRef | MemoryRef, in prompt order
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    # Dense supervision at the prompt's image: per visual token, the word the model should predict there (the
    # colour of the object on it; for yes/no questions, whether the thing asked about is on it), None for none.
    token_words: list[str | None] | None = None
    scenes: list[Scene] = field(default_factory=list)  # the scenes of ``images``, where a task keeps them
    # A single concept's yes/no question: the written pooling heads' evidence answers it (``circuit``), and the last
    # training stage ties the answer to that evidence as well as to the label (``train``)
    asks_one_concept: bool = False


# --- what each visual token shows: the attributes of the object on it ---------------------------------------------

# An object's attributes, one group each; the vision tower learns to say them at every token the object covers, and
# the decoder's matching heads compare memories and images on them (see train.py and circuit.py).
ATTRIBUTES = {"kind": KINDS, "colour": tuple(COLOURS), "pattern": PATTERNS, "accent": tuple(COLOURS)}
NONE = -1  # a token no object covers enough of, or a plain object's accent


def token_attributes(scene: Scene) -> np.ndarray:
    """Per visual token, the index of each attribute (``ATTRIBUTES`` order) of the object covering most of it,
    wherever one covers at least ``MASK_COVERAGE`` (ties go to the earlier object), ``NONE`` elsewhere: (N, 4) int.

    The threshold is the memory's own: a small instance's tokens are mostly partly covered, and labelling them as
    background taught the seeing stage to blur exactly the tokens a memory of it is made of."""
    classes = np.full((token_coverage(scene.subject.mask).size, len(ATTRIBUTES)), NONE, dtype=np.int64)
    most = np.zeros(len(classes))
    for placed in scene.objects:
        coverage = token_coverage(placed.mask)
        covered = (coverage >= MASK_COVERAGE) & (coverage > most)
        classes[covered] = attribute_indices(placed.instance)
        most = np.maximum(most, coverage)
    return classes


def attribute_indices(instance: Instance) -> list[int]:
    values = (instance.kind, instance.colour, instance.pattern, instance.accent)
    return [NONE if value is None else options.index(value) for options, value in zip(ATTRIBUTES.values(), values)]


def attribute_codes(classes: np.ndarray) -> np.ndarray:
    """One-hot codes of ``token_attributes`` rows, every group side by side, zeros for ``NONE``: (N, 25)."""
    codes = []
    for group, options in enumerate(ATTRIBUTES.values()):
        one_hot = np.zeros((len(classes), len(options)), dtype=np.float32)
        known = classes[:, group] != NONE
        one_hot[np.flatnonzero(known), classes[known, group]] = 1.0
        codes.append(one_hot)
    return np.concatenate(codes, axis=1)


def colour_words(scene: Scene) -> list[str | None]:
    """Per visual token, the body colour of the object covering most of it (at least half), else None."""
    words: list[str | None] = [None] * token_coverage(scene.subject.mask).size
    for placed in scene.objects:
        for i in np.flatnonzero(token_coverage(placed.mask) >= 0.5):
            words[int(i)] = placed.instance.colour
    return words


def answer_words(scene: Scene, matches) -> list[str]:
    """Per visual token, "Yes" where an object for which ``matches(instance)`` holds covers half of it, else "No"."""
    on = np.zeros(token_coverage(scene.subject.mask).size, dtype=bool)
    for placed in scene.objects:
        if matches(placed.instance):
            on |= token_coverage(placed.mask) >= 0.5
    return ["Yes" if x else "No" for x in on]


def token_coverage(mask: np.ndarray) -> np.ndarray:
    """Share of each visual token's 28 x 28 block covered by ``mask`` (H, W), in raster order, (N,)."""
    h, w = mask.shape
    if h % TOKEN_PX or w % TOKEN_PX:
        raise ValueError(f"a {w}x{h} mask is not a whole number of {TOKEN_PX} px token blocks")
    return mask.reshape(h // TOKEN_PX, TOKEN_PX, w // TOKEN_PX, TOKEN_PX).mean(axis=(1, 3)).reshape(-1)


def object_tokens(mask: np.ndarray) -> tuple[int, ...]:
    """The tokens an object covers enough of (at least its best-covered one), in raster order."""
    coverage = token_coverage(mask)
    chosen = np.flatnonzero(coverage >= MASK_COVERAGE)
    return tuple(int(i) for i in (chosen if chosen.size else [int(coverage.argmax())]))


def make_sample(rng: np.random.Generator, weights: dict[str, float] = TASK_WEIGHTS) -> Sample:
    """One training sample of a task drawn with ``weights``."""
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return _MAKERS[names[int(rng.choice(len(names), p=p / p.sum()))]](rng)


# --- the tasks ----------------------------------------------------------------------------------------------------


def _keywords(rng) -> Sample:
    scene = render_scene(rng)
    return Sample("keywords", [ImageRef(0), prompts.KEYWORDS], ", ".join(scene.subject.instance.keywords),
                  [scene.image], colour_words(scene))


def _area(rng) -> Sample:
    scene = render_scene(rng)
    return Sample("area", [ImageRef(0), prompts.AREA], str(round(scene.subject.area_percent)), [scene.image],
                  colour_words(scene))


def _presence(rng) -> Sample:
    scene = render_scene(rng)
    phrases = {o.instance.phrase for o in scene.objects}
    if rng.random() < 0.5:
        asked, answer = scene.objects[int(rng.integers(len(scene.objects)))].instance.phrase, "Yes"
    else:
        anchor = scene.objects[int(rng.integers(len(scene.objects)))].instance
        while True:  # absent, and often close to something present: same kind, another colour or pattern
            other = random_instance(rng, kind=anchor.kind if rng.random() < 0.6 else None)
            if other.phrase not in phrases:
                break
        asked, answer = other.phrase, "No"
    return Sample("presence", [ImageRef(0), prompts.RECOGNIZE.format(name=_article(asked))], answer, [scene.image],
                  answer_words(scene, lambda instance: instance.phrase == asked))


def _caption(rng) -> Sample:
    scene = render_scene(rng)
    return Sample("caption", [ImageRef(0), prompts.CAPTION], caption(scene), [scene.image], colour_words(scene))


def _concept(rng, order: str | None = None) -> Sample:
    """In-context recognition of a personal instance from its memory, alone or among other concepts, with the
    memories before the image (``concept_first``) or after it (``image_first``); ``order`` None draws one."""
    instance = random_instance(rng, patterned=True)
    positive = rng.random() < 0.5
    test = _test_scene(rng, instance, positive)
    name = random_name(rng)
    images, scenes = [test.image], [test]
    others = []
    if rng.random() < 0.3:  # several concepts in context, in the ask format
        names = {name}
        for _ in range(int(rng.integers(1, 3))):
            other_name = random_name(rng)
            if other_name not in names:
                names.add(other_name)
                others.append((other_name, random_instance(rng, patterned=True)))
    concepts = [(name, instance)] + others
    shuffled = rng.permutation(len(concepts))
    intro: list = [prompts.CONCEPTS_HEADER] if others else []
    for i in shuffled:
        concept_name, concept = concepts[int(i)]
        intro += [prompts.CONCEPT_INTRO.format(name=concept_name), *_memory(rng, concept, images, scenes), ".\n"]
    if others and rng.random() < 0.35:
        question, answer = prompts.LOCATE.format(name=name), where(test, instance)
    else:
        question, answer = prompts.RECOGNIZE.format(name=name), "Yes" if positive else "No"
    if others:  # several concepts come as the engine's ask puts them: before the image
        order = "concept_first"
    elif order is None:
        order = ORDERS[int(rng.integers(len(ORDERS)))]
    parts = [*intro, ImageRef(0), question] if order == "concept_first" else [ImageRef(0), *intro, question]
    # with several concepts the pooled evidence is anyone's; a single concept is always asked yes or no
    return Sample("concept", parts, answer, images, answer_words(test, lambda other: other == instance), scenes,
                  asks_one_concept=not others)


def _choice(rng) -> Sample:
    """A two-option question about a concept in context, as the evaluation's A/B VQA asks it (the concepts before
    the image): its colour. The memory holds the answer; the image shows the instance, perhaps among others."""
    instance = random_instance(rng, patterned=True)
    test = _test_scene(rng, instance, positive=True)
    name = random_name(rng)
    images, scenes = [test.image], [test]
    memory = _memory(rng, instance, images, scenes)
    other = [c for c in COLOURS if c != instance.colour][int(rng.integers(len(COLOURS) - 1))]
    options = [instance.colour, other] if rng.random() < 0.5 else [other, instance.colour]
    parts = [prompts.CONCEPTS_HEADER, prompts.CONCEPT_INTRO.format(name=name), *memory, ".\n", ImageRef(0),
             prompts.choice(f"What colour is {name}?", *options)]
    return Sample("choice", parts, "AB"[options.index(instance.colour)], images,
                  answer_words(test, lambda other: other == instance), scenes)


def concept_question(rng, order: str) -> Sample:
    """A concept question in ``order`` (several concepts always come first, as in the engine's ask); the matching
    heads are fitted on these (see circuit.py)."""
    return _concept(rng, order)


_MAKERS = {"keywords": _keywords, "area": _area, "presence": _presence, "caption": _caption, "concept": _concept,
           "choice": _choice}


def _memory(rng, instance: Instance, images: list[Image.Image], scenes: list[Scene]) -> list:
    """A concept's memory made without Ego: tokens of fresh reference views (one, or up to ``MEMORY_VIEWS``, one
    run of rows as the engine lays out a memory of several views), or (rarely) its keywords as text."""
    if rng.random() < 0.1:
        return [", ".join(instance.keywords)]
    views = 1 if rng.random() < SINGLE_VIEW_SHARE else int(rng.integers(2, MEMORY_VIEWS + 1))
    on_object = rng.random() < 0.7  # else a random share of each whole view, background included
    memory = []
    for _ in range(views):
        reference = render_scene(rng, instance)
        images.append(reference.image)
        scenes.append(reference)
        if on_object:
            tokens = object_tokens(reference.subject.mask)
        else:
            count = token_coverage(reference.subject.mask).size
            share = rng.uniform(0.1, 1.0)
            tokens = tuple(sorted(int(i) for i in rng.choice(count, max(4, round(share * count)), replace=False)))
        memory.append(MemoryRef(len(images) - 1, tokens))
    return memory


def _test_scene(rng, instance: Instance, positive: bool) -> Scene:
    """A test image whose make-up says nothing of the answer: a positive shows ``instance``, a negative a look-alike
    or another patterned instance, either as the main subject or small among others. Negatives drawn as any random
    scene (its subject plain 40% of the time) taught the layers above the written heads to answer "yes" to a
    patterned subject alone, a bias of the image that no memory changes (``bench/image_bias.py``)."""
    while True:
        if positive:
            shown = instance
        elif rng.random() < LOOK_ALIKE_SHARE:
            shown = look_alike(instance, rng)
        else:
            shown = random_instance(rng, patterned=True)
        if rng.random() < 0.7:
            scene = render_scene(rng, shown)
        else:
            others = [random_instance(rng) for _ in range(int(rng.integers(0, 2)))]
            scene = render_scene(rng, None, distractors=[shown, *others])
        if scene.contains(instance) == positive:  # a random object may be the instance; a distractor may not fit
            return scene


# --- answers ------------------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """"A red mug with stripes, a blue ball and a green box.": the subject first, then left to right."""
    rest = sorted(scene.objects[1:], key=lambda o: o.box[0])
    phrases = [_article(o.instance.phrase) for o in [scene.subject] + rest]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def where(scene: Scene, instance: Instance) -> str:
    """Where the instance's centre is, in thirds of the image ("top left", "centre"), or that it is absent."""
    placed = next((o for o in scene.objects if o.instance == instance), None)
    if placed is None:
        return "It is not in this image."
    size = scene.image.width
    x, y = (placed.box[0] + placed.box[2]) / 2, (placed.box[1] + placed.box[3]) / 2
    row = ("top", "", "bottom")[min(2, int(3 * y / size))]
    column = ("left", "", "right")[min(2, int(3 * x / size))]
    return (" ".join(p for p in (row, column) if p) or "centre").capitalize() + "."


# The tokenizer's corpus holds these (train.toy_corpus), from when names were made of them
_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "no", "sa", "vi", "do", "re", "xa", "po", "li", "zu", "be", "fa", "go",
              "ni", "to", "ma")


_VOWELS, _CONSONANTS = "aeiou", "bcdfghjklmnprstvwxyz"


def random_name(rng) -> str:
    """A made-up name ("Kalo", "Annet", "Brixo"): names carry no meaning, so only the memory can say what they are.

    Any letters, mostly consonants and vowels in turn, sometimes one doubled: so that the pieces the tokenizer cuts
    a name into are met in training whatever the name (an evaluation's "Rex", "Nala"). A piece never met keeps its
    random embedding, noise that the layers above the written heads read: trained on names of syllables alone, the
    model gave one memory 8 false "yes" of 56 when it was "Rex" and 1 when it was "Kalo".
    """
    letters = [str(rng.choice(list(_VOWELS if rng.random() < 0.25 else _CONSONANTS)))]
    for _ in range(int(rng.integers(2, 7))):
        if rng.random() < 0.1 and letters[-2:] != [letters[-1]] * 2:  # "Anna", not "Annna"
            letters.append(letters[-1])
            continue
        vowel = letters[-1] in _VOWELS
        pool = _CONSONANTS if (vowel if rng.random() < 0.8 else not vowel) else _VOWELS
        letters.append(str(rng.choice(list(pool))))
    return "".join(letters).capitalize()


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase
