# SPDX-License-Identifier: Apache-2.0
"""The ego node's services and its ``~/answer`` action: each request checked on the executor thread, then run on the
model's worker thread (:class:`~ego_ros.ros.worker.InferenceWorker`) while its caller's thread waits.

:class:`ServiceHandlers` is a part of :class:`~ego_ros.ros.node.EgoNode` (which wires these handlers to their
services on activate); it uses the node's state (``ego``, ``worker``, ``buffers``, ``sightings``...) as its own.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import CancelledError
from contextlib import contextmanager

from rclpy.action import CancelResponse, GoalResponse
from std_msgs.msg import Header

from ego_ros.action import Answer
from ego_ros.engine.memory import validate_name
from ego_ros.msg import ConceptDetection
from ego_ros.srv import Ask

from .client import seconds
from .image_msgs import image_from_msg
from .messages import box_of, concept_msg, roi_of, visit_msg
from .requests import MAX_REQUEST_PIXELS, RequestError, check_request, message_of, shown
from .worker import Priority


# Requests waiting for the model at once; each holds an executor thread (the node has more than this).
MAX_PENDING_REQUESTS = 4
# A question with one of these words gets the visits of the concepts it names in its prompt (see _visits_in_context).
TIME_WORDS = re.compile(r"\b(when|where|last|ago|seen|saw|see|today|yesterday|morning|afternoon|evening|night|"
                        r"earlier|before|since|time|hours?|minutes?)\b", re.IGNORECASE)
VISITS_IN_CONTEXT = 3  # per concept, newest first
MAX_CONCEPTS_WITH_VISITS = 4


class Slots:
    """At most ``n`` requests waiting for the model; a goal takes its slot when it is accepted."""

    def __init__(self, n: int):
        self.n, self.used, self._lock = n, 0, threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.n:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.used = max(0, self.used - 1)


class ServiceHandlers:
    """The services and the action of :class:`~ego_ros.ros.node.EgoNode`."""

    def _list_concepts(self, request, response):
        ego = self.ego
        response.concepts = [concept_msg(info) for info in ego.concepts()] if ego is not None else []
        if ego is not None:
            response.layers, response.layers_source = [int(layer) for layer in ego.layers], ego.layers_source
        elif self._loading:
            response.layers_source = "the model is loading: its concepts are listed once it is loaded"
        return response

    def _forget_concept(self, request, response):
        # The store is thread-safe and the engine reads it in consistent snapshots: answered here, not queued
        # behind the model. A registration appending to it meanwhile is refused at its commit (ConceptChanged).
        def forget():
            ego = self.ego
            try:
                check_request(request)
                if ego is None:
                    raise RequestError("the node is not active")
                ego.forget(request.name)
                if self.sightings is not None:
                    self.sightings.forget(validate_name(request.name))
                response.success, response.message = True, f"forgot {shown(request.name)}"
            except Exception as error:  # noqa: BLE001 - every failure goes back to the caller
                response.success, response.message = False, message_of(error)
            return response

        return self._repeats.answer(("forget",), request.request_id, forget)

    def _last_seen(self, request, response):
        # Answered at once, like list_concepts: SQLite reads do not wait for the model.
        try:
            ego, store = self.ego, self.sightings
            if ego is None:
                raise RequestError("the node is not active")
            name = ego.store.get(request.name).name  # an unknown name: UnknownConcept, listing the known ones
            since = seconds(request.since)
            visits = store.last_seen(name, since=since or None, camera=request.camera or None,
                                     limit=request.max_results or 5) if store is not None else []
            response.visits = [visit_msg(v) for v in visits]
            response.success = True
            response.message = (f"{len(visits)} visit{'s' * (len(visits) != 1)} of {shown(name)}" if visits
                                else f"{shown(name)} has not been seen" + ("" if store is not None else
                                                                           " (no sightings memory: see the log)"))
        except Exception as error:  # noqa: BLE001 - every failure goes back to the caller
            response.success, response.message = False, message_of(error)
        return response

    def _enable(self, request, response):
        self._enabled = bool(request.data)
        if not self._enabled:
            for tracker in self.trackers.values():
                tracker.reset()  # resuming starts fresh: what is present then appears again
        response.success = True
        response.message = "recognition enabled" if self._enabled else "recognition paused (the model stays loaded)"
        self.get_logger().info(response.message)
        return response

    def _register_concept(self, request, response):
        def prepare():
            check_request(request)
            name = validate_name(request.name)
            found = self.ego.store.find(name)
            if found is not None and not request.append:
                raise RequestError(f"concept {shown(name)} already exists; set append to add views, or forget it first")
            if found is None and request.append:
                raise RequestError(f"no concept named {shown(name)} to add views to; register it with append false")
            if request.views:
                views = [image_from_msg(view, limit_pixels=MAX_REQUEST_PIXELS) for view in request.views]
                source, headers = f"{len(views)} given views", []
            else:
                camera = self._camera(request.camera)
                frames = self._frames(camera, request.window_sec, request.num_views or 1)
                views, headers = [frame.image for frame in frames], [frame.header for frame in frames]
                source = f"{len(views)} views from {camera}"

            def on_view(done: int, total: int) -> None:
                if self._stopping:  # deactivating: stop between views, nothing stored
                    raise RequestError(f"stopped after {done} of {total} views: the node is being deactivated")

            regions = [box_of(roi) for roi in request.regions] or None  # one for all views, or one per view
            regions = regions[0] if regions is not None and len(regions) == 1 else regions
            description = request.description.strip() or None

            def job():
                info = self.ego.register(name, views, append=request.append, create=not request.append,
                                         regions=regions, description=description, on_view=on_view)
                return info, source, headers
            return job

        def respond(result):
            info, source, headers = result
            response.concept = concept_msg(info)
            response.frames = [h for h in headers if h is not None]
            response.message = f"registered {shown(info.name)} from {source}: {info.num_tokens} tokens in memory"
            self.get_logger().info(response.message)

        return self._repeats.answer(("register",), request.request_id,
                                    lambda: self._serve(request, response, prepare, respond))

    def _ask(self, request, response):
        def respond(result):
            answer, headers, noted = result
            response.answer, response.concepts_used = answer.text, answer.concepts
            response.latency_sec, response.tokens = float(answer.timings["total"]), int(answer.new_tokens)
            response.frames = headers
            response.message = f"{answer.new_tokens} tokens{noted}"

        return self._serve(request, response, lambda: self._ask_job(request), respond)

    def _recognize(self, request, response):
        def prepare():
            check_request(request)
            camera = ""  # a given image: no camera
            if request.camera or not _has_image(request.image):  # no camera and no image: the default camera
                camera = self._camera(request.camera)
                frame = self._latest_frame(camera)
                image, header, to_sent = frame.image, frame.header, frame.to_sent
            else:
                image, header = image_from_msg(request.image, limit_pixels=MAX_REQUEST_PIXELS), request.image.header

                def to_sent(box):  # the box is in the given image's pixels already
                    return box
            concepts = self._known_concepts(request.concepts)

            def job():
                found = self.ego.recognize(image, concepts, boxes=True)
                threshold = self.settings.recognition_threshold
                self._record_sightings(camera, header, found, image, to_sent,
                                       [n for n, (p, _) in found.items() if p >= threshold])
                return {name: (p, to_sent(box)) for name, (p, box) in found.items()}, header
            return job

        def respond(result):
            scores, header = result
            response.detections = [ConceptDetection(name=n, score=float(p), box=roi_of(box))
                                   for n, (p, box) in sorted(scores.items(), key=lambda kv: -kv[1][0])]
            if header is not None:
                response.frame = header
            response.message = f"{len(scores)} concepts scored"

        return self._serve(request, response, prepare, respond)

    def _ask_job(self, request, on_new_text=None, cancel=None):
        """Validate an Ask request (or Answer goal) here and return the job that answers it on the worker."""
        check_request(request)
        question = request.question.strip()
        if not question:
            raise RequestError("the question is empty")
        s = self.settings
        times = None
        if request.source == Ask.Request.SOURCE_IMAGE:
            images, headers = [image_from_msg(request.image, limit_pixels=MAX_REQUEST_PIXELS)], [request.image.header]
        elif request.source == Ask.Request.SOURCE_VIDEO:
            frames = self._frames(self._camera(request.camera), request.window_sec, s.video_frames)
            images, times = [f.image for f in frames], [f.stamp_sec for f in frames]
            headers = [f.header for f in frames]
        elif request.source == Ask.Request.SOURCE_LATEST:
            frame = self._latest_frame(self._camera(request.camera))
            images, headers = [frame.image], [frame.header]
        else:
            raise RequestError(f"unknown source {request.source}: use SOURCE_LATEST (0), SOURCE_VIDEO (1) or "
                               "SOURCE_IMAGE (2)")
        headers = [h if h is not None else Header() for h in headers]
        concepts = self._known_concepts(request.concepts)
        visits, noted = self._visits_in_context(question, concepts)
        question = visits + question
        max_new_tokens = int(request.max_new_tokens) or None
        cancel = cancel or threading.Event()

        def job():
            if cancel.is_set():  # cancelled while it waited in the queue: no token is generated
                raise RequestError("cancelled before it started")
            self._cancel_events.add(cancel)  # so that deactivating stops this generation at its next token
            try:
                answer = self.ego.ask(question, images, concepts=concepts, times=times,
                                      max_new_tokens=max_new_tokens, on_new_text=on_new_text, cancel=cancel)
            finally:
                self._cancel_events.discard(cancel)
            if self._stopping:
                raise RequestError("stopped: the node is being deactivated")
            return answer, headers, noted

        return job

    def _visits_in_context(self, question: str, concepts) -> tuple[str, str]:
        """For a question about time or place ("When did you last see Rex?", "Where was my mug this morning?"):
        the recent visits of the concepts it names (or asks about), as dated text to put before it, and a note
        for the response saying whose visits are in context. ("", "") for other questions."""
        store = self.sightings
        if store is None or not TIME_WORDS.search(question):
            return "", ""
        names = concepts or [n for n in self.ego.store.names()
                             if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", question, re.IGNORECASE)]
        lines, now = [], time.time()
        for name in names[:MAX_CONCEPTS_WITH_VISITS]:
            visits = store.last_seen(name, limit=VISITS_IN_CONTEXT)
            lines += [f"- {name}: {visit_text(v, now)}" for v in visits] or [f"- {name}: not seen yet"]
        if not lines:
            return "", ""
        shown_names = ", ".join(shown(n) for n in names[:MAX_CONCEPTS_WITH_VISITS])
        return ("What the robot's memory says about when and where it saw them (newest first; now is "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(now))}):\n" + "\n".join(lines) + "\n\n",
                f"; visits of {shown_names} in context")

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
            response.success, response.message = False, message_of(error)
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

    def _run_on_worker(self, prepare, *, slot_taken: bool = False):
        """Run ``prepare()`` (validation) here, then the job it returns on the model's thread.

        Takes one of the MAX_PENDING_REQUESTS slots (an accepted goal already holds one) or refuses at once."""
        worker, ego = self.worker, self.ego
        if worker is None or ego is None or self._stopping:
            if slot_taken:
                self._slots.give()
            raise RequestError("the model is still loading; retry later" if self._loading else "the node is not active")
        if not slot_taken and not self._slots.take():
            raise RequestError(f"busy: {MAX_PENDING_REQUESTS} requests are already waiting for the model; retry later")
        try:
            job = prepare()
            return worker.submit(job, priority=Priority.USER).result()
        except CancelledError:
            raise RequestError("cancelled: the node is being deactivated") from None
        finally:
            self._slots.give()

    # --- action -----------------------------------------------------------------------------------------------

    def _accept_goal(self, goal) -> GoalResponse:
        """Reject at once when busy (the llama_ros convention), rather than accept and abort: a goal accepted
        holds a request slot until its result is set."""
        if self.worker is None or self._stopping or not self._slots.take():
            self.get_logger().info("answer goal rejected: busy or not active", throttle_duration_sec=1.0)
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _cancel_goal(self, goal_handle) -> CancelResponse:
        # Set the goal's event now: a generation stops at its next token, a queued goal never starts.
        event = self._goal_events.get(bytes(goal_handle.goal_id.uuid))
        if event is not None:
            event.set()
        return CancelResponse.ACCEPT

    def _answer_execute(self, goal_handle):
        result = Answer.Result()
        key = bytes(goal_handle.goal_id.uuid)
        cancel = self._goal_events.setdefault(key, threading.Event())
        if goal_handle.is_cancel_requested:
            cancel.set()

        def on_new_text(text: str, count: int) -> None:
            # Only the new text: resending the whole answer at every token was quadratic in its length.
            goal_handle.publish_feedback(Answer.Feedback(new_text=text, tokens=count))
            if goal_handle.is_cancel_requested:
                cancel.set()

        with self._serving():  # until the goal's terminal state is set, so deactivate waits for it
            try:
                answer, headers, noted = self._run_on_worker(
                    lambda: self._ask_job(goal_handle.request, on_new_text, cancel), slot_taken=True)
                result.success, result.answer = True, answer.text
                result.concepts_used, result.latency_sec = answer.concepts, float(answer.timings["total"])
                result.tokens = int(answer.new_tokens)
                result.frames = headers
                result.message = f"{answer.new_tokens} tokens{noted}" + (" (cancelled)" if cancel.is_set() else "")
            except Exception as error:  # noqa: BLE001
                result.success, result.message = False, message_of(error)
            finally:
                self._goal_events.pop(key, None)
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
            elif result.success:
                goal_handle.succeed()
            else:
                goal_handle.abort()
        return result


def _has_image(image) -> bool:
    return bool(image.height or image.width or len(image.data))


def visit_text(visit, now: float) -> str:
    """One visit as the prompt gets it: 'seen 2026-12-05 14:02:11 to 14:02:40 (3 min ago) on /head/image_raw, 12
    times, best score 0.91, the robot at (1.20, 3.40) in map'."""
    day = time.strftime("%Y-%m-%d", time.localtime(visit.last_seen))
    start, end = (time.strftime("%H:%M:%S", time.localtime(t)) for t in (visit.first_seen, visit.last_seen))
    minutes = max(0.0, now - visit.last_seen) / 60
    ago = f"{minutes:.0f} min ago" if minutes < 120 else f"{minutes / 60:.0f} h ago"
    text = (f"seen {day} {start}" + (f" to {end}" if end != start else "") + f" ({ago}) "
            + (f"on {visit.camera}" if visit.camera else "in an image sent to the robot")
            + f", {visit.sightings} time{'s' * (visit.sightings != 1)}, best score {visit.best_score:.2f}")
    if visit.pose is not None:
        x, y, _ = visit.pose.position
        text += f", the robot at ({x:.2f}, {y:.2f}) in {visit.pose.frame_id}"
    return text
