# SPDX-License-Identifier: Apache-2.0
"""The page's way to the robot: an :class:`~ego_ros.ros.commander.EgoCommander` (the node's services and its answer
action, spun in a background thread), plus two subscriptions on the commander's own rclpy node: the camera, whose
frames go into a :class:`~ego_ros.web.frames.FrameStore`, and the node's recognition events, passed on as dicts.

Nothing here knows about HTTP; the web handlers await the commander's tasks and read the store.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ego_ros.ros.client import seconds
from ego_ros.web.frames import FrameStore

# How long a request waits for the node's service to be there before the page is told the node is not running.
NODE_TIMEOUT = 5.0


def roi_box(roi) -> list[int] | None:
    """A ``RegionOfInterest`` as [x0, y0, x1, y1] (exclusive); None for an empty one."""
    if roi.width == 0 or roi.height == 0:
        return None
    return [roi.x_offset, roi.y_offset, roi.x_offset + roi.width, roi.y_offset + roi.height]


def detections_of(detections) -> list[dict]:
    """``ConceptDetection`` messages as the page draws them: name, score, box (or None), most likely first."""
    found = [{"name": d.name, "score": round(float(d.score), 4), "box": roi_box(d.box)} for d in detections]
    return sorted(found, key=lambda d: (-d["score"], d["name"]))


class RobotBridge:
    """The commander, the camera's frames and the recognition events of the node ``node``, from camera ``camera``
    (a topic name, relative ones resolved in this process's namespace like the node's; ``.../compressed``: a
    ``CompressedImage`` topic)."""

    def __init__(self, node: str | None, camera: str, frames: FrameStore, *, timeout: float = NODE_TIMEOUT):
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        from ego_ros.msg import RecognitionEvent
        from ego_ros.ros.commander import EgoCommander
        from ego_ros.ros.image_msgs import is_compressed_topic

        self.frames = frames
        self.commander = EgoCommander(node, timeout=timeout)
        self.node = self.commander.node
        ros = self.commander.ros_node
        try:
            self.camera = ros.resolve_topic_name(camera)
            kind = CompressedImage if is_compressed_topic(camera) else Image
            # Best effort matches a camera publishing either way (ego-ros camera publishes reliably).
            ros.create_subscription(kind, camera, self._on_frame, qos_profile_sensor_data)
            events = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
            ros.create_subscription(RecognitionEvent, f"{self.node}/recognitions", self._on_event, events)
        except BaseException:
            self.commander.close()
            raise
        self._clock = ros.get_clock()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[dict], None]] = []
        self.latest_event: dict | None = None

    def close(self) -> None:
        self.commander.close()

    # -- state

    def node_ready(self) -> bool:
        """Whether the node's services are there now (an active node)."""
        return bool(self.commander.services["list_concepts"].service_is_ready())

    def on_event(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        """Call ``listener(event dict)`` for each recognition event about our camera; returns the way to stop."""
        with self._lock:
            self._listeners.append(listener)

        def stop() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return stop

    # -- the commander's thread

    def _on_frame(self, msg) -> None:
        from ego_ros.ros.image_msgs import rgb_from_msg
        from ego_ros.ros.requests import MAX_REQUEST_PIXELS

        stamp = seconds(msg.header.stamp) or self._clock.now().nanoseconds * 1e-9  # a zero stamp: its arrival
        self.frames.add(stamp, msg.header.frame_id, lambda: rgb_from_msg(msg, limit_pixels=MAX_REQUEST_PIXELS))

    def _on_event(self, event) -> None:
        if not self._is_our_camera(event.camera):
            return
        data = {"camera": event.camera, "stamp": seconds(event.header.stamp), "frame_id": event.header.frame_id,
                "detections": detections_of(event.detections), "appeared": list(event.appeared),
                "disappeared": list(event.disappeared), "received": time.time()}
        with self._lock:
            self.latest_event = data
            listeners = list(self._listeners)
        for listener in listeners:
            listener(data)

    def _is_our_camera(self, name: str) -> bool:
        """The node names a camera as its camera_topics has it ("camera/image_raw"), relative to its namespace."""
        if not name:
            return True
        try:
            return name == self.camera or self.commander.ros_node.resolve_topic_name(name) == self.camera
        except Exception:  # noqa: BLE001 - a name rclpy cannot resolve is not ours
            return False
