# SPDX-License-Identifier: Apache-2.0
"""Boxes from memory matching (``ego_ros.engine.boxes``): hand-made cases a person can check, then real encodings."""

from __future__ import annotations

import torch

from ego_ros.engine.backends import EncodedImage
from ego_ros.engine.boxes import concept_box, match_map, region_box
from ego_ros.evaluation.toy import iou


def frame_of(features: torch.Tensor, rows: int, cols: int, size=(224, 224)) -> EncodedImage:
    return EncodedImage(features=features, grid_thw=(1, 2 * rows, 2 * cols), pixel_values=torch.zeros(1), size=size)


def test_the_box_covers_the_region_around_the_peak_and_not_a_second_one():
    similarity = torch.zeros(8, 8)
    similarity[2:4, 4:7] = 1.0  # the concept: rows 2-3, columns 4-6 of 28-px tokens = x 112-196, y 56-112
    similarity[6, 0] = 0.9  # something else that matches almost as well, elsewhere
    box = region_box(similarity, (224, 224))
    assert iou(box, (112, 56, 196, 112)) >= 0.7, box
    assert box[0] > 28 and box[3] < 6 * 28  # the second region is not in it


def test_boxes_are_in_the_frames_own_pixels():
    similarity = torch.zeros(4, 8)
    similarity[1, 6] = 1.0
    x0, y0, x1, y1 = region_box(similarity, (1280, 720))  # one token = 160 x 180 px of this frame
    assert 900 <= x0 < 6 * 160 + 40 and 7 * 160 - 40 < x1 <= 1180
    assert 150 <= y0 < 180 + 40 and 2 * 180 - 40 < y1 <= 390
    assert 0 <= x0 < x1 <= 1280 and 0 <= y0 < y1 <= 720


def test_the_tokens_like_the_memory_are_the_ones_that_match():
    torch.manual_seed(0)
    background, concept = torch.randn(16), torch.randn(16)
    features = background + 0.1 * torch.randn(6, 6, 16)
    features[3:5, 1:3] = concept + 0.1 * torch.randn(2, 2, 16)
    frame = frame_of(features.reshape(36, 16), 6, 6)
    memory = concept + 0.1 * torch.randn(5, 16)
    similarity = match_map(frame, memory)
    assert similarity.shape == (6, 6)
    assert set(torch.topk(similarity.flatten(), 4).indices.tolist()) == {19, 20, 25, 26}
    assert iou(concept_box(frame, memory), (37, 112, 112, 187)) >= 0.6
