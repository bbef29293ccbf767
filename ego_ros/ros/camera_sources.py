# SPDX-License-Identifier: Apache-2.0
"""Where ``ego-ros camera`` takes its frames from: a camera device, a video file, a folder of images, or the toy world.

:func:`open_source` turns the SOURCE argument into a :class:`FrameSource`, opening it at once and reading its first
frame, so that a source that does not open fails before anything is published (:class:`SourceError`, an OSError:
the command prints one line and exits 1). Frames are (H, W, 3) uint8 RGB arrays, read with OpenCV (decoding a
video or a JPEG, grabbing from V4L2); no ROS here.

    SOURCE   what                                        frames                            own rate
    0, 1..   camera device index (/dev/video0 ...)       the device's latest frame         the device's
    PATH     a camera device (/dev/video*)               idem                              idem
    DIR      a folder of images (.png .jpg ...), sorted   one image each, by file name      none (10 Hz)
    FILE     a video file (anything FFmpeg reads)        one frame each, in order          the file's fps
    IMG      one image file                               that image, again and again       none (10 Hz)
    toy      the toy world (ego_ros.toy.camera)  personal instances in and out     none (10 Hz)

Files and folders start over at their end unless ``loop=False`` (then :meth:`FrameSource.read` returns None).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_RATE = 10.0  # Hz, for sources without a rate of their own


class SourceError(OSError):
    """A camera source that does not open or cannot be read."""


def _cv2():
    # OpenCV's and FFmpeg's own warnings (e.g. "can't open camera by index") would come before our one error line.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - opencv-python-headless is a requirement
        raise SourceError(f"OpenCV is not installed ({error}): pip install -r requirements.txt") from None
    return cv2


def _rgb(frame: np.ndarray) -> np.ndarray:
    """An OpenCV frame (BGR, BGRA or gray) as contiguous RGB uint8."""
    cv2 = _cv2()
    if frame.dtype != np.uint8:  # 16-bit images: the top 8 bits
        frame = (frame >> 8).astype(np.uint8) if frame.dtype == np.uint16 else frame.astype(np.uint8)
    if frame.ndim == 2 or frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB if frame.shape[2] == 4 else cv2.COLOR_BGR2RGB)


class FrameSource:
    """Frames, one per :meth:`read`; ``rate``: the source's own frame rate in Hz, or None; ``name``: in words."""

    rate: float | None = None
    name: str = ""

    def read(self, t: float) -> np.ndarray | None:
        """The frame to publish ``t`` seconds after the start; None when a source that does not loop has ended."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderSource(FrameSource):
    def __init__(self, files: list[Path], name: str, loop: bool):
        self.files, self.name, self.loop, self.index = files, name, loop, 0
        self._first = self._decode(files[0])

    @staticmethod
    def _decode(path: Path) -> np.ndarray:
        cv2 = _cv2()
        frame = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if frame is None:
            raise SourceError(f"cannot read the image {path} (not an image OpenCV decodes)")
        return _rgb(frame)

    def read(self, t: float) -> np.ndarray | None:
        if self.index >= len(self.files):
            if not self.loop:
                return None
            self.index = 0
        path, self.index = self.files[self.index], self.index + 1
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        return self._decode(path)


class VideoSource(FrameSource):
    def __init__(self, path: Path, loop: bool):
        cv2 = _cv2()
        self.path, self.loop, self.name = path, loop, f"video file {path}"
        self.capture = cv2.VideoCapture(str(path))
        ok, frame = self.capture.read() if self.capture.isOpened() else (False, None)
        if not ok:
            self.capture.release()
            raise SourceError(f"cannot read the video file {path} (not a video OpenCV's FFmpeg decodes)")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.rate = float(fps) if fps and 0 < fps < 1000 else None
        self._first = _rgb(frame)

    def read(self, t: float) -> np.ndarray | None:
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        ok, frame = self.capture.read()
        if not ok and self.loop:
            self.capture.set(_cv2().CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.capture.read()
        return _rgb(frame) if ok else None

    def close(self) -> None:
        self.capture.release()


class DeviceSource(FrameSource):
    """A camera device, read continuously by a thread: :meth:`read` returns the newest frame, never a stale one."""

    def __init__(self, device: int | str, wait: float = 5.0):
        cv2 = _cv2()
        self.name = f"camera device {device}"
        # V4L2 on Linux: any backend would also probe others (e.g. Orbbec's), which log their own errors.
        self.capture = cv2.VideoCapture(device, cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY)
        if not self.capture.isOpened():
            self.capture.release()
            raise SourceError(f"cannot open the {self.name} (is a camera connected, and readable by this user?)")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.rate = float(fps) if fps and 0 < fps < 1000 else None
        self._latest: np.ndarray | None = None
        self._lock, self._stop, self._got = threading.Lock(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._grab, name="camera-grab", daemon=True)
        self._thread.start()
        if not self._got.wait(wait):
            self.close()
            raise SourceError(f"the {self.name} opened but gave no frame in {wait:g} s")

    def _grab(self) -> None:
        while not self._stop.is_set():
            ok, frame = self.capture.read()
            if not ok:
                time.sleep(0.01)
                continue
            with self._lock:
                self._latest = frame
            self._got.set()

    def read(self, t: float) -> np.ndarray | None:
        with self._lock:
            frame = self._latest
        return _rgb(frame)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self.capture.release()


class ToySource(FrameSource):
    def __init__(self):
        from ego_ros.toy.camera import ToyCamera

        self.camera = ToyCamera()
        self.name = "the toy world (" + ", ".join(f"{name}: {instance.phrase}"
                                                  for name, instance in self.camera.names.items()) + ")"

    def read(self, t: float) -> np.ndarray:
        return self.camera.frame_at(t).image


def open_source(spec: str, *, loop: bool = True) -> FrameSource:
    """The source named by SOURCE (module docstring), opened and with its first frame read."""
    spec = spec.strip()
    if spec == "toy":
        return ToySource()
    if spec.isdigit():
        return DeviceSource(int(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"no camera source {spec!r}: not a device index, an existing file or folder, or 'toy'")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise SourceError(f"no images in the folder {path} (looked for {' '.join(IMAGE_SUFFIXES)})")
        return FolderSource(files, f"{len(files)} images of {path}", loop)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FolderSource([path], f"the image {path}", True)
    if str(path).startswith("/dev/"):
        return DeviceSource(str(path))
    return VideoSource(path, loop)
