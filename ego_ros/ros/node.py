# SPDX-License-Identifier: Apache-2.0
"""The ``ego`` node: camera buffers, concept and question services, a streaming answer action, recognition events.

A managed lifecycle node, thin plumbing over :class:`ego_ros.engine.Ego`. This module holds its lifecycle and its
wiring (cameras, publishers, diagnostics, the process); the services and the action are in
:mod:`ego_ros.ros.handlers`, the periodic recognition in :mod:`ego_ros.ros.recognition`, the message conversions in
:mod:`ego_ros.ros.messages`.

    configure   parameters read and validated (camera topic names included), memory folder checked, publishers
                and camera buffers created
    activate    model loaded (a failure fails the transition, with the reason, and leaves nothing behind), worker
                started, then the camera subscriptions, services, the ``~/answer`` action and the recognition timer
    deactivate  generation cancelled, every caller answered, the worker joined, all of those destroyed, camera
                buffers emptied, model and GPU memory released, the freed heap given back to the system
    cleanup     publishers and buffers dropped
    error       (an exception in a transition) everything above released: the node is back to unconfigured

Threads: the lifecycle services run in a reentrant group of their own, so ``get_state``, the parameter services,
``/diagnostics`` and ``list_concepts`` answer while a transition loads the model (minutes for a 7B one). The
executor's threads only validate and queue; one :class:`InferenceWorker` thread owns the model. User requests wait
for their result on their own executor thread (a multi-threaded executor; at most ``MAX_PENDING_REQUESTS`` at a
time, more are refused at once as busy, action goals rejected), so ``list_concepts`` and camera callbacks stay
responsive. Periodic recognition queues behind user requests and coalesces per camera.

Live parameters (taken while active): ``recognition_threshold``, ``recognition_hysteresis``,
``recognition_confirm_frames``, ``recognition_rate_hz``, ``max_new_tokens`` (and ``use_sim_time``); the others are
read on configure. ``~/enable`` (std_srvs/SetBool) pauses and resumes recognition without unloading the model.

Sightings: every recognition of a concept is kept as a visit in the memory folder's ``sightings.db``
(:mod:`ego_ros.sightings`), with the robot's pose from ``pose_topic`` (:mod:`ego_ros.ros.poses`); ``~/last_seen``
reads them, and a question about time gets them in its prompt.

Run it with ``ros2 launch ego_ros ego.launch.py``, ``ros2 run ego_ros ego_node --ros-args -p autostart:=true``, or in
the venv ``ego-ros node --params-file config/ego.yaml``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.service import Service
from rclpy.signals import SignalHandlerOptions
from rclpy.timer import Timer
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import SetBool

from ego_ros.action import Answer
from ego_ros.msg import RecognitionEvent
from ego_ros.sightings import FILE_NAME as SIGHTINGS_FILE
from ego_ros.sightings import SightingsStore
from ego_ros.srv import Ask, ForgetConcept, LastSeen, ListConcepts, Recognize, RegisterConcept

from .client import seconds
from .frame_buffer import FrameBuffer
from .handlers import MAX_PENDING_REQUESTS, ServiceHandlers, Slots
from .heap import limit_arenas, trim_heap
from .hysteresis import PresenceTracker
from .image_msgs import is_compressed_topic, rgb_from_msg
from .parameters import LIVE, PARAMETER_SPECS, PARAMETERS, Settings  # noqa: F401 - PARAMETERS: the node's public table
from .poses import PoseHistory
from .recognition import RecognitionLoop
from .requests import MAX_REQUEST_PIXELS, RepeatedRequests, RequestError, check_model_can_take, message_of, shown
from .worker import InferenceWorker

# Each request waiting for the model holds an executor thread: a few more serve everything else meanwhile.
EXECUTOR_THREADS = MAX_PENDING_REQUESTS + 4
DIAGNOSTICS_PERIOD_SEC = 1.0
# Requests that arrive together are queued by DDS until an executor thread takes them: the default depth of 10
# dropped 5 of a burst of 16 without a trace. Deep enough that every one is taken, answered or refused as busy.
REQUEST_QOS = QoSProfile(depth=256, reliability=ReliabilityPolicy.RELIABLE)
# Parameters taken live while configured; the others are read on configure.
LIVE_PARAMETERS = (*LIVE, "use_sim_time")
# How long deactivate or a signal waits for callers to be answered before it says so in the log (it goes on waiting).
STOP_WARN_SEC = 10.0
RESPONSE_GRACE_SEC = 0.2


class EgoNode(ServiceHandlers, RecognitionLoop, LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("ego", **kwargs)
        self._lifecycle_group = self._move_lifecycle_services()
        for name, (default, descriptor) in PARAMETER_SPECS.items():
            if isinstance(default, list) and not default:
                # An empty list would be declared a byte array, and `-p layers:=[1, 2]` refused as the wrong type:
                # declare the type from the descriptor instead (unset until given; Settings reads unset as empty).
                default = Parameter.Type(descriptor.type)
            self.declare_parameter(name, default, descriptor)
        self.settings: Settings | None = None
        self.ego = None
        self.worker: InferenceWorker | None = None
        self.buffers: dict[str, FrameBuffer] = {}
        self.trackers: dict[str, PresenceTracker] = {}
        self._recognitions_pub = None
        self._debug_pub = None  # ~/debug_image: frames with the present concepts' boxes, names and scores
        self._diagnostics_pub = None
        self._active: list = []  # subscriptions, services, the action server and timers made on activate
        self._configured: list = []  # the diagnostics timer, made on configure
        self._recognition_timer: Timer | None = None
        self._slots = Slots(MAX_PENDING_REQUESTS)
        self._cancel_events: set[threading.Event] = set()  # one per generation in progress
        self._goal_events: dict[bytes, threading.Event] = {}  # goal id -> its cancel event
        self.sightings: SightingsStore | None = None  # where and when each concept was seen (its visits)
        self.poses: PoseHistory | None = None  # the robot's recent poses, with pose_topic
        self._repeats = RepeatedRequests()  # registrations and forgets by request id: sent twice, done once
        self._in_flight = 0  # requests and goals being served; deactivate waits for them to answer
        self._idle = threading.Condition()
        self._stopping = False
        self._enabled = True  # ~/enable: periodic recognition on or paused
        self._last_analysed: dict[str, float] = {}  # camera -> stamp of the last frame recognised
        self._waiting_for_frame: set[str] = set()  # cameras whose next kept frame is recognised as it comes
        self._load_error = ""
        self._loading = False  # activate is loading the model
        # Fast callbacks (list, forget, diagnostics, camera frames) never share a thread pool slot with requests
        # that wait for the model.
        self._fast_group = ReentrantCallbackGroup()
        self._slow_group = ReentrantCallbackGroup()
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

    def _move_lifecycle_services(self) -> ReentrantCallbackGroup:
        """Transitions (a model load takes minutes) must not hold the default group, which serves the parameter
        services, nor block get_state: the lifecycle services go to a reentrant group of their own. rcl refuses a
        second transition while one is in progress, so reentrancy cannot interleave two transitions.

        (rclpy's LifecycleNode takes no callback group for them: they are moved out of the default one here.)"""
        group = ReentrantCallbackGroup()
        default = self.default_callback_group
        for service in (self._service_change_state, self._service_get_state, self._service_get_available_states,
                        self._service_get_available_transitions, self._service_get_transition_graph):
            default.entities.discard(weakref.ref(service))
            service.callback_group = group
            group.add_entity(service)
        return group

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Live parameters are taken (ranges are checked by rclpy from the descriptors); the others are read on
        configure, so a change to them while configured is refused rather than silently not applied."""
        if self.settings is None:
            return SetParametersResult(successful=True)
        fixed = [p.name for p in parameters if p.name not in LIVE_PARAMETERS]
        if not fixed:
            return SetParametersResult(successful=True)
        return SetParametersResult(successful=False, reason=(
            f"{', '.join(fixed)}: read on configure; deactivate and clean up the node, set them, then configure "
            f"and activate again (live: {', '.join(LIVE_PARAMETERS)})"))

    def _apply_parameters(self, parameters) -> None:
        s = self.settings
        if s is None:
            return
        changes = {p.name: p.value for p in parameters if p.name in LIVE_PARAMETERS and p.name != "use_sim_time"}
        if not changes:
            return
        self.settings = s = dataclasses.replace(s, **{k: type(getattr(s, k))(v) for k, v in changes.items()})
        if {"recognition_threshold", "recognition_hysteresis", "recognition_confirm_frames"} & set(changes):
            for tracker in self.trackers.values():
                tracker.set_thresholds(s.recognition_threshold, s.recognition_off_threshold, s.recognition_off_frames,
                                       s.recognition_confirm_frames)
        if "max_new_tokens" in changes and self.ego is not None:
            self.ego.config.max_new_tokens = s.max_new_tokens
        if "recognition_rate_hz" in changes:
            self._set_recognition_rate(s.recognition_rate_hz)
        self.get_logger().info(f"parameters changed live: {changes}")

    # --- lifecycle --------------------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            settings = Settings.from_node(self)
            for topic in settings.camera_topics:  # a bad name would only fail activate, after the model loaded
                try:
                    self.resolve_topic_name(topic)
                except Exception as error:  # noqa: BLE001 - rclpy raises its own types for invalid names
                    raise ValueError(f"camera topic {shown(topic)} is not a valid topic name: {error}") from None
            memory_dir = settings.memory_dir or _default_memory_dir()
            memory_dir.mkdir(parents=True, exist_ok=True)
            probe = memory_dir / ".ego_write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except Exception as error:  # noqa: BLE001 - a failed transition must say why (rclpy would not)
            self.get_logger().error(f"configure failed: {message_of(error)}")
            return TransitionCallbackReturn.FAILURE
        self._release_configured()  # nothing of an earlier configuration may survive into this one
        self.settings = s = settings
        self.buffers = {t: FrameBuffer(s.buffer_seconds, s.buffer_fps, s.max_image_pixels,
                                       on_jump_back=self._time_went_back(t)) for t in s.camera_topics}
        self.trackers = {t: PresenceTracker(s.recognition_threshold, s.recognition_off_threshold,
                                            min_on_frames=s.recognition_confirm_frames,
                                            min_off_frames=s.recognition_off_frames) for t in s.camera_topics}
        self._recognitions_pub = self.create_lifecycle_publisher(RecognitionEvent, "~/recognitions", 10)
        self._debug_pub = self.create_lifecycle_publisher(Image, "~/debug_image", 2)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._configured.append(
            self.create_timer(DIAGNOSTICS_PERIOD_SEC, self._publish_diagnostics, callback_group=self._fast_group))
        self.get_logger().info(
            f"configured: model {s.model}, cameras {list(s.camera_topics)}, memories in {memory_dir}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._activate()
        except Exception as error:  # noqa: BLE001 - any failure leaves the node inactive, with the reason
            self._load_error = message_of(error)
            self.get_logger().error(f"activate failed: {self._load_error}")
            self._release_active()  # whatever was made before the failure: model, worker, subscriptions
            return TransitionCallbackReturn.FAILURE
        return super().on_activate(state)

    def _activate(self) -> None:
        from ego_ros.engine import Ego

        s = self.settings
        # list_concepts first: it answers during a load of minutes (an empty list, layers_source "loading"). The
        # model-backed services appear once the model is loaded, so their presence still means "ready".
        self._loading = True
        self._active.append(self.create_service(ListConcepts, "~/list_concepts", self._list_concepts,
                                                qos_profile=REQUEST_QOS, callback_group=self._fast_group))
        self.get_logger().info(f"loading {s.model} (device {s.device}, dtype {s.dtype})...")
        started = time.perf_counter()
        try:
            ego = Ego.load(
                s.model, device=s.device, dtype=s.dtype, memory_dir=s.memory_dir, layers=s.layers,
                max_tokens_per_view=s.max_tokens_per_view, max_image_pixels=s.max_image_pixels,
                max_concepts_in_context=s.max_concepts_in_context, max_new_tokens=s.max_new_tokens,
                recognition_order=s.recognition_order, memory_layout=s.memory_layout, static_cache=s.static_cache,
                generation=s.generation, vllm_url=s.vllm_url,
            )
        except Exception as error:
            raise RuntimeError(f"cannot load the model: {message_of(error)}") from error
        self._load_error = ""
        for path, reason in ego.store.skipped:
            self.get_logger().warning(f"skipped concept file {path}: {reason}")
        try:
            for path in ego.store.gc():  # older revisions and temporary files a killed process left behind
                self.get_logger().info(f"deleted stale concept file {path}")
        except OSError as error:  # a read-only memory folder still serves its concepts
            self.get_logger().warning(f"could not clean up the memory folder: {error}")
        self.get_logger().info(
            f"loaded {s.model} on {ego.device} in {time.perf_counter() - started:.1f} s; layers {ego.layers} "
            f"({ego.layers_source}); {len(ego.store)} concepts")
        try:  # beside the concepts; a folder that refuses it still serves them, without a sightings memory
            self.sightings = SightingsStore(ego.store.root / SIGHTINGS_FILE, max_age_sec=s.sightings_max_age,
                                            max_rows=s.sightings_max_rows)
        except Exception as error:  # noqa: BLE001
            self.get_logger().error(f"no sightings memory: {message_of(error)}")
        self._slots = Slots(MAX_PENDING_REQUESTS)
        self.worker = InferenceWorker()
        self.ego = ego
        self._loading = False
        self._open_interfaces()

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_configured()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        self._release_configured()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: release everything, so that the next configure and activate start clean
        (no second diagnostics timer, no second model); the node goes back to unconfigured."""
        self.get_logger().error(f"error in a transition from {state.label}: releasing the model and interfaces")
        self._release_active()
        self._release_configured()
        return TransitionCallbackReturn.SUCCESS

    def _release_active(self) -> None:
        """Undo activate, whatever part of it was done: callers answered first, while the services still exist."""
        self._loading = False
        self._release_model()
        self._destroy(self._active)
        if self.sightings is not None:
            self.sightings.close()
        self.sightings, self.poses = None, None
        self._recognition_timer = None
        for tracker in self.trackers.values():
            tracker.reset()
        for buffer in self.buffers.values():
            buffer.clear()  # the next activation must not answer about frames from before
        self._last_analysed.clear()
        self._waiting_for_frame.clear()

    def _release_configured(self) -> None:
        self.settings = None  # parameters may change again until the next configure
        self._destroy(self._configured)
        self.buffers, self.trackers = {}, {}
        if self._recognitions_pub is not None:
            self.destroy_lifecycle_publisher(self._recognitions_pub)
        if self._debug_pub is not None:
            self.destroy_lifecycle_publisher(self._debug_pub)
        self._debug_pub = None
        if self._diagnostics_pub is not None:
            self.destroy_publisher(self._diagnostics_pub)
        self._recognitions_pub = self._diagnostics_pub = None

    def _open_interfaces(self) -> None:
        s = self.settings
        for topic in s.camera_topics:
            kind = CompressedImage if is_compressed_topic(topic) else Image
            self._active.append(self.create_subscription(kind, topic, self._frame_callback(topic),
                                                         qos_profile_sensor_data, callback_group=self._camera_group))
        for srv_type, name, callback, group in (
            (ForgetConcept, "~/forget_concept", self._forget_concept, self._fast_group),
            (SetBool, "~/enable", self._enable, self._fast_group),
            (LastSeen, "~/last_seen", self._last_seen, self._fast_group),
            (RegisterConcept, "~/register_concept", self._register_concept, self._slow_group),
            (Ask, "~/ask", self._ask, self._slow_group),
            (Recognize, "~/recognize", self._recognize, self._slow_group),
        ):
            self._active.append(self.create_service(srv_type, name, callback, qos_profile=REQUEST_QOS,
                                                    callback_group=group))
        self._active.append(ActionServer(
            self, Answer, "~/answer", execute_callback=self._answer_execute, goal_callback=self._accept_goal,
            cancel_callback=self._cancel_goal, callback_group=self._slow_group,
            goal_service_qos_profile=REQUEST_QOS, result_service_qos_profile=REQUEST_QOS,
            cancel_service_qos_profile=REQUEST_QOS))
        if s.pose_topic:  # subscribed once the topic has a publisher (its type tells PoseStamped from Odometry)
            self.poses = PoseHistory(s.pose_topic)
            self._follow_poses()
        # Always made (cancelled while the rate is 0), so that a live rate change only sets its period.
        self._recognition_timer = self.create_timer(1.0, self._recognition_tick, callback_group=self._fast_group)
        self._active.append(self._recognition_timer)
        self._set_recognition_rate(s.recognition_rate_hz)

    def _follow_poses(self) -> None:
        poses = self.poses
        if poses is None:
            return
        subscription = poses.subscribe(self, callback_group=self._camera_group)
        if subscription is not None:
            self._active.append(subscription)
            self.get_logger().info(f"poses from {poses.topic} ({poses.type_name}) are kept with the sightings")
        else:  # no publisher yet: look again in a second (a one-shot timer, gone from _active once it fires)
            def again() -> None:
                if timer in self._active:
                    self._active.remove(timer)
                    self.destroy_timer(timer)
                    self._follow_poses()

            timer = self.create_timer(1.0, again, callback_group=self._fast_group)
            self._active.append(timer)

    def _set_recognition_rate(self, rate_hz: float) -> None:
        timer = self._recognition_timer
        if timer is None:
            return
        if rate_hz > 0:
            timer.timer_period_ns = int(1e9 / rate_hz)
            timer.reset()
        else:
            timer.cancel()
            self._waiting_for_frame.clear()  # no tick is waiting for a frame any more

    def _destroy(self, entities: list) -> None:
        for entity in entities:
            if isinstance(entity, ActionServer):
                entity.destroy()
            elif isinstance(entity, Timer):
                self.destroy_timer(entity)
            elif isinstance(entity, Service):
                self.destroy_service(entity)
            else:
                self.destroy_subscription(entity)
        entities.clear()

    def _release_model(self) -> None:
        """Stop inference (queued jobs cancelled, a generation stopped at its next token, a registration at its
        next view), let every request in flight send its answer, join the worker, then free the model and its GPU
        memory. Waits as long as the running job takes: returning earlier would leave the model referenced."""
        self._stopping = True
        try:
            for event in list(self._cancel_events):
                event.set()
            worker = self.worker
            if worker is not None:
                while not worker.stop(timeout=STOP_WARN_SEC):
                    self.get_logger().warning(f"still waiting for the inference job {worker.running_job!r} to end")
                self.worker = None
            with self._idle:
                while not self._idle.wait_for(lambda: self._in_flight == 0, timeout=STOP_WARN_SEC):
                    self.get_logger().warning(f"still waiting for {self._in_flight} callers to be answered")
            # The executor sends a response after its callback returns; destroying the service before that would
            # drop it ("destruction was requested"). A moment is plenty: nothing is computed in between.
            time.sleep(RESPONSE_GRACE_SEC)
        finally:
            self._stopping = False
        self.ego = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        trim_heap()  # the freed model's pages stay in malloc's arenas until given back (see heap.py)

    # --- cameras ----------------------------------------------------------------------------------------------

    def _frame_callback(self, topic: str):
        buffer = self.buffers[topic]

        def decode(msg):
            image = rgb_from_msg(msg, buffer.max_pixels, limit_pixels=MAX_REQUEST_PIXELS)
            check_model_can_take(image)  # refused here, once, not by every later recognition
            return image

        def on_frame(msg) -> None:
            header = msg.header
            if header.stamp.sec == 0 and header.stamp.nanosec == 0:
                # Drivers that leave the stamp empty: the arrival time, in the buffer and in events alike.
                header = Header(stamp=self.get_clock().now().to_msg(), frame_id=header.frame_id)
            stamp = seconds(header.stamp)
            try:
                kept = buffer.offer(stamp, lambda: decode(msg), header=header)
            except ValueError as error:
                self.get_logger().warning(f"dropping a frame from {topic}: {error}", throttle_duration_sec=5.0)
                return
            if kept:
                self._frame_kept(topic)

        return on_frame

    def _time_went_back(self, topic: str):
        def warn(seconds: float, dropped: int) -> None:
            self.get_logger().warning(
                f"{topic}: frame stamps went back {seconds:.1f} s (a bag loop or a simulator reset?): dropped the "
                f"{dropped} buffered frames from the old timeline and started over", throttle_duration_sec=5.0)
        return warn

    def _camera(self, name: str) -> str:
        """The camera a request names; none named means the first of camera_topics."""
        topics = self.settings.camera_topics
        if not topics:
            raise RequestError("the node has no cameras: set camera_topics")
        if not name:
            return topics[0]
        if name in topics:
            return name
        for topic in topics:  # named as resolved ("/robot1/camera/image_raw" for "camera/image_raw" in /robot1)
            if self.resolve_topic_name(topic) == name:
                return topic
        raise RequestError(f"unknown camera {shown(name)}; cameras: {list(topics)}")

    def _no_frame(self, camera: str) -> RequestError:
        age = self.buffers[camera].age()
        if age is None:
            return RequestError(f"no frame from {camera} yet: is the camera publishing?")
        return RequestError(f"no frame from {camera} for {age:.1f} s (more than buffer_seconds, "
                            f"{self.settings.buffer_seconds:g}): is the camera still publishing?")

    def _latest_frame(self, camera: str):
        frame = self.buffers[camera].latest(max_age=self.settings.buffer_seconds)
        if frame is None:
            raise self._no_frame(camera)
        return frame

    def _frames(self, camera: str, window_sec: float, count: int):
        window = float(window_sec) or self.settings.buffer_seconds
        if not (math.isfinite(window) and 0 < window):
            raise RequestError(f"window_sec must be a positive number of seconds, got {window_sec}")
        frames = self.buffers[camera].window(window, count, max_age=self.settings.buffer_seconds)
        if not frames:
            raise self._no_frame(camera)
        return frames

    # --- diagnostics ------------------------------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        if self._diagnostics_pub is None:
            return
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        name = self.get_fully_qualified_name()
        ego, worker, settings = self.ego, self.worker, self.settings
        model = DiagnosticStatus(name=f"{name}: model", hardware_id=settings.model if settings else "")
        if self._loading:
            model.level, model.message = DiagnosticStatus.WARN, "loading"
        elif ego is not None:
            model.level, model.message = DiagnosticStatus.OK, f"loaded on {ego.device}"
            model.values = _values(device=ego.device, concepts=len(ego.store), layers=ego.layers,
                                   layers_source=ego.layers_source, fingerprint=ego.fingerprint)
        else:
            model.level = DiagnosticStatus.ERROR if self._load_error else DiagnosticStatus.WARN
            model.message = f"not loaded: {self._load_error}" if self._load_error else "not loaded (node inactive)"
        inference = DiagnosticStatus(name=f"{name}: inference", level=DiagnosticStatus.OK,
                                     message="busy" if worker is not None and worker.busy else "idle")
        if worker is not None:
            latency = worker.last_latency_sec
            inference.values = _values(queue_length=worker.queue_length(), busy=worker.busy, last_job=worker.last_job,
                                       last_latency_sec=f"{latency:.3f}" if latency is not None else "",
                                       recognition="enabled" if self._enabled else "paused")
        array.status = [model, inference]
        if ego is not None and ego.server is not None:
            array.status.append(_server_status(f"{name}: generation", ego.server))
        for camera, buffer in list(self.buffers.items()):
            stats = buffer.stats()
            status = DiagnosticStatus(name=f"{name}: camera {camera}", hardware_id=camera)
            silent_for = stats.pop("last_message_age_sec")
            if silent_for is None:
                status.level, status.message, since = DiagnosticStatus.WARN, "no frame yet", ""
            elif stats["input_rate_hz"] == 0.0:  # nothing for RATE_WINDOW_SEC
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - silent_for))
                status.level, status.message = DiagnosticStatus.WARN, f"silent for {silent_for:.0f} s, since {since}"
            else:
                status.level, status.message, since = DiagnosticStatus.OK, f"{stats['input_rate_hz']:.1f} Hz in", ""
            status.values = _values(**{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in stats.items()},
                                    silent_since=since,
                                    last_message_age_sec=f"{silent_for:.1f}" if silent_for is not None else "")
            array.status.append(status)
        self._diagnostics_pub.publish(array)

    # --- stopping on a signal ---------------------------------------------------------------------------------

    def stop_serving(self) -> None:
        """SIGINT/SIGTERM: answer every caller (queued ones refused, a generation cut at its next token) while
        the executor still spins, so nobody waits on a node that is gone; then the model is released. The services
        stay until the node is destroyed, so that the answers can still be sent."""
        self._release_model()


def _default_memory_dir() -> Path:
    from ego_ros.engine.config import default_memory_dir

    return default_memory_dir()


def _values(**pairs) -> list[KeyValue]:
    return [KeyValue(key=key, value=str(value)) for key, value in pairs.items()]


def _server_status(name: str, server) -> DiagnosticStatus:
    """generation: vllm: the server as the last request found it (no request is made for diagnostics)."""
    status = DiagnosticStatus(name=name, hardware_id=server.url)
    if server.last_error:
        status.level, status.message = DiagnosticStatus.ERROR, server.last_error
    elif server.model is None:
        status.level, status.message = DiagnosticStatus.WARN, f"vLLM server at {server.url}: not reached yet"
    else:
        status.level, status.message = DiagnosticStatus.OK, f"vLLM server at {server.url} serving {server.model}"
    status.values = _values(url=server.url, served_model=server.model or "")
    return status


def main(args: list[str] | None = None) -> int:
    limit_arenas()  # before rclpy, DDS and torch start their threads (see heap.py)
    # Before any service exists: imported during the first activate, this code stalled get_state for up to 180 ms.
    from ego_ros.engine.loading import import_model_code

    import_model_code()
    # Our own signal handling: rclpy's would shut the context down at once, and callers still waiting would never
    # get an answer (nor would a long generation stop). A second signal exits at once.
    temp_dir = _own_temp_dir()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    node = executor = loader = None
    try:
        node = EgoNode()
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        executor.add_node(node)
        spinner = threading.Thread(target=_spin, args=(executor,), name="ego-executor", daemon=True)
        spinner.start()
        if node.get_parameter("autostart").value:
            # On a thread of its own, so that a signal during the model load is acted on at once.
            loader = threading.Thread(target=_autostart, args=(node,), name="ego-autostart", daemon=True)
            loader.start()
        while not stop.wait(0.2) and spinner.is_alive():
            pass
        if stop.is_set():
            node.get_logger().info("signal received: answering callers and stopping")
            node.stop_serving()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if loader is not None and loader.is_alive():
        # The model load is still running (a read that never ends) inside rclpy's C++ transition code: finalising
        # the interpreter under it aborts the process ("terminate called without an active exception"). Callers
        # are answered and everything is released by now, so leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _own_temp_dir() -> Path | None:
    """A temporary folder of this process's own, for libraries that write to the system's one.

    What writes there: Python's tempfile (its writability probe, a random name created and deleted) and torch's
    inductor cache folder, both from torch._dynamo, which transformers imports on the first generation. With
    TMPDIR pointing here they stay in ``$XDG_RUNTIME_DIR/ego_ros`` (else ``~/.cache/ego_ros``), removed at exit;
    folders of processes that were killed are removed at the next start. A TMPDIR set by the user is kept.
    """
    if os.environ.get("TMPDIR"):
        return None
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "ego_ros"
    try:
        base.mkdir(parents=True, exist_ok=True)
        for old in base.glob("tmp-*"):
            pid = old.name.removeprefix("tmp-")
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        folder = base / f"tmp-{os.getpid()}"
        folder.mkdir(exist_ok=True)
    except OSError:
        return None  # a read-only home: the system's temporary folder it is
    os.environ["TMPDIR"] = tempfile.tempdir = str(folder)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _spin(executor) -> None:
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def _autostart(node: EgoNode) -> None:
    if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()


if __name__ == "__main__":
    raise SystemExit(main())
