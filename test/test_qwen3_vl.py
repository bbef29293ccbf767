# SPDX-License-Identifier: Apache-2.0
"""Qwen3-VL: DeepStack in concept memories, the family registry, and the engine end to end on the tiny model.

The family-independent fidelity checks (eq. 3 against eager attention, stored vectors against the model's image
features, injection against explicit paths) run on this family in test_method_fidelity.py. Here: what DeepStack
adds. Everything is float32 on the CPU; hidden states of two paths through the same computation agree to 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ego_ros.engine import Ego
from ego_ros.engine.backends import BACKENDS, EncodedImage, SoftTokens, UnsupportedModel, backend_for
from ego_ros.engine.images import to_rgb
from ego_ros.engine.loading import ModelLoadError
from ego_ros.engine.memory import ConceptMemory, MemoryStore
from conftest import TEST_MAX_PIXELS


def hidden_states(ego, batch, **native) -> list[torch.Tensor]:
    """The hidden states entering each decoder layer, then the final norm: the input embeddings, then each layer's
    output with that layer's DeepStack feature added. With ``native`` (pixel_values) through the model's own image
    path, else with the batch's vectors through the backend's injection."""
    language_model = ego.model.model.language_model
    seen = []

    def keep(module, args, kwargs):
        seen.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone())

    taps = [module.register_forward_pre_hook(keep, with_kwargs=True)
            for module in [*language_model.layers, language_model.norm]]
    try:
        with torch.no_grad():
            if native:
                ego.model(**batch.model_inputs(), **native, use_cache=False)
            else:
                with ego.backend.injecting(batch):
                    ego.model(**batch.model_inputs(), use_cache=False)
    finally:
        for tap in taps:
            tap.remove()
    return seen


def test_a_memory_of_all_tokens_reproduces_the_pixel_path_at_every_layer(qwen3_ego, make_view):
    """The decision, checked: a memory keeps, per token, the projector vector and the DeepStack features. Kept
    tokens put back at the image's own rows (same positions, same context) must give exactly the hidden states of
    every decoder layer that the model computes from the image's pixels; without their DeepStack features they
    must not (the features carry what the model saw)."""
    ego = qwen3_ego
    view = make_view(40)
    (trace,) = ego.register("mug", [view], area_percent=100.0).traces
    memory = ego.store.get("mug")
    n = trace.image.num_tokens
    assert memory.views[0].indices == list(range(n)) and memory.deepstack.shape == (3, n, ego.hidden_size)

    def with_rows(deepstack):
        remembered = EncodedImage(features=memory.vectors, grid_thw=trace.image.grid_thw,
                                  pixel_values=trace.image.pixel_values, size=trace.image.size, deepstack=deepstack)
        return ego.backend.build([[remembered, "What is this?"]])

    batch = with_rows(memory.deepstack)
    native = hidden_states(ego, batch, pixel_values=batch.pixel_values)
    remembered = hidden_states(ego, batch)
    assert len(native) == ego.num_layers + 1
    for layer, (a, b) in enumerate(zip(remembered, native)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"hidden states entering layer {layer}")

    # Without DeepStack: the input embeddings agree, every layer after the first DeepStack addition differs.
    bare = hidden_states(ego, with_rows(None))
    torch.testing.assert_close(bare[0], native[0], atol=1e-5, rtol=0)
    for layer in range(1, ego.num_layers + 1):
        assert (bare[layer] - native[layer]).abs().max() > 1e-3, layer


def test_soft_tokens_get_their_deepstack_features_in_the_first_layers(qwen3_ego, make_view):
    """At the soft-token rows, layer l's output (l < L) minus the same prompt's without DeepStack is exactly the
    memory's feature l plus what earlier additions changed downstream; at layer 0 exactly the feature itself."""
    ego = qwen3_ego
    ego.register("mug", [make_view(41)])
    memory = ego.store.get("mug")
    (image,) = ego.backend.encode([to_rgb(make_view(42), ego.config.max_image_pixels)])
    with_deepstack = ego.backend.build([["mug is ", memory.soft_tokens, ".\n", image, "Where is mug?"]])
    without = ego.backend.build([["mug is ", SoftTokens(memory.vectors), ".\n", image, "Where is mug?"]])
    rows = with_deepstack.input_ids[0] == ego.backend.placeholder_id
    a, b = hidden_states(ego, with_deepstack), hidden_states(ego, without)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)  # the same input embeddings
    # Entering decoder layer 1, the rows differ by exactly the memory's first DeepStack feature.
    torch.testing.assert_close(a[1][0, rows] - b[1][0, rows], memory.deepstack[0], atol=1e-5, rtol=0)
    assert memory.deepstack[0].abs().max() > 1e-2  # a feature that matters, not zeros


def test_deepstack_features_persist_and_appends_extend_them(tiny_qwen3_vl_dir, tmp_path, make_view):
    ego = Ego.load(str(tiny_qwen3_vl_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS)
    ego.register("Rex", [make_view(43)])
    first = ego.store.get("Rex")
    ego.register("Rex", [make_view(44, 168, 280)], append=True)
    memory = ego.store.get("Rex")
    assert memory.deepstack.shape == (3, memory.num_tokens, ego.hidden_size)
    torch.testing.assert_close(memory.deepstack[:, : first.num_tokens], first.deepstack, atol=0, rtol=0)
    reopened = Ego.load(str(tiny_qwen3_vl_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS)
    stored = reopened.store.get("Rex")
    assert reopened.store.skipped == []
    torch.testing.assert_close(stored.deepstack, memory.deepstack, atol=0, rtol=0)
    torch.testing.assert_close(stored.vectors, memory.vectors, atol=0, rtol=0)


def test_memories_of_the_other_family_are_refused_and_left_alone(tiny_model_dir, tiny_qwen3_vl_dir, tmp_path,
                                                                 make_view):
    qwen2_5 = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS)
    qwen2_5.register("mug", [make_view(45)])
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    qwen3 = Ego.load(str(tiny_qwen3_vl_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS)
    assert qwen3.concepts() == []
    ((path, reason),) = qwen3.store.skipped
    assert "made by another model" in reason and str(tiny_model_dir) in reason, reason
    with pytest.raises(ValueError, match="did not load"):  # its name is taken by the file: never overwritten
        qwen3.register("mug", [make_view(46)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files
    # And the other way round: a Qwen3-VL memory does not load into Qwen2.5-VL.
    qwen3.register("Rex", [make_view(47)])
    again = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS)
    assert [c.name for c in again.concepts()] == ["mug"]
    assert "made by another model" in again.store.skipped[0][1]


def test_a_memory_without_the_models_deepstack_layers_is_skipped(tmp_path):
    """Beyond the fingerprint: a store for a 3-layer DeepStack model refuses a record with none (or another count),
    and a memory's DeepStack rows must match its vectors."""
    vectors = torch.randn(4, 8)
    from ego_ros.engine.memory import ViewRecord

    view = ViewRecord(grid_thw=(1, 4, 4), indices=[0, 1, 2, 3], keywords=["mug"], area_percent=50.0,
                      area_parsed=True, num_visual_tokens=4, layers=[1])
    fields = dict(name="mug", vectors=vectors, views=[view], layers=[1], max_tokens_per_view=4, model="m",
                  fingerprint="f" * 16, created=1.0, updated=1.0)
    MemoryStore(tmp_path, "f" * 16, 8).put(ConceptMemory(**fields))  # made without DeepStack
    store = MemoryStore(tmp_path, "f" * 16, 8, deepstack_layers=3)
    assert len(store) == 0 and "0 DeepStack layers" in store.skipped[0][1] and "has 3" in store.skipped[0][1]
    with pytest.raises(ValueError, match="deepstack: expected"):
        ConceptMemory(**fields, deepstack=torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="DeepStack layers"):
        MemoryStore(tmp_path / "other", "f" * 16, 8, deepstack_layers=3).put(
            ConceptMemory(**fields, deepstack=torch.randn(2, 4, 8)))


def test_qwen2_5_prompts_refuse_deepstack_soft_tokens(ego):
    with pytest.raises(ValueError, match="another model family"):
        ego.backend.build([["mug is ", SoftTokens(torch.zeros(2, ego.hidden_size), torch.zeros(3, 2, 8)), "."]])


def test_register_ask_recognize_end_to_end(qwen3_ego, make_view):
    ego = qwen3_ego
    assert type(ego.backend).__name__ == "Qwen3VLBackend" and ego.backend.deepstack_layers == 3
    info = ego.register("mug", [make_view(50), make_view(51, 168, 280)])
    ego.register("Rex", [make_view(52)])
    assert info.num_views == 2 and 0 < info.num_tokens
    # 224x224 px: 32 px tokens, a 7x7 merged grid (14x14 patches of 16 px).
    assert info.traces[0].image.grid_thw == (1, 14, 14) and info.traces[0].image.num_tokens == 49
    answer = ego.ask("Where is mug?", make_view(53), max_new_tokens=5)
    assert answer.concepts == ["mug", "Rex"] and answer.new_tokens == 5 and answer.text
    clip = ego.ask("What did Rex just do?", [make_view(54), make_view(55)], times=[0.0, 0.5], max_new_tokens=4)
    assert clip.new_tokens == 4
    scores = ego.recognize(make_view(53))
    assert set(scores) == {"mug", "Rex"} and all(0.0 <= p <= 1.0 for p in scores.values())
    boxed = ego.recognize(make_view(53), ["mug"], boxes=True)
    assert boxed["mug"][0] == pytest.approx(scores["mug"], abs=1e-5) and len(boxed["mug"][1]) == 4
    ego.forget("mug")
    assert [c.name for c in ego.concepts()] == ["Rex"]


def test_tiny_builder_command_is_seeded(tiny_qwen3_vl_dir, tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "ego_ros.testing.tiny_model", "--arch", "qwen3_vl",
                    "--max-pixels", str(112 * 112 * 4), str(out)], check=True, capture_output=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["text_config"]["num_hidden_layers"] == 4
    assert config["text_config"]["hidden_size"] == 64 and len(config["vision_config"]["deepstack_visual_indexes"]) == 3
    assert (out / "model.safetensors").read_bytes() == (tiny_qwen3_vl_dir / "model.safetensors").read_bytes()


# --- family registry ---------------------------------------------------------------------------------------------


def tiny_llava(folder, tokenizer_from):
    """A real LlavaForConditionalGeneration checkpoint (tiny CLIP + Llama), a family ego_ros has no backend for."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, patch_size=14),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer) + 8),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_unsupported_family_gets_one_clear_error_before_any_weight_is_read(tiny_model_dir, tmp_path):
    folder = tiny_llava(tmp_path / "llava", tiny_model_dir)
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(str(folder)).config.model_type == "llava"  # a loadable VLM
    # Garbage weights: had the loader gone past the family check, it would fail on them with another error.
    (folder / "model.safetensors").write_bytes(b"not weights")
    memory = tmp_path / "memory"
    with pytest.raises(ModelLoadError) as error:
        Ego.load(str(folder), memory_dir=memory)
    message = str(error.value)
    assert "'llava' is not supported" in message and str(folder) in message
    assert all(family in message for family in BACKENDS), message
    assert not memory.exists()  # nothing was opened or created


def test_backend_for_lists_the_families(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    folder = tiny_llava(tmp_path / "llava", tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    with pytest.raises(UnsupportedModel, match="qwen2_5_vl, qwen3_vl"):
        backend_for(model, None, None, placeholder="<|concept|>", max_pixels=TEST_MAX_PIXELS)
    assert list(BACKENDS)[:2] == ["qwen2_5_vl", "qwen3_vl"]


def test_the_evaluations_ego_introduction_carries_the_memorys_deepstack(qwen3_ego, make_view):
    from ego_ros.evaluation.methods import introduction

    info = qwen3_ego.register("mug", [make_view(56), make_view(57)])
    memory = qwen3_ego.store.get("mug")
    ego_intro, full = introduction("ego", info, views=2)[0], introduction("full", info, views=1)[0]
    assert isinstance(ego_intro, SoftTokens) and isinstance(full, SoftTokens)
    torch.testing.assert_close(ego_intro.vectors, memory.vectors, atol=0, rtol=0)
    torch.testing.assert_close(ego_intro.deepstack, memory.deepstack, atol=0, rtol=0)
    torch.testing.assert_close(full.deepstack, info.traces[0].image.deepstack, atol=0, rtol=0)
