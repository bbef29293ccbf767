# SPDX-License-Identifier: Apache-2.0
"""What a concept memory kept, drawn: Fig. 3 of the Ego paper for one concept.

For each reference view: the view as the model saw it (resized to the processor's size), the kept visual tokens'
28x28 px cells outlined and every other cell dimmed, and under it how many tokens were kept, the subject's area and
the keywords whose attention chose them. Views side by side, the concept name as the title.

Everything is drawn from the memory record (``ViewRecord``: grid, kept indices, keywords, area), so no model is
needed. The store keeps vectors, not images, so ``Ego.register`` saves a copy of each view as the engine saw it
under ``<memory_dir>/views/<file_stem(name)>/<k>.png`` (k = the view's index in the memory, see
:func:`save_views`). A concept whose views were not saved (copied without them, or the write failed) has its token
grid drawn on a grey canvas instead, and the figure says so.

Cell geometry (``token_layout``, from the stored grid and tiling alone): Qwen2.5-VL's visual token i of patch grid
(t, gh, gw) covers merged-grid row ``i // (gw // 2)``, column ``i % (gw // 2)``: the 28x28 px block (two 14 px
patches a side) of the processed image of size (gw * 14, gh * 14). InternVL's tokens cover 28x28 px blocks of
their tile, drawn at the tile's place on the tiles side by side; a kept thumbnail token is a coarse cell of the
whole view, outlined in another colour and left dimmed (lit, it would hide which fine cells were kept).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from .memory import ConceptMemory, ViewRecord, file_stem
from .token_layout import MERGE_SIZE, PATCH_SIZE, canvas_size, thumbnail_tokens, token_cells

# Layout, in pixels. Width: MARGIN + sum(panel width + MARGIN) with panel width = max(view width, MIN_PANEL_WIDTH);
# height: MARGIN + HEADER_HEIGHT + tallest view + TEXT_GAP + TEXT_LINES * LINE_HEIGHT + MARGIN.
# A view narrower than its panel is centred in it; every view's top is at MARGIN + HEADER_HEIGHT.
MARGIN = 16
HEADER_HEIGHT = 92  # title line, what was kept, the model, a note (empty when every view has its image)
MIN_PANEL_WIDTH = 300
TEXT_GAP = 8
TEXT_LINES = 4  # kept tokens; area; keywords on up to two lines
LINE_HEIGHT = 19
TITLE_SIZE = 24
TEXT_SIZE = 14

# Colours.
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
NOTE = (170, 40, 40)
OUTLINE = (255, 214, 0)  # kept cells
THUMBNAIL_OUTLINE = (0, 200, 255)  # kept thumbnail cells (InternVL): coarse cells of the whole view
OUTLINE_WIDTH = 2  # drawn inside the cell, so a cell's outline never covers its neighbour
DIM = 0.4  # brightness factor of the cells that were not kept
CANVAS = (128, 128, 128)  # stands in for a view whose image was not saved
CANVAS_GRID = (112, 112, 112)
CANVAS_KEPT = (200, 200, 200)

VIEWS_FOLDER = "views"


# --- geometry ---------------------------------------------------------------------------------------------------


processed_size = canvas_size  # (width, height) of the image the vision encoder saw, from its patch grid


def token_cell(
    grid_thw: Sequence[int], index: int, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
    tiles=None,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the block visual token ``index`` covers, in processed-image pixels."""
    return tuple(int(v) for v in token_cells(grid_thw, tiles, patch_size, merge_size)[index])


def panel_width(view: ViewRecord, patch_size: int = PATCH_SIZE) -> int:
    return max(processed_size(view.grid_thw, patch_size)[0], MIN_PANEL_WIDTH)


def figure_size(memory: ConceptMemory, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """(width, height) of :func:`concept_figure`'s image for ``memory``."""
    width = MARGIN + sum(panel_width(v, patch_size) + MARGIN for v in memory.views)
    tallest = max(processed_size(v.grid_thw, patch_size)[1] for v in memory.views)
    return width, MARGIN + HEADER_HEIGHT + tallest + TEXT_GAP + TEXT_LINES * LINE_HEIGHT + MARGIN


# --- the figure -------------------------------------------------------------------------------------------------


def concept_figure(
    memory: ConceptMemory,
    views: Sequence[Image.Image | None] = (),
    *,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> Image.Image:
    """The kept tokens of every view of ``memory``, drawn over ``views`` (aligned with ``memory.views``).

    A missing view (None, or the list too short) or one whose shape does not match its stored grid is drawn as
    its token grid on a grey canvas.
    """
    width, height = figure_size(memory, patch_size)
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    title_font, text_font = _font(TITLE_SIZE), _font(TEXT_SIZE)

    missing = 0
    x = MARGIN
    top = MARGIN + HEADER_HEIGHT  # every view's top edge
    text_top = top + max(processed_size(v.grid_thw, patch_size)[1] for v in memory.views) + TEXT_GAP
    for k, record in enumerate(memory.views):
        image = views[k] if k < len(views) else None
        size = processed_size(record.grid_thw, patch_size)
        # A stale copy (the concept was replaced outside the CLI): better no picture than a wrong one. A tiling
        # stretches the view to whole tiles, so there the aspect says nothing.
        if image is not None and record.tiles is None and not _matches(image.size, size):
            image = None
        if image is None:
            missing += 1
            tile = _grid_on_canvas(record, size, patch_size, merge_size)
        else:
            tile = _kept_over_view(record, image, size, patch_size, merge_size)
        panel = panel_width(record, patch_size)
        figure.paste(tile, (x + (panel - size[0]) // 2, top))

        area = f"area {record.area_percent:.0f}%" + ("" if record.area_parsed else " (no estimate: the default)")
        kept = f"view {k + 1}: {len(record.indices)} kept of {record.num_visual_tokens} tokens"
        if record.tiles is not None:
            columns, rows = record.tiles
            coarse = int(thumbnail_tokens(record.grid_thw, record.tiles)[record.indices].sum())
            kept += f", {columns}x{rows} tiles" + (f", {coarse} of the thumbnail" if coarse else "")
        lines = [kept, area]
        lines += _wrap("keywords: " + (", ".join(record.keywords) or "(none)"), text_font, panel, TEXT_LINES - 2)
        for i, line in enumerate(lines):
            draw.text((x, text_top + i * LINE_HEIGHT), _fit(line, text_font, panel), font=text_font, fill=TEXT)
        x += panel + MARGIN

    usable = width - 2 * MARGIN
    draw.text((MARGIN, MARGIN), _fit(memory.name, title_font, usable), font=title_font, fill=TEXT)
    layers = ",".join(str(layer) for layer in memory.layers)
    # Two lines, so that a one-view figure (300 px) still shows K and the layers; a long model path is what gets
    # cut.
    kept = (f"{memory.num_views} view{'s' * (memory.num_views != 1)}, {memory.num_tokens} tokens kept, "
            f"K = {memory.max_tokens_per_view} per view")
    for i, line in enumerate([kept, f"layers {layers}; model {memory.model}"]):
        draw.text((MARGIN, MARGIN + 32 + i * LINE_HEIGHT), _fit(line, text_font, usable), font=text_font, fill=TEXT)
    if missing:
        note = (f"grey: no saved image of {'this view' if missing == 1 else f'{missing} views'} "
                "(registered outside `ego-ros register`): token grid only")
        draw.text((MARGIN, MARGIN + 32 + 2 * LINE_HEIGHT), _fit(note, text_font, usable), font=text_font,
                  fill=NOTE)
    return figure


def _kept_over_view(record: ViewRecord, image: Image.Image, size, patch_size: int, merge_size: int) -> Image.Image:
    shown = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)  # as the processor resized it
    tile = ImageEnhance.Brightness(shown).enhance(DIM)
    fine, coarse = _kept_cells(record, patch_size, merge_size)
    for box in fine:
        tile.paste(shown.crop(box), box[:2])
    draw = ImageDraw.Draw(tile)
    for boxes, colour in ((fine, OUTLINE), (coarse, THUMBNAIL_OUTLINE)):
        for left, top, right, bottom in boxes:
            draw.rectangle((left, top, right - 1, bottom - 1), outline=colour, width=OUTLINE_WIDTH)
    return tile


def _kept_cells(record: ViewRecord, patch_size: int, merge_size: int) -> tuple[list[tuple], list[tuple]]:
    """The kept tokens' cells in processed-image pixels: (tile or grid cells, thumbnail cells)."""
    cells = token_cells(record.grid_thw, record.tiles, patch_size, merge_size)
    thumbnail = thumbnail_tokens(record.grid_thw, record.tiles, merge_size)
    fine = [tuple(int(v) for v in cells[i]) for i in record.indices if not thumbnail[i]]
    coarse = [tuple(int(v) for v in cells[i]) for i in record.indices if thumbnail[i]]
    return fine, coarse


def _grid_on_canvas(record: ViewRecord, size, patch_size: int, merge_size: int) -> Image.Image:
    tile = Image.new("RGB", size, CANVAS)
    draw = ImageDraw.Draw(tile)
    kept = set(record.indices)
    cells = token_cells(record.grid_thw, record.tiles, patch_size, merge_size)
    thumbnail = thumbnail_tokens(record.grid_thw, record.tiles, merge_size)
    for i in range(record.num_visual_tokens):
        left, top, right, bottom = (int(v) for v in cells[i])
        if thumbnail[i]:
            continue  # coarse cells over the whole view: only the kept ones are drawn, below
        if i in kept:
            draw.rectangle((left, top, right - 1, bottom - 1), fill=CANVAS_KEPT, outline=OUTLINE, width=OUTLINE_WIDTH)
        else:
            draw.rectangle((left, top, right - 1, bottom - 1), outline=CANVAS_GRID, width=1)
    for left, top, right, bottom in _kept_cells(record, patch_size, merge_size)[1]:
        draw.rectangle((left, top, right - 1, bottom - 1), outline=THUMBNAIL_OUTLINE, width=OUTLINE_WIDTH)
    return tile


def _matches(image_size: tuple[int, int], processed: tuple[int, int]) -> bool:
    """Whether a saved view could be the image behind a grid: same aspect, up to the processor's rounding to 28."""
    (w, h), (pw, ph) = image_size, processed
    return abs(w / h - pw / ph) <= 0.1 * pw / ph + 28 / ph


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis so that it fits in ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most ``max_lines`` lines; the last one is cut with an ellipsis if needed."""
    lines: list[str] = []
    words = text.split(" ")
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and font.getlength(line + " " + words[0]) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words:
        lines[-1] = _fit(lines[-1] + " " + " ".join(words) + " …", font, width)
    return lines


# --- the saved reference views ----------------------------------------------------------------------------------


def views_dir(memory_dir: Path | str, name: str) -> Path:
    """Where the reference views of concept ``name`` (a valid name) are saved."""
    return Path(memory_dir) / VIEWS_FOLDER / file_stem(name)


def save_views(memory_dir: Path | str, name: str, images: Sequence[Image.Image], start: int) -> list[Path]:
    """Save ``images`` (RGB, as the engine saw them) as views ``start``, ``start + 1``... of concept ``name``.

    ``start`` is the number of views the concept had before (0 for a new concept, whose stale views, left by a
    concept of the same name forgotten outside the CLI, are deleted first). Each file is written atomically.
    """
    folder = views_dir(memory_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        if old.stem.isdigit() and int(old.stem) >= start:
            old.unlink(missing_ok=True)
    paths = []
    for k, image in enumerate(images, start):
        path = folder / f"{k}.png"
        tmp = folder / f".{k}.{secrets.token_hex(4)}.tmp.png"
        try:
            image.convert("RGB").save(tmp, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        paths.append(path)
    return paths


def load_views(memory_dir: Path | str, name: str, count: int | None = None) -> list[Image.Image | None]:
    """The saved views of concept ``name``, by view index; None where a view has no readable saved image.

    ``count``: the concept's number of views (default: up to the highest saved index).
    """
    folder = views_dir(memory_dir, name)
    saved = {int(p.stem): p for p in folder.glob("*.png") if p.stem.isdigit()} if folder.is_dir() else {}
    if count is None:
        count = max(saved, default=-1) + 1
    views: list[Image.Image | None] = []
    for k in range(count):
        image = None
        if k in saved:
            try:
                with Image.open(saved[k]) as opened:
                    image = opened.convert("RGB")
            except (OSError, Image.DecompressionBombError):
                image = None  # drawn as missing: the figure is a view of the memory, not of these copies
        views.append(image)
    return views


def remove_views(memory_dir: Path | str, name: str) -> None:
    """Delete the saved views of concept ``name`` (after the concept itself is forgotten)."""
    folder = views_dir(memory_dir, name)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something else left in there: keep it, it is not ours
        folder.rmdir()
