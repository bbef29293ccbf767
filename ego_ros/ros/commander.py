# SPDX-License-Identifier: Apache-2.0
"""``EgoCommander``: requests to a running ``ego`` node that a task planner starts, polls or awaits, and cancels.

The shape of nav2_simple_commander, without blocking: each call starts a request and returns a :class:`Task` at
once; the planner polls it (``done()``, ``status``, ``feedback``) at its own tick rate, blocks on it
(``result(timeout)``), awaits it from asyncio (``await task``), or cancels it (``cancel()``). Many tasks may run at
the same time::

    with EgoCommander("/ego") as ego:
        seen = ego.wait_for_concept("my mug", timeout=30.0)   # completes on a recognition event naming it
        question = ego.ask("Where is my mug?")                # the answer action: streamed, cancellable
        while not question.done():
            print(question.text or "...")                     # the answer so far
            time.sleep(0.1)
        print(question.result().answer)

One rclpy node with one client per service and one action client, created once and reused by every request, spun
by a single-threaded executor in a background thread of its own context (no global ``rclpy.init``). Every ROS call
is made on that thread: the planner's thread only queues work, so a commander may be used from any thread.

Cancelling: an ``ask`` is cancelled on the node (its goal), and the task ends CANCELED with the partial answer. A
service request cannot be cancelled in ROS 2: cancelling its task stops waiting for it (CANCELED at once), and the
node still carries it out. ``wait_for_concept`` just stops watching.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import itertools
import os
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from ego_ros.ros.client import (DEFAULT_TIMEOUT, RESEND_AFTER_SEC, AskResult, NodeError, absent_error, answer_goal,
                                forget_request, last_seen_request, node_name, recognize_request, register_request)

# How often the commander's thread sends queued requests and checks deadlines and liveness (seconds).
_TICK = 0.02
_LIVENESS_PERIOD = 1.0

# The node's own services, and its parameter service (what a client may read of its settings: memory_dir...).
_SERVICES = ("register_concept", "recognize", "list_concepts", "forget_concept", "ask", "last_seen",
             "get_parameters")


class TaskStatus(enum.Enum):
    PENDING = "pending"  # waiting for the node's service or action to be there
    RUNNING = "running"  # sent; waiting for the answer
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class TaskCancelled(NodeError):
    """The task was cancelled; for ``ask``, ``partial`` holds what was generated before the cancel (or None)."""

    def __init__(self, message: str, partial: AskResult | None = None):
        super().__init__(message)
        self.partial = partial


class Task:
    """One request to the node, started and not waited for. Thread-safe; awaitable from asyncio."""

    _ids = itertools.count(1)

    def __init__(self, kind: str, commander: "EgoCommander"):
        self.kind = kind
        self.id = next(self._ids)
        self._commander = commander
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._status = TaskStatus.PENDING
        self._cancel_requested = False
        self.feedback = None  # ask: the latest Answer.Feedback (new_text, tokens); else None
        self._pieces: list[str] = []  # ask: every feedback's new_text, in order
        # Set on the commander's thread while running:
        self._on_cancel: Callable[[], None] | None = None
        self._alive: Callable[[], bool] | None = None
        self._endpoint = ""
        # Sends the request once more if it is still unanswered RESEND_AFTER_SEC after _sent_at (then None).
        self._resend: Callable[[], None] | None = None
        self._sent_at = 0.0

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.kind} {self._status.value}>"

    @property
    def text(self) -> str:
        """ask: the answer so far, joined from the feedback's ``new_text`` pieces ("" before the first)."""
        return "".join(self._pieces)

    @property
    def status(self) -> TaskStatus:
        return self._status

    def done(self) -> bool:
        """True once it succeeded, failed or was cancelled (never blocks)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """The answer; waits up to ``timeout`` seconds (None: as long as it takes; TimeoutError after). Raises
        :class:`NodeError` with the node's message on failure, :class:`TaskCancelled` if it was cancelled."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self!r} not done after {timeout} s") from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return self._future.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self!r} not done after {timeout} s") from None

    def cancel(self) -> None:
        """Ask for it to stop (see the module docstring for what that means per kind); returns at once."""
        if self.done() or self._cancel_requested:
            return
        self._cancel_requested = True
        self._commander._queue(lambda: self._commander._cancel(self))

    def add_done_callback(self, callback: Callable[["Task"], None]) -> None:
        self._future.add_done_callback(lambda _: callback(self))

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    # -- the commander's side

    def _set_running(self) -> None:
        self._status = TaskStatus.RUNNING

    def _succeed(self, value) -> None:
        if not self._future.done():
            self._status = TaskStatus.SUCCEEDED
            self._future.set_result(value)

    def _fail(self, error: BaseException) -> None:
        if not self._future.done():
            self._status = TaskStatus.CANCELED if isinstance(error, TaskCancelled) else TaskStatus.FAILED
            self._future.set_exception(error)


class EgoCommander:
    """Non-blocking requests to the ego node ``node`` (default ``$EGO_ROS_NODE``, else ``/ego``).

    ``timeout`` bounds how long a request waits for the node's service or action to be there (then the task fails
    with :class:`~ego_ros.ros.client.NodeNotFound`, or ``NodeInactive`` when the node runs but is not active); an
    answer itself may take as long as the model needs. ``domain_id`` defaults to ``$ROS_DOMAIN_ID``.
    """

    def __init__(self, node: str | None = None, *, timeout: float = DEFAULT_TIMEOUT, domain_id: int | None = None):
        import rclpy
        from rclpy.action import ActionClient
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rcl_interfaces.srv import GetParameters
        from rclpy.signals import SignalHandlerOptions

        from ego_ros import srv
        from ego_ros.action import Answer

        self.node = node_name(node)
        self.timeout = timeout
        self._context = Context()
        init = {} if domain_id is None else {"domain_id": domain_id}
        rclpy.init(context=self._context, signal_handler_options=SignalHandlerOptions.NO, **init)
        self._lock = threading.Lock()
        self._ops: list[Callable[[], None]] = []
        self._pending: list[tuple[Task, Callable[[], bool], Callable[[], None], float]] = []
        self._running: list[Task] = []
        self._watchers: list[tuple[Task, str, str, float | None, float]] = []
        self._closed = False
        try:
            self.ros_node = rclpy.create_node(f"ego_commander_{os.getpid()}_{id(self):x}", context=self._context,
                                              start_parameter_services=False, enable_rosout=False)
            types = {"register_concept": srv.RegisterConcept, "recognize": srv.Recognize,
                     "list_concepts": srv.ListConcepts, "forget_concept": srv.ForgetConcept, "ask": srv.Ask,
                     "last_seen": srv.LastSeen,
                     "get_parameters": GetParameters}
            self.services = {name: self.ros_node.create_client(types[name], f"{self.node}/{name}")
                             for name in _SERVICES}
            self.answer_action = ActionClient(self.ros_node, Answer, f"{self.node}/answer")
            self._events_qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT)  # matches either
            self._events = None
            self._executor = SingleThreadedExecutor(context=self._context)
            self._executor.add_node(self.ros_node)
            self._last_liveness = time.monotonic()
            self.ros_node.create_timer(_TICK, self._tick)
        except BaseException:
            self._context.try_shutdown()
            raise
        self._thread = threading.Thread(target=self._spin, name="ego-commander", daemon=True)
        self._thread.start()

    # -- lifetime

    def close(self) -> None:
        """Cancel what is running (goals on the node), fail what is pending, stop the thread."""
        if self._closed:
            return
        with self._lock:
            tasks = [t for t, *_ in self._pending] + list(self._running) + [w[0] for w in self._watchers]
        for task in tasks:
            task.cancel()
        deadline = time.monotonic() + 2.0  # give the cancels a moment to reach the node
        while any(not t.done() for t in tasks) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._closed = True
        for task in tasks:
            task._fail(TaskCancelled("the commander was closed"))
        self._executor.shutdown(timeout_sec=1.0)
        self._thread.join(timeout=2.0)
        self.answer_action.destroy()
        self.ros_node.destroy_node()
        self._context.try_shutdown()

    def __enter__(self) -> "EgoCommander":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the requests

    def register(self, name: str, views: Sequence = (), *, camera: str = "", num_views: int = 0,
                 window_sec: float = 0.0, append: bool = False, regions: Sequence = (),
                 description: str = "") -> Task:
        """``RegisterConcept``: from ``views`` (RGB uint8 arrays) if given, else from the camera's buffer; see
        :func:`ego_ros.ros.client.register_request`. Result: the stored ``ConceptInfo``."""
        request = register_request(name, views, camera=camera, num_views=num_views, window_sec=window_sec,
                                   append=append, regions=regions, description=description)
        return self.call("register_concept", request, lambda r: _succeeded(r).concept, kind="register")

    def recognize(self, image=None, *, camera: str = "", concepts: Iterable[str] = ()) -> Task:
        """``Recognize`` on ``image`` (an RGB array) if given, else on the camera's latest frame.
        Result: ``{name: score}``."""
        request = recognize_request(image, camera=camera, concepts=concepts)
        return self.call("recognize", request,
                         lambda r: {d.name: float(d.score) for d in _succeeded(r).detections}, kind="recognize")

    def list_concepts(self) -> Task:
        """``ListConcepts``. Result: the node's ``ConceptInfo`` messages, by name."""
        from ego_ros.srv import ListConcepts

        return self.call("list_concepts", ListConcepts.Request(), lambda r: list(r.concepts), kind="list_concepts")

    def forget(self, name: str) -> Task:
        """``ForgetConcept``. Result: the node's confirmation."""
        return self.call("forget_concept", forget_request(name), lambda r: _succeeded(r).message, kind="forget")

    def last_seen(self, name: str, *, since: float | None = None, camera: str = "", max_results: int = 5) -> Task:
        """``LastSeen``: where and when ``name`` was recognised. Result: its visits (``ego_ros/msg/Visit``),
        newest first; ``since`` in seconds since the epoch (None: any time)."""
        request = last_seen_request(name, since=since, camera=camera, max_results=max_results)
        return self.call("last_seen", request, lambda r: list(_succeeded(r).visits), kind="last_seen")

    def parameters(self, names: Iterable[str]) -> Task:
        """The node's parameters ``names`` (its ``get_parameters`` service, answered in any lifecycle state).
        Result: ``{name: value}`` (Python values; None for one declared without a value). Fails naming them when
        the node lacks any of them (ROS then answers with no values at all)."""
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        names = list(names)

        def values(response) -> dict:
            if len(response.values) != len(names):
                raise NodeError(f"the node {self.node} does not have all of the parameters {names}")
            return {n: parameter_value_to_python(v) for n, v in zip(names, response.values)}
        return self.call("get_parameters", GetParameters.Request(names=names), values, kind="parameters")

    def call(self, service: str, request, convert: Callable[[Any], Any] = lambda r: r, *, kind: str = "") -> Task:
        """Any of the node's services (``register_concept``, ``recognize``, ``list_concepts``, ``forget_concept``,
        ``ask``, ``get_parameters``) with a ready request; the result is ``convert(response)``."""
        client = self.services[service]
        task = Task(kind or service, self)
        task._endpoint = f"{self.node}/{service}"

        sent: list = []

        def forget_the_others(_task) -> None:  # on whichever thread finished the task: only local bookkeeping
            for future in sent:
                if not future.done():
                    client.remove_pending_request(future)

        def send_once() -> None:
            future = client.call_async(request)
            sent.append(future)
            future.add_done_callback(lambda f: self._service_done(task, f, convert))

        def send() -> None:
            send_once()
            task._set_running()
            task._alive = client.service_is_ready
            task._resend, task._sent_at = send_once, time.monotonic()
            task.add_done_callback(forget_the_others)
            task._on_cancel = lambda: task._fail(TaskCancelled(
                f"stopped waiting for {task._endpoint} (a service cannot be cancelled: the node still carries it "
                f"out)"))

        self._start(task, client.service_is_ready, send, f"{self.node}/{service}")
        return task

    def ask(self, question: str, *, image=None, camera: str = "", video_sec: float | None = None,
            concepts: Iterable[str] = (), max_new_tokens: int = 0,
            on_feedback: Callable[[Any], None] | None = None) -> Task:
        """The ``answer`` action: about ``image`` (an RGB array) if given, else the last ``video_sec`` seconds of
        ``camera`` if given, else its latest frame. ``task.feedback`` is the latest ``Answer.Feedback``
        (``new_text``: what its token added, ``tokens``), also passed to ``on_feedback`` (on the commander's
        thread); ``task.text`` is the answer so far.
        Result: an :class:`~ego_ros.ros.client.AskResult`."""
        goal = answer_goal(question, image=image, camera=camera, video_sec=video_sec, concepts=concepts,
                           max_new_tokens=max_new_tokens)
        task = Task("ask", self)
        endpoint = task._endpoint = f"{self.node}/answer"
        action = self.answer_action

        handle: list = []  # the goal the node accepted first: the task's
        early: list = []  # feedback that came before the node's acceptance of its goal did

        def feedback(message) -> None:
            if not handle:
                early.append(message)
            elif bytes(message.goal_id.uuid) == bytes(handle[0].goal_id.uuid):  # not a goal sent again
                task._pieces.append(message.feedback.new_text)
                task.feedback = message.feedback
                if on_feedback is not None:
                    on_feedback(message.feedback)

        def goal_response(future) -> None:
            if future.exception() is not None:
                if not handle:
                    task._fail(NodeError(f"{endpoint} failed: {future.exception()}"))
                return
            goal_handle = future.result()
            if handle or task.done():  # the goal was sent twice and both arrived: this one is not wanted
                if goal_handle.accepted:
                    goal_handle.cancel_goal_async()
                return
            task._resend = None
            if not goal_handle.accepted:
                task._fail(NodeError(f"the node at {self.node} refused the question (goal rejected)"))
                return
            handle.append(goal_handle)
            for message in early:
                feedback(message)
            if task._cancel_requested:
                goal_handle.cancel_goal_async()
            goal_handle.get_result_async().add_done_callback(lambda f: self._answer_done(task, f))

        def send_once() -> None:
            action.send_goal_async(goal, feedback_callback=feedback).add_done_callback(goal_response)

        def send() -> None:
            send_once()
            task._set_running()
            task._alive = action.server_is_ready
            task._resend, task._sent_at = send_once, time.monotonic()

            def cancel() -> None:  # once accepted; before, goal_response() sees _cancel_requested
                if handle:
                    handle[0].cancel_goal_async()

            task._on_cancel = cancel

        self._start(task, action.server_is_ready, send, endpoint)
        return task

    def wait_for_concept(self, name: str, *, camera: str = "", min_score: float | None = None,
                         timeout: float | None = None) -> Task:
        """Completes when a recognition event on ``<node>/recognitions`` (from ``camera``, if given) has ``name``
        among its detections (present by the node's threshold and hysteresis), with a score of at least
        ``min_score`` if given; fails after ``timeout`` seconds (None: never). Result: ``(score, event)``."""
        task = Task("wait_for_concept", self)
        task._endpoint = f"{self.node}/recognitions"
        deadline = float("inf") if timeout is None else time.monotonic() + timeout

        def watch() -> None:
            self._subscribe_events()
            task._set_running()
            task._on_cancel = lambda: self._unwatch(task, TaskCancelled(f"stopped waiting for {name!r}"))
            with self._lock:
                self._watchers.append((task, name, camera, min_score, deadline))

        self._queue(watch)
        return task

    # -- the commander's thread

    def _spin(self) -> None:
        try:
            self._executor.spin()
        except Exception:  # noqa: BLE001 - the context was shut down under it by close()
            pass

    def _queue(self, op: Callable[[], None]) -> None:
        if self._closed:
            raise NodeError("the commander is closed")
        with self._lock:
            self._ops.append(op)

    def _start(self, task: Task, ready: Callable[[], bool], send: Callable[[], None], endpoint: str) -> None:
        deadline = time.monotonic() + self.timeout
        self._queue(lambda: self._pending.append((task, ready, send, deadline)))

    def _tick(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        for op in ops:
            op()
        now = time.monotonic()
        still = []
        for entry in self._pending:
            task, ready, send, deadline = entry
            if task.done():
                continue
            if ready():
                send()
                self._running.append(task)
            elif now > deadline:
                task._fail(absent_error(self.ros_node, self.node, task._endpoint or "?", self.timeout))
            else:
                still.append(entry)
        self._pending = still
        self._running = [t for t in self._running if not t.done()]
        for task in self._running:  # unanswered for long: perhaps lost on the way (see ego_ros.ros.client)
            if task._resend is not None and not task._cancel_requested and now - task._sent_at >= RESEND_AFTER_SEC:
                resend, task._resend = task._resend, None
                resend()
        if now - self._last_liveness >= _LIVENESS_PERIOD:
            self._last_liveness = now
            for task in self._running:
                if task._alive is not None and not task._alive():
                    task._fail(NodeError(f"{task._endpoint} went away before answering (the node stopped or "
                                         f"was deactivated)"))
        with self._lock:
            expired = [w for w in self._watchers if w[4] <= now]
        for task, name, camera, _, _ in expired:
            where = f" on {camera}" if camera else ""
            self._unwatch(task, NodeError(f"{name!r} was not recognised{where} within the timeout"))

    def _cancel(self, task: Task) -> None:
        if task.done():
            return
        if task._on_cancel is not None:
            task._on_cancel()
        else:  # still pending: never sent
            self._pending = [entry for entry in self._pending if entry[0] is not task]
            task._fail(TaskCancelled(f"cancelled before it was sent to {task._endpoint}"))

    def _service_done(self, task: Task, future, convert) -> None:
        if future.cancelled() or task.done():
            return
        if future.exception() is not None:
            task._fail(NodeError(f"{task._endpoint} failed: {future.exception()}"))
            return
        try:
            task._succeed(convert(future.result()))
        except NodeError as error:
            task._fail(error)

    def _answer_done(self, task: Task, future) -> None:
        from action_msgs.msg import GoalStatus

        if future.exception() is not None:
            task._fail(NodeError(f"{task._endpoint} failed: {future.exception()}"))
            return
        result, status = future.result().result, future.result().status
        answer = AskResult(result.answer, list(result.concepts_used), result.latency_sec, result.tokens)
        if status == GoalStatus.STATUS_CANCELED:
            task._fail(TaskCancelled(result.message or "cancelled", partial=answer))
        elif status != GoalStatus.STATUS_SUCCEEDED or not result.success:
            task._fail(NodeError(result.message or f"the question ended with goal status {status}"))
        else:
            task._succeed(answer)

    def _subscribe_events(self) -> None:
        if self._events is None:
            from ego_ros.msg import RecognitionEvent

            self._events = self.ros_node.create_subscription(RecognitionEvent, f"{self.node}/recognitions",
                                                             self._on_event, self._events_qos)

    def _on_event(self, event) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for task, name, camera, min_score, _ in watchers:
            if camera and event.camera != camera:
                continue
            for detection in event.detections:
                if detection.name == name and (min_score is None or detection.score >= min_score):
                    self._unwatch(task, None, (float(detection.score), event))
                    break

    def _unwatch(self, task: Task, error: BaseException | None, value=None) -> None:
        with self._lock:
            self._watchers = [w for w in self._watchers if w[0] is not task]
        if error is None:
            task._succeed(value)
        else:
            task._fail(error)


def _succeeded(response):
    if not response.success:
        raise NodeError(response.message or "the node answered success=false without a message")
    return response
