# SPDX-License-Identifier: Apache-2.0
"""The ego node's recognition loop: at ``recognition_rate_hz``, each camera's newest frame is scored for every
concept on the model's worker thread; the presence tracker turns scores into appeared and disappeared; the present
concepts go out on ``~/recognitions`` (and ``~/debug_image`` when someone watches) and into the sightings memory.

:class:`RecognitionLoop` is a part of :class:`~ego_ros.ros.node.EgoNode`, which starts its timer on activate.
"""

from __future__ import annotations

import time

from sensor_msgs.msg import Image

from ego_ros.msg import ConceptDetection, RecognitionEvent
from ego_ros.sightings import crop_jpeg

from .client import seconds
from .debug_image import annotated
from .image_msgs import image_to_msg
from .messages import roi_of
from .requests import message_of, shown


class RecognitionLoop:
    """The periodic recognition of :class:`~ego_ros.ros.node.EgoNode`."""

    def _recognition_tick(self) -> None:
        if not self._recognition_wanted():
            return
        for camera in list(self.buffers):
            if not self._recognize_newest(camera):
                # Nothing new yet: the next frame the buffer keeps is analysed as it comes (_frame_kept). A timer in
                # step with the buffer's schedule (recognition_rate_hz = buffer_fps) would otherwise land just
                # before each new frame half the time, and skip it: measured, 1 event/s at 2 Hz.
                self._waiting_for_frame.add(camera)

    def _frame_kept(self, camera: str) -> None:
        """The camera callback, after the buffer kept a frame: a camera a tick found nothing new on is analysed now."""
        if camera in self._waiting_for_frame and self._recognition_wanted():
            self._waiting_for_frame.discard(camera)
            self._recognize_newest(camera)

    def _recognition_wanted(self) -> bool:
        ego = self.ego
        if self.worker is None or ego is None or not self._enabled or self._stopping:
            return False
        # Nothing to look for, and nothing present to announce gone (the last one forgotten): no work.
        return len(ego.store) > 0 or any(tracker.present for tracker in self.trackers.values())

    def _recognize_newest(self, camera: str) -> bool:
        """Queue the recognition of the camera's newest frame; False when it has none not yet analysed."""
        worker, buffer = self.worker, self.buffers.get(camera)
        frame = buffer.latest(max_age=self.settings.buffer_seconds) if buffer is not None else None
        if worker is None or frame is None or self._last_analysed.get(camera) == frame.stamp_sec:
            return False
        self._last_analysed[camera] = frame.stamp_sec
        try:
            job = worker.submit_periodic(("recognize", camera), lambda: self._recognize_frame(camera, frame))
        except RuntimeError:  # the worker stopped between the check above and now: deactivating
            return True
        job.add_done_callback(self._report_recognition_failure)
        return True

    def _report_recognition_failure(self, job) -> None:
        # Nobody waits for a periodic job: a failure would pass unseen if it were not logged here.
        if not job.cancelled() and job.exception() is not None:
            self.get_logger().error(f"recognition failed: {message_of(job.exception())}", throttle_duration_sec=10.0)

    def _recognize_frame(self, camera: str, frame) -> None:
        ego = self.ego
        if ego is None or not self._enabled:
            return
        found = ego.recognize(frame.image, boxes=True)  # {} once the last concept is forgotten: all disappear
        present, appeared, disappeared = self.trackers[camera].update({n: p for n, (p, _) in found.items()})
        self._record_sightings(camera, frame.header, found, frame.image, frame.to_sent, list(present))
        event = RecognitionEvent(camera=camera, appeared=list(appeared), disappeared=list(disappeared))
        if frame.header is not None:
            event.header = frame.header
        event.detections = [ConceptDetection(name=n, score=float(p), box=roi_of(frame.to_sent(found[n][1])))
                            for n, p in sorted(present.items(), key=lambda kv: -kv[1])]
        if self._recognitions_pub is not None:
            self._recognitions_pub.publish(event)
        debug = self._debug_pub
        if debug is not None and debug.get_subscription_count() > 0:  # drawing costs: only for someone watching
            boxes = [(n, p, found[n][1]) for n, p in present.items()]
            debug.publish(image_to_msg(annotated(frame.image, boxes), Image, header=frame.header))

    def _record_sightings(self, camera: str, header, found: dict, image, to_sent, present) -> None:
        """Keep the sightings of the ``present`` concepts of one analysed frame (on the worker thread)."""
        store = self.sightings
        if store is None:
            return
        stamp = seconds(header.stamp) if header is not None else time.time()
        pose, age, note = self.poses.nearest(stamp) if self.poses is not None else (None, None, "no pose_topic")
        ego = self.ego
        for name in present:
            if ego is None or name not in ego.store:
                continue  # forgotten while this frame was analysed: its visits are gone, and stay gone
            score, box = found[name]
            try:
                store.record(name, camera=camera, frame_id=header.frame_id if header is not None else "",
                             stamp=stamp, score=score, box=to_sent(box) if box is not None else None,
                             crop=lambda b=box: crop_jpeg(image, b), pose=pose, pose_age_sec=age, pose_note=note)
            except Exception as error:  # noqa: BLE001 - a full disk must not stop recognition
                self.get_logger().warning(f"could not record a sighting of {shown(name)}: {message_of(error)}",
                                          throttle_duration_sec=10.0)
