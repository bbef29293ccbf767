# SPDX-License-Identifier: Apache-2.0
"""``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` <-> (H, W, 3) uint8 RGB arrays.

A message is untrusted input: a request can claim 100000 x 100000 pixels with ten bytes of data. So every field is
checked against the others *before* anything is allocated, and each error says what is wrong and what would be
accepted (the node returns it as ``success=false``). All errors are :class:`ego_ros.engine.images.InvalidImage` (a
ValueError). Only then are the pixels converted: by cv_bridge where it is installed (a ROS 2 distro), by this
module's own converter where it is not (the PyPI-wheel venv, where the PyPI package named cv_bridge is ROS 1's).
Compressed frames are decoded and every frame is downscaled with OpenCV: in ``bench/node_costs.py`` that is
faster than PIL for both (a JPEG frame decoded at a reduced scale where that still gives the pixels wanted).

Messages are duck-typed: anything with ``height, width, encoding, is_bigendian, step, data`` (Image) or ``format,
data`` (CompressedImage) works, and builders take the message class as an argument, so this module never imports
rclpy. ``data`` may be ``bytes``, ``array.array('B')`` (what rclpy hands out), a memoryview, a uint8 array or a
list of ints.

Decoding raw images is zero-copy where the layout allows: the result is often a read-only *view* of ``msg.data``
(strided for bgr8 or padded rows). Copy it if you keep it beyond the message or need it contiguous.
"""

from __future__ import annotations

import array
import io
import math
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from ego_ros.engine.images import InvalidImage

try:  # a ROS 2 distro's cv_bridge (apt: ros-$ROS_DISTRO-cv-bridge); absent from the PyPI-wheel venv
    from cv_bridge import CvBridge
except ImportError:  # pragma: no cover - depends on the install
    CvBridge = None

# Larger than any camera (a 8K frame is 33 MP); a claim above this is a bug or an attack, refused before allocating.
MAX_MESSAGE_PIXELS = 64_000_000

# BT.601 limited-range YUV -> RGB, the coefficients OpenCV (hence cv_bridge) uses for its YUV 4:2:2 conversions.
_Y_SCALE, _V_TO_R, _U_TO_G, _V_TO_G, _U_TO_B = 1.164, 1.596, -0.391, -0.813, 2.018


def _gray(pixels: np.ndarray) -> np.ndarray:  # (H, W, 1) -> (H, W, 3) view, no copy
    return np.broadcast_to(pixels, pixels.shape[:2] + (3,))


def _gray16(pixels: np.ndarray, bigendian: bool) -> np.ndarray:
    values = pixels.view(">u2" if bigendian else "<u2")  # (H, W, 1)
    # The top 8 bits, as the engine does for 16-bit arrays: a full-range image stays full range.
    return _gray((values >> 8).astype(np.uint8))


def _yuv422(pixels: np.ndarray, order: str) -> np.ndarray:
    """(H, W, 2) packed 4:2:2 -> (H, W, 3) RGB. ``order`` names the 4 bytes of each pixel pair, e.g. "UYVY"."""
    pairs = pixels.reshape(pixels.shape[0], -1, 4).astype(np.float32)  # (H, W/2, 4): two pixels share U and V
    y = pairs[..., [order.index("Y"), order.rindex("Y")]]  # (H, W/2, 2)
    u = pairs[..., order.index("U"), None] - 128.0  # (H, W/2, 1)
    v = pairs[..., order.index("V"), None] - 128.0
    y = _Y_SCALE * (y - 16.0)
    rgb = np.stack([y + _V_TO_R * v, y + _U_TO_G * u + _V_TO_G * v, y + _U_TO_B * u], axis=-1)  # (H, W/2, 2, 3)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(pixels.shape[0], -1, 3)


# encoding -> (bytes per pixel, (H, W, bytes per pixel) uint8 view + is_bigendian -> (H, W, 3) RGB)
_Decoder = Callable[[np.ndarray, bool], np.ndarray]
_ENCODINGS: dict[str, tuple[int, _Decoder]] = {
    "rgb8": (3, lambda p, be: p),
    "bgr8": (3, lambda p, be: p[..., ::-1]),
    "8UC3": (3, lambda p, be: p[..., ::-1]),  # OpenCV's default channel order is BGR
    "rgba8": (4, lambda p, be: p[..., :3]),
    "bgra8": (4, lambda p, be: p[..., 2::-1]),
    "mono8": (1, lambda p, be: _gray(p)),
    "8UC1": (1, lambda p, be: _gray(p)),
    "mono16": (2, _gray16),
    "16UC1": (2, _gray16),
    "yuv422": (2, lambda p, be: _yuv422(p, "UYVY")),  # ROS's "yuv422" is UYVY byte order
    "uyvy": (2, lambda p, be: _yuv422(p, "UYVY")),
    "yuv422_yuy2": (2, lambda p, be: _yuv422(p, "YUYV")),
    "yuyv": (2, lambda p, be: _yuv422(p, "YUYV")),
}
_BY_LOWER = {name.lower(): name for name in _ENCODINGS}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)


def image_from_msg(msg, *, limit_pixels: int = MAX_MESSAGE_PIXELS) -> np.ndarray:
    """A ``sensor_msgs/Image`` as (H, W, 3) uint8 RGB, often a read-only view of ``msg.data`` (see module doc)."""
    encoding = _BY_LOWER.get(str(getattr(msg, "encoding", "")).strip().lower())
    if encoding is None:
        raise InvalidImage(f"unsupported image encoding {_shown(getattr(msg, 'encoding', None))}; "
                           f"supported: {', '.join(SUPPORTED_ENCODINGS)}")
    bpp, decode = _ENCODINGS[encoding]
    height, width, step = (_count(msg, field) for field in ("height", "width", "step"))
    # Geometry first, from the header fields alone: nothing below allocates until the data length is proven.
    if height == 0 or width == 0:
        raise InvalidImage(f"empty image ({width}x{height})")
    if height * width > limit_pixels:
        raise InvalidImage(f"image claims {width}x{height} = {height * width} pixels, more than the "
                           f"{limit_pixels} accepted")
    if step < width * bpp:
        raise InvalidImage(f"step {step} is smaller than width {width} x {bpp} bytes per pixel ({encoding}) "
                           f"= {width * bpp}")
    if bpp == 2 and encoding not in ("mono16", "16UC1") and width % 2:
        raise InvalidImage(f"{encoding} packs pixels in pairs: width must be even, got {width}")
    data = _bytes_of(msg.data, expected=step * height)
    rgb = _bridged(msg, encoding) if _BRIDGE is not None else None
    if rgb is None:
        rows = np.frombuffer(data, dtype=np.uint8).reshape(height, step)[:, : width * bpp]  # drop row padding
        rgb = decode(rows.reshape(height, width, bpp), bool(getattr(msg, "is_bigendian", False)))
    if rgb.flags.writeable:
        rgb.setflags(write=False)  # it may alias msg.data (array.array is mutable)
    return rgb


def compressed_from_msg(msg, max_pixels: int | None = None, *,
                        limit_pixels: int = MAX_MESSAGE_PIXELS) -> np.ndarray:
    """A JPEG or PNG ``sensor_msgs/CompressedImage`` as (H, W, 3) uint8 RGB, at most ``max_pixels`` when given.

    With ``max_pixels``, a big JPEG is decoded at 1/2, 1/4 or 1/8 scale directly (``draft``), which is both faster
    and what lets a JPEG larger than ``limit_pixels`` through. The claimed size is checked from the file header,
    before any pixel is decoded.
    """
    fmt = str(getattr(msg, "format", ""))
    if "compresseddepth" in fmt.lower():
        raise InvalidImage(f"CompressedImage format {_shown(fmt)} (compressedDepth) is not supported; send JPEG or PNG")
    data = _bytes_of(msg.data)
    if not data:
        raise InvalidImage("CompressedImage has no data")
    what = f"CompressedImage (format {_shown(fmt)}, {len(data)} bytes)"
    try:
        header = Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])  # reads the header only: the claimed size
    except Exception as error:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise InvalidImage(f"cannot decode {what} as JPEG or PNG: {error}") from None
    width, height = header.size
    reduction = 1
    if max_pixels is not None and header.format == "JPEG" and width * height > max_pixels:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for free: take the largest that still gives max_pixels.
        reduction = max(r for r in (1, 2, 4, 8) if (width // r) * (height // r) >= max_pixels)
    if (width // reduction) * (height // reduction) > limit_pixels:
        raise InvalidImage(f"{what} claims {width}x{height} pixels, more than the {limit_pixels} accepted")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _IMREAD[reduction])
    if bgr is None or bgr.ndim != 3:
        raise InvalidImage(f"cannot decode {what} as JPEG or PNG: its data is corrupt or truncated")
    return shrink(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), max_pixels)


def rgb_from_msg(msg, max_pixels: int | None = None, *, limit_pixels: int = MAX_MESSAGE_PIXELS) -> np.ndarray:
    """Either message type (a CompressedImage has ``format``, an Image has ``encoding``) as RGB uint8, downscaled
    to at most ``max_pixels`` when given. Handy as the decoder a FrameBuffer calls for accepted frames.
    ``limit_pixels``: a larger claimed size is refused before decoding."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_from_msg(msg, max_pixels, limit_pixels=limit_pixels)
    return shrink(image_from_msg(msg, limit_pixels=limit_pixels), max_pixels)


def shrink(rgb: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """``rgb`` downscaled (never enlarged) to at most ``max_pixels``, aspect kept, to the size the engine's own
    downscale gives; area averaging, so a frame shrunk here and one shrunk by the engine look alike."""
    height, width = rgb.shape[:2]
    if max_pixels is None or height * width <= max_pixels:
        return rgb
    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)


def is_compressed_topic(topic: str) -> bool:
    """The package's convention: a camera topic ending in ``/compressed`` carries CompressedImage."""
    return topic.rstrip("/").endswith("/compressed")


# -- building messages (CLI live client, tests, benches) -------------------------------------------------------


def image_to_msg(image: np.ndarray, msg_cls, header=None, encoding: str = "rgb8"):
    """A ``msg_cls`` (sensor_msgs/msg/Image) holding ``image``: (H, W, 3) uint8 RGB for rgb8/bgr8, (H, W) for mono8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InvalidImage(f"image_to_msg needs uint8 pixels, got {image.dtype}")
    if encoding in ("rgb8", "bgr8"):
        if image.ndim != 3 or image.shape[2] != 3:
            raise InvalidImage(f"{encoding} needs an (H, W, 3) RGB array, got shape {image.shape}")
        pixels = image if encoding == "rgb8" else image[..., ::-1]
    elif encoding == "mono8":
        if image.ndim != 2:
            raise InvalidImage(f"mono8 needs an (H, W) array, got shape {image.shape}")
        pixels = image
    else:
        raise InvalidImage(f"image_to_msg builds rgb8, bgr8 or mono8, not {encoding!r}")
    msg = msg_cls()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(image.shape[0]), int(image.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * (1 if pixels.ndim == 2 else 3)
    msg.data = _byte_array(pixels)
    return msg


def compressed_to_msg(image: np.ndarray, msg_cls, header=None, fmt: str = "jpeg", quality: int = 90):
    """A ``msg_cls`` (sensor_msgs/msg/CompressedImage) holding ``image`` (RGB uint8) encoded as JPEG or PNG."""
    if fmt not in ("jpeg", "png"):
        raise InvalidImage(f"compressed_to_msg encodes 'jpeg' or 'png', not {fmt!r}")
    out = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    pil.save(out, format="JPEG", quality=quality) if fmt == "jpeg" else pil.save(out, format="PNG")
    msg = msg_cls()
    if header is not None:
        msg.header = header
    msg.format = fmt
    msg.data = array.array("B", out.getvalue())
    return msg


# -- helpers ---------------------------------------------------------------------------------------------------

_IMREAD = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
           8: cv2.IMREAD_REDUCED_COLOR_8}
_BRIDGE = CvBridge() if CvBridge is not None else None
_bridge_failed: set[str] = set()  # encodings cv_bridge refused once: this module converts them from then on


def _bridged(msg, encoding: str) -> np.ndarray | None:
    """cv_bridge's RGB of a message already checked here, or None where it cannot convert it (a duck-typed
    message, an encoding it refuses): then this module's converter does, with the same checks behind it."""
    if encoding in _bridge_failed or type(msg).__module__.split(".")[0] != "sensor_msgs":
        return None
    try:
        return _BRIDGE.imgmsg_to_cv2(msg, desired_encoding="rgb8")
    except Exception:  # CvBridgeError and whatever its conversion raises: ours is validated and total
        _bridge_failed.add(encoding)
        return None


def _shown(value, limit: int = 40) -> str:
    """A field as sent, quoted and cut: an error must not echo a 5,000-character encoding whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def _count(msg, field: str) -> int:
    value = getattr(msg, field, None)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise InvalidImage(f"image field {field} must be a non-negative integer, got {value!r}")
    return int(value)


def _bytes_of(data, expected: int | None = None):
    """``data`` as a 1-D byte buffer, without copying when it supports the buffer protocol. The length is checked
    against ``expected`` before a list of ints is converted, so a bogus message never costs an allocation."""
    try:
        view = memoryview(data)
    except TypeError:
        view = None
    if view is not None:
        if view.itemsize != 1 or view.ndim != 1:
            if not view.c_contiguous:
                raise InvalidImage("image data must be a contiguous byte buffer")
            view = view.cast("B")
        size = view.nbytes
    elif isinstance(data, (list, tuple)):
        size = len(data)
    else:
        raise InvalidImage(f"image data must be bytes or a sequence of bytes, got {type(data).__name__}")
    if expected is not None and size != expected:
        raise InvalidImage(f"image data has {size} bytes, but step x height = {expected} bytes were expected")
    if view is not None:
        return view
    try:
        return bytes(data)  # a list of ints in [0, 255]
    except (TypeError, ValueError) as error:
        raise InvalidImage(f"image data is not a sequence of bytes: {error}") from None


def _byte_array(pixels: np.ndarray) -> array.array:
    # array.array('B') is what rclpy's setter stores as-is; bytes or a list would be checked element by element.
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(pixels).tobytes())
    return data
