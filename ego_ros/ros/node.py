"""The ``ego`` node: camera buffers, concept and question services, a streaming answer action, recognition events.

A managed lifecycle node, thin plumbing over :class:`ego_ros.engine.Ego`:

    configure   parameters read and validated, memory folder checked, publishers and camera buffers created
    activate    model loaded (a failure fails the transition, with the reason), worker started, then the camera
                subscriptions, services, the ``~/answer`` action and the recognition and diagnostics timers
    deactivate  all of those destroyed, generation cancelled, model and GPU memory released
    cleanup     publishers and buffers dropped

Threads: the executor's threads only validate, convert and queue; one :class:`InferenceWorker` thread owns the
model. User requests wait for their result on their own executor thread (a multi-threaded executor; at most
``MAX_PENDING_REQUESTS`` at a time, more are refused), so ``list_concepts`` and camera callbacks stay responsive.
Periodic recognition queues behind user requests and coalesces per camera.

Run it with ``ros2 launch ego_ros ego.launch.py``, ``ros2 run ego_ros ego_node --ros-args -p autostart:=true``, or in
the venv ``ego-ros node --params-file config/ego.yaml``.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from concurrent.futures import CancelledError
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from rclpy.service import Service
from rclpy.timer import Timer
from sensor_msgs.msg import CompressedImage, Image

from ego_ros.action import Answer
from ego_ros.engine.memory import validate_name
from ego_ros.msg import ConceptDetection, ConceptInfo, RecognitionEvent
from ego_ros.srv import Ask, ForgetConcept, ListConcepts, Recognize, RegisterConcept

from .frame_buffer import FrameBuffer
from .hysteresis import PresenceTracker
from .image_msgs import image_from_msg, is_compressed_topic, rgb_from_msg
from .parameters import PARAMETER_SPECS, PARAMETERS, Settings  # noqa: F401 - PARAMETERS: the node's public table
from .worker import InferenceWorker, Priority

# Requests waiting for the model at once; each holds an executor thread, so this must stay below EXECUTOR_THREADS.
MAX_PENDING_REQUESTS = 4
EXECUTOR_THREADS = MAX_PENDING_REQUESTS + 4
DIAGNOSTICS_PERIOD_SEC = 1.0


class RequestError(ValueError):
    """A request that cannot be served as asked; the message says what to fix."""


class EgoNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("ego", **kwargs)
        for name, (default, descriptor) in PARAMETER_SPECS.items():
            self.declare_parameter(name, default, descriptor)
        self.settings: Settings | None = None
        self.ego = None
        self.worker: InferenceWorker | None = None
        self.buffers: dict[str, FrameBuffer] = {}
        self.trackers: dict[str, PresenceTracker] = {}
        self._recognitions_pub = None
        self._diagnostics_pub = None
        self._active: list = []  # subscriptions, services, the action server and timers made on activate
        self._configured: list = []  # the diagnostics timer, made on configure
        self._pending = threading.BoundedSemaphore(MAX_PENDING_REQUESTS)
        self._cancel_events: set[threading.Event] = set()  # one per generation in progress
        self._in_flight = 0  # requests and goals being served; deactivate waits for them to answer
        self._idle = threading.Condition()
        self._stopping = False
        self._last_analysed: dict[str, float] = {}
        self._load_error = ""
        # Fast callbacks (list, forget, diagnostics, camera frames) never share a thread pool slot with requests
        # that wait for the model.
        self._fast_group = ReentrantCallbackGroup()
        self._slow_group = ReentrantCallbackGroup()
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Parameters are read on configure: refuse a change that would silently not apply."""
        if self.settings is None:
            return SetParametersResult(successful=True)
        names = ", ".join(p.name for p in parameters)
        return SetParametersResult(successful=False, reason=(
            f"{names}: parameters are read on configure; deactivate and clean up the node, set them, then "
            "configure and activate again"))

    # --- lifecycle --------------------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            settings = Settings.from_node(self)
            memory_dir = settings.memory_dir or _default_memory_dir()
            memory_dir.mkdir(parents=True, exist_ok=True)
            probe = memory_dir / ".ego_write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except Exception as error:  # noqa: BLE001 - a failed transition must say why (rclpy would not)
            self.get_logger().error(f"configure failed: {_message(error)}")
            return TransitionCallbackReturn.FAILURE
        self.settings = s = settings
        self.buffers = {t: FrameBuffer(s.buffer_seconds, s.buffer_fps, s.max_image_pixels) for t in s.camera_topics}
        off = max(0.0, s.recognition_threshold - 0.1)
        self.trackers = {t: PresenceTracker(s.recognition_threshold, off) for t in s.camera_topics}
        self._recognitions_pub = self.create_lifecycle_publisher(RecognitionEvent, "~/recognitions", 10)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._configured.append(
            self.create_timer(DIAGNOSTICS_PERIOD_SEC, self._publish_diagnostics, callback_group=self._fast_group))
        self.get_logger().info(
            f"configured: model {s.model}, cameras {list(s.camera_topics)}, memories in {memory_dir}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        from ego_ros.engine import Ego

        s = self.settings
        self.get_logger().info(f"loading {s.model} (device {s.device}, dtype {s.dtype})...")
        started = time.perf_counter()
        try:
            self.ego = Ego.load(
                s.model, device=s.device, dtype=s.dtype, memory_dir=s.memory_dir, layers=s.layers,
                max_tokens_per_view=s.max_tokens_per_view, max_image_pixels=s.max_image_pixels,
                max_concepts_in_context=s.max_concepts_in_context, max_new_tokens=s.max_new_tokens,
            )
        except Exception as error:  # any failure to load leaves the node inactive, with the reason
            self._load_error = f"{type(error).__name__}: {error}"
            self.get_logger().error(f"activate failed: cannot load the model: {self._load_error}")
            self.ego = None
            return TransitionCallbackReturn.FAILURE
        self._load_error = ""
        for path, reason in self.ego.store.skipped:
            self.get_logger().warning(f"skipped concept file {path}: {reason}")
        self.get_logger().info(
            f"loaded {s.model} on {self.ego.device} in {time.perf_counter() - started:.1f} s; layers {self.ego.layers} "
            f"({self.ego.layers_source}); {len(self.ego.store)} concepts")
        self.worker = InferenceWorker()
        self._open_interfaces()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_model()  # first: every caller gets its answer while the services still exist
        self._destroy(self._active)
        for tracker in self.trackers.values():
            tracker.reset()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.settings = None  # parameters may change again until the next configure
        self._destroy(self._configured)
        self.buffers, self.trackers = {}, {}
        if self._recognitions_pub is not None:
            self.destroy_lifecycle_publisher(self._recognitions_pub)
        if self._diagnostics_pub is not None:
            self.destroy_publisher(self._diagnostics_pub)
        self._recognitions_pub = self._diagnostics_pub = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_model()
        self._destroy(self._active)
        self._destroy(self._configured)
        return TransitionCallbackReturn.SUCCESS

    def _open_interfaces(self) -> None:
        s = self.settings
        for topic in s.camera_topics:
            kind = CompressedImage if is_compressed_topic(topic) else Image
            self._active.append(self.create_subscription(kind, topic, self._frame_callback(topic), qos_profile_sensor_data,
                                               callback_group=self._camera_group))
        self._active.append(self.create_service(ListConcepts, "~/list_concepts", self._list_concepts,
                                      callback_group=self._fast_group))
        self._active.append(self.create_service(ForgetConcept, "~/forget_concept", self._forget_concept,
                                      callback_group=self._fast_group))
        self._active.append(self.create_service(RegisterConcept, "~/register_concept", self._register_concept,
                                      callback_group=self._slow_group))
        self._active.append(self.create_service(Ask, "~/ask", self._ask, callback_group=self._slow_group))
        self._active.append(self.create_service(Recognize, "~/recognize", self._recognize, callback_group=self._slow_group))
        self._active.append(ActionServer(self, Answer, "~/answer", execute_callback=self._answer_execute,
                               goal_callback=lambda goal: GoalResponse.ACCEPT,
                               cancel_callback=lambda handle: CancelResponse.ACCEPT,
                               callback_group=self._slow_group))
        if s.recognition_rate_hz > 0:
            self._active.append(self.create_timer(1.0 / s.recognition_rate_hz, self._recognition_tick,
                                        callback_group=self._fast_group))

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
        """Stop inference (queued jobs cancelled, a generation stopped at its next token), let every request in
        flight send its answer, then free the model and its GPU memory."""
        self._stopping = True
        for event in list(self._cancel_events):
            event.set()
        if self.worker is not None:
            self.worker.stop(timeout=30.0)
            self.worker = None
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=30.0)
        self._stopping = False
        self.ego = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # --- cameras ----------------------------------------------------------------------------------------------

    def _frame_callback(self, topic: str):
        buffer = self.buffers[topic]

        def on_frame(msg) -> None:
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            if stamp == 0.0:  # drivers that leave the stamp empty: use the arrival time
                stamp = self.get_clock().now().nanoseconds * 1e-9
            try:
                buffer.offer(stamp, lambda: rgb_from_msg(msg, buffer.max_pixels), header=msg.header)
            except ValueError as error:
                self.get_logger().warning(f"dropping a frame from {topic}: {error}", throttle_duration_sec=5.0)

        return on_frame

    def _camera(self, name: str) -> str:
        """The camera a request names; none named means the first of camera_topics."""
        topics = self.settings.camera_topics
        if not topics:
            raise RequestError("the node has no cameras: set camera_topics")
        if not name:
            return topics[0]
        if name not in topics:
            raise RequestError(f"unknown camera {name!r}; cameras: {list(topics)}")
        return name

    def _latest_frame(self, camera: str):
        frame = self.buffers[camera].latest()
        if frame is None:
            raise RequestError(f"no frame from {camera} yet: is the camera publishing?")
        return frame

    # --- services ---------------------------------------------------------------------------------------------

    def _list_concepts(self, request, response):
        ego = self.ego
        response.concepts = [_concept_msg(info) for info in ego.concepts()] if ego is not None else []
        if ego is not None:
            response.layers, response.layers_source = [int(layer) for layer in ego.layers], ego.layers_source
        return response

    def _forget_concept(self, request, response):
        # The store is thread-safe and forgetting needs no inference: answered here, not queued behind the model.
        try:
            self.ego.forget(request.name)
            response.success, response.message = True, f"forgot {request.name!r}"
        except Exception as error:  # noqa: BLE001 - every failure goes back to the caller
            response.success, response.message = False, _message(error)
        return response

    def _register_concept(self, request, response):
        def prepare():
            name = validate_name(request.name)
            if name in self.ego.store and not request.append:
                raise RequestError(f"concept {name!r} already exists; set append to add views, or forget it first")
            if request.views:
                views = [image_from_msg(view) for view in request.views]
                source = f"{len(views)} given views"
            else:
                camera = self._camera(request.camera)
                window = float(request.window_sec) or self.settings.buffer_seconds
                frames = self.buffers[camera].sample(request.num_views or 1, window)
                if not frames:
                    raise RequestError(f"no frame from {camera} yet: is the camera publishing?")
                views = [frame.image for frame in frames]
                source = f"{len(views)} views from {camera}"
            return lambda: (self.ego.register(name, views, append=request.append), source)

        def respond(result):
            info, source = result
            response.concept = _concept_msg(info)
            response.message = f"registered {info.name!r} from {source}: {info.num_tokens} tokens in memory"
            self.get_logger().info(response.message)

        return self._serve(request, response, prepare, respond)

    def _ask(self, request, response):
        def respond(answer):
            response.answer, response.concepts_used = answer.text, answer.concepts
            response.latency_sec = float(answer.timings["total"])
            response.message = f"{answer.new_tokens} tokens"

        return self._serve(request, response, lambda: self._ask_job(request), respond)

    def _recognize(self, request, response):
        def prepare():
            if request.camera or not _has_image(request.image):
                image = self._latest_frame(self._camera(request.camera)).image
            else:
                image = image_from_msg(request.image)
            concepts = self._known_concepts(request.concepts)
            return lambda: self.ego.recognize(image, concepts)

        def respond(scores):
            response.detections = [ConceptDetection(name=n, score=float(p))
                                   for n, p in sorted(scores.items(), key=lambda kv: -kv[1])]
            response.message = f"{len(scores)} concepts scored"

        return self._serve(request, response, prepare, respond)

    def _ask_job(self, request, on_text=None, cancel=None):
        """Validate an Ask request (or Answer goal) here and return the job that answers it on the worker."""
        question = request.question.strip()
        if not question:
            raise RequestError("the question is empty")
        s = self.settings
        times = None
        if request.source == Ask.Request.SOURCE_IMAGE:
            images = [image_from_msg(request.image)]
        elif request.source == Ask.Request.SOURCE_VIDEO:
            camera = self._camera(request.camera)
            window = float(request.window_sec) or s.buffer_seconds
            frames = self.buffers[camera].window(window, s.video_frames)
            if not frames:
                raise RequestError(f"no frame from {camera} yet: is the camera publishing?")
            images, times = [f.image for f in frames], [f.stamp_sec for f in frames]
        elif request.source == Ask.Request.SOURCE_LATEST:
            images = [self._latest_frame(self._camera(request.camera)).image]
        else:
            raise RequestError(f"unknown source {request.source}: use SOURCE_LATEST (0), SOURCE_VIDEO (1) or "
                               "SOURCE_IMAGE (2)")
        concepts = self._known_concepts(request.concepts)
        max_new_tokens = int(request.max_new_tokens) or None
        cancel = cancel or threading.Event()

        def job():
            self._cancel_events.add(cancel)  # so that deactivating stops this generation at its next token
            try:
                answer = self.ego.ask(question, images, concepts=concepts, times=times,
                                      max_new_tokens=max_new_tokens, on_text=on_text, cancel=cancel)
            finally:
                self._cancel_events.discard(cancel)
            if self._stopping:
                raise RequestError("stopped: the node is being deactivated")
            return answer

        return job

    def _known_concepts(self, names) -> list[str] | None:
        """The requested concepts (None: all), checked here so that a typo is refused before waiting in line."""
        for name in names:
            self.ego.store.get(name)  # raises UnknownConcept listing the known ones
        return list(names) or None

    def _serve(self, request, response, prepare, respond):
        """The shape of every model-backed service: validate, queue, wait, and always answer with a message."""
        started = time.perf_counter()
        try:
            with self._serving():
                result = self._run_on_worker(prepare)
                respond(result)
                response.success = True
        except Exception as error:  # noqa: BLE001 - the caller gets the reason; the node keeps running
            response.success, response.message = False, _message(error)
            self.get_logger().warning(f"{type(request).__name__} refused: {response.message}")
        if hasattr(response, "latency_sec") and not response.latency_sec:
            response.latency_sec = float(time.perf_counter() - started)
        return response

    @contextmanager
    def _serving(self):
        """Counts a request or goal in flight until its answer is decided."""
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _run_on_worker(self, prepare):
        """Run ``prepare()`` (validation, conversion) here, then the job it returns on the model's thread."""
        worker, ego = self.worker, self.ego
        if worker is None or ego is None:
            raise RequestError("the node is not active")
        if not self._pending.acquire(blocking=False):
            raise RequestError(f"busy: {MAX_PENDING_REQUESTS} requests are already waiting for the model; retry later")
        try:
            job = prepare()
            return worker.submit(job, priority=Priority.USER).result()
        except CancelledError:
            raise RequestError("cancelled: the node was deactivated") from None
        finally:
            self._pending.release()

    # --- action -----------------------------------------------------------------------------------------------

    def _answer_execute(self, goal_handle):
        result = Answer.Result()
        cancel = threading.Event()
        tokens = 0

        def on_text(text: str) -> None:
            nonlocal tokens
            tokens += 1
            goal_handle.publish_feedback(Answer.Feedback(answer_so_far=text, tokens=tokens))
            if goal_handle.is_cancel_requested:
                cancel.set()

        with self._serving():  # until the goal's terminal state is set, so deactivate waits for it
            try:
                answer = self._run_on_worker(lambda: self._ask_job(goal_handle.request, on_text, cancel))
                result.success, result.answer = True, answer.text
                result.concepts_used, result.latency_sec = answer.concepts, float(answer.timings["total"])
                result.message = f"{answer.new_tokens} tokens" + (" (cancelled)" if cancel.is_set() else "")
            except Exception as error:  # noqa: BLE001
                result.success, result.message = False, _message(error)
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
            elif result.success:
                goal_handle.succeed()
            else:
                goal_handle.abort()
        return result

    # --- recognition ------------------------------------------------------------------------------------------

    def _recognition_tick(self) -> None:
        worker, ego = self.worker, self.ego
        if worker is None or ego is None or len(ego.store) == 0:
            return
        for camera, buffer in self.buffers.items():
            frame = buffer.latest()
            if frame is None or self._last_analysed.get(camera) == frame.stamp_sec:
                continue  # nothing new to look at
            self._last_analysed[camera] = frame.stamp_sec
            job = worker.submit_periodic(("recognize", camera), lambda c=camera, f=frame: self._recognize_frame(c, f))
            job.add_done_callback(self._report_recognition_failure)

    def _report_recognition_failure(self, job) -> None:
        # Nobody waits for a periodic job: a failure would pass unseen if it were not logged here.
        if not job.cancelled() and job.exception() is not None:
            self.get_logger().error(f"recognition failed: {_message(job.exception())}", throttle_duration_sec=10.0)

    def _recognize_frame(self, camera: str, frame) -> None:
        if self.ego is None:
            return
        scores = self.ego.recognize(frame.image)
        present, appeared, disappeared = self.trackers[camera].update(scores)
        event = RecognitionEvent(camera=camera, appeared=list(appeared), disappeared=list(disappeared))
        if frame.header is not None:
            event.header = frame.header
        event.detections = [ConceptDetection(name=n, score=float(p))
                            for n, p in sorted(present.items(), key=lambda kv: -kv[1])]
        if self._recognitions_pub is not None:
            self._recognitions_pub.publish(event)

    # --- diagnostics ------------------------------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        if self._diagnostics_pub is None:
            return
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        name = self.get_fully_qualified_name()
        ego, worker = self.ego, self.worker
        model = DiagnosticStatus(name=f"{name}: model", hardware_id=self.settings.model if self.settings else "")
        if ego is not None:
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
                                       last_latency_sec=f"{latency:.3f}" if latency is not None else "")
        array.status = [model, inference]
        for camera, buffer in self.buffers.items():
            stats = buffer.stats()
            status = DiagnosticStatus(name=f"{name}: camera {camera}", hardware_id=camera)
            silent = stats["input_rate_hz"] == 0.0
            status.level = DiagnosticStatus.WARN if silent else DiagnosticStatus.OK
            status.message = "no frames" if silent else f"{stats['input_rate_hz']:.1f} Hz in"
            status.values = _values(**{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in stats.items()})
            array.status.append(status)
        self._diagnostics_pub.publish(array)


def _default_memory_dir() -> Path:
    from ego_ros.engine.config import default_memory_dir

    return default_memory_dir()


def _concept_msg(info) -> ConceptInfo:
    msg = ConceptInfo(name=info.name, keywords=list(info.keywords), num_views=info.num_views,
                      num_tokens=info.num_tokens, area_percent=float(info.area_percent), model=info.model)
    for field, seconds in (("created", info.created), ("updated", info.updated)):
        stamp = getattr(msg, field)
        stamp.sec, stamp.nanosec = int(seconds), int((seconds % 1) * 1e9)
    return msg


def _has_image(image) -> bool:
    return bool(image.height or image.width or len(image.data))


def _values(**pairs) -> list[KeyValue]:
    return [KeyValue(key=key, value=str(value)) for key, value in pairs.items()]


def _message(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, (ValueError, KeyError, RequestError)) else f"{type(error).__name__}: {text}"


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = None
    try:
        node = EgoNode()
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        executor.add_node(node)
        if node.get_parameter("autostart").value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
