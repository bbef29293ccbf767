# SPDX-License-Identifier: Apache-2.0
"""Where a concept is in a frame: a box from the frame's visual tokens that match the concept's memory.

A memory holds projector outputs, the same kind of vector as the frame's own visual tokens, so no detector is
needed: each frame token is compared with the memory, and the box is drawn around the best-matching region.
On the trained toy model, boxes hit (IoU >= 0.5 against the instance's true box) 100% of the time when the instance
is the main subject and 58-61% when it is small among others, from a memory of 5 views or of 1 (``bench/quality.py``,
2026-12-07). Each choice below was measured there on an earlier toy model (with the middle-half layers):

- Compare with the memory's mean vector, not with its best-matching vector: a memory also keeps a few background
  tokens, and with the best match they pull the box onto the background (1 view: 81% / 33% against 67% / 25%;
  5 views: 92% / 31% against 58% / 6%).
- Centre the vectors on the frame's mean token before the cosine: visual tokens share a large common component
  (two unrelated objects' tokens have cosine ~0.5 on the toy model) that drowns the differences (on another set
  of scenes: 83% / 40% against 71% / 31%).
- Keep what is within a third of the way from the peak down to the median similarity, and only the connected
  region around the peak, so that another object elsewhere does not stretch the box.
- Threshold the similarity map upsampled to 4-px cells rather than whole 28-px tokens, so that boxes follow an
  object's edge inside a token (88% / 42% against 83% / 40%; boxes made of exactly the tokens that the object
  covers reach 88% / 35%: small objects are few tokens, the limit of any token-based box).
"""

from __future__ import annotations

import numpy as np
import torch

from .backends import EncodedImage
from .token_layout import fine_raster

CUT = 1 / 3  # of the way from the peak similarity down to the median: what counts as the concept's region
CELL_PX = 4  # resolution of the upsampled similarity map, in pixels of the frame


def match_map(frame: EncodedImage, memory: torch.Tensor) -> torch.Tensor:
    """(rows, cols): each frame token's cosine with the memory's mean vector, both centred on the frame's mean.

    Note (InternVL): the map is made of the tiles' tokens laid out over the whole image; the thumbnail's tokens
    are left out (of the map and of the mean). They see the same image at a coarser scale (a thumbnail cell is
    columns x rows tile cells), so they add no place the tiles do not cover, and a box cut from cells that large
    would be coarser than the tiles allow.
    """
    order = torch.from_numpy(fine_raster(frame.grid_thw, frame.tiles))  # (rows, cols) token indices
    features = frame.features[order.flatten().to(frame.features.device)].float()
    centre = features.mean(dim=0)
    tokens = torch.nn.functional.normalize(features - centre, dim=-1)
    prototype = torch.nn.functional.normalize(memory.to(features.device).float().mean(dim=0) - centre, dim=0)
    return (tokens @ prototype).reshape(order.shape).cpu()


def region_box(similarity: torch.Tensor, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1 and y1 exclusive, in a ``size`` = (width, height) frame: the box of the region around
    the peak of ``similarity`` (rows, cols) that stays within ``CUT`` of the way from the peak to the median."""
    width, height = size
    rows, cols = similarity.shape
    up = torch.nn.functional.interpolate(similarity[None, None].float(),
                                         size=(max(rows, height // CELL_PX), max(cols, width // CELL_PX)),
                                         mode="bilinear", align_corners=False)[0, 0].numpy()
    peak, median = float(up.max()), float(np.median(similarity.numpy()))
    inside = up >= peak - CUT * (peak - median)
    region = _connected(inside, np.unravel_index(int(np.argmax(up)), up.shape))
    ys, xs = np.nonzero(region)
    scale_y, scale_x = height / up.shape[0], width / up.shape[1]
    return (int(xs.min() * scale_x), int(ys.min() * scale_y),
            min(width, int(np.ceil((xs.max() + 1) * scale_x))), min(height, int(np.ceil((ys.max() + 1) * scale_y))))


def concept_box(frame: EncodedImage, memory: torch.Tensor, size: tuple[int, int] | None = None):
    """The box of ``memory``'s concept in ``frame``, in pixels of a ``size`` frame (default: the encoded size)."""
    return region_box(match_map(frame, memory), size or frame.size)


def _connected(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``mask`` that holds ``seed``."""
    region = np.zeros_like(mask)
    stack = [seed]
    while stack:
        y, x = stack.pop()
        if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not region[y, x]:
            region[y, x] = True
            stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return region
