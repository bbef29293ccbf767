# SPDX-License-Identifier: Apache-2.0
"""Task planners' interfaces to the node, against the real node (its own process, a tiny model, real DDS):
EgoCommander (start, poll or await, cancel; clients made once), the py_trees behaviours and their example tree,
and the services as LLM tools (checked against the .srv files and the generated message classes)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
py_trees = pytest.importorskip("py_trees")

from py_trees.common import Status  # noqa: E402

from ego_ros.ros import tools  # noqa: E402
from ego_ros.ros.behaviours import AskQuestion, RecallLastSeen, WaitForConcept, example_tree, run  # noqa: E402
from ego_ros.ros.client import NodeError, NodeNotFound  # noqa: E402
from ego_ros.ros.commander import EgoCommander, TaskCancelled, TaskStatus  # noqa: E402
from ego_ros.testing.rosgraph import CameraPublisher, Client, NodeProcess, free_domain, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMERA = "/cam/image_raw"


@pytest.fixture(scope="module")
def graph(tiny_model_dir, tmp_path_factory):
    """One node (threshold 0: every scored concept counts as present), a camera at 10 Hz, a commander, and the
    concept Rex registered from the camera."""
    domain = free_domain()
    folder = tmp_path_factory.mktemp("planners")
    node = NodeProcess(
        domain, folder / "node.log", model=str(tiny_model_dir), memory_dir=str(folder / "memory"),
        camera_topics=[CAMERA], buffer_seconds=6.0, buffer_fps=2.0, max_image_pixels=224 * 224,
        recognition_rate_hz=2.0, recognition_threshold=0.0, max_new_tokens=8, autostart=True,
    ).start()
    camera_client = Client(domain, name="planner_camera")
    camera = CameraPublisher(camera_client, CAMERA, 10.0).start()
    commander = EgoCommander("/ego", timeout=120.0, domain_id=domain)
    try:
        commander.list_concepts().result(180.0)  # the node is up and active
        registered = wait_for(lambda: _try_register(commander), 60, "a registration from the camera buffer")
        assert registered.name == "Rex"
        yield node, commander, domain
    finally:
        commander.close()
        camera.stop()
        camera_client.close()
        node.stop()


def _try_register(commander):
    try:
        return commander.register("Rex", camera=CAMERA, num_views=2, window_sec=1.0).result(120.0)
    except NodeError as error:  # the buffer may still be empty
        if "no frame" in str(error) or "frames" in str(error):
            time.sleep(0.5)
            return None
        raise


# --- EgoCommander -----------------------------------------------------------------------------------------------


def test_requests_start_at_once_run_side_by_side_and_reuse_the_clients(graph):
    _, commander, _ = graph
    clients = len(list(commander.ros_node.clients))
    assert clients == 7, "one client per service (the node's six and its get_parameters), made once"
    for _ in range(2):
        started = time.monotonic()
        tasks = {"list": commander.list_concepts(), "recognize": commander.recognize(camera=CAMERA),
                 "ask": commander.ask("What is here?", camera=CAMERA, max_new_tokens=4),
                 "forget": commander.forget("nobody")}
        assert time.monotonic() - started < 0.5, "starting requests does not wait for them"
        wait_for(lambda: all(t.done() for t in tasks.values()), 120, "every task")
        assert [c.name for c in tasks["list"].result()] == ["Rex"]
        assert set(tasks["recognize"].result()) == {"Rex"}
        answer = tasks["ask"].result()
        assert answer.answer and answer.tokens is not None and answer.tokens <= 4
        assert tasks["forget"].status is TaskStatus.FAILED
        with pytest.raises(NodeError, match="nobody"):
            tasks["forget"].result()
    assert len(list(commander.ros_node.clients)) == clients, "no client per call"


def test_the_node_parameters_are_read_through_the_commander(graph):
    _, commander, _ = graph
    values = commander.parameters(["recognition_threshold", "camera_topics"]).result(60.0)
    assert values == {"recognition_threshold": 0.0, "camera_topics": [CAMERA]}
    with pytest.raises(NodeError, match="does not have all of the parameters"):
        commander.parameters(["recognition_threshold", "no_such_parameter"]).result(60.0)


def test_ask_streams_feedback_and_is_cancelled_on_the_node(graph):
    _, commander, _ = graph
    seen = []
    task = commander.ask("Tell a long story.", camera=CAMERA, max_new_tokens=2000, on_feedback=seen.append)
    wait_for(lambda: task.feedback is not None, 60, "the first feedback")
    assert task.status is TaskStatus.RUNNING and not task.done()
    task.cancel()
    with pytest.raises(TaskCancelled) as cancelled:
        task.result(30.0)
    assert task.status is TaskStatus.CANCELED
    assert cancelled.value.partial is not None and cancelled.value.partial.tokens < 2000
    assert seen and seen[-1].tokens == task.feedback.tokens
    # task.text joins the feedback's new_text pieces: what the node generated before the cancel begins with it.
    assert task.text and cancelled.value.partial.answer.strip().startswith(task.text.strip())
    # The node is free again at once: a short question is answered.
    assert commander.ask("Again?", camera=CAMERA, max_new_tokens=2).result(60.0).answer


def test_tasks_can_be_awaited_from_asyncio(graph):
    _, commander, _ = graph

    async def plan():
        concepts, scores = await asyncio.gather(commander.list_concepts(), commander.recognize(camera=CAMERA))
        return [c.name for c in concepts], scores

    names, scores = asyncio.run(asyncio.wait_for(plan(), 120))
    assert names == ["Rex"] and set(scores) == {"Rex"}


def test_wait_for_concept_completes_on_a_recognition_event_or_times_out(graph):
    _, commander, _ = graph
    score, event = commander.wait_for_concept("Rex", camera=CAMERA, timeout=60.0).result(70.0)
    assert event.camera == CAMERA and 0.0 <= score <= 1.0 and "Rex" in {d.name for d in event.detections}
    started = time.monotonic()
    missing = commander.wait_for_concept("nobody", timeout=1.5)
    with pytest.raises(NodeError, match="'nobody' was not recognised within the timeout"):
        missing.result(10.0)
    assert 1.4 < time.monotonic() - started < 5.0
    watching = commander.wait_for_concept("nobody")
    watching.cancel()
    with pytest.raises(TaskCancelled):
        watching.result(5.0)


def test_no_node_fails_the_task_after_the_timeout_without_blocking_the_caller(graph):
    other = free_domain() % 100 + 101  # 101..200: no node of this module there
    with EgoCommander("/ego", timeout=1.0, domain_id=other) as commander:
        started = time.monotonic()
        task = commander.list_concepts()
        assert time.monotonic() - started < 0.2
        assert task.status is TaskStatus.PENDING
        with pytest.raises(NodeNotFound):
            task.result(10.0)
        assert 0.9 < time.monotonic() - started < 5.0


def test_the_blocking_client_reuses_its_clients_too(graph, monkeypatch):
    from ego_ros.ros.client import EgoClient

    _, _, domain = graph
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    with EgoClient("/ego", timeout=30.0) as client:
        for _ in range(3):
            assert [c.name for c in client.list()] == ["Rex"]
            assert set(client.recognize(camera=CAMERA)) == {"Rex"}
        assert len(list(client._ros.clients)) == 2, "one client per service used, not one per call"


# --- py_trees behaviours ----------------------------------------------------------------------------------------


def test_example_tree_waits_for_the_concept_then_asks(graph):
    _, commander, _ = graph
    py_trees.blackboard.Blackboard.clear()
    root = example_tree(commander, "Rex", timeout=60.0, camera=CAMERA)
    assert [type(child) for child in root.children] == [WaitForConcept, AskQuestion]
    assert run(root, period=0.05, limit=120.0) == Status.SUCCESS
    assert py_trees.blackboard.Blackboard.get("/answer")
    assert 0.0 <= py_trees.blackboard.Blackboard.get("/score") <= 1.0


def test_the_example_tree_runs_from_the_command_line(graph):
    import os
    import subprocess
    import sys

    _, _, domain = graph
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "ego_ros.ros.behaviours", "--concept", "Rex", "--camera", CAMERA,
                           "--timeout", "60"], capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "see Rex" in done.stdout and "ask: Where is Rex?" in done.stdout
    assert done.stdout.strip().splitlines()[-1].strip(), "the answer, last"


def test_behaviours_fail_with_the_reason_and_cancel_when_interrupted(graph):
    _, commander, _ = graph
    waiting = WaitForConcept("see nobody", commander, "nobody", timeout=1.0)
    assert run(waiting, period=0.05, limit=30.0) == Status.FAILURE
    assert "was not recognised" in waiting.feedback_message

    asking = AskQuestion("long", commander, "Tell a long story.", camera=CAMERA, max_new_tokens=2000, key="story")
    tree = py_trees.trees.BehaviourTree(asking)
    tree.setup(timeout=5.0)
    tree.tick()
    wait_for(lambda: asking.task.feedback is not None, 60, "the first feedback")
    tree.tick()
    assert asking.status == Status.RUNNING and "tokens so far" in asking.feedback_message
    asking.stop(Status.INVALID)  # what a higher-priority branch or a stopped tree does
    with pytest.raises(TaskCancelled):
        asking.task.result(30.0)
    tree.shutdown()


def test_recall_last_seen_puts_the_newest_visit_on_the_blackboard_or_fails_saying_why(graph):
    _, commander, _ = graph
    py_trees.blackboard.Blackboard.clear()
    recall = RecallLastSeen("where was Rex", commander, "Rex", camera=CAMERA, within=600.0)
    wait_for(lambda: run(recall, period=0.05, limit=30.0) == Status.SUCCESS, 60,
             "a visit of Rex (threshold 0: every event is a sighting)")
    visit = py_trees.blackboard.Blackboard.get("/last_seen")
    assert visit.name == "Rex" and visit.camera == CAMERA and visit.sightings >= 1
    assert time.time() - 60 < visit.last_seen.sec <= time.time() + 1 and len(visit.crop.data) > 0
    assert recall.feedback_message.startswith("'Rex' was last seen") and CAMERA in recall.feedback_message
    elsewhere = RecallLastSeen("Rex elsewhere", commander, "Rex", camera="/other/image_raw", key="elsewhere")
    assert run(elsewhere, period=0.05, limit=30.0) == Status.FAILURE
    assert elsewhere.feedback_message == "'Rex' was not seen on /other/image_raw"
    unknown = RecallLastSeen("nobody", commander, "nobody", key="nobody")
    assert run(unknown, period=0.05, limit=30.0) == Status.FAILURE
    assert "nobody" in unknown.feedback_message and "Rex" in unknown.feedback_message, "the known names"


# --- the services as LLM tools ----------------------------------------------------------------------------------


def test_tools_json_is_generated_from_the_srv_files():
    assert tools.load_tools() == tools.generate(REPO / "srv"), (
        "ego_ros/ros/tools.json is out of date: run python -m ego_ros.ros.tools --write")


JSON_TYPE = {"string": "string", "boolean": "boolean", "float": "number", "double": "number"}


def test_tools_match_the_generated_message_classes():
    from ego_ros import srv

    for tool in tools.load_tools():
        function = tool["function"]
        request = getattr(srv, tools.SERVICES[function["name"]]).Request
        fields = {name: kind for name, kind in request.get_fields_and_field_types().items()
                  if not any(left_out in kind for left_out in ("sensor_msgs/Image", "sensor_msgs/RegionOfInterest"))
                  and name not in tools.CLIENT_FIELDS}
        properties = function["parameters"]["properties"]
        assert list(properties) == list(fields), function["name"]
        for name, kind in fields.items():
            schema = properties[name]
            if kind.startswith("sequence<"):
                assert schema["type"] == "array"
                kind, schema = kind[len("sequence<"):-1], schema["items"]
            expected = ("number" if kind == "builtin_interfaces/Time" else "integer" if "int" in kind
                        else JSON_TYPE[kind])
            assert schema["type"] == expected, (function["name"], name, kind, schema)
            assert function["parameters"]["properties"][name]["description"], (function["name"], name)
        for required in function["parameters"].get("required", ()):
            assert required in fields


def test_tool_calls_run_on_the_node(graph):
    _, commander, _ = graph
    listed = tools.call_tool(commander, "list_concepts", "{}", timeout=30.0)
    assert [c["name"] for c in listed["concepts"]] == ["Rex"] and listed["concepts"][0]["num_views"] >= 1
    recognized = tools.call_tool(commander, "recognize", {"camera": CAMERA, "concepts": ["Rex"]}, timeout=60.0)
    assert recognized["success"] and [d["name"] for d in recognized["detections"]] == ["Rex"]
    asked = tools.call_tool(commander, "ask", '{"question": "What is here?", "source": 0, "max_new_tokens": 3}',
                            timeout=60.0)
    assert asked["success"] and asked["answer"]
    seen = tools.call_tool(commander, "last_seen", {"name": "Rex", "since": time.time() - 600}, timeout=30.0)
    assert seen["success"] and seen["visits"][0]["camera"] == CAMERA, seen
    newest = seen["visits"][0]
    assert time.time() - 600 < newest["last_seen"] <= time.time() + 1, "times as seconds since the epoch"
    assert re.fullmatch(r"\(\d+ bytes, left out\)", newest["crop"]["data"]), "no pixels for a language model"
    assert len(json.dumps(seen)) < 4000
    forgot = tools.call_tool(commander, "forget_concept", {"name": "nobody"}, timeout=30.0)
    assert forgot["success"] is False and "nobody" in forgot["message"]
    for name, arguments, words in (("fly", {}, "no tool named"), ("ask", {"question": 3}, "must be a string"),
                                   ("ask", {"question": "q", "source": 2}, r"must be one of \[0, 1\]"),
                                   ("ask", {"question": "q", "image": {}}, "unknown argument"),
                                   ("forget_concept", {}, "missing argument"),
                                   ("last_seen", {"name": "Rex", "since": -1}, r"must be in \[0, inf\]")):
        with pytest.raises(ValueError, match=words):
            tools.call_tool(commander, name, arguments)
