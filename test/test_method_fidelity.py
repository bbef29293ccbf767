# SPDX-License-Identifier: Apache-2.0
"""The method, checked by computation against the model's own code paths, for every supported family.

Tolerances: everything runs in float32 on the CPU. Scores are compared with atol 1e-6 (attention probabilities of
a few hundred keys; the reference goes through the eager kernel, ours through a re-derivation of the same rows),
logits of the two injection paths must be equal to 1e-5, stored vectors to 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from ego_ros.engine import Ego
from ego_ros.engine.scoring import tokens_to_keep
from conftest import TEST_MAX_PIXELS


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny_model_dir(request, tiny_model_dir):
    """Every test of this module runs on each family's tiny model (the conftest's ``ego`` follows this one)."""
    return tiny_model_dir if request.param == "qwen2_5_vl" else request.getfixturevalue("tiny_qwen3_vl_dir")


@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    """An independent load of the same checkpoint with eager attention, the reference for eq. 3."""
    return AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), attn_implementation="eager").eval()


def reference_scores(model, trace) -> torch.Tensor:
    """Eq. 3 from ``output_attentions=True`` on the trace's exact inputs, through the model's own image path."""
    with torch.no_grad():
        out = model(**trace.model_inputs, output_attentions=True, use_cache=False)
    rows, cols = trace.keyword_positions, trace.visual_positions
    per_layer = [out.attentions[layer][0][:, rows][:, :, cols] for layer in trace.layers]  # (H, R, N) each
    return torch.stack(per_layer).mean(dim=(0, 1, 2))


@pytest.mark.parametrize("layers", [None, [0], [3], [0, 2, 3]])
def test_scores_match_eager_attention_reference(tiny_model_dir, tmp_path, eager_model, make_view, layers):
    ego = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, layers=layers, max_image_pixels=TEST_MAX_PIXELS)
    info = ego.register("mug", [make_view(1), make_view(2, 168, 280)])
    for trace in info.traces:
        expected = reference_scores(eager_model, trace)
        assert trace.layers == (layers or [1, 2])
        assert trace.scores.shape == (trace.image.num_tokens,)
        torch.testing.assert_close(trace.scores, expected, atol=1e-6, rtol=0)
        k = trace.selected.numel()
        assert set(trace.selected.tolist()) == set(torch.topk(expected, k).indices.tolist())
        # The scores are a real signal, not a constant: a wrong row or column would not reproduce them.
        assert expected.std() > 1e-4


def test_keyword_rows_are_generated_words_only(ego, make_view):
    (trace,) = ego.register("mug", [make_view(3)]).traces
    ids = trace.model_inputs["input_ids"][0]
    prompt_end = int(trace.visual_positions[-1]) + 1
    assert trace.keyword_positions.numel() > 0
    for position in trace.keyword_positions.tolist():
        assert position > prompt_end  # in the teacher-forced response, after the image
        text = ego.tokenizer.decode([int(ids[position])])
        assert any(ch.isalnum() for ch in text), text
    # The visual positions are exactly the image tokens of the sequence.
    image_positions = torch.nonzero(ids == ego.model.config.image_token_id).flatten()
    assert torch.equal(image_positions, trace.visual_positions)


def test_stored_vectors_are_projector_outputs_at_stored_indices(ego, tiny_model_dir, eager_model, make_view):
    views = [make_view(4), make_view(5, 280, 168)]
    info = ego.register("rex", views)
    reopened = Ego.load(str(tiny_model_dir), memory_dir=ego.store.root, max_image_pixels=TEST_MAX_PIXELS)
    memory = reopened.store.get("rex")
    assert memory.num_views == 2
    # A DeepStack family's memory also holds each kept token's features of the DeepStack layers (L, T, D).
    layers = len(getattr(eager_model.config.vision_config, "deepstack_visual_indexes", []))
    assert memory.deepstack_layers == layers
    start = 0
    for i, (trace, view) in enumerate(zip(info.traces, memory.views)):
        grid = torch.tensor([trace.image.grid_thw])
        with torch.no_grad():
            output = eager_model.get_image_features(pixel_values=trace.model_inputs["pixel_values"],
                                                    image_grid_thw=grid)
        assert view.indices == sorted(view.indices) and len(set(view.indices)) == len(view.indices)
        assert view.indices == trace.selected.tolist()
        torch.testing.assert_close(memory.view_vectors(i), output.pooler_output[0][view.indices], atol=1e-6, rtol=0)
        rows = slice(start, start + len(view.indices))
        for layer in range(layers):
            expected = output.deepstack_features[layer][0][view.indices]
            torch.testing.assert_close(memory.deepstack[layer, rows], expected, atol=1e-6, rtol=0)
        start = rows.stop


@pytest.mark.parametrize("alpha", [0.0, 1.0, 5.0, 12.5, 50.0, 100.0])
def test_tokens_kept_follow_area(ego, make_view, alpha):
    (trace,) = ego.register("mug", [make_view(6)], area_percent=alpha).traces
    n, k, floor = trace.image.num_tokens, ego.config.max_tokens_per_view, ego.config.min_tokens_per_view
    expected = min(n, max(floor, min(k, math.ceil(alpha * n / 100))))
    assert trace.selected.numel() == expected
    assert trace.area_percent == alpha and trace.area_answer == ""  # a given area is not asked for


def test_unparsable_area_answer_uses_documented_fallback(tiny_model_dir, tmp_path, make_view):
    # The random tiny model answers the area question with word salad: alpha falls back to the configured value.
    # Salad may hold a digit by chance ("...o100br..."): the first of a few views whose answer has none is used.
    ego = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS,
                   fallback_area_percent=25.0, max_tokens_per_view=64)
    answers = []
    for seed in range(7, 12):
        (trace,) = ego.register(f"mug {seed}", [make_view(seed)]).traces
        answers.append(trace.area_answer)
        if not any(ch.isdigit() for ch in trace.area_answer):
            break
    assert not trace.area_parsed, answers
    assert trace.area_percent == 25.0
    assert trace.selected.numel() == math.ceil(0.25 * trace.image.num_tokens)


@pytest.mark.parametrize(
    "answer, value, parsed",
    [("35", 35.0, True), ("about 35%", 35.0, True), ("12.5 percent", 12.5, True), ("7,5", 7.5, True),
     ("150", 100.0, True), ("0", 0.0, True), ("most of it", 60.0, False), ("", 60.0, False)],
)
def test_parse_area(answer, value, parsed):
    from ego_ros.engine.ego import parse_area

    assert parse_area(answer, 60.0) == (value, parsed)


def test_tokens_to_keep_bounds():
    assert tokens_to_keep(64, 100.0, 391, 4) == 64  # K caps a large subject
    assert tokens_to_keep(64, 10.0, 391, 4) == 40  # ceil(39.1)
    assert tokens_to_keep(64, 0.1, 391, 4) == 4  # the floor
    assert tokens_to_keep(64, 50.0, 3, 4) == 3  # never more than the image has


def test_soft_token_hook_equals_explicit_inputs_embeds(ego, make_view):
    ego.register("mug", [make_view(8)])
    (image,) = ego.backend.encode([ego_image(ego, make_view(9))])
    memory = ego.store.get("mug").soft_tokens
    batch = ego.backend.build([["mug is ", memory, ".\n", image, "Where is mug?"]])
    with torch.no_grad(), ego.backend.injecting(batch):
        hooked = ego.model(**batch.model_inputs(), use_cache=False).logits

    # Explicit path: embeddings built by hand, positions from the model's own rope index, and for a DeepStack
    # family the DeepStack rows through the language model's own arguments.
    with torch.no_grad():
        embeds = ego.model.get_input_embeddings()(batch.input_ids).clone()
        rows = torch.isin(batch.input_ids, torch.tensor(ego.backend.injected_token_ids))
        embeds[rows] = batch.injected
        positions, _ = ego.model.model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
            attention_mask=batch.attention_mask)
        deepstack = {}
        if ego.backend.deepstack_layers:
            stack = torch.cat([memory.deepstack, image.deepstack], dim=1)  # the rows in prompt order
            deepstack = dict(visual_pos_masks=rows, deepstack_visual_embeds=list(stack))
        hidden = ego.model.model.language_model(inputs_embeds=embeds, position_ids=positions,
                                                attention_mask=batch.attention_mask, use_cache=False,
                                                **deepstack).last_hidden_state
        explicit = ego.model.lm_head(hidden)
    torch.testing.assert_close(hooked, explicit, atol=1e-5, rtol=0)
    # The memory rows really are the stored vectors, in order, right after the name.
    placeholder = ego.backend.placeholder_id
    assert int((batch.input_ids == placeholder).sum()) == memory.vectors.shape[0]


def test_injected_image_features_equal_the_models_pixel_path(ego, make_view):
    (image,) = ego.backend.encode([ego_image(ego, make_view(10))])
    batch = ego.backend.build([[image, "What is this?"]])
    with torch.no_grad():
        with ego.backend.injecting(batch):
            hooked = ego.model(**batch.model_inputs(), use_cache=False).logits
        native = ego.model(**batch.model_inputs(), pixel_values=batch.pixel_values, use_cache=False).logits
    torch.testing.assert_close(hooked, native, atol=1e-5, rtol=0)


def test_memory_changes_the_answer_logits(ego, make_view):
    ego.register("mug", [make_view(11)])
    (image,) = ego.backend.encode([ego_image(ego, make_view(12))])
    memory = ego.store.get("mug").vectors

    def last_logits(parts):
        batch = ego.backend.build([parts])
        with torch.no_grad(), ego.backend.injecting(batch):
            return ego.model(**batch.model_inputs(), use_cache=False).logits[0, -1]

    with_memory = last_logits(["mug is ", memory, ".\n", image, "Where is mug?"])
    other_memory = last_logits(["mug is ", torch.randn_like(memory), ".\n", image, "Where is mug?"])
    without = last_logits(["mug is .\n", image, "Where is mug?"])
    assert (with_memory - without).abs().max() > 1e-3
    assert (with_memory - other_memory).abs().max() > 1e-3


def test_batched_recognition_equals_one_prompt_at_a_time(tiny_model_dir, tmp_path, make_view):
    ego = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS,
                   recognition_batch_size=8)
    for i, name in enumerate(["mug", "Rex", "a much longer concept name"]):
        ego.register(name, [make_view(20 + i)])
    test_image = make_view(30)
    batched = ego.recognize(test_image)
    single = {name: ego.recognize(test_image, [name])[name] for name in batched}
    assert set(batched) == {"mug", "Rex", "a much longer concept name"}
    for name in batched:
        assert 0.0 <= batched[name] <= 1.0
        assert batched[name] == pytest.approx(single[name], abs=1e-5)


def test_generation_never_emits_the_placeholder(ego, make_view):
    ego.register("mug", [make_view(13)])
    placeholder = ego.backend.placeholder_id

    # Make the placeholder the model's favourite next token: only the suppression keeps it out of the answer.
    def favour_placeholder(module, args, logits):
        logits[..., placeholder] += 1000.0
        return logits

    ego.model.lm_head.register_forward_hook(favour_placeholder)
    (image,) = ego.backend.encode([ego_image(ego, make_view(14))])
    batch = ego.backend.build([["mug is ", ego.store.get("mug").vectors, ".", image, "Where is mug?"]])
    with ego.backend.injecting(batch):
        unsuppressed = ego.model.generate(**batch.model_inputs(), max_new_tokens=1, do_sample=False)
    assert unsuppressed[0, -1] == placeholder  # the bias works: without suppression the placeholder comes out
    (ids,) = ego._generate(batch, 6)
    assert len(ids) == 6 and placeholder not in ids
    assert ego.ask("Where is mug?", make_view(14), max_new_tokens=6).new_tokens == 6


def ego_image(ego, array):
    from ego_ros.engine.images import to_rgb

    return to_rgb(array, ego.config.max_image_pixels)
