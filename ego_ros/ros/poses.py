# SPDX-License-Identifier: Apache-2.0
"""The robot's recent poses, from a ``geometry_msgs/PoseStamped`` or ``nav_msgs/Odometry`` topic, to say where
the robot was when it saw something (the sightings memory keeps the pose nearest in time to each sighting).

The topic's type is taken from the graph once a publisher appears (so the node can start before the localisation
does); until then, and when the nearest pose is too far in time from the sighting, :meth:`PoseHistory.nearest`
says why there is none.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque

from ego_ros.ros.client import seconds
from ego_ros.sightings import Pose

TYPES = {"geometry_msgs/msg/PoseStamped": ("geometry_msgs.msg", "PoseStamped"),
         "nav_msgs/msg/Odometry": ("nav_msgs.msg", "Odometry")}
KEEP_SEC = 30.0  # poses older than this (behind the newest) are dropped
MAX_AGE_SEC = 1.0  # a pose further than this from a sighting in time is not its pose


class PoseHistory:
    """Poses of the last KEEP_SEC seconds, by stamp. Thread-safe: the subscription adds, the worker reads."""

    def __init__(self, topic: str):
        self.topic = topic
        self.type_name: str | None = None  # once subscribed
        self._lock = threading.Lock()
        self._stamps: deque[float] = deque()
        self._poses: deque[Pose] = deque()
        self.note = f"no publisher on {topic} yet"

    def subscribe(self, node, callback_group=None) -> object | None:
        """Subscribe if the topic has a publisher of a known type; returns the subscription, or None (try again
        later: ``note`` says why not)."""
        import importlib

        from rclpy.qos import qos_profile_sensor_data

        resolved = node.resolve_topic_name(self.topic)
        types = {t for topic, names in node.get_topic_names_and_types() if topic == resolved for t in names}
        known = sorted(types & set(TYPES))
        if not known:
            self.note = (f"{self.topic} has the type {sorted(types)[0]}, not PoseStamped or Odometry" if types
                         else f"no publisher on {self.topic} yet")
            return None
        self.type_name = known[0]
        module, name = TYPES[self.type_name]
        msg_type = getattr(importlib.import_module(module), name)
        self.note = f"no message on {self.topic} yet"
        return node.create_subscription(msg_type, self.topic, self.add, qos_profile_sensor_data,
                                        callback_group=callback_group)

    def add(self, msg) -> None:
        pose = msg.pose.pose if hasattr(msg, "twist") else msg.pose  # Odometry nests a PoseWithCovariance
        p, q = pose.position, pose.orientation
        stamp = seconds(msg.header.stamp)
        entry = Pose(msg.header.frame_id, (p.x, p.y, p.z), (q.x, q.y, q.z, q.w))
        with self._lock:
            if self._stamps and stamp < self._stamps[-1]:  # time went back (a bag loop): start over
                self._stamps.clear()
                self._poses.clear()
            self._stamps.append(stamp)
            self._poses.append(entry)
            while self._stamps and self._stamps[0] < stamp - KEEP_SEC:
                self._stamps.popleft()
                self._poses.popleft()

    def nearest(self, stamp: float) -> tuple[Pose | None, float | None, str]:
        """(pose, its distance in time from ``stamp`` in seconds, "") or (None, None, why there is none)."""
        with self._lock:
            if not self._stamps:
                return None, None, self.note
            i = bisect.bisect_left(self._stamps, stamp)
            best = min((j for j in (i - 1, i) if 0 <= j < len(self._stamps)),
                       key=lambda j: abs(self._stamps[j] - stamp))
            age = abs(self._stamps[best] - stamp)
            if age > MAX_AGE_SEC:
                return None, None, f"the nearest pose on {self.topic} is {age:.1f} s from the sighting"
            return self._poses[best], age, ""
