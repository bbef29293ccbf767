# SPDX-License-Identifier: Apache-2.0
"""The ego_ros messages, services and action: their contract, and a real trip over DDS.

Needs the interfaces built and installed first (they are generated code, not in the source tree):

    bash scripts/build_interfaces.sh VENV        # plain venv with the PyPI ROS 2 wheels
    colcon build && source install/setup.bash    # on a ROS 2 distro

The DDS tests run one node per test in its own rclpy context, on a random ROS domain id, with
discovery limited to this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST).
"""

import os
import random
import time

import pytest

import rclpy
from builtin_interfaces.msg import Time
from rclpy.action import ActionClient, ActionServer
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header

try:
    from ego_ros.action import Answer
    from ego_ros.msg import ConceptDetection, ConceptInfo, RecognitionEvent, Visit
    from ego_ros.srv import Ask, ForgetConcept, LastSeen, ListConcepts, Recognize, RegisterConcept
except ImportError as err:  # pragma: no cover - only reached on a broken set-up
    import ego_ros

    raise ImportError(
        f"ego_ros's generated interfaces are not importable ({err}); ego_ros was imported from "
        f"{os.path.dirname(ego_ros.__file__)}. Build and install them first (scripts/build_interfaces.sh "
        "VENV, or colcon build and source install/setup.bash). If they are installed, this source tree "
        "(on sys.path through pytest.ini's pythonpath or the current directory) hides the installed "
        "package: ego_ros/__init__.py needs `__path__ = __import__('pkgutil').extend_path(__path__, "
        "__name__)`, or run `python -P -m pytest -o pythonpath=` to test the installed copy."
    ) from err

TIMEOUT_S = 10.0

# ---------------------------------------------------------------------------------------------------
# The contract: field names and types as rosidl reports them (float32 is 'float', bool is 'boolean').
# ---------------------------------------------------------------------------------------------------

ASK_FIELDS = {
    "question": "string",
    "source": "uint8",
    "camera": "string",
    "window_sec": "float",
    "image": "sensor_msgs/Image",
    "concepts": "sequence<string>",
    "max_new_tokens": "uint32",
}
ANSWER_FIELDS = {
    "success": "boolean",
    "message": "string",
    "answer": "string",
    "concepts_used": "sequence<string>",
    "latency_sec": "float",
    "tokens": "uint32",
    "frames": "sequence<std_msgs/Header>",
}

FIELDS = {
    ConceptInfo: {
        "name": "string",
        "keywords": "sequence<string>",
        "num_views": "uint32",
        "num_tokens": "uint32",
        "area_percent": "float",
        "model": "string",
        "created": "builtin_interfaces/Time",
        "updated": "builtin_interfaces/Time",
    },
    ConceptDetection: {"name": "string", "score": "float", "box": "sensor_msgs/RegionOfInterest"},
    RecognitionEvent: {
        "header": "std_msgs/Header",
        "camera": "string",
        "detections": "sequence<ego_ros/ConceptDetection>",
        "appeared": "sequence<string>",
        "disappeared": "sequence<string>",
    },
    RegisterConcept.Request: {
        "name": "string",
        "views": "sequence<sensor_msgs/Image>",
        "camera": "string",
        "num_views": "uint32",
        "window_sec": "float",
        "regions": "sequence<sensor_msgs/RegionOfInterest>",
        "description": "string",
        "append": "boolean",
        "request_id": "string",
    },
    RegisterConcept.Response: {"success": "boolean", "message": "string", "concept": "ego_ros/ConceptInfo",
                               "frames": "sequence<std_msgs/Header>"},
    Ask.Request: ASK_FIELDS,
    Ask.Response: ANSWER_FIELDS,
    Recognize.Request: {"camera": "string", "image": "sensor_msgs/Image", "concepts": "sequence<string>"},
    Recognize.Response: {
        "success": "boolean",
        "message": "string",
        "detections": "sequence<ego_ros/ConceptDetection>",
        "frame": "std_msgs/Header",
    },
    ListConcepts.Request: {},
    ListConcepts.Response: {"concepts": "sequence<ego_ros/ConceptInfo>", "layers": "sequence<int32>",
                            "layers_source": "string"},
    ForgetConcept.Request: {"name": "string", "request_id": "string"},
    ForgetConcept.Response: {"success": "boolean", "message": "string"},
    Visit: {
        "name": "string",
        "camera": "string",
        "frame_id": "string",
        "first_seen": "builtin_interfaces/Time",
        "last_seen": "builtin_interfaces/Time",
        "sightings": "uint32",
        "best_score": "float",
        "best_stamp": "builtin_interfaces/Time",
        "box": "sensor_msgs/RegionOfInterest",
        "crop": "sensor_msgs/CompressedImage",
        "has_pose": "boolean",
        "pose": "geometry_msgs/PoseStamped",
        "pose_age_sec": "float",
        "pose_note": "string",
    },
    LastSeen.Request: {"name": "string", "since": "builtin_interfaces/Time", "camera": "string",
                       "max_results": "uint32"},
    LastSeen.Response: {"success": "boolean", "message": "string", "visits": "sequence<ego_ros/Visit>"},
    Answer.Goal: ASK_FIELDS,
    Answer.Result: ANSWER_FIELDS,
    Answer.Feedback: {"new_text": "string", "tokens": "uint32"},
}


@pytest.mark.parametrize("msg_type", list(FIELDS), ids=lambda t: f"{t.__module__.split('.')[1]}.{t.__qualname__}")
def test_fields_match_the_contract(msg_type):
    assert msg_type.get_fields_and_field_types() == FIELDS[msg_type]


def test_interfaces_are_registered_under_the_package_name():
    # The names other nodes use: ego_ros/msg/RecognitionEvent, ego_ros/srv/Ask, ego_ros/action/Answer.
    assert RecognitionEvent.__module__ == "ego_ros.msg._recognition_event"
    assert Ask.__module__ == "ego_ros.srv._ask"
    assert Answer.__module__ == "ego_ros.action._answer"


@pytest.mark.parametrize("request_type", [Ask.Request, Answer.Goal], ids=["Ask", "Answer"])
def test_source_constants(request_type):
    assert (request_type.SOURCE_LATEST, request_type.SOURCE_VIDEO, request_type.SOURCE_IMAGE) == (0, 1, 2)
    assert request_type().source == request_type.SOURCE_LATEST


def _image(width=4, height=2, value=7):
    return Image(
        header=Header(frame_id="camera_optical"),
        height=height,
        width=width,
        encoding="rgb8",
        step=width * 3,
        data=bytes([value]) * (width * height * 3),
    )


def _concept(name="my mug", views=2):
    return ConceptInfo(
        name=name,
        keywords=["mug", "blue", "ceramic"],
        num_views=views,
        num_tokens=37 * views,
        area_percent=12.5,
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        created=Time(sec=1_700_000_000, nanosec=5),
        updated=Time(sec=1_700_000_100, nanosec=0),
    )


def test_messages_hold_their_values():
    info = _concept()
    assert info.name == "my mug" and info.keywords == ["mug", "blue", "ceramic"]
    assert (info.num_views, info.num_tokens, info.area_percent) == (2, 74, 12.5)
    assert info.created.sec == 1_700_000_000 and info.updated.sec == 1_700_000_100

    event = RecognitionEvent(
        header=Header(stamp=Time(sec=3, nanosec=4), frame_id="front"),
        camera="/camera/front/image_raw",
        detections=[ConceptDetection(name="Rex", score=0.75)],
        appeared=["Rex"],
        disappeared=["my mug"],
    )
    assert event.detections[0].name == "Rex" and event.detections[0].score == pytest.approx(0.75)
    assert (event.appeared, event.disappeared, event.header.frame_id) == (["Rex"], ["my mug"], "front")


def test_a_visit_holds_its_crop_and_pose():
    from geometry_msgs.msg import Point, Pose, PoseStamped
    from sensor_msgs.msg import CompressedImage, RegionOfInterest

    visit = Visit(name="Rex", camera="/camera/image_raw", first_seen=Time(sec=10), last_seen=Time(sec=12),
                  sightings=5, best_score=0.9, box=RegionOfInterest(x_offset=3, y_offset=4, width=20, height=10),
                  crop=CompressedImage(format="jpeg", data=b"\xff\xd8\xff"), has_pose=True,
                  pose=PoseStamped(header=Header(frame_id="map"), pose=Pose(position=Point(x=1.5, y=-2.0))))
    assert (visit.last_seen.sec - visit.first_seen.sec, visit.sightings, visit.box.width) == (2, 5, 20)
    assert bytes(visit.crop.data) == b"\xff\xd8\xff" and visit.pose.pose.position.x == 1.5
    answer = LastSeen.Response(success=True, visits=[visit, Visit(name="Rex", pose_note="no pose_topic")])
    assert [v.has_pose for v in answer.visits] == [True, False] and answer.visits[1].pose_note == "no pose_topic"


def test_requests_and_results_hold_their_values():
    register = RegisterConcept.Request(
        name="Rex", views=[_image(), _image(value=9)], camera="", num_views=2, window_sec=1.5, append=True
    )
    assert len(register.views) == 2 and bytes(register.views[1].data[:1]) == b"\x09"
    assert register.append is True and register.window_sec == pytest.approx(1.5)
    assert RegisterConcept.Response(success=True, message="ok", concept=_concept("Rex")).concept.name == "Rex"

    ask = Ask.Request(
        question="Where is my mug?",
        source=Ask.Request.SOURCE_IMAGE,
        image=_image(),
        concepts=["my mug"],
        max_new_tokens=32,
    )
    assert (ask.source, ask.image.width, ask.concepts, ask.max_new_tokens) == (2, 4, ["my mug"], 32)
    answer = Ask.Response(success=True, answer="On the desk.", concepts_used=["my mug"], latency_sec=0.5)
    assert answer.answer == "On the desk." and answer.concepts_used == ["my mug"]

    recognize = Recognize.Request(camera="", image=_image(), concepts=[])
    assert recognize.image.height == 2
    found = Recognize.Response(success=True, detections=[ConceptDetection(name="Rex", score=1.0)])
    assert found.detections[0].score == 1.0

    assert ForgetConcept.Request(name="Rex").name == "Rex"
    assert ForgetConcept.Response(success=False, message="no such concept").success is False
    assert ListConcepts.Response(concepts=[_concept()]).concepts[0].num_views == 2

    goal = Answer.Goal(question="What did Rex just do?", source=Answer.Goal.SOURCE_VIDEO, window_sec=4.0)
    assert (goal.source, goal.window_sec) == (1, 4.0)
    assert Answer.Feedback(new_text="He", tokens=1).tokens == 1
    assert Answer.Result(success=True, answer="He jumped.").answer == "He jumped."


def test_fields_reject_wrong_types_and_ranges():
    # Since Kilted, generated types check field values only with check_fields=True or
    # ROS_PYTHON_CHECK_FIELDS=1 in the environment; unchecked bad values fail later, when published.
    with pytest.raises(AssertionError):
        ConceptDetection(check_fields=True, score="high")
    with pytest.raises(AssertionError):
        ConceptInfo(check_fields=True, num_views=-1)
    with pytest.raises(AssertionError):
        Ask.Request(check_fields=True, source=256)
    with pytest.raises(AssertionError):
        RecognitionEvent(check_fields=True, appeared="Rex")  # a sequence of strings, not one string
    with pytest.raises(AssertionError):
        ConceptInfo(check_fields=True, nmae="typo")


# ---------------------------------------------------------------------------------------------------
# Over DDS: every test gets its own context, node and random domain, discovery on this machine only.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def node(monkeypatch):
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.setenv("ROS_STATIC_PEERS", "")
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)  # deprecated; a leftover =0 would clash
    monkeypatch.delenv("ROS_DOMAIN_ID", raising=False)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=random.randint(1, 100))
    node = rclpy.create_node(f"test_interfaces_{os.getpid()}", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    node.executor_for_test = executor
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def _spin_until(node, done, timeout_s=TIMEOUT_S, every=None):
    """Spin the node's executor until done() is true; call every() between spins. False on timeout."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        if every is not None:
            every()
        node.executor_for_test.spin_once(timeout_sec=0.05)
    return True


def test_list_concepts_service_round_trip(node):
    requests = []

    def handle(request, response):
        requests.append(request)
        response.concepts = [_concept("my mug"), _concept("Rex", views=5)]
        return response

    node.create_service(ListConcepts, "~/list_concepts", handle)
    client = node.create_client(ListConcepts, "~/list_concepts")
    assert _spin_until(node, client.service_is_ready), "ListConcepts service was never discovered"

    future = client.call_async(ListConcepts.Request())
    assert _spin_until(node, future.done), "no ListConcepts response"

    concepts = future.result().concepts
    assert [c.name for c in concepts] == ["my mug", "Rex"]
    assert (concepts[1].num_views, concepts[1].num_tokens, concepts[1].keywords) == (5, 185, ["mug", "blue", "ceramic"])
    assert concepts[0].created == Time(sec=1_700_000_000, nanosec=5)
    assert len(requests) == 1


def test_recognition_event_publish_subscribe(node):
    qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE, durability=QoSDurabilityPolicy.VOLATILE)
    received = []
    node.create_subscription(RecognitionEvent, "~/recognitions", received.append, qos)
    publisher = node.create_publisher(RecognitionEvent, "~/recognitions", qos)

    sent = RecognitionEvent(
        header=Header(stamp=Time(sec=12, nanosec=34), frame_id="front"),
        camera="/camera/front/image_raw",
        detections=[ConceptDetection(name="Rex", score=0.9), ConceptDetection(name="my mug", score=0.6)],
        appeared=["Rex"],
        disappeared=[],
    )
    # Publish until the subscription has matched and got one: discovery takes a moment.
    assert _spin_until(node, lambda: received, every=lambda: publisher.publish(sent)), "no RecognitionEvent"

    got = received[0]
    assert (got.header, got.camera, got.appeared, got.disappeared) == (sent.header, sent.camera, ["Rex"], [])
    # score is float32 on the wire: 0.9 comes back as 0.8999999761581421.
    assert [(d.name, d.score) for d in got.detections] == [("Rex", pytest.approx(0.9)), ("my mug", pytest.approx(0.6))]


def test_answer_action_round_trip(node):
    def execute(goal_handle):
        words = ["Rex", "jumped", "twice."]
        for i in range(len(words)):
            goal_handle.publish_feedback(Answer.Feedback(new_text=(" " if i else "") + words[i], tokens=i + 1))
        goal_handle.succeed()
        return Answer.Result(
            success=True, answer=" ".join(words), concepts_used=[goal_handle.request.concepts[0]], latency_sec=0.1
        )

    server = ActionServer(node, Answer, "~/answer", execute)
    client = ActionClient(node, Answer, "~/answer")
    try:
        assert _spin_until(node, client.server_is_ready), "Answer action server was never discovered"
        feedback = []
        goal = Answer.Goal(question="What did Rex just do?", source=Answer.Goal.SOURCE_VIDEO, concepts=["Rex"])
        sent = client.send_goal_async(goal, feedback_callback=lambda msg: feedback.append(msg.feedback))
        assert _spin_until(node, sent.done) and sent.result().accepted

        result = sent.result().get_result_async()
        assert _spin_until(node, result.done), "no Answer result"
        assert result.result().result.answer == "Rex jumped twice."
        assert result.result().result.concepts_used == ["Rex"]
        # Feedback is best effort over DDS; what arrives must be in order.
        assert [f.tokens for f in feedback] == sorted(f.tokens for f in feedback)
    finally:
        client.destroy()
        server.destroy()
