# SPDX-License-Identifier: Apache-2.0
"""A rolling buffer of recent camera frames: decimated, downscaled on arrival, bounded in time, count and bytes.

One per camera. The ROS callback thread calls :meth:`FrameBuffer.offer` for every message; the inference worker
reads :meth:`latest`, :meth:`window` (a video clip) or :meth:`sample` (views to register a concept from).

Cost per message is what matters: a camera at 30 Hz into a 2 fps buffer refuses 14 of 15 frames, so the keep/refuse
decision is made from the stamp alone, *before* decoding. ``offer`` takes either an image or a zero-argument
callable that decodes one; the callable runs only for accepted frames.

Memory is bounded by construction: at most ``capacity`` = ceil(seconds * fps) + 1 frames (a deque with that
``maxlen``, so insert is O(1)), each of at most ``max_pixels`` RGB pixels, i.e. ``capacity_bytes``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
from PIL import Image

from ego_ros.engine.images import to_rgb

FrameSource = Union[np.ndarray, Image.Image, Callable[[], Union[np.ndarray, Image.Image]]]

# A stamp this far behind the newest frame is a bag loop or a simulator reset, not a late message: start over.
DEFAULT_RESET_JUMP_SEC = 1.0
# Input and accepted rates are measured over the offers of the last few seconds (wall clock, see stats()).
RATE_WINDOW_SEC = 2.0
_RATE_SAMPLES = 2048  # caps the bookkeeping; input rates above ~1 kHz read low, which no camera reaches
# Stamps built from sec + nanosec * 1e-9 carry float noise; a frame due at 0.5 s must not be refused at 0.4999999.
_STAMP_EPS = 1e-6


@dataclass(frozen=True)
class Frame:
    stamp_sec: float
    image: np.ndarray  # (H, W, 3) uint8 RGB, read-only, at most max_pixels pixels
    header: object | None = None  # the message's std_msgs/Header, to stamp events about this frame
    received: float = 0.0  # when it was offered, on the buffer's (wall) clock: how old it is, whatever its stamp
    size: tuple[int, int] | None = None  # (width, height) as the camera sent it, before the buffer shrank it

    def to_sent(self, box) -> tuple[int, int, int, int]:
        """A box (x0, y0, x1, y1) in this frame's pixels, in the pixels of the frame as the camera sent it."""
        height, width = self.image.shape[:2]
        sx, sy = (self.size[0] / width, self.size[1] / height) if self.size else (1.0, 1.0)
        return (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))


class FrameBuffer:
    """Recent frames of one camera. Thread-safe: one thread offers, any thread reads.

    Decimation keeps a schedule of due times ``period = 1 / fps`` apart: a frame is accepted when its stamp reaches
    the next due time. Note: this is phase-locked rather than "at least ``period`` after the last accepted frame",
    which would keep 15 Hz input at 1.875 fps (every 8th frame) and drift lower still with stamp jitter; the
    schedule keeps the accepted rate at ``fps`` on average. After a gap longer than a period the schedule restarts
    from the next frame, so a pause never causes a burst.
    """

    def __init__(self, seconds: float, fps: float, max_pixels: int, *,
                 reset_jump_sec: float = DEFAULT_RESET_JUMP_SEC, clock: Callable[[], float] = time.monotonic,
                 on_jump_back: Callable[[float, int], None] | None = None):
        for field, value in (("seconds", seconds), ("fps", fps), ("reset_jump_sec", reset_jump_sec)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{field} must be a positive number, got {value!r}")
        if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        self.seconds = float(seconds)
        self.fps = float(fps)
        self.max_pixels = max_pixels
        self.reset_jump_sec = float(reset_jump_sec)
        self.period = 1.0 / self.fps
        self.capacity = math.ceil(self.seconds * self.fps) + 1
        self._clock = clock  # wall clock for rates only; frame order and age always come from the stamps
        self._on_jump_back = on_jump_back  # called (seconds back, frames dropped) when time goes back
        self._lock = threading.Lock()
        self._frames: deque[Frame] = deque(maxlen=self.capacity)
        self._offers: deque[float] = deque(maxlen=_RATE_SAMPLES)
        self._accepts: deque[float] = deque(maxlen=_RATE_SAMPLES)
        self._first_offer: float | None = None
        self._generation = 0  # bumped by every clear, so a decode that straddles a clear is dropped
        self._reset_schedule()

    def _reset_schedule(self) -> None:
        self._last_stamp: float | None = None  # newest accepted (or being decoded) stamp
        self._next_due = -math.inf
        self._generation += 1

    # -- writing ---------------------------------------------------------------------------------------------

    def offer(self, stamp_sec: float, frame_or_thunk: FrameSource, header: object | None = None) -> bool:
        """Keep this frame if the decimation schedule wants it; return whether it was kept.

        ``frame_or_thunk``: an image (array or PIL) or a callable returning one, called only when the frame is kept,
        outside the lock. An exception from it propagates and the frame counts as refused.
        """
        stamp = float(stamp_sec)
        with self._lock:
            offered_at = self._clock()
            self._offers.append(offered_at)
            if self._first_offer is None:
                self._first_offer = offered_at
            if not math.isfinite(stamp):
                return False
            if self._last_stamp is not None and stamp < self._last_stamp - self.reset_jump_sec:
                # Time went back (a bag loop, a simulator reset): the frames held are "from the future" of the new
                # clock and would poison windows and ages. Drop them and start over from this frame.
                jump, dropped = self._last_stamp - stamp, len(self._frames)
                self._frames.clear()
                self._reset_schedule()
                if self._on_jump_back is not None:
                    self._on_jump_back(jump, dropped)
            if stamp < self._next_due - _STAMP_EPS:
                return False  # too soon, or older than the newest frame (the due time is past the newest stamp)
            # Reserve the slot before decoding (outside the lock), so a reader never waits on a decode.
            previous = (self._last_stamp, self._next_due)
            self._last_stamp = stamp
            # Stay on the schedule while input keeps up; after a gap, restart it from this frame.
            due = self._next_due + self.period
            self._next_due = due if stamp < due else stamp + self.period
            generation = self._generation
        try:
            image = frame_or_thunk() if callable(frame_or_thunk) else frame_or_thunk
            size = image.size if hasattr(image, "getbands") else (np.shape(image)[1], np.shape(image)[0])
            array = np.asarray(to_rgb(image, self.max_pixels), dtype=np.uint8)
        except BaseException:
            with self._lock:  # give the slot back so the next frame is taken instead
                if self._generation == generation and self._last_stamp == stamp:
                    self._last_stamp, self._next_due = previous
            raise
        array.setflags(write=False)  # frames are shared with readers on other threads
        with self._lock:
            if self._generation != generation or (self._frames and stamp < self._frames[-1].stamp_sec):
                return False  # cleared, or overtaken by a newer frame, while decoding
            self._frames.append(Frame(stamp, array, header, offered_at, (int(size[0]), int(size[1]))))
            while stamp - self._frames[0].stamp_sec > self.seconds + _STAMP_EPS:
                self._frames.popleft()
            self._accepts.append(offered_at)
            return True

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._reset_schedule()

    # -- reading ---------------------------------------------------------------------------------------------

    def latest(self, max_age: float | None = None) -> Frame | None:
        """The newest frame; with ``max_age``, None when it arrived more than that many seconds ago (a camera
        that stopped publishing leaves its last frame here, which is not "what the camera sees" any more)."""
        with self._lock:
            if not self._frames or not self._fresh(max_age):
                return None
            return self._frames[-1]

    def age(self) -> float | None:
        """Seconds since the newest frame arrived (None: no frame)."""
        with self._lock:
            return self._clock() - self._frames[-1].received if self._frames else None

    def _fresh(self, max_age: float | None) -> bool:  # call with the lock held and a frame in the buffer
        return max_age is None or self._clock() - self._frames[-1].received <= max_age

    def window(self, seconds: float, max_frames: int, max_age: float | None = None) -> list[Frame]:
        """Frames of the last ``seconds`` before the newest, oldest first, evenly thinned to at most ``max_frames``.

        The newest frame is always included (and, when thinning, the oldest in the window too). With ``max_age``:
        nothing when the newest frame arrived more than that many seconds ago (see :meth:`latest`).
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        if not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
        with self._lock:
            if not self._frames or not self._fresh(max_age):
                return []
            start = self._frames[-1].stamp_sec - seconds - _STAMP_EPS
            frames = [frame for frame in self._frames if frame.stamp_sec >= start]
        return _spread(frames, max_frames)

    def sample(self, n: int, window_sec: float, max_age: float | None = None) -> list[Frame]:
        """``n`` frames spread evenly over the last ``window_sec`` (fewer if the buffer holds fewer): the views to
        register a concept from, so that they show it from as many moments (angles) as the window offers."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        return self.window(window_sec, n, max_age)

    def stats(self) -> dict:
        """For diagnostics: fill, memory use and its bound, span, input / accepted rates (Hz, wall clock), and the
        seconds since the last message (None: none yet)."""
        with self._lock:
            now = self._clock()
            # Over the last RATE_WINDOW_SEC, or since the first offer when the topic is younger than that.
            span = min(RATE_WINDOW_SEC, now - self._first_offer) if self._first_offer is not None else 0.0
            frames = len(self._frames)
            return {
                "frames": frames,
                "capacity": self.capacity,
                "bytes": sum(frame.image.nbytes for frame in self._frames),
                "capacity_bytes": self.capacity * self.max_pixels * 3,
                "span_sec": self._frames[-1].stamp_sec - self._frames[0].stamp_sec if frames else 0.0,
                "input_rate_hz": _rate(self._offers, now, span),
                "accepted_rate_hz": _rate(self._accepts, now, span),
                # Since the last message of any kind (kept or not): how long a silent camera has been silent.
                "last_message_age_sec": now - self._offers[-1] if self._offers else None,
            }


def _spread(frames: list[Frame], n: int) -> list[Frame]:
    """At most n of frames at evenly spaced indices, first and last included."""
    if len(frames) <= n:
        return frames
    if n == 1:
        return frames[-1:]
    step = (len(frames) - 1) / (n - 1)
    return [frames[round(i * step)] for i in range(n)]  # distinct indices since step > 1


def _rate(times: deque[float], now: float, span: float) -> float:
    """Events per second over the last ``span`` seconds. Counting over a fixed span (rather than between the first
    and last event) is unbiased for a sparse stream, and makes the rate of a camera that stopped publishing decay
    to 0 instead of freezing at its last value."""
    if span <= 0:
        return 0.0
    return sum(1 for t in times if t > now - span) / span
