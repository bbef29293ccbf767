# SPDX-License-Identifier: Apache-2.0
"""The concept prefix cache and one image pass for recognition give the answers of the whole prompt.

Each path is compared with the prompt run whole (greedy tokens identical, logits within float tolerance), on the
tiny random model and on the trained toy model, and the cache is shown to be dropped whenever the concepts in
context change: registered, appended, forgotten (also on another thread, also mid-question), edited in place.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from conftest import TEST_MAX_PIXELS
from ego_ros.engine import Ego, prompts
from ego_ros.engine.images import to_rgb
from ego_ros.engine.prefix_cache import PrefixCache
from ego_ros.engine.soft_tokens import injected_rows

QUESTION = "What is Rex doing?"


def question_paths(ego: Ego, image, *, new_tokens: int = 6, concepts=None):
    """(tokens, per-step logits) of ask's prompt generated whole, then from the concept prefix cache."""
    (encoded,) = ego.backend.encode([to_rgb(image, ego.config.max_image_pixels)])
    memories = ego.store.snapshot(concepts)
    names = list(memories)
    prompt, concept_parts = ego._question_prompt(QUESTION, [encoded], None, names, memories)
    batch = ego.backend.build([prompt])
    whole_logits, cached_logits = [], []
    (whole,) = ego._generate(batch, new_tokens, logits=whole_logits)
    prefix = ego._concept_prefix(batch, concept_parts, [memories[n] for n in names])
    assert prefix is not None
    (cached,) = ego._generate(batch, new_tokens, prefix=prefix, logits=cached_logits)
    return (whole, torch.stack(whole_logits)), (cached, torch.stack(cached_logits))


def assert_same_answer(ego: Ego, image, **kwargs):
    (whole, whole_logits), (cached, cached_logits) = question_paths(ego, image, **kwargs)
    assert cached == whole
    torch.testing.assert_close(cached_logits, whole_logits, atol=1e-4, rtol=1e-4)
    return whole


def ask_both_ways(ego: Ego, image, question=QUESTION, **kwargs):
    """The answer of ask with the prefix cache off, then on."""
    ego.config.prefix_cache = False
    try:
        whole = ego.ask(question, image, max_new_tokens=8, **kwargs)
    finally:
        ego.config.prefix_cache = True
    return whole, ego.ask(question, image, max_new_tokens=8, **kwargs)


@pytest.mark.parametrize("count", [1, 3])
def test_a_question_from_the_cached_prefix_equals_the_whole_prompt(ego, make_view, count):
    for i, name in enumerate(["Rex", "Anna", "a much longer concept name"][:count]):
        ego.register(name, [make_view(40 + i)])
    assert_same_answer(ego, make_view(50))
    misses = ego.prefixes.misses
    assert_same_answer(ego, make_view(51))  # another image, the same concepts: from the cache
    assert ego.prefixes.misses == misses and ego.prefixes.hits >= 1
    whole, cached = ask_both_ways(ego, make_view(52))
    assert cached.text == whole.text and cached.new_tokens == whole.new_tokens


def test_a_clip_question_from_the_cached_prefix_equals_the_whole_prompt(ego, make_view):
    ego.register("Rex", [make_view(40)])
    clip = [make_view(53), make_view(54), make_view(55)]
    whole, cached = ask_both_ways(ego, clip, "What did Rex just do?", times=[10.0, 10.5, 11.0])
    assert ego.prefixes.misses == 1 and cached.text == whole.text and cached.new_tokens == whole.new_tokens
    whole, cached = ask_both_ways(ego, clip, "And now?", times=[10.0, 10.5, 11.0])
    assert ego.prefixes.hits == 1 and cached.text == whole.text


def test_the_suffix_gets_the_models_own_positions_of_the_whole_prompt(ego, make_view):
    ego.register("Rex", [make_view(40)])
    (encoded,) = ego.backend.encode([to_rgb(make_view(50), TEST_MAX_PIXELS)])
    memories = ego.store.snapshot()
    prompt, concept_parts = ego._question_prompt(QUESTION, [encoded], None, ["Rex"], memories)
    batch = ego.backend.build([prompt])
    length, _, cache = ego._concept_prefix(batch, concept_parts, [memories["Rex"]])
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"])

    handle = ego.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ego._generate(batch, 2, prefix=(length, memories["Rex"].num_tokens, cache))
    finally:
        handle.remove()
    expected = ego.backend.rope_positions(batch)[:, :, length:]  # (3, 1, S - P): the model's M-RoPE index
    assert cache.get_seq_length() == length + expected.shape[-1] + 1  # the fork grew, prefix + suffix + 1 step
    assert torch.equal(seen[0][-3:], expected)  # the prefill of the suffix (generate prepends 1-D text positions)
    # Not a trivial count: after the image the positions run behind the token index.
    assert expected[0, 0, -1] < batch.input_ids.shape[1] - 1


def test_the_cached_prefix_is_never_written(ego, make_view):
    ego.register("Rex", [make_view(40)])
    ego.ask(QUESTION, make_view(50), max_new_tokens=4)
    entry = ego.prefixes._entry
    before = [(layer.keys.clone(), layer.values.clone()) for layer in entry.cache.layers]
    ego.ask(QUESTION, make_view(51), max_new_tokens=4)
    ego.ask("Where is Rex?", make_view(52), max_new_tokens=4, on_text=lambda text: None)
    assert ego.prefixes._entry is entry
    for layer, (keys, values) in zip(entry.cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_register_append_forget_and_an_edit_in_place_each_miss_the_cache(ego, make_view):
    ego.register("Rex", [make_view(40)])
    assert_same_answer(ego, make_view(50))
    hits, misses = ego.prefixes.hits, ego.prefixes.misses
    assert_same_answer(ego, make_view(50))
    assert (ego.prefixes.hits, ego.prefixes.misses) == (hits + 1, misses)

    changes = [
        lambda: ego.register("Anna", [make_view(41)]),  # a new concept in context
        lambda: ego.register("Rex", [make_view(42)], append=True),  # a new memory for the same name
        lambda: ego.forget("Anna"),
        lambda: ego.store.get("Rex").vectors.mul_(1.5),  # a memory changed in place (nobody should, but)
    ]
    for change in changes:
        change()
        misses = ego.prefixes.misses
        assert_same_answer(ego, make_view(50))
        assert ego.prefixes.misses == misses + 1  # the new prefix was prefilled, not taken from the cache


def test_a_registration_on_another_thread_between_two_questions_is_seen(ego, make_view):
    ego.register("Rex", [make_view(40)])
    first = ego.ask(QUESTION, make_view(50), max_new_tokens=4)
    thread = threading.Thread(target=lambda: ego.register("Rex", [make_view(43)], append=True))
    thread.start()
    thread.join()
    memory = ego.store.get("Rex")
    assert memory.num_views == 2
    whole, cached = ask_both_ways(ego, make_view(50))
    assert cached.text == whole.text and first.concepts == cached.concepts == ["Rex"]
    assert ego.prefixes._entry.memories == (memory,)  # the cached prefix is the new memory's

    # The store changed behind the engine's back (another process's concept, written and reloaded).
    replaced = dataclasses.replace(memory, vectors=torch.randn_like(memory.vectors))
    thread = threading.Thread(target=lambda: ego.store.put(replaced))
    thread.start()
    thread.join()
    misses = ego.prefixes.misses
    assert_same_answer(ego, make_view(50))
    assert ego.prefixes.misses == misses + 1


def test_a_concept_forgotten_mid_question_does_not_change_that_answer_nor_leak_into_the_next(ego, make_view):
    ego.register("Rex", [make_view(40)])
    ego.register("Anna", [make_view(41)])
    ego.ask(QUESTION, make_view(50), max_new_tokens=2)  # both in the cache
    ego.config.prefix_cache = False
    expected_with_anna = ego.ask(QUESTION, make_view(51), max_new_tokens=8)
    ego.config.prefix_cache = True

    def forget_once(text, tokens):
        if tokens == 1:  # the executor thread answers ForgetConcept while the worker generates
            thread = threading.Thread(target=ego.forget, args=("Anna",))
            thread.start()
            thread.join()

    during = ego.ask(QUESTION, make_view(51), max_new_tokens=8, on_new_text=forget_once)
    assert "Anna" not in ego.store
    assert during.concepts == ["Rex", "Anna"] and during.text == expected_with_anna.text
    whole, cached = ask_both_ways(ego, make_view(51))
    assert cached.concepts == whole.concepts == ["Rex"] and cached.text == whole.text


def test_streaming_uses_the_cache_and_streams_the_same_answer(ego, make_view):
    ego.register("Rex", [make_view(40)])
    ego.ask(QUESTION, make_view(50), max_new_tokens=2)
    hits = ego.prefixes.hits
    pieces, texts = [], []
    answer = ego.ask(QUESTION, make_view(51), max_new_tokens=10, on_text=texts.append,
                     on_new_text=lambda text, tokens: pieces.append(text))
    assert ego.prefixes.hits == hits + 1
    assert "".join(pieces).strip() == texts[-1].strip() == answer.text
    ego.config.prefix_cache = False
    assert ego.ask(QUESTION, make_view(51), max_new_tokens=10).text == answer.text


def test_no_concepts_or_the_cache_off_prefill_the_whole_prompt(ego, make_view):
    ego.ask(QUESTION, make_view(50), max_new_tokens=2)
    assert len(ego.prefixes) == 0 and ego.prefixes.misses == 0
    ego.register("Rex", [make_view(40)])
    ego.config.prefix_cache = False
    ego.ask(QUESTION, make_view(50), max_new_tokens=2)
    assert len(ego.prefixes) == 0


def test_prefix_cache_key_is_the_model_and_memory_objects_not_their_names():
    cache = PrefixCache()
    model, other_model = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    a = torch.zeros(2, 4)
    memory = type("Memory", (), {"vectors": a})()
    twin = type("Memory", (), {"vectors": a.clone()})()
    cache.put(model, [1, 2, 3], [memory], cache=_empty_cache())
    assert cache.get(model, [1, 2, 3], [memory]) is not None
    assert cache.get(model, [1, 2, 3], [twin]) is None  # equal content, other object: a concept re-read or re-made
    assert cache.get(other_model, [1, 2, 3], [memory]) is None
    assert cache.get(model, [1, 2], [memory]) is None
    assert cache.get(model, [1, 2, 3], []) is None
    a.add_(1.0)  # edited in place
    assert cache.get(model, [1, 2, 3], [memory]) is None


def _empty_cache():
    from transformers import DynamicCache

    return DynamicCache()


# --- recognition: one image pass ---------------------------------------------------------------------------------


def image_first_whole(ego: Ego, image, introductions: dict[str, list]) -> dict[str, float]:
    """P(yes) of each image-first prompt run whole, one at a time: the reference for the one-pass path."""
    yes, no = sorted(ego._yes_ids), sorted(ego._no_ids)
    result = {}
    for name, intro in introductions.items():
        parts = [image] + ([prompts.CONCEPT_INTRO.format(name=name), *intro, ".\n"] if intro else [])
        batch = ego.backend.build([parts + [prompts.RECOGNIZE.format(name=name)]])
        with torch.no_grad(), injected_rows(ego.model, ego.backend.injected_token_ids, batch.injected):
            logits = ego.model(**batch.model_inputs(), use_cache=False).logits[:, -1]
        answer = torch.cat([logits[:, yes], logits[:, no]], dim=-1).float().softmax(dim=-1)
        result[name] = answer[0, : len(yes)].sum().item()
    return result


def test_one_image_pass_equals_each_image_first_prompt_run_whole(tiny_model_dir, tmp_path, make_view):
    ego = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS,
                   recognition_batch_size=2)  # several chunks, rows of different lengths (padding)
    for i, name in enumerate(["mug", "Rex", "a much longer concept name"]):
        ego.register(name, [make_view(20 + i), make_view(30 + i)][: 1 + i % 2])
    (image,) = ego.backend.encode([to_rgb(make_view(33), TEST_MAX_PIXELS)])
    (reference,) = ego.backend.encode([to_rgb(make_view(20), TEST_MAX_PIXELS)])
    introductions = {name: [ego.store.get(name).vectors] for name in ego.store.names()}
    introductions["nobody"] = []  # no introduction at all
    introductions["by words"] = ["a red mug with a star"]
    introductions["by picture"] = [reference]  # an image after the frame: M-RoPE positions continue past both
    one_pass = ego.yes_probabilities(image, introductions, order="image_first")
    assert one_pass == pytest.approx(image_first_whole(ego, image, introductions), abs=1e-5)
    concept_first = ego.yes_probabilities(image, introductions, order="concept_first")
    assert concept_first["nobody"] == pytest.approx(one_pass["nobody"], abs=1e-5)  # the same prompt
    assert concept_first["mug"] != pytest.approx(one_pass["mug"], abs=1e-5)  # another order, another prompt

    ego.config.recognition_order = "image_first"
    assert ego.recognize(make_view(33)) == pytest.approx({n: one_pass[n] for n in ego.store.names()}, abs=1e-5)
    with pytest.raises(ValueError, match="recognition order"):
        ego.yes_probabilities(image, introductions, order="sideways")


def test_recognition_order_is_validated():
    from ego_ros.engine.config import EgoConfig

    with pytest.raises(ValueError, match="recognition_order"):
        EgoConfig(recognition_order="image-first")


# --- the trained toy model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_ego(toy_model_dir, tmp_path_factory):
    from ego_ros import toy as toy_world

    ego = Ego.load(str(toy_model_dir), memory_dir=tmp_path_factory.mktemp("toy-memory"))
    for i, name in enumerate(["Rex", "Anna", "my mug"]):
        ego.register(name, [toy_world.scene(900 + i).image])
    return ego


def test_toy_model_questions_from_the_cache_equal_the_whole_prompt(toy_ego):
    from ego_ros import toy as toy_world

    assert_same_answer(toy_ego, toy_world.scene(910).image, new_tokens=12, concepts=["Rex"])
    assert_same_answer(toy_ego, toy_world.scene(911).image, new_tokens=12)
    toy_ego.register("Anna", [toy_world.scene(912).image], append=True)
    assert_same_answer(toy_ego, toy_world.scene(911).image, new_tokens=12)


def test_toy_model_one_image_pass_equals_the_image_first_prompts(toy_ego):
    from ego_ros import toy as toy_world

    (image,) = toy_ego.backend.encode([to_rgb(toy_world.scene(913).image, toy_ego.config.max_image_pixels)])
    introductions = {name: [toy_ego.store.get(name).vectors] for name in toy_ego.store.names()}
    one_pass = toy_ego.yes_probabilities(image, introductions, order="image_first")
    assert one_pass == pytest.approx(image_first_whole(toy_ego, image, introductions), abs=1e-5)
