# SPDX-License-Identifier: Apache-2.0
"""The method on a model that has learned to see: figures on the trained toy model, held as orderings with margins.

Sizes are smaller than bench/quality.py's (which prints the tables of docs/toy-world.md) to keep the suite quick; each
threshold sits below what the benchmark and these sizes measured, and says what it guards. The recognition test
uses concepts and test images of seeds the toy model's training never drew (test_toy_world checks the streams).
"""

from __future__ import annotations

import numpy as np
import pytest

from ego_ros.engine import Ego
from ego_ros.engine.config import default_layers
from ego_ros.evaluation import toy
from ego_ros import toy as toy_world


@pytest.fixture(scope="module")
def toy_ego(toy_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    return Ego.load(str(toy_model_dir), memory_dir=work / "memory", calibration_dir=work / "calibration")


def test_the_toy_model_names_the_colour_of_the_main_subject_of_scenes_it_never_saw(toy_ego):
    scenes = [toy_world.scene(10_000 + i) for i in range(24)]
    said = []
    for scene in scenes:
        info = toy_ego.register("probe", [scene.image], area_percent=10)
        toy_ego.forget("probe")
        said.append(info.traces[0].keywords[:1] == [scene.subject.instance.colour])
    # Eight colours: chance is 1 in 8. The model measured 24 of 24 here (an earlier one 0.83; 0.46 when its layers
    # above the written heads had trained 450 steps instead of 1,350: describing pays for the heads until they
    # relearn it).
    assert np.mean(said) >= 0.6


def test_keyword_attention_finds_the_subject_and_calibration_finds_the_best_layers(toy_ego):
    calibration = toy_ego.calibrate(toy_world.calibration_samples(40, seed=1), source="toy world", save=True)
    assert toy_ego.layers == calibration.layers
    assert calibration.overlap >= calibration.default_overlap
    layer_sets = {"default": list(default_layers(toy_ego.num_layers)), "calibrated": list(calibration.layers)}
    shares = toy.localisation(toy_ego, toy.localisation_samples(40, seed=2), layer_sets)
    # Held-out scenes: the calibrated layers keep at least as many subject tokens as the middle half, less a
    # sampling margin, and both keep over 4x what a random choice of as many tokens would.
    assert shares["calibrated"] >= shares["default"] - 0.03
    assert shares["default"] >= 4 * shares["random"]
    assert shares["calibrated"] >= 4 * shares["random"]


def test_the_concept_in_the_image_stays_in_context_among_many(toy_ego):
    data = toy.recognition_set(20, seed=4, views=1, positives=1, look_alikes=0)
    toy.introduce(toy_ego, data)
    limit = toy_ego.config.max_concepts_in_context
    rate = toy.filter_recall(toy_ego, data)
    for name in data.concepts:
        toy_ego.forget(name)
    assert rate >= limit / len(data.concepts) + 0.25  # chance: 8 of 20 in context


def test_a_concepts_memory_boxes_it_in_frames_it_never_saw(toy_ego):
    data = toy.recognition_set(8, seed=5, views=1, positives=6, look_alikes=0)
    toy.introduce(toy_ego, data)
    hits = toy.box_hits(toy_ego, data)
    for name in data.concepts:
        toy_ego.forget(name)
    # bench/quality.py measured 100% / 58-61% (main subject / small among others) with 12 concepts; among others, the
    # concept's own memory must box it more often than another concept's memory does (measured 11-17%).
    assert hits["main subject"] >= 0.6
    assert hits["among others"] > hits["among others, another memory"]


def test_a_box_says_which_object_of_a_cluttered_view_is_meant(toy_ego):
    table = toy.region_registration(toy_ego, 8, seed=8)
    whole, boxed = table["whole view"], table["inside the box"]
    # bench/quality.py (30 instances): 7% of the kept tokens on the instance without a box (the keywords describe
    # the main subject, another object), 54% with it; its memory then boxes the instance among others 77% of the
    # time against 8%.
    assert boxed["on the instance"] >= whole["on the instance"] + 0.25
    assert boxed["among others"] > whole["among others"]


F1_FLOOR = {"image_first": 0.55, "concept_first": 0.35}
F1_MARGIN = {"image_first": 0.35, "concept_first": 0.15}  # over the name alone
LOOK_ALIKES_REJECTED = {"image_first": 0.85, "concept_first": 0.6}


def test_a_memory_in_context_recognises_the_instance_better_than_its_name_alone(toy_ego):
    """The paper's protocol on 6 concepts (24 positives, 12 look-alike images): Ego's memory must beat the name
    alone by a margin in both orders, and reject look-alikes. A change that stopped the memory from reaching the
    model (its injection, the written heads) falls to the name alone's figures and fails. Measured on these seeds,
    with the layers this module's calibration keeps (layer 4): F1 0.737 image first (precision 1.00, recall 0.58),
    0.432 concept first (main subjects found 58%, small instances none), 0.199 for the name alone; look-alikes
    rejected 100% in both orders (on the middle half, when this test runs alone: 0.667 and 0.476). Fewer than over
    the protocol's twelve seeds (75.7 from one view, image first): 24 positives, and what this model gets wrong here
    is misses, not mistakes: nearly all small instances among others (found 17% image first, main subjects 100%)."""
    data = toy.recognition_set(6, seed=11, views=1, positives=4, look_alikes=2)
    introduced = toy.introduce(toy_ego, data)
    runs = [("ego", 1), ("none", 1)]
    default = toy_ego.config.recognition_order
    try:
        for order in ("image_first", "concept_first"):
            toy_ego.config.recognition_order = order
            result = toy.recognition(toy_ego, data, introduced, runs)
            ego, name_alone = result[("ego", 1)], result[("none", 1)]
            print(f"{order}: Ego F1 {ego.score.f1:.3f} (name alone {name_alone.score.f1:.3f}), found as main subject "
                  f"{ego.found['main subject']:.2f}, small among others {ego.found['small among others']:.2f}, "
                  f"look-alikes rejected {ego.rejected['look-alikes']:.2f}, other objects "
                  f"{ego.rejected['other objects']:.2f}")
            assert ego.score.f1 >= name_alone.score.f1 + F1_MARGIN[order], order
            assert ego.score.f1 >= F1_FLOOR[order], order
            assert ego.rejected["look-alikes"] >= LOOK_ALIKES_REJECTED[order], order
    finally:
        toy_ego.config.recognition_order = default
        for name in data.concepts:
            toy_ego.forget(name)


# Names a user might give: the protocol's, names with a piece that training names rarely have ("or": one in a hundred)
# and one with a letter they never have ("Q")
ALIASES = ("Rex", "Zora", "Dora", "Cora", "Quinn", "Kalo", "Ivy", "Oscar")


def test_the_answer_does_not_depend_on_what_the_concept_is_called(toy_ego):
    """A name says nothing of what a concept looks like: the same memory asked about under other names must get the
    same answers. No stage trains names (they appear in the last stage, which trains layers 3-5, not embeddings), but
    a name's pieces may be pieces of words the describing stage taught ("or" begins "orange" where an answer starts
    with it), which the layers above the written heads may read as evidence: one trained draw said "yes" to 0.91-0.93
    of the images without the concept under "Zora", "Dora" and "Cora", to 0.03-0.04 under nine other names, three
    quarters of its false "yes" in the protocol, which names one concept in ten "Zora" (docs/toy-world.md). Each of
    4 concepts asked about 16 images under each name. Measured on this model: no name changed an answer of the 64;
    "yes" to 0.38 of the questions whose image shows the concept (small instances are missed) and 0.02 of the
    rest."""
    data = toy.recognition_set(4, seed=11, views=1, positives=2, look_alikes=2)
    try:
        said, present = toy.answers_under_names(toy_ego, data, toy.introduce(toy_ego, data), list(ALIASES))
    finally:
        for name in data.concepts:
            toy_ego.forget(name)
    most_names = said.mean(0) >= 0.5
    unlike_most = (said != most_names).mean(axis=(1, 2))  # per name: the share of questions it changes
    print(dict(zip(ALIASES, unlike_most.round(3))), f"said yes: present {said[:, present].mean():.2f}, "
          f"absent {said[:, ~present].mean():.2f}")
    assert said[:, present].mean() >= said[:, ~present].mean() + 0.2  # the memory, not the name, decides
    assert unlike_most.max() <= 0.1, dict(zip(ALIASES, unlike_most))
