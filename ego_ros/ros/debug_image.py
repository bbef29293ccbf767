# SPDX-License-Identifier: Apache-2.0
"""What the node's ``~/debug_image`` shows: a camera frame with each present concept's box, name and score."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 190, 0), (200, 64, 255), (0, 200, 200))


def annotated(image: np.ndarray, detections) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 RGB with each (name, score, box) of ``detections`` drawn on it; the box
    (x0, y0, x1, y1, exclusive) in the image's pixels. Colours follow the order given (most likely first)."""
    picture = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(min(picture.size) / 160))
    for i, (name, score, (x0, y0, x1, y1)) in enumerate(detections):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=width)
        label = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label)
        y = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y1 + 1  # above the box, else below it
        draw.rectangle((x0, y, x0 + right - left + 3, y + bottom - top + 2), fill=colour)
        draw.text((x0 + 2, y - top + 1), label, fill=(0, 0, 0))
    return np.asarray(picture)
