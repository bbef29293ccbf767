# SPDX-License-Identifier: Apache-2.0
"""``ego-ros camera``: publish a :class:`~ego_ros.ros.camera_sources.FrameSource` as a ROS 2 camera.

Each frame goes out as a ``sensor_msgs/Image`` (rgb8) on TOPIC, and with ``compressed`` also as a JPEG
``sensor_msgs/CompressedImage`` on ``TOPIC/compressed`` (the image_transport convention), both with the same
header: the node clock's time of the frame, and ``frame_id``. Frames are published on a fixed schedule of
``rate`` Hz (a late frame does not cause a burst: the schedule skips ahead). The publisher is reliable with a
short queue, which both reliable and best-effort (sensor-data) subscribers accept. The topic is relative by
default, ``camera/image_raw``, as the node's ``camera_topics`` in config/ego.yaml: in a namespace (``--ros-args -r
__ns:=/robot1``) both resolve to ``/robot1/camera/image_raw``.

With ``grade`` (the toy world only), the camera also listens to the node's recognition events on that topic and
grades each against what the frame it names really showed (:class:`EventGrader`), printing the tally when it
stops: scripts/run.sh's demo ends with it.
"""

from __future__ import annotations

import array
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ego_ros.ros.camera_sources import FrameSource

DEFAULT_TOPIC = "camera/image_raw"
DEFAULT_FRAME_ID = "camera"
JPEG_QUALITY = 90
QUEUE_DEPTH = 5


@dataclass
class Published:
    frames: int
    seconds: float

    @property
    def rate(self) -> float:
        return (self.frames - 1) / self.seconds if self.frames > 1 and self.seconds > 0 else 0.0


def image_msg(frame: np.ndarray, header):
    """An rgb8 ``sensor_msgs/Image`` of an (H, W, 3) uint8 RGB frame."""
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header = header
    msg.height, msg.width = int(frame.shape[0]), int(frame.shape[1])
    msg.encoding, msg.is_bigendian, msg.step = "rgb8", 0, 3 * msg.width
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
    msg.data = data
    return msg


def compressed_msg(frame: np.ndarray, header):
    """A JPEG ``sensor_msgs/CompressedImage`` of an RGB frame, encoded by OpenCV."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("OpenCV could not encode a frame as JPEG")
    msg = CompressedImage()
    msg.header = header
    msg.format = "rgb8; jpeg compressed bgr8"  # what compressed_image_transport writes
    msg.data = array.array("B", encoded.tobytes())
    return msg


class EventGrader:
    """The node's recognition events about the toy camera's frames, against what each frame showed
    (:class:`ego_ros.toy.tally.Tally`). Frames are known by their header stamp; events about other frames (another
    camera, or frames older than the last ``remember``) are not counted."""

    def __init__(self, camera, remember: int = 1000):
        from ego_ros.toy.tally import Tally

        self.camera, self.remember = camera, remember
        self.tally = Tally(camera)
        self._sent: OrderedDict[tuple[int, int], float] = OrderedDict()  # stamp -> the frame's time on the pan
        self.ignored = 0

    def sent(self, stamp, t: float) -> None:
        self._sent[(stamp.sec, stamp.nanosec)] = t
        while len(self._sent) > self.remember:
            self._sent.popitem(last=False)

    def heard(self, event) -> None:
        t = self._sent.pop((event.header.stamp.sec, event.header.stamp.nanosec), None)
        if t is None:
            self.ignored += 1
            return
        self.tally.add(self.camera.frame_at(t), {d.name for d in event.detections})

    def report(self) -> str:
        return (f"camera: the node's recognition events against what their frames showed ({self.tally.frames} "
                f"events graded, {self.ignored} about other frames):\n{self.tally.table()}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def publish(source: FrameSource, *, topic: str = DEFAULT_TOPIC, rate: float, frame_id: str = DEFAULT_FRAME_ID,
            compressed: bool = False, count: int | None = None, ros_args: list[str] | None = None,
            grade: str | None = None, log=lambda line: print(line, file=sys.stderr, flush=True)) -> Published:
    """Publish ``source`` at ``rate`` Hz until it ends, ``count`` frames are out, or Ctrl-C; with ``grade`` (a
    :class:`~ego_ros.ros.camera_sources.ToySource` only), grade the recognition events heard on that topic."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

    context = rclpy.Context()
    rclpy.init(args=["ego_camera", "--ros-args", *(ros_args or [])], context=context)
    if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, a script's end) stops it like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    node = rclpy.create_node("camera", context=context)
    grader = EventGrader(source.camera) if grade else None
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    published = 0
    start = last = time.monotonic()

    def wait(seconds: float) -> None:  # with a grader, its events are taken in while the camera waits
        if grader is None:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and context.ok():
            executor.spin_once(timeout_sec=left)

    try:
        if grader is not None:
            from ego_ros.msg import RecognitionEvent

            events = node.create_subscription(RecognitionEvent, grade, grader.heard, 10)
            log(f"camera: grading the recognition events on {events.topic_name} against what the frames show")
        qos = QoSProfile(depth=QUEUE_DEPTH)
        raw = node.create_publisher(Image, topic, qos)
        packed = node.create_publisher(CompressedImage, f"{raw.topic_name}/compressed", qos) if compressed else None
        log(f"camera: publishing {source.name} on {raw.topic_name}"
            + (f" and {packed.topic_name}" if packed else "") + f" at {rate:g} Hz, frame_id {frame_id!r}")
        period = 1.0 / rate
        tick = 0
        while context.ok() and (count is None or published < count):
            frame = source.read(tick * period)
            if frame is None:
                break
            header = Header(frame_id=frame_id, stamp=node.get_clock().now().to_msg())
            try:
                raw.publish(image_msg(frame, header))
                if packed is not None:
                    packed.publish(compressed_msg(frame, header))
            except Exception:  # noqa: BLE001 - SIGTERM or Ctrl-C shut the context down (rclpy's handler): stop
                if context.ok():
                    raise
                break
            if grader is not None:
                grader.sent(header.stamp, tick * period)
            published += 1
            last = time.monotonic()
            if published == 1:
                log(f"camera: first frame {frame.shape[1]}x{frame.shape[0]} rgb8")
            tick += 1
            delay = start + tick * period - time.monotonic()
            if delay > 0:
                wait(delay)
            elif delay < -period:  # fell behind (a slow source or a loaded machine): skip, do not burst
                tick = int((time.monotonic() - start) / period) + 1
                wait(max(0.0, start + tick * period - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        done = Published(published, last - start)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        source.close()
    log(f"camera: published {done.frames} frames in {done.seconds:.1f} s ({done.rate:.1f} Hz)")
    if grader is not None:
        log(grader.report())
    return done
