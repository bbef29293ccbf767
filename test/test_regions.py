# SPDX-License-Identifier: Apache-2.0
"""Registering from a box (``Ego.register(regions=...)``) and in the user's words (``description=...``)."""

from __future__ import annotations

import pytest
import torch

from ego_ros.engine.regions import box_share, check_region, regions_per_view, scaled, tokens_inside


def test_tokens_inside_a_box_are_those_whose_centre_it_holds():
    # A 224 x 224 image of 8 x 8 tokens of 28 px: centres at 14, 42, 70, ...; the box x 30-90, y 0-50 holds the
    # centres x 42 and 70 (columns 1, 2) and y 14 and 42 (rows 0, 1).
    inside = tokens_inside((30, 0, 90, 50), (1, 16, 16), (224, 224)).reshape(8, 8)
    assert inside.nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    # Smaller than a token and between centres: the token under its centre.
    assert tokens_inside((50, 50, 54, 54), (1, 16, 16), (224, 224)).nonzero().flatten().tolist() == [8 + 1]


def test_regions_are_checked_and_follow_the_view_to_its_shown_size():
    assert regions_per_view(None, 2) == [None, None]
    assert regions_per_view((1, 2, 3, 4), 2) == [(1.0, 2.0, 3.0, 4.0)] * 2
    assert regions_per_view([(1, 2, 3, 4), None], 2) == [(1.0, 2.0, 3.0, 4.0), None]
    with pytest.raises(ValueError, match="3 regions given for 2 views"):
        regions_per_view([(0, 0, 1, 1)] * 3, 2)
    with pytest.raises(ValueError, match=r"\(x0, y0, x1, y1\)"):
        regions_per_view([(0, 0, 1), None], 2)
    with pytest.raises(ValueError, match="is empty"):
        check_region((10, 10, 10, 20), (100, 100))
    with pytest.raises(ValueError, match="outside the 100x100 view"):
        check_region((150, 10, 180, 20), (100, 100))
    assert check_region((-5, 10, 120, 20), (100, 100)) == (0.0, 10.0, 100.0, 20.0)
    assert scaled((100, 50, 300, 150), (400, 200), (200, 100)) == (50.0, 25.0, 150.0, 75.0)
    assert box_share((0, 0, 50, 50), (100, 100)) == 25.0


def test_a_registration_from_a_box_keeps_only_tokens_inside_it(ego, make_view):
    view = make_view(3, 224, 448)
    info = ego.register("mug", [view], regions=[(224, 56, 336, 168)])  # x: 1/2 to 3/4 of the width, y: 1/4 to 3/4
    trace = info.traces[0]
    _, h, w = trace.image.grid_thw
    rows, cols = h // 2, w // 2
    for index in trace.selected.tolist():  # each kept token's centre, as a share of the view, is inside the box
        assert 0.5 <= (index % cols + 0.5) / cols < 0.75 and 0.25 <= (index // cols + 0.5) / rows < 0.75
    assert trace.selected.numel() > 0
    assert trace.area_percent == pytest.approx(100 * 112 * 112 / (224 * 448))  # alpha: the box's share
    stored = ego.store.get("mug")
    assert torch.equal(stored.vectors, trace.image.features[trace.selected])


def test_a_box_on_a_large_view_is_in_the_views_own_pixels(ego, make_view):
    ego.config.max_image_pixels = 224 * 224
    view = make_view(4, 448, 448)  # shown at 224 x 224 (8 x 8 tokens): the box's pixels halve
    info = ego.register("mug", [view], regions=(0, 0, 112, 112))  # the top-left 2 x 2 tokens once shown
    assert info.traces[0].image.grid_thw == (1, 16, 16)
    assert set(info.traces[0].selected.tolist()) <= {0, 1, 8, 9}


def test_a_description_is_scored_as_the_keywords(ego, make_view):
    info = ego.register("mug", [make_view(5)], description="  blue mug with a star ")
    assert info.traces[0].keywords == ["blue mug with a star"]
    assert not info.traces[0].keywords_fallback


@pytest.mark.parametrize("regions, description, message", [
    ([(0, 0, 10, 10)] * 2, None, "2 regions given for 1 views"),
    ([(300, 300, 400, 400)], None, "outside"),
    ([(20, 20, 20, 40)], None, "empty"),
    (None, "a <|im_start|> mug", "control token"),
])
def test_bad_regions_or_descriptions_are_refused_and_nothing_is_registered(ego, make_view, regions, description,
                                                                           message):
    with pytest.raises(ValueError, match=message):
        ego.register("mug", [make_view(6)], regions=regions, description=description)
    assert "mug" not in ego.store
