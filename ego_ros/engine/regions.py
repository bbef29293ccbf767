# SPDX-License-Identifier: Apache-2.0
"""Saying which object a reference view is about: a box on the view confines the selection to that object.

A robot's view is cluttered, and the keyword prompt describes its *main* subject, which need not be the object the
user means. Given a box, only the visual tokens whose centre lies inside it are ranked, and alpha (the subject's
share of the view) is the box's share. Two ways of confining were measured on the trained toy model (``bench/
quality.py``, calibrated layers, 30 instances each drawn small beside another object that is the main subject):
the share of kept tokens on the instance, and how often its memory then boxes it (IoU >= 0.5, ``boxes``) in new
scenes where it is the main subject / small among others:

    whole view (no box)                                 8% on the instance    later boxes 62% / 27%
    rank only the tokens inside the box                54%                                92% / 58%
    a crop around the box (50% context each side,      56%                                90% / 50%
      enlarged to the view's size; alpha its share)

Ranking inside the box is kept: as many of its tokens are on the instance, and its memory finds the instance
again more often, as it holds the object's tokens as the model sees it in a whole scene, at the scale it will
meet it again (a crop's enlarged tokens differ from those); and it costs no second image. (With the middle-half
layers: 54% and 92% / 58% inside, 50% and 85% / 47% for the crop. Which words lead the attention hardly matters
here: keywords generated from the crop and scored on the whole view keep the same tokens, because the box holds
about as many tokens as alpha asks for.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from .token_layout import Tiles, thumbnail_tokens, token_boxes

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in the view's pixels; x1, y1 exclusive


def regions_per_view(regions, num_views: int) -> list[Box | None]:
    """One box (or None: the whole view) per view, from None, one box for all views, or one per view."""
    if regions is None:
        return [None] * num_views
    if _is_box(regions):
        return [tuple(float(v) for v in regions)] * num_views
    regions = list(regions)
    if len(regions) != num_views:
        raise ValueError(f"{len(regions)} regions given for {num_views} views: give one per view or one for all")
    for region in regions:
        if region is not None and not _is_box(region):
            raise ValueError(f"a region is (x0, y0, x1, y1) in pixels, got {region!r}")
    return [None if r is None else tuple(float(v) for v in r) for r in regions]


def check_region(region: Box, size: tuple[int, int]) -> Box:
    """``region`` clipped to a ``size`` = (width, height) view; an error if it is empty or outside the view."""
    x0, y0, x1, y1 = region
    width, height = size
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"region {_show(region)} is empty: x1 > x0 and y1 > y0 are needed")
    clipped = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        raise ValueError(f"region {_show(region)} lies outside the {width}x{height} view")
    return clipped


def box_share(region: Box, size: tuple[int, int]) -> float:
    """The box's share of a ``size`` view, in percent: alpha for a registration from a box."""
    x0, y0, x1, y1 = region
    return 100.0 * (x1 - x0) * (y1 - y0) / (size[0] * size[1])


def scaled(region: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """``region`` given on a ``from_size`` view, on the same view shown at ``to_size``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return (region[0] * sx, region[1] * sy, region[2] * sx, region[3] * sy)


def tokens_inside(region: Box, grid_thw: tuple[int, int, int], size: tuple[int, int],
                  tiles: Tiles = None) -> torch.Tensor:
    """(N,) bool, in token order: the visual tokens whose cell's centre lies inside ``region`` of a ``size`` image;
    for a box smaller than a token, the finest token under the box's centre.

    Note (InternVL): a thumbnail token counts by the same rule as a tile token, its centre inside the box. The box
    says where the object is, not at which scale the model looks at it; a coarse cell centred inside the box is
    mostly the object (a small box holds none), and eq. 3 then ranks both scales together, as it does for a view
    without a box.
    """
    boxes = torch.from_numpy(token_boxes(grid_thw, tiles, size))
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (centre_x >= region[0]) & (centre_x < region[2]) & (centre_y >= region[1]) & (centre_y < region[3])
    if not inside.any():
        x, y = (region[0] + region[2]) / 2, (region[1] + region[3]) / 2
        under = (boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])
        under &= ~torch.from_numpy(thumbnail_tokens(grid_thw, tiles))
        inside[int(under.nonzero()[0])] = True  # the tiles cover the image: a clipped box's centre is on one
    return inside


def _is_box(value) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _show(region: Box) -> str:
    return "(" + ", ".join(f"{v:g}" for v in region) + ")"
