# SPDX-License-Identifier: Apache-2.0
"""The vision tower's windows (or images) attended in one call per layer equal the tower's own call per group."""

import pytest
import torch
from PIL import Image
from transformers import AttentionInterface, AutoImageProcessor, AutoModelForImageTextToText
from transformers.vision_utils import get_vision_window_index

from ego_ros.engine.vision_attention import NAME, attend_groups_at_once, grouped_attention


def image_features(model, processor, images) -> torch.Tensor:
    processed = processor(images=images, return_tensors="pt")
    output = model.get_image_features(pixel_values=processed["pixel_values"],
                                      image_grid_thw=processed["image_grid_thw"])
    parts = list(output.pooler_output) + [f for layer in getattr(output, "deepstack_features", None) or ()
                                          for f in layer]
    return torch.cat(parts)


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_qwen3_vl_dir"])
def test_groups_attended_in_one_call_equal_the_towers_loop(model_dir, request, make_view):
    directory = request.getfixturevalue(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoImageProcessor.from_pretrained(directory)
    # Two sizes: windows of different lengths (Qwen2.5-VL's edge windows), images of different lengths (every
    # full-attention layer), so padding and masking are exercised.
    images = [Image.fromarray(make_view(1, 224, 224)), Image.fromarray(make_view(2, 140, 196))]
    grids = processor(images=images, return_tensors="pt")["image_grid_thw"]
    vision = model.model.visual
    if hasattr(vision, "window_size"):
        _, bounds = get_vision_window_index(grids, spatial_merge_size=vision.spatial_merge_size,
                                            window_size=vision.window_size, patch_size=vision.patch_size)
        lengths = (bounds[1:] - bounds[:-1]).unique()
        assert len(bounds) - 1 > len(images) and len(lengths) > 1, "the images must give windows of several lengths"

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["cu_seq_lens_q"].numel() - 1)
        return grouped_attention(*args, **kwargs)

    with torch.no_grad():
        reference = image_features(model, processor, images)
        assert attend_groups_at_once(vision)
        AttentionInterface.register(NAME, counted)
        try:
            grouped = image_features(model, processor, images)
        finally:
            AttentionInterface.register(NAME, grouped_attention)

    depth = len(vision.blocks)
    assert len(calls) == depth, "one attention call per vision layer"
    assert max(calls) > 1, "each call held several groups"
    assert torch.allclose(grouped, reference, atol=1e-5), (grouped - reference).abs().max()


def test_a_tower_without_grouped_attention_is_left_alone():
    assert not attend_groups_at_once(torch.nn.Sequential(torch.nn.Linear(2, 2)))
