# SPDX-License-Identifier: Apache-2.0
"""Turn whatever a caller hands us (array, path, PIL image) into a bounded RGB PIL image, or a clear error.

Everything downstream (the processor, the scoring pass) assumes 8-bit RGB of at most ``max_pixels``; doing the
conversion once, here, is what keeps a 16-bit depth-like frame or a 50-megapixel photo from surprising them.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageInput = Union[np.ndarray, Image.Image, str, PathLike]

# Below this the vision encoder has nothing to look at (one 28x28 merged patch is its smallest unit).
MIN_SIDE = 1
# Arrays larger than this are strided down first (a cheap view) so that conversion never copies a huge frame.
MAX_ARRAY_PIXELS_BEFORE_RESIZE = 16_000_000
# Decoding a claimed 200-megapixel file would allocate gigabytes before we could downscale it.
MAX_DECODE_PIXELS = 200_000_000


class InvalidImage(ValueError):
    """The input cannot be read as an image; the message says what is wrong and what is accepted."""


def to_rgb(image: ImageInput, max_pixels: int) -> Image.Image:
    """An RGB PIL image with at most ``max_pixels`` pixels (aspect kept) from an array, a path or a PIL image.

    Arrays: (H, W) grey or (H, W, 1|3|4) of uint8, uint16 (scaled to 8 bit) or float in [0, 1].
    """
    if isinstance(image, (str, PathLike)):
        pil = _open(Path(image))
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    else:
        raise InvalidImage(f"expected an image array, a PIL image or a file path, got {type(image).__name__}")
    if pil.width < MIN_SIDE or pil.height < MIN_SIDE:
        raise InvalidImage(f"image is empty ({pil.width}x{pil.height})")
    if pil.mode.startswith("I"):  # 16/32-bit integer files (depth-like PNGs): read as 16 bit
        pil = _from_array(np.clip(np.asarray(pil), 0, 65535).astype(np.uint16))
    if pil.mode != "RGB":
        pil = pil.convert("RGBA").convert("RGB") if "A" in pil.getbands() or pil.mode == "P" else pil.convert("RGB")
    return downscale(pil, max_pixels)


def downscale(image: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink (never enlarge) so that width * height <= max_pixels, keeping the aspect ratio."""
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / pixels)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise InvalidImage(f"no image file at {path}")
    Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (4096, 4096))  # JPEG: decode at reduced scale when the file is huge
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise InvalidImage(f"cannot read {path} as an image: {error}") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImage(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {array.shape}")
    if array.shape[0] < MIN_SIDE or array.shape[1] < MIN_SIDE:
        raise InvalidImage(f"image is empty (shape {array.shape})")
    # A view, not a copy: thin out a huge frame before any per-pixel work, leaving the fine resize to PIL.
    stride = int(math.sqrt(array.shape[0] * array.shape[1] / MAX_ARRAY_PIXELS_BEFORE_RESIZE))
    if stride > 1:
        array = array[::stride, ::stride]
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)  # keep the top 8 bits: a full-range 16-bit image stays full range
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InvalidImage("float image contains NaN or infinity")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise InvalidImage(f"unsupported pixel type {array.dtype}; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array))  # mode L, RGB or RGBA from the shape
