# SPDX-License-Identifier: Apache-2.0
"""The camera frames the page shows, kept so that a registration takes the very frame the user drew a box on.

Each frame gets an id of its own (increasing; stamps may repeat or be zero) and is kept as it arrived, decoded only
when someone looks at it (a JPEG for the page, pixels for a registration), so frames nobody watches cost their
storage alone. Three bounded sets, so that memory stays bounded whatever the camera's rate and size (a 1280x720
frame is 2.7 MB): the last ``max_recent`` frames that arrived; the last ``max_served`` frames sent to a page (each
page asks for the next frame once it has drawn the last, so these are what the pages are showing); and the frames
*held* by a page, which holds the frame it freezes on when the user starts a box, so that typing a name may take
as long as it takes (at most ``max_held``, the oldest hold let go first). No ROS here: the bridge feeds it from its
subscription.
"""

from __future__ import annotations

import collections
import io
import itertools
import threading
import time
from typing import Callable

import numpy as np

JPEG_QUALITY = 80


class FrameGone(LookupError):
    """The frame asked for is no longer kept (or never was)."""


class Frame:
    """One camera frame: ``id`` (ours), ``stamp`` (its header's, seconds), ``frame_id``; pixels decoded once."""

    def __init__(self, frame_id: int, stamp: float, camera_frame: str, decode: Callable[[], np.ndarray]):
        self.id, self.stamp, self.camera_frame = frame_id, stamp, camera_frame
        self.arrived = time.monotonic()
        self._decode = decode
        self._pixels: np.ndarray | None = None
        self._jpeg: bytes | None = None
        self._lock = threading.Lock()

    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB, exactly as the camera sent it (decoded once, then shared)."""
        with self._lock:
            if self._pixels is None:
                self._pixels = self._decode()
                self._decode = None  # let go of the message
            return self._pixels

    def jpeg(self) -> bytes:
        """The frame as the page shows it (encoded once, whoever asks)."""
        pixels = self.pixels()
        with self._lock:
            if self._jpeg is None:
                from PIL import Image

                out = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="JPEG", quality=JPEG_QUALITY)
                self._jpeg = out.getvalue()
            return self._jpeg

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        height, width = self.pixels().shape[:2]
        return width, height


class FrameStore:
    """Recent frames (thread-safe: the ROS thread adds, the web handlers read), and the frames held by pages."""

    def __init__(self, max_recent: int = 8, max_served: int = 32, max_held: int = 16):
        self.max_held = max_held
        self._recent: collections.deque[Frame] = collections.deque(maxlen=max_recent)
        self._served: collections.deque[Frame] = collections.deque(maxlen=max_served)
        self._held: collections.OrderedDict[int, Frame] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Frame], None]] = []

    def add(self, stamp: float, camera_frame: str, decode: Callable[[], np.ndarray]) -> Frame:
        frame = Frame(next(self._ids), stamp, camera_frame, decode)
        with self._lock:
            self._recent.append(frame)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(frame)
        return frame

    def on_frame(self, listener: Callable[[Frame], None]) -> None:
        """Call ``listener(frame)`` for every new frame (on the adding thread)."""
        with self._lock:
            self._listeners.append(listener)

    def latest(self) -> Frame | None:
        with self._lock:
            return self._recent[-1] if self._recent else None

    def served(self, frame: Frame) -> None:
        """``frame`` was sent to a page: keep it while pages may still be showing it."""
        with self._lock:
            if frame not in self._served:
                self._served.append(frame)

    def get(self, frame_id: int) -> Frame:
        """The frame ``frame_id``, held, shown or recent; FrameGone when it is none of them."""
        with self._lock:
            frame = self._held.get(frame_id) or next(
                (f for f in (*self._served, *self._recent) if f.id == frame_id), None)
        if frame is None:
            raise FrameGone(f"frame {frame_id} is no longer kept (a page holds the frame it pauses on; others go "
                            "as new ones come): draw the box again on the live view")
        return frame

    def hold(self, frame_id: int) -> Frame:
        """Keep ``frame_id`` past the rolling window (the page froze on it); the oldest hold beyond ``max_held``
        is let go."""
        frame = self.get(frame_id)
        with self._lock:
            self._held[frame.id] = frame
            self._held.move_to_end(frame.id)
            while len(self._held) > self.max_held:
                self._held.popitem(last=False)
        return frame

    def release(self, frame_id: int) -> None:
        with self._lock:
            self._held.pop(frame_id, None)
