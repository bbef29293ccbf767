# SPDX-License-Identifier: Apache-2.0
"""The live ``ego-ros`` commands (ego_ros.cli.live) against a real ROS 2 server of the node's protocol.

The server here is not the ego node and runs no model (the node has its own tests): it is a plain rclpy node named
``ego`` that offers the node's services, its ``~/answer`` action (three feedback messages, cancellable) and its
``~/recognitions`` topic, with fixed, deterministic answers, and records what it was asked. It spins in a background
thread of this process; each command runs as ``python -m ego_ros.cli`` in a child process, over DDS, on a random
ROS domain of this module with discovery limited to this machine.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

rclpy = pytest.importorskip("rclpy")
from builtin_interfaces.msg import Time  # noqa: E402
from rclpy.action import ActionServer, CancelResponse  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from ego_ros.action import Answer  # noqa: E402
from ego_ros.msg import ConceptDetection, ConceptInfo, RecognitionEvent  # noqa: E402
from ego_ros.srv import Ask, ForgetConcept, ListConcepts, Recognize, RegisterConcept  # noqa: E402
from ego_ros.testing.rosgraph import EMPTY_DOMAIN, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOMAIN = random.randint(1, 100)
CAMERA = "/camera/image_raw"
EVENT_A = RecognitionEvent(
    header=Header(stamp=Time(sec=1_700_000_000, nanosec=250_000_000), frame_id="camera_optical"), camera=CAMERA,
    detections=[ConceptDetection(name="Rex", score=0.31), ConceptDetection(name="my mug", score=0.87)],
    appeared=["my mug"], disappeared=[])
EVENT_B = RecognitionEvent(
    header=Header(stamp=Time(sec=1_700_000_001, nanosec=5_000_000), frame_id="camera_optical"), camera=CAMERA,
    detections=[ConceptDetection(name="Rex", score=0.66)], appeared=["Rex"], disappeared=["my mug"])
LINE_A = "22:13:20.250  /camera/image_raw  my mug(0.87), Rex(0.31)  +my mug"  # TZ=UTC
LINE_B = "22:13:21.005  /camera/image_raw  Rex(0.66)  +Rex  -my mug"


def concept(name: str, views: int, area: float = 20.0) -> ConceptInfo:
    return ConceptInfo(name=name, keywords=["red", "ceramic", "mug"] if name == "my mug" else ["dog"],
                       num_views=views, num_tokens=64 * views, area_percent=area, model="tiny-qwen",
                       created=Time(sec=1_700_000_000), updated=Time(sec=1_700_000_100))


class ProtocolServer:
    """The ego node's services, action and topic with fixed answers; ``requests`` records what came in."""

    CONCEPTS = {"my mug": 2, "Rex": 1}

    def __init__(self, domain_id: int):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("ego", context=self.context)
        self.idle = rclpy.create_node("idle", context=self.context)  # a node without ego services (inactive)
        self.requests: list[tuple[str, object]] = []
        self.cancelled = threading.Event()
        group = ReentrantCallbackGroup()
        node = self.node
        node.create_service(ListConcepts, "~/list_concepts", self.list_concepts, callback_group=group)
        node.create_service(ForgetConcept, "~/forget_concept", self.forget_concept, callback_group=group)
        node.create_service(RegisterConcept, "~/register_concept", self.register_concept, callback_group=group)
        node.create_service(Recognize, "~/recognize", self.recognize, callback_group=group)
        node.create_service(Ask, "~/ask", self.ask, callback_group=group)
        self.action = ActionServer(node, Answer, "~/answer", execute_callback=self.answer,
                                   cancel_callback=lambda handle: CancelResponse.ACCEPT, callback_group=group)
        self.events = node.create_publisher(RecognitionEvent, "~/recognitions", 10)
        self.sent = 0
        node.create_timer(0.2, self.publish_events, callback_group=group)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(node)
        self.executor.add_node(self.idle)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.action.destroy()
        self.node.destroy_node()
        self.idle.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=2.0)

    def asked(self, service: str) -> list:
        return [request for name, request in self.requests if name == service]

    # services

    def list_concepts(self, request, response):
        self.requests.append(("list_concepts", request))
        response.concepts = [concept(name, views) for name, views in sorted(self.CONCEPTS.items())]
        response.layers, response.layers_source = [1, 2], "calibrated on 3 images (folder pairs) 2026-11-26"
        return response

    def forget_concept(self, request, response):
        self.requests.append(("forget_concept", request))
        if request.name in self.CONCEPTS:
            response.success, response.message = True, f"forgot {request.name!r}"
        else:
            response.success = False
            response.message = f"no concept named {request.name!r}; known: 'Rex', 'my mug'"
        return response

    def register_concept(self, request, response):
        self.requests.append(("register_concept", request))
        if request.views:
            views = len(request.views)
        elif request.camera not in ("", CAMERA):
            response.success, response.message = False, f"unknown camera {request.camera!r}; cameras: ['{CAMERA}']"
            return response
        else:
            views = request.num_views or 3
        if request.name in self.CONCEPTS and not request.append:
            response.success = False
            response.message = f"concept {request.name!r} already exists; set append to add views, or forget it first"
            return response
        views += self.CONCEPTS.get(request.name, 0) if request.append else 0
        response.success, response.concept = True, concept(request.name, views, area=35.0)
        response.message = f"registered {request.name!r}"
        return response

    def recognize(self, request, response):
        self.requests.append(("recognize", request))
        if request.camera not in ("", CAMERA):
            response.success, response.message = False, f"unknown camera {request.camera!r}; cameras: ['{CAMERA}']"
            return response
        scores = {"Rex": 0.31, "my mug": 0.87}
        response.success = True
        response.detections = [ConceptDetection(name=n, score=s) for n, s in scores.items()
                               if not request.concepts or n in request.concepts]
        return response

    def ask(self, request, response):
        self.requests.append(("ask", request))
        response.success, response.answer = True, "asked through the service"
        return response

    # action

    def answer(self, goal_handle):
        goal = goal_handle.request
        self.requests.append(("answer", goal))
        unknown = [name for name in goal.concepts if name not in self.CONCEPTS]
        if unknown:
            goal_handle.abort()
            return Answer.Result(success=False, message=f"no concept named {unknown[0]!r}; known: 'Rex', 'my mug'")
        if goal.question.startswith("slow"):  # streams until cancelled
            text = ""
            for tokens in range(1, 400):
                if goal_handle.is_cancel_requested:
                    self.cancelled.set()
                    goal_handle.canceled()
                    return Answer.Result(success=False, message="cancelled", answer=text)
                text += "la "
                goal_handle.publish_feedback(Answer.Feedback(new_text="la ", tokens=tokens))
                time.sleep(0.05)
            goal_handle.abort()
            return Answer.Result(success=False, message="never cancelled")
        if goal.source == Answer.Goal.SOURCE_IMAGE:
            source = f"image {goal.image.width}x{goal.image.height} {goal.image.encoding}"
        elif goal.source == Answer.Goal.SOURCE_VIDEO:
            source = f"video {goal.window_sec:g} s of {goal.camera or 'the default camera'}"
        else:
            source = f"latest frame of {goal.camera or 'the default camera'}"
        parts = ["The mug", " is on", f" the table ({source})."]  # as the node's: the pieces join to the answer
        # "late": the last piece's feedback leaves after the result, as it can arrive under load
        late = goal.question.startswith("late")
        for tokens in range(1, len(parts) + (0 if late else 1)):
            time.sleep(0.1)
            goal_handle.publish_feedback(Answer.Feedback(new_text=parts[tokens - 1], tokens=tokens))
        if late:
            last = Answer.Feedback(new_text=parts[-1], tokens=len(parts))
            threading.Timer(0.3, goal_handle.publish_feedback, [last]).start()
        goal_handle.succeed()
        return Answer.Result(success=True, answer="".join(parts),
                             concepts_used=list(goal.concepts) or ["my mug"], latency_sec=0.25, tokens=len(parts))

    # topic

    def publish_events(self):
        if self.events.get_subscription_count():
            self.events.publish(EVENT_A if self.sent % 2 == 0 else EVENT_B)
            self.sent += 1


@pytest.fixture(scope="module")
def server():
    saved = dict(os.environ)
    os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_STATIC_PEERS="")
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    try:
        server = ProtocolServer(DOMAIN)
        yield server
        server.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def env(domain: int = DOMAIN) -> dict:
    variables = {k: v for k, v in os.environ.items()
                 if k not in ("EGO_ROS_MODEL", "EGO_ROS_MEMORY_DIR", "EGO_ROS_NODE", "ROS_LOCALHOST_ONLY")}
    variables.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TZ="UTC", ROS_DOMAIN_ID=str(domain),
                     ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_STATIC_PEERS="", HF_HUB_OFFLINE="1",
                     # Some 20 commands start at once below. Fast DDS's shared-memory transport can hang a
                     # participant that starts among many on a loaded machine (ros2/rmw_fastrtps#860; one run
                     # here hung in create_publisher for good): these commands send small messages, over UDP.
                     FASTDDS_BUILTIN_TRANSPORTS="UDPv4")
    return variables


def start(*args, domain: int = DOMAIN, **extra_env) -> subprocess.Popen:
    # Ctrl-C as in a terminal, even when these tests run in the background of a non-interactive shell (which starts
    # them with SIGINT ignored, and a child would inherit that: Python then never raises KeyboardInterrupt).
    return subprocess.Popen([sys.executable, "-m", "ego_ros.cli", *map(str, args)], cwd=REPO,
                            env=dict(env(domain), **extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(process: subprocess.Popen, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # a command that hangs fails its test, and is not left holding DDS resources for the next
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args[3:]} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_error_line(result: subprocess.CompletedProcess, status: int = 1) -> str:
    assert result.returncode == status, f"{result.args[3:]} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ego-ros: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "mug.png"
    PILImage.fromarray(np.full((24, 32, 3), (200, 40, 30), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def runs(server, photo, tmp_path_factory):
    """The commands that end by themselves, started together (each is its own DDS participant)."""
    offline_memory = tmp_path_factory.mktemp("offline") / "memory"
    offline_memory.mkdir()
    commands = {
        "list": ["list"],
        "forget": ["forget", "Rex"],
        "forget unknown": ["forget", "nobody"],
        "ask": ["ask", "Where is my mug?", "--concept", "my mug", "--max-new-tokens", "12"],
        "ask, feedback after the result": ["ask", "late: where is my mug?"],
        "ask video": ["ask", "What did Rex do?", "--video", "5", "--camera", CAMERA],
        "ask image": ["ask", "Is this my mug?", "--image", photo],
        "ask unknown concept": ["ask", "Where is he?", "--concept", "nobody", "--node", "ego"],
        "ask empty": ["ask", "  "],
        "recognize": ["recognize"],
        "recognize image": ["recognize", photo, "--concept", "my mug"],
        "recognize bad camera": ["recognize", "--camera", "/nope"],
        "register camera": ["register", "cup", "--camera", "--views", "4", "--window", "2.5"],
        "register files": ["register", "Rex", photo, photo, "--append", "--node", "/ego/"],
        "register taken": ["register", "my mug", photo],
        "inactive node": ["ask", "Hello?", "--node", "/idle", "--timeout", "5"],  # discovery can take 3 s
        "offline list": ["list", "--memory-dir", offline_memory],
        "offline ask": ["ask", "Where?", "--model", "/no/such/model"],
        "offline camera": ["register", "cup", "--camera", "--offline"],
        "node and model": ["list", "--node", "/ego", "--memory-dir", offline_memory],
        "live --area": ["register", "cup", photo, "--area", "30"],
    }
    processes = {name: start(*args) for name, args in commands.items()}
    processes["env model list"] = start("list", "--timeout", "2", EGO_ROS_MODEL="/no/such/model",
                                        EGO_ROS_MEMORY_DIR=str(offline_memory))
    processes["env model, --node"] = start("list", "--node", "/ego", EGO_ROS_MODEL="/no/such/model")
    # Some 20 interpreters start at once on what may be a 2-core machine, the node serving them one by one: each
    # gets 90 s (one run under load took over 30 s), and a command that hangs still fails here.
    return {name: finish(process, timeout=90.0) for name, process in processes.items()}


def test_list_prints_the_nodes_concepts_as_a_table(runs):
    lines = ok(runs["list"]).stdout.splitlines()
    # Then the layers the node's model scores tokens with, and where they come from.
    assert lines[-2:] == ["", "layers 1,2; calibrated on 3 images (folder pairs) 2026-11-26"]
    lines = lines[:-2]
    assert lines[0].split() == ["NAME", "VIEWS", "TOKENS", "AREA", "KEYWORDS", "UPDATED", "MODEL"]
    rows = {line.split("  ")[0].strip(): line.split() for line in lines[1:]}
    assert set(rows) == {"Rex", "my mug"}
    assert rows["my mug"][2:6] == ["2", "128", "20%", "red,"] and rows["my mug"][-1] == "tiny-qwen"
    assert rows["Rex"][1:4] == ["1", "64", "20%"]


def test_forget_confirms_or_fails_in_one_line(server, runs):
    assert ok(runs["forget"]).stdout == "forgot 'Rex'\n"
    line = one_error_line(runs["forget unknown"])
    assert line == "ego-ros: error: no concept named 'nobody'; known: 'Rex', 'my mug'"
    assert {r.name for r in server.asked("forget_concept")} == {"Rex", "nobody"}


def test_ask_streams_the_answer_through_the_action(server, runs):
    result = ok(runs["ask"])
    assert result.stdout == "The mug is on the table (latest frame of the default camera).\n"
    assert result.stderr.strip().splitlines()[-1] == "(concepts in context: 'my mug'; 3 tokens in 0.2 s)"
    (goal,) = [g for g in server.asked("answer") if g.question == "Where is my mug?"]
    assert (goal.source, goal.concepts, goal.max_new_tokens) == (Answer.Goal.SOURCE_LATEST, ["my mug"], 12)
    assert not server.asked("ask"), "the CLI asks through the action, not the service"


def test_ask_holds_when_the_result_overtakes_the_feedback(runs):
    # The server sends the last piece's feedback 0.3 s after the result (rclpy then drops it): the answer and its
    # count are the result's, printed once
    result = ok(runs["ask, feedback after the result"])
    assert result.stdout == "The mug is on the table (latest frame of the default camera).\n"
    assert result.stderr.strip().splitlines()[-1] == "(concepts in context: 'my mug'; 3 tokens in 0.2 s)"


def test_ask_about_a_video_window_or_an_image(runs):
    assert ok(runs["ask video"]).stdout == f"The mug is on the table (video 5 s of {CAMERA}).\n"
    assert ok(runs["ask image"]).stdout == "The mug is on the table (image 32x24 rgb8).\n"


def test_ask_failures_are_one_line(runs):
    line = one_error_line(runs["ask unknown concept"])  # the goal aborted with success=false and a message
    assert line == "ego-ros: error: no concept named 'nobody'; known: 'Rex', 'my mug'"
    assert one_error_line(runs["ask empty"], status=2) == "ego-ros: error: the question is empty"


def test_recognize_prints_scores_sorted(server, runs):
    assert ok(runs["recognize"]).stdout == "my mug  0.870\nRex     0.310\n"
    assert ok(runs["recognize image"]).stdout == "my mug  0.870\n"
    line = one_error_line(runs["recognize bad camera"])
    assert line == f"ego-ros: error: unknown camera '/nope'; cameras: ['{CAMERA}']"
    with_image = [r for r in server.asked("recognize") if r.image.height]
    assert [(r.image.width, r.image.height, r.image.encoding, list(r.concepts)) for r in with_image] == [
        (32, 24, "rgb8", ["my mug"])]
    assert bytes(with_image[0].image.data[:3]) == bytes([200, 40, 30])


def test_register_from_the_camera_buffer_or_from_files(server, runs):
    assert ok(runs["register camera"]).stdout.splitlines() == [
        "registered 'cup': 4 views, 256 tokens", "  area 35%; keywords: dog"]
    assert ok(runs["register files"]).stdout.splitlines()[0] == "added views to 'Rex': now 3 views, 192 tokens"
    requests = {r.name: r for r in server.asked("register_concept")}
    cup, rex = requests["cup"], requests["Rex"]
    assert (cup.camera, cup.num_views, cup.window_sec, cup.append, len(cup.views)) == ("", 4, 2.5, False, 0)
    assert (rex.append, [(v.width, v.height, v.encoding) for v in rex.views]) == (True, [(32, 24, "rgb8")] * 2)
    line = one_error_line(runs["register taken"])
    assert line == "ego-ros: error: concept 'my mug' already exists; set append to add views, or forget it first"


def test_no_node_is_one_line_within_the_timeout():
    started = time.monotonic()
    result = finish(start("list", "--timeout", "2", domain=EMPTY_DOMAIN))
    assert time.monotonic() - started < 2.0 + 5.0  # the timeout, and the start of a Python with rclpy
    assert one_error_line(result) == (
        "ego-ros: error: no ego node answering at /ego/list_concepts (start one with 'ego-ros node', "
        "or pass --offline to use this machine's memory folder)")
    result = finish(start("ask", "Where is my mug?", "--timeout", "2", domain=EMPTY_DOMAIN))
    assert "no ego node answering at /ego/answer (start one with 'ego-ros node', or pass --model to work offline)" \
        in one_error_line(result)


def with_exit_handlers(*handlers: str):
    """``python -m ego_ros.cli`` with ``handlers`` (Python statements) registered to run at interpreter exit."""
    return ("import atexit, pathlib, runpy, sys, time\n" + "".join(f"atexit.register(lambda: {h})\n" for h in handlers)
            + "sys.argv[0] = 'ego-ros'\nrunpy.run_module('ego_ros.cli', run_name='__main__')")


def test_a_live_command_exits_once_its_output_is_out(server, tmp_path):
    """What is left to tear down at interpreter exit does not hold a finished live command: ROS 2's middleware,
    torn down there, has been seen to hang a command after it had printed its result. Here an exit handler that
    would wait ten minutes stands in for it; an offline command exits the usual way, its exit handlers run."""
    live = subprocess.run([sys.executable, "-c", with_exit_handlers("time.sleep(600)"), "list"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert "my mug" in ok(live).stdout
    ran = tmp_path / "exit handler ran"
    offline = subprocess.run([sys.executable, "-c", with_exit_handlers(f"pathlib.Path({str(ran)!r}).touch()"),
                              "list", "--memory-dir", tmp_path], cwd=REPO, env=env(), capture_output=True, text=True,
                             timeout=60)
    assert offline.returncode == 0 and ran.exists(), offline.stderr


def test_a_node_that_is_not_active_is_named(runs):
    line = one_error_line(runs["inactive node"])
    assert line.startswith("ego-ros: error: the node /idle is running but not active, so it offers no /idle/answer")


def test_mode_rule(runs):
    # --memory-dir: the offline store (empty), not the server's two concepts.
    result = ok(runs["offline list"])
    assert result.stdout == "" and result.stderr.startswith("no concepts in ")
    # $EGO_ROS_MODEL alone makes it offline too, and an explicit --node beats it.
    assert ok(runs["env model list"]).stdout == ""
    assert "my mug" in ok(runs["env model, --node"]).stdout
    # --model: the offline path, which fails on the model (after checking the command line), not on ROS.
    assert "--image" in one_error_line(runs["offline ask"], status=2)
    assert "--camera needs a running node" in one_error_line(runs["offline camera"], status=2)
    assert "--node talks to a running node and --memory-dir works offline" in one_error_line(
        runs["node and model"], status=2)
    assert "--area only works offline" in one_error_line(runs["live --area"], status=2)


# --- commands that run until interrupted -------------------------------------------------------------------------


def read_lines(process: subprocess.Popen, count: int, timeout: float) -> list[str]:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(process.stdout.readline()) for _ in range(count)],
                              daemon=True)
    reader.start()
    reader.join(timeout)
    return lines


def test_watch_prints_events_until_ctrl_c(server):
    process = start("watch")
    try:
        lines = read_lines(process, 2, timeout=15.0)
        assert len(lines) == 2, f"watch printed {lines!r} in 15 s"
        assert {line.rstrip("\n") for line in lines} == {LINE_A, LINE_B}
    finally:
        process.send_signal(signal.SIGINT)
        result = finish(process, timeout=10.0)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("watching /ego/recognitions")


def test_ctrl_c_cancels_the_question_on_the_node(server):
    server.cancelled.clear()
    process = start("ask", "slow question")
    try:
        first = process.stdout.read(3)  # "la ": the stream has begun
        assert first == "la ", first
    finally:
        process.send_signal(signal.SIGINT)
        result = finish(process, timeout=10.0)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "cancelled" in result.stderr.strip().splitlines()[-1]
    assert server.cancelled.wait(5.0), "the server never saw the cancel request"


# --- ego-ros node -------------------------------------------------------------------------------------------------


def node_argv(*args: str) -> list[str]:
    from ego_ros import cli
    from ego_ros.cli.live import node_arguments

    return node_arguments(cli.build_parser().parse_args(["node", *args]))


def test_node_command_line_puts_the_params_file_first_and_the_users_arguments_last(monkeypatch):
    monkeypatch.delenv("EGO_ROS_MODEL", raising=False)
    config = REPO / "config" / "ego.yaml"
    assert node_argv() == ["ego_node", "--ros-args", "--params-file", str(config), "-p", "autostart:=true"]
    assert node_argv("--no-autostart", "--model", "true", "--memory-dir", "/data/mem", "--ros-args", "-p",
                     "autostart:=true", "-r", "__ns:=/r1") == [
        "ego_node", "--ros-args", "--params-file", str(config), "-p", "autostart:=false",
        "-p", 'model:="true"', "-p", 'memory_dir:="/data/mem"', "-p", "autostart:=true", "-r", "__ns:=/r1"]
    monkeypatch.setenv("EGO_ROS_MODEL", "/models/from-env")
    assert node_argv()[-2:] == ["-p", 'model:="/models/from-env"']


def test_node_command_runs_the_real_node_with_the_params_file_and_overrides(server):
    """`ego-ros node` starts ego_ros.ros.node (unconfigured: --no-autostart, so no model is loaded) with the shipped
    file, --model and --ros-args; its parameters are read back over ROS, and a client is told it is not active."""
    from rcl_interfaces.srv import GetParameters

    process = start("node", "--no-autostart", "--model", "/models/m", "--ros-args", "-r", "__ns:=/clitest",
                    "-p", "recognition_threshold:=0.7")
    client = server.node.create_client(GetParameters, "/clitest/ego/get_parameters")
    try:
        assert client.wait_for_service(timeout_sec=20.0), "the node did not come up"
        names = ["model", "camera_topics", "autostart", "recognition_threshold", "buffer_fps"]

        def parameters():
            # A request sent as the service appears can be lost before DDS has matched the reply's path (seen once
            # in a full suite run): reading parameters is idempotent, so ask again rather than wait for nothing.
            future = client.call_async(GetParameters.Request(names=names))
            retry = time.monotonic() + 3.0
            while not future.done() and time.monotonic() < retry:
                time.sleep(0.05)
            return future.result().values if future.done() else None

        values = wait_for(parameters, 30.0, "the node to answer get_parameters", interval=0.0)
        inactive = finish(start("list", "--node", "/clitest/ego", "--timeout", "5"))
    finally:
        server.node.destroy_client(client)
        process.send_signal(signal.SIGINT)
        result = finish(process, timeout=15.0)
    assert values[0].string_value == "/models/m"  # --model beats the file's
    assert list(values[1].string_array_value) == ["camera/image_raw"]  # from config/ego.yaml (relative)
    assert values[2].bool_value is False  # --no-autostart
    assert values[3].double_value == pytest.approx(0.7)  # --ros-args -p
    assert values[4].double_value == pytest.approx(2.0)  # the file's
    assert "the node /clitest/ego is running but not active, so it offers no /clitest/ego/list_concepts" in \
        one_error_line(inactive)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
