# SPDX-License-Identifier: Apache-2.0
"""``EgoClient``: plain, blocking Python calls to a running ``ego`` node (what ``ego-ros`` uses).

Each call waits for the node (up to ``timeout`` seconds), then for its answer, and returns it or raises
:class:`NodeError` with the node's message. Its ROS clients are made on first use and reused by later calls. A task
planner that must not block wants :class:`ego_ros.ros.commander.EgoCommander` instead (start, poll or await,
cancel)::

    with EgoClient("/ego", timeout=10.0) as ego:
        info = ego.register("my mug", camera="", num_views=3)
        answer = ego.ask("Where is my mug?", on_text=print)     # answer.answer, .concepts_used, .latency_sec
        ego.recognize(camera="/camera/image_raw")               # {"my mug": 0.87, ...}

A request that is not answered within ``RESEND_AFTER_SEC`` is sent once more, and the first answer wins: DDS
discovery sometimes drops the first request of a fresh client, which the node then never answers. A repetition is
harmless: registrations and forgets carry a request id, by which the node carries them out once; the other calls
only read (a slow ``recognize`` may be computed twice). A goal of the answer action is sent again only when the
node has not accepted it (acceptance comes at once), and a second acceptance is cancelled.

rclpy is imported inside the class only, so importing this module costs nothing.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

NODE_ENV = "EGO_ROS_NODE"
DEFAULT_NODE = "/ego"
DEFAULT_TIMEOUT = 10.0
# While waiting for a long answer, how often to check that the node is still there (seconds).
_LIVENESS_PERIOD = 1.0
# A request unanswered (a goal unaccepted) this long is sent once more (see the module docstring).
RESEND_AFTER_SEC = 3.0


class NodeError(Exception):
    """The node could not be reached, refused the request, or answered ``success=false`` (the message says which)."""


class NodeNotFound(NodeError):
    """Nothing answered at ``endpoint`` within the timeout."""

    def __init__(self, endpoint: str, timeout: float):
        super().__init__(f"no ego node answering at {endpoint} (start one with 'ego-ros node')")
        self.endpoint, self.timeout = endpoint, timeout


class NodeInactive(NodeError):
    """The node is in the graph but offers no services: a lifecycle node that is not active."""


@dataclass
class AskResult:
    answer: str
    concepts_used: list[str]
    latency_sec: float
    tokens: int  # how many tokens the answer took (the result's count)


def node_name(name: str | None) -> str:
    """``ego``, ``/ego/``, ``robot1/ego`` -> ``/ego``, ``/robot1/ego``: the prefix of the node's services."""
    name = (name if name is not None else os.environ.get(NODE_ENV) or DEFAULT_NODE).strip().strip("/")
    if not name:
        raise ValueError("--node needs a node name like /ego or /robot1/ego")
    return "/" + name


def register_request(name: str, views: Sequence = (), *, camera: str = "", num_views: int = 0,
                     window_sec: float = 0.0, append: bool = False, regions: Sequence = (), description: str = ""):
    """A ``RegisterConcept`` request. ``regions``: which object the views are about, boxes (x0, y0, x1, y1) in the
    views' pixels, one per view or one for all; ``description``: the object in the user's words."""
    from ego_ros.srv import RegisterConcept

    request = RegisterConcept.Request(name=sendable_name(name), camera=camera, num_views=int(num_views),
                                      window_sec=float(window_sec), append=append, description=description,
                                      request_id=new_request_id())
    request.views = [image_msg(view) for view in views]
    request.regions = [region_msg(box) for box in regions]
    return request


def seconds(stamp) -> float:
    """A ``builtin_interfaces/Time`` (a header's stamp, a visit's times) as seconds since the epoch."""
    return stamp.sec + stamp.nanosec * 1e-9


def last_seen_request(name: str, *, since: float | None = None, camera: str = "", max_results: int = 5):
    """A ``LastSeen`` request: ``since`` in seconds since the epoch (None: any time)."""
    from ego_ros.ros.messages import time_msg
    from ego_ros.srv import LastSeen

    request = LastSeen.Request(name=sendable_name(name), camera=camera, max_results=int(max_results))
    if since is not None:
        request.since = time_msg(since)
    return request


def forget_request(name: str):
    """A ``ForgetConcept`` request, with its request id."""
    from ego_ros.srv import ForgetConcept

    return ForgetConcept.Request(name=sendable_name(name), request_id=new_request_id())


def new_request_id() -> str:
    """An id by which the node tells a request sent again from a new one."""
    return uuid.uuid4().hex


def answer_goal(question: str, *, image=None, camera: str = "", video_sec: float | None = None,
                concepts: Iterable[str] = (), max_new_tokens: int = 0):
    """An ``Answer`` goal about ``image`` (an RGB array) if given, else the last ``video_sec`` seconds of ``camera``
    if given, else its latest frame."""
    from ego_ros.action import Answer

    goal = Answer.Goal(question=question, camera=camera, concepts=list(concepts), max_new_tokens=int(max_new_tokens))
    if image is not None:
        goal.source, goal.image = Answer.Goal.SOURCE_IMAGE, image_msg(image)
    elif video_sec is not None:
        goal.source, goal.window_sec = Answer.Goal.SOURCE_VIDEO, float(video_sec)
    else:
        goal.source = Answer.Goal.SOURCE_LATEST
    return goal


def recognize_request(image=None, *, camera: str = "", concepts: Iterable[str] = ()):
    """A ``Recognize`` request about ``image`` (an RGB array) if given, else about the camera's latest frame."""
    from ego_ros.srv import Recognize

    request = Recognize.Request(camera=camera, concepts=list(concepts))
    if image is not None:
        request.camera, request.image = "", image_msg(image)
    return request


def sendable_name(name: str) -> str:
    """``name``, refused if it holds a NUL: a ROS string ends at the first one, so the node would get a cut name
    ("nul", NUL, "../x" arrives as "nul") and could act on another concept than the one meant."""
    if "\x00" in name:
        raise ValueError(f"a concept name cannot hold a NUL character: {name[:60]!r}")
    return name


def region_msg(box):
    """(x0, y0, x1, y1) in pixels as a ``sensor_msgs/RegionOfInterest`` (clipped at 0; an empty box is an error,
    as a zero-sized region would mean the whole image)."""
    from sensor_msgs.msg import RegionOfInterest

    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = max(0, round(x0)), max(0, round(y0))
    if round(x1) <= left or round(y1) <= top:
        raise ValueError(f"the box {tuple(box)} is empty: x1 > x0 and y1 > y0 (in pixels) are needed")
    return RegionOfInterest(x_offset=left, y_offset=top, width=round(x1) - left, height=round(y1) - top)


class EgoClient:
    """Plain calls to a running ``ego`` node: each waits for the node (up to ``timeout`` s), then for its answer.

    Its own rclpy context (no global ``rclpy.init``) and a single-threaded executor spun only while a call is
    waiting; no signal handlers, so Ctrl-C is a KeyboardInterrupt in the caller. ``ask`` turns that interrupt into
    a cancel of the goal on the node before re-raising it.
    """

    def __init__(self, node: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        self.node = node_name(node)
        self.timeout = timeout
        self._context = Context()
        rclpy.init(context=self._context, signal_handler_options=SignalHandlerOptions.NO)
        try:
            self._ros = rclpy.create_node(f"ego_ros_cli_{os.getpid()}", context=self._context,
                                          start_parameter_services=False, enable_rosout=False)
            self._executor = SingleThreadedExecutor(context=self._context)
            self._executor.add_node(self._ros)
            self._clients: dict = {}  # service name -> its client, made on first use
            self._answer_client = None
        except BaseException:
            self._context.try_shutdown()
            raise

    def close(self, timeout: float | None = None) -> bool:
        """Destroy this client's ROS entities and shut its context down; with ``timeout``, wait at most that long
        and say whether the teardown finished. The middleware's teardown has been seen to hang now and then (DDS
        participants going away while many others come and go); a process about to exit need not wait for it."""
        if timeout is None:
            self._teardown()
            return True
        teardown = threading.Thread(target=self._teardown, name="ego-client-close", daemon=True)
        teardown.start()
        teardown.join(timeout)
        return not teardown.is_alive()

    def _teardown(self) -> None:
        if self._answer_client is not None:
            self._answer_client.destroy()
        self._executor.shutdown(timeout_sec=1.0)
        self._ros.destroy_node()
        self._context.try_shutdown()

    def __enter__(self) -> EgoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the node's calls

    def register(self, name: str, views: Sequence = (), *, camera: str = "", num_views: int = 0,
                 window_sec: float = 0.0, append: bool = False, regions: Sequence = (), description: str = ""):
        """``RegisterConcept``: from ``views`` (RGB uint8 arrays) if given, else from the camera's buffer; see
        :func:`register_request` for ``regions`` and ``description``. Returns the stored ``ConceptInfo``."""
        from ego_ros.srv import RegisterConcept

        request = register_request(name, views, camera=camera, num_views=num_views, window_sec=window_sec,
                                   append=append, regions=regions, description=description)
        return self._succeeded(self._call(RegisterConcept, "register_concept", request)).concept

    def ask(self, question: str, *, image=None, camera: str = "", video_sec: float | None = None,
            concepts: Iterable[str] = (), max_new_tokens: int = 0,
            on_text: Callable[[str], None] | None = None) -> AskResult:
        """The ``answer`` action. ``on_text`` gets the whole answer so far at each feedback (joined here from each
        feedback's ``new_text``). Source: ``image`` (an RGB array) if given, else the last ``video_sec`` seconds of
        ``camera`` if given, else its latest frame."""
        from action_msgs.msg import GoalStatus
        from rclpy.action import ActionClient

        from ego_ros.action import Answer

        goal = answer_goal(question, image=image, camera=camera, video_sec=video_sec, concepts=concepts,
                           max_new_tokens=max_new_tokens)
        endpoint = f"{self.node}/answer"
        if self._answer_client is None:
            self._answer_client = ActionClient(self._ros, Answer, endpoint)
        client = self._answer_client
        pieces, chosen, early = [], [], []

        def feedback(message) -> None:
            if not chosen:
                early.append(message)  # before the node's acceptance of its goal reached us
                return
            if bytes(message.goal_id.uuid) != chosen[0]:
                return  # a goal sent again that the node accepted too (cancelled below)
            pieces.append(message.feedback.new_text)
            if on_text is not None:
                on_text("".join(pieces))

        def cancel_if_accepted(future) -> None:
            if future.exception() is None and future.result().accepted:
                future.result().cancel_goal_async()

        accepted = goal_handle = None
        sent: list = []
        try:
            if not client.wait_for_server(timeout_sec=self.timeout):
                raise self._not_found(endpoint)
            sent.append(client.send_goal_async(goal, feedback_callback=feedback))
            accepted = self._wait(sent, client.server_is_ready, endpoint,
                                  resend=lambda: sent.append(client.send_goal_async(goal, feedback_callback=feedback)))
            goal_handle = accepted.result()
            for other in sent:
                if other is not accepted:
                    other.add_done_callback(cancel_if_accepted)
            if not goal_handle.accepted:
                raise NodeError(f"the node at {self.node} refused the question (goal rejected)")
            chosen.append(bytes(goal_handle.goal_id.uuid))
            for message in early:
                feedback(message)
            response = self._wait([goal_handle.get_result_async()], client.server_is_ready, endpoint)
        except KeyboardInterrupt:
            self._cancel(goal_handle, accepted or (sent[0] if sent else None))
            raise
        result, status = response.result().result, response.result().status
        if status != GoalStatus.STATUS_SUCCEEDED or not result.success:
            raise NodeError(result.message or f"the question ended with goal status {status}")
        # The count is the result's: feedback travels on another topic, the result can overtake its last messages,
        # and rclpy drops feedback that comes after the result
        return AskResult(result.answer, list(result.concepts_used), result.latency_sec, result.tokens)

    def recognize(self, image=None, *, camera: str = "", concepts: Iterable[str] = ()) -> dict[str, float]:
        """``Recognize`` on ``image`` (an RGB array) if given, else on the camera's latest frame: name -> score."""
        from ego_ros.srv import Recognize

        request = recognize_request(image, camera=camera, concepts=concepts)
        response = self._succeeded(self._call(Recognize, "recognize", request))
        return {d.name: float(d.score) for d in response.detections}

    def list(self) -> list:
        """``ListConcepts``: the node's ``ConceptInfo`` messages, sorted by name."""
        return self.concepts_and_layers()[0]

    def concepts_and_layers(self) -> tuple[list, list[int], str]:
        """``ListConcepts`` in full: the concepts, the decoder layers the node's model scores tokens with (empty
        while none is loaded) and where those layers come from."""
        from ego_ros.srv import ListConcepts

        response = self._call(ListConcepts, "list_concepts", ListConcepts.Request())
        return list(response.concepts), [int(layer) for layer in response.layers], response.layers_source

    def forget(self, name: str) -> str:
        """``ForgetConcept``; returns the node's message."""
        from ego_ros.srv import ForgetConcept

        return self._succeeded(self._call(ForgetConcept, "forget_concept", forget_request(name))).message

    def last_seen(self, name: str, *, since: float | None = None, camera: str = "", max_results: int = 5) -> list:
        """``LastSeen``: the concept's visits (``ego_ros/msg/Visit``), newest first; ``since`` in seconds since
        the epoch."""
        from ego_ros.srv import LastSeen

        request = last_seen_request(name, since=since, camera=camera, max_results=max_results)
        return list(self._succeeded(self._call(LastSeen, "last_seen", request)).visits)

    def watch(self, callback: Callable, *, duration: float | None = None,
              on_ready: Callable[[str], None] | None = None) -> None:
        """Calls ``callback(RecognitionEvent)`` for each event on ``<node>/recognitions``, for ``duration`` seconds
        or until KeyboardInterrupt (which propagates); ``on_ready(topic)`` once subscribed. Fails like the calls
        when the node is not there."""
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from ego_ros.msg import RecognitionEvent
        from ego_ros.srv import ListConcepts

        # The node's presence, as for every other command: its list_concepts service.
        if not self._client(ListConcepts, "list_concepts").wait_for_service(timeout_sec=self.timeout):
            raise self._not_found(f"{self.node}/list_concepts")
        topic = f"{self.node}/recognitions"
        # Match the publisher's reliability (a reliable subscription gets nothing from a best-effort publisher).
        publishers = self._ros.get_publishers_info_by_topic(topic)
        best_effort = any(p.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for p in publishers)
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT if best_effort
                         else ReliabilityPolicy.RELIABLE)
        subscription = self._ros.create_subscription(RecognitionEvent, topic, callback, qos)
        if on_ready is not None:
            on_ready(topic)
        try:
            end = None if duration is None else time.monotonic() + duration
            while end is None or time.monotonic() < end:
                self._executor.spin_once(timeout_sec=0.1)
        finally:
            self._ros.destroy_subscription(subscription)

    # -- plumbing

    def _not_found(self, endpoint: str) -> NodeError:
        return absent_error(self._ros, self.node, endpoint, self.timeout)

    def _client(self, srv_type, service: str):
        """The client of the node's ``service``, made on first use and kept."""
        client = self._clients.get(service)
        if client is None:
            client = self._clients[service] = self._ros.create_client(srv_type, f"{self.node}/{service}")
        return client

    def _call(self, srv_type, service: str, request):
        endpoint = f"{self.node}/{service}"
        client = self._client(srv_type, service)
        if not client.wait_for_service(timeout_sec=self.timeout):
            raise self._not_found(endpoint)
        sent = [client.call_async(request)]
        try:
            return self._wait(sent, client.service_is_ready, endpoint,
                              resend=lambda: sent.append(client.call_async(request))).result()
        finally:
            for future in sent:
                if not future.done():
                    client.remove_pending_request(future)

    def _wait(self, futures: list, alive: Callable[[], bool], endpoint: str, resend: Callable[[], None] | None = None):
        """Spin until one of ``futures`` is done (a model may take minutes: no deadline) and return it, failing if
        the node goes away. ``resend`` (which adds a future) is called once, if none is done after
        RESEND_AFTER_SEC."""
        started = checked = time.monotonic()
        while not any(future.done() for future in futures):
            self._executor.spin_once(timeout_sec=0.05)
            now = time.monotonic()
            if resend is not None and now - started >= RESEND_AFTER_SEC and not any(f.done() for f in futures):
                resend()
                resend = None
            if now - checked >= _LIVENESS_PERIOD:
                checked = now
                if not any(future.done() for future in futures) and not alive():
                    raise NodeError(f"{endpoint} went away before answering (the node stopped or was deactivated)")
        done = next(future for future in futures if future.done())
        if done.exception() is not None:
            raise NodeError(f"{endpoint} failed: {done.exception()}")
        return done

    def _cancel(self, goal_handle, accepted) -> None:
        """Best effort, a few seconds at most: ask the node to stop generating for this goal."""
        try:
            if goal_handle is None and accepted is not None:  # interrupted before the node accepted the goal
                self._executor.spin_until_future_complete(accepted, timeout_sec=2.0)
                goal_handle = accepted.result() if accepted.done() else None
            if goal_handle is not None and goal_handle.accepted:
                cancelling = goal_handle.cancel_goal_async()
                self._executor.spin_until_future_complete(cancelling, timeout_sec=3.0)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for the cancel to be acknowledged
            pass

    @staticmethod
    def _succeeded(response):
        if not response.success:
            raise NodeError(response.message or "the node answered success=false without a message")
        return response


def absent_error(ros_node, node: str, endpoint: str, timeout: float) -> NodeError:
    """Why ``endpoint`` of the ego node ``node`` is not there, seen from ``ros_node``: NodeNotFound, or NodeInactive
    when a node of that name is in the graph (a lifecycle node offers its services only while active)."""
    namespace, _, name = node.rpartition("/")
    if (name, namespace or "/") in ros_node.get_node_names_and_namespaces():
        return NodeInactive(f"the node {node} is running but not active, so it offers no {endpoint}: it "
                            f"may still be loading its model (retry, or raise --timeout), be waiting for a "
                            f"lifecycle activate, or have failed to activate (see its log)")
    return NodeNotFound(endpoint, timeout)


def image_msg(image):
    """An RGB uint8 array (H, W, 3) as a ``sensor_msgs/Image`` (rgb8)."""
    from sensor_msgs.msg import Image

    from ego_ros.ros.image_msgs import image_to_msg

    return image_to_msg(image, Image)
