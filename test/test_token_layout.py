# SPDX-License-Identifier: Apache-2.0
"""Where visual tokens lie on the image, for one resized grid (Qwen2.5-VL) and for tiles plus a thumbnail
(InternVL), checked against tilings computed by hand; and how regions, boxes, calibration and the figure use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ego_ros.engine.backends import EncodedImage
from ego_ros.engine.boxes import match_map
from ego_ros.engine.calibration import subject_tokens
from ego_ros.engine.figure import HEADER_HEIGHT, OUTLINE, THUMBNAIL_OUTLINE, concept_figure, token_cell
from ego_ros.engine.memory import ConceptMemory, ViewRecord
from ego_ros.engine.regions import tokens_inside
from ego_ros.engine.token_layout import fine_raster, num_tokens, thumbnail_tokens, token_boxes, token_cells

# 2x1 tiles of 112 px (8x8 patches of 14 px, so 4x4 tokens a tile) and a thumbnail: 16 + 16 + 16 tokens.
GRID, TILES = (1, 8, 16), (2, 1)


def test_a_2x1_tiling_with_thumbnail_maps_each_token_to_its_rectangle():
    cells = token_cells(GRID, TILES)
    assert num_tokens(GRID, TILES) == len(cells) == 48
    # Left tile: tokens 0-15, 28 px blocks in raster order inside the tile.
    assert cells[0].tolist() == [0, 0, 28, 28]
    assert cells[1].tolist() == [28, 0, 56, 28]
    assert cells[4].tolist() == [0, 28, 28, 56]
    assert cells[15].tolist() == [84, 84, 112, 112]
    # Right tile: tokens 16-31, the same blocks shifted by one tile.
    assert cells[16].tolist() == [112, 0, 140, 28]
    assert cells[31].tolist() == [196, 84, 224, 112]
    # Thumbnail: tokens 32-47, its 4x4 grid over the whole 224x112 canvas (56x28 px cells).
    assert cells[32].tolist() == [0, 0, 56, 28]
    assert cells[33].tolist() == [56, 0, 112, 28]
    assert cells[47].tolist() == [168, 84, 224, 112]
    assert thumbnail_tokens(GRID, TILES).nonzero()[0].tolist() == list(range(32, 48))
    # The tiles' tokens laid over the whole canvas: row 0 is the left tile's first row, then the right tile's.
    assert fine_raster(GRID, TILES)[0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19]
    assert fine_raster(GRID, TILES)[3].tolist() == [12, 13, 14, 15, 28, 29, 30, 31]
    # In pixels of the original 448x200 image: the canvas stretched by (2, 200/112).
    boxes = token_boxes(GRID, TILES, (448, 200))
    np.testing.assert_allclose(boxes[16], [224, 0, 280, 50])
    np.testing.assert_allclose(boxes[47], [336, 150, 448, 200])
    assert token_cell(GRID, 33, tiles=TILES) == (56, 0, 112, 28)


def test_an_untiled_grid_is_the_raster_it_always_was():
    cells = token_cells((1, 4, 6), None)
    assert cells.tolist() == [[c * 28, r * 28, c * 28 + 28, r * 28 + 28] for r in range(2) for c in range(3)]
    assert not thumbnail_tokens((1, 4, 6), None).any()
    assert fine_raster((1, 4, 6), None).tolist() == [[0, 1, 2], [3, 4, 5]]
    # One InternVL tile has no thumbnail: the same raster.
    assert token_cells((1, 8, 8), (1, 1)).tolist() == token_cells((1, 8, 8), None).tolist()


def test_a_box_selects_tile_and_thumbnail_tokens_whose_centre_it_holds():
    # The left half of a 448x200 image: the left tile's 16 tokens and the thumbnail's left two columns.
    inside = tokens_inside((0, 0, 224, 200), GRID, (448, 200), TILES)
    assert inside.nonzero().flatten().tolist() == list(range(16)) + [32, 33, 36, 37, 40, 41, 44, 45]
    # A box smaller than every cell: the tile token under its centre, never a thumbnail token.
    assert inside.dtype == torch.bool
    small = tokens_inside((300, 60, 302, 62), GRID, (448, 200), TILES)
    assert small.nonzero().flatten().tolist() == [16 + 4 + 1]  # right tile, row 1 (50-100 px), column 1


def test_the_match_map_is_made_of_tile_tokens_over_the_whole_image():
    features = torch.randn(48, 8)
    memory = features[[20]]  # the right tile's token at row 1, column 0
    frame = EncodedImage(features=features, grid_thw=GRID, pixel_values=torch.zeros(1), size=(448, 200),
                         tiles=TILES)
    similarity = match_map(frame, memory)
    assert similarity.shape == (4, 8)
    assert np.unravel_index(int(similarity.argmax()), (4, 8)) == (1, 4)
    # The thumbnail's tokens are not in the map: changing them changes nothing.
    features2 = features.clone()
    features2[32:] = torch.randn(16, 8)
    frame2 = EncodedImage(features=features2, grid_thw=GRID, pixel_values=torch.zeros(1), size=(448, 200),
                          tiles=TILES)
    torch.testing.assert_close(match_map(frame2, memory), similarity)


def test_subject_tokens_measure_each_cell_of_the_tiling():
    mask = np.zeros((200, 448), dtype=bool)
    mask[:, 224:] = True  # the right half of the image
    subject = subject_tokens(mask, GRID, tiles=TILES)
    assert subject.nonzero()[0].tolist() == list(range(16, 32)) + [34, 35, 38, 39, 42, 43, 46, 47]


def test_the_figure_outlines_kept_tile_and_thumbnail_cells(tmp_path):
    from PIL import Image

    record = ViewRecord(grid_thw=GRID, indices=[5, 32], keywords=["mug"], area_percent=10.0, area_parsed=True,
                        num_visual_tokens=48, layers=[1], tiles=TILES)
    memory = ConceptMemory(name="mug", vectors=torch.zeros(2, 8), views=[record], layers=[1], max_tokens_per_view=8,
                           model="tiny", fingerprint="f", created=0.0, updated=0.0)
    view = Image.new("RGB", (448, 200), (200, 200, 200))
    figure = concept_figure(memory, [view])
    # The view panel: 224x112 canvas, centred in a 300 px panel, its top at MARGIN + HEADER_HEIGHT.
    left, top = 16 + (300 - 224) // 2, 16 + HEADER_HEIGHT
    pixels = figure.load()
    assert pixels[left + 28, top + 28 + 14] == OUTLINE  # token 5: cell (28, 28)-(56, 56), its left edge
    assert pixels[left + 0, top + 14] == THUMBNAIL_OUTLINE  # token 32: cell (0, 0)-(56, 28), its left edge
    assert pixels[left + 42, top + 42] == (200, 200, 200)  # a kept tile cell is shown as it is
    assert pixels[left + 150, top + 60] == (80, 80, 80)  # a cell not kept is dimmed (DIM = 0.4)
    assert pixels[left + 28, top + 14] == (80, 80, 80)  # inside a kept thumbnail cell: dimmed, only outlined
    with pytest.raises(ValueError, match="tiles"):
        ViewRecord(grid_thw=GRID, indices=[], keywords=[], area_percent=1.0, area_parsed=True,
                   num_visual_tokens=48, tiles=(0, 1))
