# SPDX-License-Identifier: Apache-2.0
"""Requests lost on the way: the clients send again what the node never answered, and the node carries out a
registration or a forget sent twice only once.

DDS discovery now and then drops the first request of a fresh client, which the node then never answers. Here a
real rclpy server of the node's protocol (not the ego node: it runs no model) answers nothing to the first request
of each service and to the first goal of its answer action, as if they had been lost, and answers the rest; the
clients (``EgoClient`` for the command line, ``EgoCommander`` for planners and the web page) must still get their
answers. The ego node's own side, request ids remembered, is tested against the real node at the end.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.action import ActionServer, GoalResponse  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402

from ego_ros.action import Answer  # noqa: E402
from ego_ros.msg import ConceptDetection, ConceptInfo  # noqa: E402
from ego_ros.ros.client import RESEND_AFTER_SEC, EgoClient  # noqa: E402
from ego_ros.ros.commander import EgoCommander  # noqa: E402
from ego_ros.srv import ForgetConcept, ListConcepts, Recognize, RegisterConcept  # noqa: E402
from ego_ros.testing.rosgraph import free_domain  # noqa: E402


class LossyServer:
    """The node's services and answer action; the first request of each (and the first goal) is "lost": held
    unanswered until the server closes. ``received`` records every request that came in, by service."""

    def __init__(self, domain_id: int):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("ego", context=self.context)
        self.received: dict[str, list] = {}
        self.closing = threading.Event()
        self._lock = threading.Lock()
        group = ReentrantCallbackGroup()
        for srv_type, service, answer in ((ListConcepts, "list_concepts", self.list_concepts),
                                          (RegisterConcept, "register_concept", self.register_concept),
                                          (ForgetConcept, "forget_concept", self.forget_concept),
                                          (Recognize, "recognize", self.recognize)):
            self.node.create_service(srv_type, f"~/{service}", self.losing_the_first(service, answer),
                                     callback_group=group)
        self.goals: list[bytes] = []
        self.action = ActionServer(self.node, Answer, "~/answer", execute_callback=self.answer,
                                   goal_callback=self.goal, callback_group=group)
        self.executor = MultiThreadedExecutor(num_threads=8, context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing.set()  # the held requests are let go: their callers are long gone
        self.executor.shutdown(timeout_sec=2.0)
        self.action.destroy()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=2.0)

    def first(self, kind: str, request) -> bool:
        with self._lock:
            self.received.setdefault(kind, []).append(request)
            return len(self.received[kind]) == 1

    def losing_the_first(self, service: str, answer):
        def serve(request, response):
            if self.first(service, request):
                self.closing.wait()  # never answered while the test runs
            return answer(request, response)
        return serve

    @staticmethod
    def list_concepts(request, response):
        response.concepts = [ConceptInfo(name="Rex", num_views=1)]
        return response

    @staticmethod
    def register_concept(request, response):
        response.success, response.concept = True, ConceptInfo(name=request.name, num_views=len(request.views))
        return response

    @staticmethod
    def forget_concept(request, response):
        response.success, response.message = True, f"forgot {request.name!r}"
        return response

    @staticmethod
    def recognize(request, response):
        response.success, response.detections = True, [ConceptDetection(name="Rex", score=0.75)]
        return response

    def goal(self, goal_request):
        if self.first("answer", goal_request):
            self.closing.wait()  # the first goal is never accepted
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    @staticmethod
    def answer(goal_handle):
        goal_handle.publish_feedback(Answer.Feedback(new_text="on the table", tokens=3))
        time.sleep(0.2)  # the feedback arrives before the result
        goal_handle.succeed()
        return Answer.Result(success=True, answer="on the table", concepts_used=["Rex"], tokens=3)


@pytest.fixture()
def lossy():
    domain = free_domain()
    server = LossyServer(domain)
    try:
        yield server, domain
    finally:
        server.close()


def check_each_request_came_twice(server: LossyServer) -> None:
    """Each service saw its request twice (the first lost), the answer action two goals; registrations and
    forgets were sent again under the same request id, which the node uses to carry them out once."""
    assert {kind: len(requests) for kind, requests in server.received.items()} == {
        "list_concepts": 2, "register_concept": 2, "forget_concept": 2, "recognize": 2, "answer": 2}
    for kind in ("register_concept", "forget_concept"):
        first, again = server.received[kind]
        assert first.request_id and first.request_id == again.request_id and first.name == again.name


def test_the_command_line_client_sends_again_what_was_never_answered(lossy, monkeypatch):
    server, domain = lossy
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))  # EgoClient joins its environment's domain, as the CLI does
    said: dict = {}

    def calls() -> None:  # on a thread of its own: a client that waited for good would otherwise hang the test
        with EgoClient("/ego", timeout=30.0) as ego:
            said["list"] = [c.name for c in ego.list()]
            said["register"] = ego.register("my mug", [np.zeros((28, 28, 3), np.uint8)]).num_views
            said["forget"] = ego.forget("my mug")
            said["recognize"] = ego.recognize(camera="/camera")
            pieces = []
            answer = ego.ask("Where is Rex?", on_text=pieces.append)
            said["ask"] = (answer.answer, pieces, answer.tokens)

    started = time.monotonic()
    caller = threading.Thread(target=calls, daemon=True)
    caller.start()
    caller.join(timeout=120)
    print(f"5 calls, each lost once, answered in {time.monotonic() - started:.1f} s (sent again after "
          f"{RESEND_AFTER_SEC:g} s)")
    assert said == {"list": ["Rex"], "register": 1, "forget": "forgot 'my mug'", "recognize": {"Rex": 0.75},
                    "ask": ("on the table", ["on the table"], 3)}, f"answered so far: {said}"
    check_each_request_came_twice(server)


def test_the_commander_sends_again_what_was_never_answered(lossy):
    server, domain = lossy
    with EgoCommander("/ego", timeout=30.0, domain_id=domain) as commander:
        tasks = [commander.list_concepts(), commander.register("my mug", [np.zeros((28, 28, 3), np.uint8)]),
                 commander.forget("my mug"), commander.recognize(camera="/camera")]
        feedback = []
        asked = commander.ask("Where is Rex?", on_feedback=feedback.append)
        concepts, registered, forgot, scores = (task.result(timeout=60) for task in tasks)
        answer = asked.result(timeout=60)
    assert [c.name for c in concepts] == ["Rex"] and registered.num_views == 1 and forgot == "forgot 'my mug'"
    assert scores == {"Rex": pytest.approx(0.75)}
    assert answer.answer == "on the table" and [f.new_text for f in feedback] == ["on the table"]
    assert asked.text == "on the table"
    check_each_request_came_twice(server)


def test_the_test_client_sends_a_query_again_only_when_asked_to(lossy):
    """The suite's own client (``rosgraph.Client``) against the same lost first request: without ``resend_after``
    it waits out its timeout, with it the query is sent again and answered."""
    from ego_ros.testing.rosgraph import Client

    server, domain = lossy
    client = Client(domain)
    try:
        with pytest.raises(TimeoutError, match="did not answer in 2.0 s"):
            client.call(ListConcepts, "/ego/list_concepts", ListConcepts.Request(), timeout=2.0)
        server.received.clear()  # the next request is "lost" again: the first of its kind
        answer = client.call(ListConcepts, "/ego/list_concepts", ListConcepts.Request(), timeout=30.0,
                             resend_after=0.5)
    finally:
        client.close()
    assert [c.name for c in answer.concepts] == ["Rex"]
    assert len(server.received["list_concepts"]) == 2
