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


def tokens_inside(region: Box, grid_thw: tuple[int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """(N,) bool, raster order: the visual tokens whose centre lies inside ``region`` of a ``size`` image; for a
    box smaller than a token, the token under the box's centre."""
    _, h, w = grid_thw
    rows, cols = h // 2, w // 2
    centre_y = (torch.arange(rows) + 0.5) * size[1] / rows
    centre_x = (torch.arange(cols) + 0.5) * size[0] / cols
    inside = (((centre_y[:, None] >= region[1]) & (centre_y[:, None] < region[3]))
              & ((centre_x[None] >= region[0]) & (centre_x[None] < region[2])))
    if not inside.any():
        row = min(rows - 1, int((region[1] + region[3]) / 2 * rows / size[1]))
        col = min(cols - 1, int((region[0] + region[2]) / 2 * cols / size[0]))
        inside[row, col] = True
    return inside.reshape(-1)


def _is_box(value) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _show(region: Box) -> str:
    return "(" + ", ".join(f"{v:g}" for v in region) + ")"
