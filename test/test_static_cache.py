# SPDX-License-Identifier: Apache-2.0
"""``static_cache``: decoding with transformers' fixed-size KV cache (compiled on a GPU) answers exactly as the
default dynamic cache does, soft tokens included: the injection hook leaves after the prefill and nothing is lost."""

from __future__ import annotations

import pytest
import torch

from ego_ros.engine import Ego
from ego_ros.engine.soft_tokens import injected_rows


@pytest.fixture
def two_engines(tiny_model_dir, tmp_path):
    dynamic = Ego.load(str(tiny_model_dir), device="cpu", memory_dir=tmp_path / "memory", layers=[1, 2])
    static = Ego.load(str(tiny_model_dir), device="cpu", memory_dir=tmp_path / "static", layers=[1, 2],
                      static_cache=True)
    return dynamic, static


def test_a_static_cache_gives_the_same_tokens_for_descriptions_and_answers(two_engines, make_view):
    dynamic, static = two_engines
    views = [make_view(1), make_view(2)]
    registered = dynamic.register("my mug", views)
    again = static.register("my mug", views)
    # Keywords and area come from one batched generation of two rows.
    assert [(t.keywords, t.area_answer) for t in again.traces] == \
        [(t.keywords, t.area_answer) for t in registered.traces]
    assert all(torch.equal(a.selected, b.selected) for a, b in zip(again.traces, registered.traces))
    for seed in (3, 4):  # the second answer reuses the first one's static cache
        expected = dynamic.ask("Where is my mug?", make_view(seed), concepts=["my mug"], max_new_tokens=12)
        answer = static.ask("Where is my mug?", make_view(seed), concepts=["my mug"], max_new_tokens=12)
        assert answer.text == expected.text and answer.new_tokens == expected.new_tokens == 12


def test_the_once_hook_places_the_vectors_in_the_first_forward_only(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir)).eval()
    embed = model.get_input_embeddings()
    placeholder = embed.weight.shape[0] - 1
    ids = torch.tensor([[5, placeholder, 6]])
    vectors = torch.ones(1, embed.weight.shape[1])
    with injected_rows(model, [placeholder], vectors, once=True):
        first = embed(ids)
        second = embed(ids)
    assert torch.equal(first[0, 1], vectors[0])
    assert torch.equal(second, embed(ids)) and not torch.equal(second[0, 1], vectors[0])
