# SPDX-License-Identifier: Apache-2.0
"""The camera frames the page shows, kept so that a registration takes the very frame the user drew a box on.

Each frame gets an id of its own (increasing; stamps may repeat or be zero) and is kept as it arrived, decoded only
when someone looks at it (a JPEG for the page, pixels for a registration), so frames nobody watches cost their
storage alone. The recent ones roll over after ``keep_seconds``; the page *holds* the frame it freezes on when the
user starts a box, so that typing a name may take as long as it takes: at most ``max_held`` are held, the oldest
hold let go first. No ROS here: the bridge feeds it from its subscription.
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

    def __init__(self, keep_seconds: float = 5.0, max_recent: int = 150, max_held: int = 16):
        self.keep_seconds, self.max_held = keep_seconds, max_held
        self._recent: collections.deque[Frame] = collections.deque(maxlen=max_recent)
        self._held: collections.OrderedDict[int, Frame] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Frame], None]] = []

    def add(self, stamp: float, camera_frame: str, decode: Callable[[], np.ndarray]) -> Frame:
        frame = Frame(next(self._ids), stamp, camera_frame, decode)
        with self._lock:
            self._recent.append(frame)
            while self._recent and frame.arrived - self._recent[0].arrived > self.keep_seconds:
                self._recent.popleft()
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

    def get(self, frame_id: int) -> Frame:
        """The frame ``frame_id``, held or recent; FrameGone when it is neither."""
        with self._lock:
            frame = self._held.get(frame_id) or next((f for f in self._recent if f.id == frame_id), None)
        if frame is None:
            raise FrameGone(f"frame {frame_id} is no longer kept (frames are kept {self.keep_seconds:g} s unless a "
                            "page holds them): draw the box again on the live view")
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
