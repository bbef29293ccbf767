# SPDX-License-Identifier: Apache-2.0
"""``ego-ros web``: the teleop page, a client of the ego node like any other.

:mod:`~ego_ros.web.server` (the command) starts a :class:`~ego_ros.web.bridge.RobotBridge` (the node through an
``EgoCommander``, the camera's frames into a :class:`~ego_ros.web.frames.FrameStore`, the recognition events) and
serves :mod:`~ego_ros.web.app` (the page's files from ``static/`` and its JSON API, behind
:mod:`~ego_ros.web.guard` and :mod:`~ego_ros.web.inputs`). Importing this package imports neither aiohttp nor ROS.
"""
