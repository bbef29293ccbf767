# SPDX-License-Identifier: Apache-2.0
"""The ROS 2 side of ego_ros: the ``ego`` lifecycle node and the pieces it is built from.

The pure helpers here never import rclpy, so they are tested without a ROS graph and reused by the CLI and benches:

- :mod:`.frame_buffer`: one rolling, decimated, bounded buffer of recent frames per camera.
- :mod:`.image_msgs`: ``sensor_msgs/Image`` and ``CompressedImage`` <-> RGB uint8 arrays, validated before allocating.
- :mod:`.worker`: the single thread that owns the model; user requests run ahead of periodic recognition.
- :mod:`.hysteresis`: turns per-frame recognition scores into appeared / disappeared events without flicker.
- :mod:`.camera_sources`: the frames of ``ego-ros camera`` (a device, a video file, images, the toy world), via
  OpenCV.
- :mod:`.camera`: publishes them as a ROS 2 camera (``sensor_msgs/Image``, optionally ``CompressedImage``); it
  imports rclpy inside its function only.

Only the node and client modules import rclpy; this ``__init__`` imports nothing so ``import ego_ros.ros.X``
stays cheap and ROS-free.
"""
