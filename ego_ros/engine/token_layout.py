# SPDX-License-Identifier: Apache-2.0
"""Where each visual token of an image lies on it: the geometry that regions, boxes, the figure and calibration share.

Two layouts, described by a patch grid ``grid_thw`` = (t, gh, gw) of 14 px patches (2x2 merged into one token) and
``tiles``:

- ``tiles`` None (Qwen2.5-VL): the whole image resized to ``(gw * 14, gh * 14)`` px, one token per 28x28 px
  block in raster order.
- ``tiles`` = (columns, rows) (InternVL): the image resized to a canvas of columns x rows square tiles; ``grid_thw``
  is that canvas's patch grid (1, rows * g, columns * g), g patches a tile side. Each tile is encoded on its own:
  its (g/2)^2 tokens, in raster order inside the tile, follow the previous tile's (tiles in raster order). With more
  than one tile a thumbnail follows, the whole image resized to one tile: (g/2)^2 more tokens, each covering a
  coarse cell of the whole image (columns x rows times a tile token's area).

A token's cell is given in pixels of the canvas the encoder saw (``canvas_size``); both layouts resize the whole
image without cropping, so a cell scales to the original image by the canvas-to-image ratio (``token_boxes``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PATCH_SIZE = 14  # px a side of a vision patch (Qwen2.5-VL, InternVL3)
MERGE_SIZE = 2  # patches a side merged into one visual token (Qwen's 2x2 merge, InternVL's 0.5 pixel shuffle)

Tiles = tuple[int, int] | None  # (columns, rows) of an InternVL tiling; None for one resized image


def canvas_size(grid_thw: Sequence[int], patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """(width, height) of the image the vision encoder saw (the tiles side by side), from its patch grid."""
    _, gh, gw = grid_thw
    return gw * patch_size, gh * patch_size


def has_thumbnail(tiles: Tiles) -> bool:
    """Whether there is a thumbnail: InternVL adds one only when it cut the image into more than one tile."""
    return tiles is not None and tiles[0] * tiles[1] > 1


def _fine_grid(grid_thw: Sequence[int], tiles: Tiles, merge_size: int) -> tuple[int, int, int, int]:
    """(token rows, token columns) of the whole canvas and of one tile."""
    _, gh, gw = grid_thw
    rows, cols = gh // merge_size, gw // merge_size
    columns, tile_rows = tiles if tiles is not None else (1, 1)
    if rows % tile_rows or cols % columns:
        raise ValueError(f"patch grid {tuple(grid_thw)} does not split into {columns}x{tile_rows} tiles")
    return rows, cols, rows // tile_rows, cols // columns


def num_tokens(grid_thw: Sequence[int], tiles: Tiles = None, merge_size: int = MERGE_SIZE) -> int:
    rows, cols, tile_h, tile_w = _fine_grid(grid_thw, tiles, merge_size)
    return rows * cols + (tile_h * tile_w if has_thumbnail(tiles) else 0)


def fine_raster(grid_thw: Sequence[int], tiles: Tiles = None, merge_size: int = MERGE_SIZE) -> np.ndarray:
    """(rows, cols) token indices: the tiles' tokens laid out over the whole canvas, in raster order (the thumbnail's
    tokens are not in it). For an untiled image, simply ``arange(N).reshape(rows, cols)``."""
    rows, cols, tile_h, tile_w = _fine_grid(grid_thw, tiles, merge_size)
    y, x = np.mgrid[0:rows, 0:cols]
    tile = (y // tile_h) * (cols // tile_w) + x // tile_w
    return tile * tile_h * tile_w + (y % tile_h) * tile_w + x % tile_w


def thumbnail_tokens(grid_thw: Sequence[int], tiles: Tiles = None, merge_size: int = MERGE_SIZE) -> np.ndarray:
    """(N,) bool: which tokens are the thumbnail's (the last (g/2)^2 of a tiled image), coarse cells of the image."""
    rows, cols, _, _ = _fine_grid(grid_thw, tiles, merge_size)
    mask = np.zeros(num_tokens(grid_thw, tiles, merge_size), dtype=bool)
    mask[rows * cols:] = True
    return mask


def token_cells(grid_thw: Sequence[int], tiles: Tiles = None, patch_size: int = PATCH_SIZE,
                merge_size: int = MERGE_SIZE) -> np.ndarray:
    """(N, 4) int: (left, top, right, bottom) of each token's cell in canvas pixels (right, bottom exclusive)."""
    rows, cols, tile_h, tile_w = _fine_grid(grid_thw, tiles, merge_size)
    cell = patch_size * merge_size
    cells = np.zeros((num_tokens(grid_thw, tiles, merge_size), 4), dtype=np.int64)
    y, x = np.mgrid[0:rows, 0:cols]
    order = fine_raster(grid_thw, tiles, merge_size)
    cells[order, 0], cells[order, 1] = x * cell, y * cell
    cells[order, 2], cells[order, 3] = (x + 1) * cell, (y + 1) * cell
    if has_thumbnail(tiles):  # one tile's grid stretched over the whole canvas: cells columns x rows times larger
        width, height = canvas_size(grid_thw, patch_size)
        ty, tx = np.mgrid[0:tile_h, 0:tile_w]
        sx, sy = width // tile_w, height // tile_h
        thumb = np.stack([tx * sx, ty * sy, (tx + 1) * sx, (ty + 1) * sy], axis=-1).reshape(-1, 4)
        cells[rows * cols:] = thumb
    return cells


def token_boxes(grid_thw: Sequence[int], tiles: Tiles, size: tuple[int, int], patch_size: int = PATCH_SIZE,
                merge_size: int = MERGE_SIZE) -> np.ndarray:
    """(N, 4) float: each token's cell in pixels of the original image of ``size`` = (width, height)."""
    width, height = canvas_size(grid_thw, patch_size)
    scale = np.array([size[0] / width, size[1] / height] * 2)
    return token_cells(grid_thw, tiles, patch_size, merge_size) * scale
