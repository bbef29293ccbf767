# SPDX-License-Identifier: Apache-2.0
"""The real-size presets build the published architectures: parameter counts of the real checkpoints (counted on
the meta device, nothing allocated), and a narrow build keeps the decoder's layout."""

from __future__ import annotations

import pytest
import torch

from ego_ros.testing.real_sizes import make_model, preset, preset_names


@pytest.mark.parametrize("name, billions", [("qwen2_5_vl_7b", 8.29), ("qwen2_5_vl_3b", 3.75)])
def test_a_preset_has_the_published_parameter_count(name, billions):
    model, _, _ = make_model(name, device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.005)
    assert model.dtype == torch.bfloat16


def test_a_narrow_build_keeps_layers_heads_and_vision_depth():
    model, _, _ = make_model("qwen2_5_vl_7b", device="meta", narrow=True)
    text, vision = preset("qwen2_5_vl_7b")["text_config"], preset("qwen2_5_vl_7b")["vision_config"]
    config = model.config
    assert config.text_config.num_hidden_layers == text["num_hidden_layers"] == 28
    assert config.text_config.num_attention_heads == text["num_attention_heads"]
    assert config.text_config.num_key_value_heads == text["num_key_value_heads"]
    assert config.vision_config.depth == vision["depth"]
    assert config.text_config.hidden_size == 16 * text["num_attention_heads"] < text["hidden_size"]


def test_an_unknown_preset_is_named_with_the_ones_there_are():
    with pytest.raises(ValueError, match="qwen2_5_vl_3b, qwen2_5_vl_7b"):
        preset("llama_70b")
    assert preset_names() == ["qwen2_5_vl_3b", "qwen2_5_vl_7b"]
