# SPDX-License-Identifier: Apache-2.0
"""The evaluation's tasks: how each query is put to the model, and how its answer is scored.

    recognition  "Is NAME in this image?" for every test image and every concept; P(yes) > threshold is a yes
                 (the engine's recognition prompt, ``Ego.yes_probabilities``); scored by ``metrics.recognition_score``
    vqa          an A/B question with the concept introduced; the chosen option is the first letter A or B the answer
                 starts with (or the one option whose text it contains); accuracy
    captioning   "Describe this image in one short sentence." with the concepts it shows introduced; recall: the
                 share of captions that name every one of them (whole words, any case)
    multi        recognition of each concept an image shows, with its own introduction; the image counts only if
                 every one of them gets a yes

The "none" method gives the name alone: in recognition no introduction at all (the question names the concept), in
A/B VQA the question alone (it names the concept), in captioning the name in the list of concepts, with nothing
after it.

Open-ended answers (captions) have no judge model here: a keyword match decides. A judge is any function
``judge(answer, names) -> bool`` (True when the answer names them all, correctly); pass it to the runner.
"""

from __future__ import annotations

import re
from typing import Callable

from ego_ros.engine import prompts

TASKS = {
    "recognition": "recognition (yes/no): precision and recall per concept, averaged; F1 from the averages",
    "vqa": "A/B multiple-choice VQA: accuracy of the chosen option",
    "captioning": "captioning recall: share of captions naming every concept shown",
    "multi": "multi-concept recognition: an image counts only if every concept in it is recognised",
}
VIDEO_NOTE = ("video QA: none of the supported layouts (myvlm, yollava, thisismy, toy) carries video, so it is "
              "not evaluated")
Judge = Callable[[str, list], bool]


def context(introduced: dict[str, list]) -> list:
    """The concepts in context, as ``Ego.ask`` puts them: "NAME is <introduction>." each; a concept without an
    introduction (the "none" method) is given by its name alone."""
    parts: list = [prompts.CONCEPTS_HEADER]
    for name, intro in introduced.items():
        parts += [prompts.CONCEPT_INTRO.format(name=name), *intro, ".\n"] if intro else [f"{name}.\n"]
    return parts


def vqa_prompt(question: str, options: dict[str, str]) -> str:
    return prompts.choice(question, options["A"], options["B"])


# "B", "(a)", "A. red", "Answer: B" -- but not the article in "A red mug"
_LETTER = re.compile(r"^\W*(?:(?:the\s+)?answer(?:\s+is)?\s*:?\s*)?\(?([AB])(?:[).:,]|\s*$)", re.IGNORECASE)


def chosen_option(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer chose: the letter it starts with ("B", "(a)", "A. red", "Answer: B"; not the article
    of "A red mug"), else the only option whose text it contains; None when it chose neither or both."""
    match = _LETTER.match(answer)
    if match:
        return match.group(1).upper()
    said = [letter for letter, text in options.items() if text and _contains(answer, text)]
    return said[0] if len(said) == 1 else None


def keyword_judge(answer: str, names) -> bool:
    """True when ``answer`` names every one of ``names`` (whole words, case-insensitive): the default judge."""
    return all(_contains(answer, name) for name in names)


def _contains(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", text, re.IGNORECASE) is not None
