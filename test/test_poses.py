# SPDX-License-Identifier: Apache-2.0
"""The robot's pose history on real ROS 2 messages (no graph: ``PoseHistory.add`` is the subscription's
callback): the nearest pose in time, the age bound, the memory window, both message types."""

from __future__ import annotations

import pytest

pytest.importorskip("rclpy")
from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402

from ego_ros.ros.messages import time_msg  # noqa: E402
from ego_ros.ros.poses import KEEP_SEC, MAX_AGE_SEC, PoseHistory  # noqa: E402

EPOCH = 1_800_000_000.0  # a plausible ROS time, so float seconds keep their precision as in the node


def pose_at(t: float, x: float, *, frame: str = "map") -> PoseStamped:
    msg = PoseStamped()
    msg.header.stamp, msg.header.frame_id = time_msg(EPOCH + t), frame
    msg.pose.position.x, msg.pose.orientation.w = x, 1.0
    return msg


def test_the_nearest_pose_on_either_side_is_taken_with_its_distance_in_time():
    history = PoseHistory("/robot_pose")
    for t in (0.0, 0.1, 0.2, 0.5):
        history.add(pose_at(t, x=10 * t))
    for when, expected_x in ((0.04, 0.0), (0.06, 1.0), (0.26, 2.0), (0.4, 5.0), (0.9, 5.0), (-0.3, 0.0)):
        pose, age, note = history.nearest(EPOCH + when)
        assert pose.position[0] == pytest.approx(expected_x) and note == ""
        assert age == pytest.approx(abs(when - expected_x / 10), abs=1e-6)
    assert pose.frame_id == "map" and pose.orientation == (0.0, 0.0, 0.0, 1.0)


def test_no_pose_says_why():
    history = PoseHistory("/robot_pose")
    assert history.nearest(EPOCH) == (None, None, "no publisher on /robot_pose yet")
    history.add(pose_at(0.0, x=1.0))
    pose, age, note = history.nearest(EPOCH + MAX_AGE_SEC + 0.5)
    assert pose is None and age is None and "1.5 s from the sighting" in note


def test_old_poses_are_dropped_and_a_jump_back_in_time_starts_over():
    history = PoseHistory("/robot_pose")
    history.add(pose_at(0.0, x=1.0))
    history.add(pose_at(KEEP_SEC + 1.0, x=2.0))  # the first is now too old to keep
    assert history.nearest(EPOCH)[0] is None
    history.add(pose_at(0.5, x=3.0))  # a bag looped: the later pose is forgotten
    pose, _, _ = history.nearest(EPOCH + KEEP_SEC + 1.0)
    assert pose is None
    assert history.nearest(EPOCH + 0.5)[0].position[0] == 3.0


def test_odometry_gives_its_nested_pose():
    history = PoseHistory("/odom")
    odometry = Odometry()
    odometry.header.stamp, odometry.header.frame_id = time_msg(EPOCH), "odom"
    odometry.pose.pose.position.y, odometry.pose.pose.orientation.z = 4.0, 1.0
    history.add(odometry)
    pose, age, _ = history.nearest(EPOCH)
    assert pose.frame_id == "odom" and pose.position == (0.0, 4.0, 0.0) and pose.orientation[2] == 1.0 and age == 0
