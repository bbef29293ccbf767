# SPDX-License-Identifier: Apache-2.0
"""The evaluation's pieces: the paper's recognition metric by hand, and the ways of giving a concept to the model."""

from __future__ import annotations

import pytest
import torch

from ego_ros.evaluation.methods import METHODS, introduction
from ego_ros.evaluation.metrics import recognition_score


def test_precision_and_recall_are_averaged_over_concepts_and_f1_comes_from_the_averages():
    decisions = (
        [("a", True, True)] * 3 + [("a", True, False)] * 1 + [("a", False, True)] * 1 + [("a", False, False)] * 5
        + [("b", True, True)] * 1 + [("b", False, True)] * 3 + [("b", False, False)] * 6
    )
    score = recognition_score(decisions)
    assert score.per_concept["a"].precision == 3 / 4 and score.per_concept["a"].recall == 3 / 4
    assert score.per_concept["b"].precision == 1.0 and score.per_concept["b"].recall == 1 / 4
    assert score.precision == pytest.approx((3 / 4 + 1) / 2) and score.recall == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert score.f1 == pytest.approx(2 * 0.875 * 0.5 / (0.875 + 0.5))
    assert score.accuracy == pytest.approx(15 / 20)


def test_a_concept_never_said_present_has_precision_zero():
    score = recognition_score([("a", False, True), ("a", False, False)])
    assert (score.precision, score.recall, score.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no decisions"):
        recognition_score([])


def test_each_method_introduces_the_concept_from_the_same_register(ego, make_view):
    info = ego.register("mug", [make_view(1), make_view(2)])
    first, second = info.traces
    ego_memory = introduction("ego", info, views=2)[0]
    assert torch.equal(ego_memory, ego.store.get("mug").vectors.to(ego_memory.dtype))
    assert torch.equal(introduction("ego", info, views=1)[0], first.image.features[first.selected])
    assert torch.equal(introduction("full", info, views=1)[0], first.image.features)
    assert introduction("full", info, views=2)[0].shape[0] == first.image.num_tokens + second.image.num_tokens
    picked = introduction("random", info, views=1, seed=3)[0]
    assert picked.shape[0] == round(0.2 * first.image.num_tokens)
    assert torch.equal(picked, introduction("random", info, views=1, seed=3)[0])  # seeded
    assert not torch.equal(picked, introduction("random", info, views=1, seed=4)[0])
    assert introduction("none", info, views=1) == []
    words = introduction("keywords", info, views=1)
    assert words == ([", ".join(first.keywords)] if first.keywords else [])
    with pytest.raises(ValueError, match="unknown method"):
        introduction("oracle", info, views=1)
    with pytest.raises(ValueError, match="3 asked for"):
        introduction("ego", info, views=3)
    assert set(METHODS) == {"ego", "none", "keywords", "full", "random"}


def test_recognize_is_the_recognition_question_with_the_stored_memory(ego, make_view):
    ego.register("mug", [make_view(1)])
    from ego_ros.engine.images import to_rgb

    (encoded,) = ego.backend.encode([to_rgb(make_view(5), ego.config.max_image_pixels)])
    by_memory = ego.yes_probabilities(encoded, {"mug": [ego.store.get("mug").vectors]})
    assert ego.recognize(make_view(5)) == pytest.approx(by_memory, abs=1e-6)
    alone = ego.yes_probabilities(encoded, {"mug": []})
    assert alone["mug"] != pytest.approx(by_memory["mug"], abs=1e-6)  # no introduction is another prompt
