# SPDX-License-Identifier: Apache-2.0
"""Conversions between the engine's records and the ego_ros messages (concepts, visits, boxes, times)."""

from __future__ import annotations

import math

from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, RegionOfInterest
from std_msgs.msg import Header

from ego_ros.msg import ConceptInfo, Visit


def concept_msg(info) -> ConceptInfo:
    msg = ConceptInfo(name=info.name, keywords=list(info.keywords), num_views=info.num_views,
                      num_tokens=info.num_tokens, area_percent=float(info.area_percent), model=info.model)
    for field, seconds in (("created", info.created), ("updated", info.updated)):
        stamp = getattr(msg, field)
        stamp.sec, stamp.nanosec = int(seconds), int((seconds % 1) * 1e9)
    return msg


def box_of(roi) -> tuple[int, int, int, int] | None:
    """A RegionOfInterest as (x0, y0, x1, y1); None for one of zero width or height (the whole image)."""
    if roi.width == 0 or roi.height == 0:
        return None
    return (roi.x_offset, roi.y_offset, roi.x_offset + roi.width, roi.y_offset + roi.height)


def time_msg(seconds: float) -> Time:
    """``builtin_interfaces/Time`` of ``seconds`` since the epoch (to the nearest nanosecond)."""
    whole = math.floor(seconds)
    return Time(sec=int(whole), nanosec=min(999_999_999, int(round((seconds - whole) * 1e9))))


def visit_msg(visit) -> Visit:
    from geometry_msgs.msg import PoseStamped

    msg = Visit(name=visit.concept, camera=visit.camera, frame_id=visit.frame_id,
                first_seen=time_msg(visit.first_seen), last_seen=time_msg(visit.last_seen),
                sightings=visit.sightings, best_score=float(visit.best_score), best_stamp=time_msg(visit.best_stamp),
                pose_note=visit.pose_note)
    if visit.box is not None:
        msg.box = roi_of(visit.box)
    if visit.crop:
        msg.crop = CompressedImage(header=Header(stamp=msg.best_stamp, frame_id=visit.frame_id), format="jpeg",
                                   data=visit.crop)
    if visit.pose is not None:
        pose = PoseStamped(header=Header(stamp=msg.best_stamp, frame_id=visit.pose.frame_id))
        (pose.pose.position.x, pose.pose.position.y, pose.pose.position.z) = visit.pose.position
        (pose.pose.orientation.x, pose.pose.orientation.y, pose.pose.orientation.z,
         pose.pose.orientation.w) = visit.pose.orientation
        msg.has_pose, msg.pose, msg.pose_age_sec = True, pose, float(visit.pose_age_sec or 0.0)
    return msg


def roi_of(box) -> RegionOfInterest:
    x0, y0, x1, y1 = (int(v) for v in box)
    return RegionOfInterest(x_offset=x0, y_offset=y0, width=max(0, x1 - x0), height=max(0, y1 - y0))
