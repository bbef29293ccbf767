# SPDX-License-Identifier: Apache-2.0
"""py_trees behaviours over :class:`~ego_ros.ros.commander.EgoCommander`, for behaviour-tree task planners.

- :class:`AskQuestion` asks the node a question (the ``answer`` action) and writes the answer to the blackboard:
  RUNNING while it is generated, SUCCESS with the answer, FAILURE with the node's message; interrupted (the tree
  moves on, or is stopped), it cancels the goal on the node.
- :class:`WaitForConcept` waits for a concept to be recognised (a ``~/recognitions`` event naming it): RUNNING
  until then, SUCCESS (the score on the blackboard), FAILURE after its timeout.
- :class:`RecallLastSeen` asks the node's sightings memory where and when a concept was last seen (``~/last_seen``):
  SUCCESS with the newest visit (``ego_ros/msg/Visit``: camera, time, box, crop, the robot's pose) on the
  blackboard, FAILURE when it was never seen (since ``within`` seconds, on ``camera``) or is unknown. A fetch tree
  tries WaitForConcept briefly, and falls back on it to know where to go.

None blocks a tick: each starts a task in ``initialise`` and polls it in ``update``. :func:`example_tree` puts
them together (wait for "my mug", then ask where it is), and ``python -m ego_ros.ros.behaviours`` runs that tree
against a running node::

    python -m ego_ros.ros.behaviours --concept "my mug" --question "Where is my mug?" --timeout 60
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable

import py_trees
from py_trees.common import Access, Status

from ego_ros.ros.client import NodeError, seconds
from ego_ros.ros.commander import EgoCommander, Task


class _TaskBehaviour(py_trees.behaviour.Behaviour):
    """Starts one commander task per run of the behaviour, polls it each tick, cancels it if interrupted."""

    def __init__(self, name: str, commander: EgoCommander, key: str | None):
        super().__init__(name)
        self.commander = commander
        self.key = key
        self.task: Task | None = None
        if key:
            self.blackboard = self.attach_blackboard_client(name=name)
            self.blackboard.register_key(key=key, access=Access.WRITE)

    def start(self) -> Task:
        raise NotImplementedError

    def initialise(self) -> None:
        self.task = self.start()

    def update(self) -> Status:
        if self.task is None:
            return Status.FAILURE
        if not self.task.done():
            self.feedback_message = self.running_message()
            return Status.RUNNING
        try:
            value = self.task.result(0)
        except NodeError as error:
            self.feedback_message = str(error)
            return Status.FAILURE
        if self.key:
            self.blackboard.set(self.key, self.blackboard_value(value))
        self.feedback_message = self.done_message(value)
        return Status.SUCCESS

    def terminate(self, new_status: Status) -> None:
        if new_status == Status.INVALID and self.task is not None and not self.task.done():
            self.task.cancel()  # interrupted by a higher priority or a stopped tree: stop the work on the node

    def running_message(self) -> str:
        return "waiting for the node"

    def blackboard_value(self, value):
        return value

    def done_message(self, value) -> str:
        return "done"


class AskQuestion(_TaskBehaviour):
    """Asks ``question`` (about the latest frame of ``camera``, or its last ``video_sec`` seconds) and writes the
    answer text to the blackboard variable ``key``."""

    def __init__(self, name: str, commander: EgoCommander, question: str, *, key: str = "answer", camera: str = "",
                 video_sec: float | None = None, concepts: Iterable[str] = (), max_new_tokens: int = 0):
        super().__init__(name, commander, key)
        self.question, self.camera, self.video_sec = question, camera, video_sec
        self.concepts, self.max_new_tokens = tuple(concepts), max_new_tokens

    def start(self) -> Task:
        return self.commander.ask(self.question, camera=self.camera, video_sec=self.video_sec,
                                  concepts=self.concepts, max_new_tokens=self.max_new_tokens)

    def running_message(self) -> str:
        feedback = self.task.feedback
        return f"{feedback.tokens} tokens so far" if feedback is not None else "asked"

    def blackboard_value(self, value):
        return value.answer

    def done_message(self, value) -> str:
        return f"answered: {value.answer!r}"


class WaitForConcept(_TaskBehaviour):
    """Waits until the node recognises ``concept`` (on ``camera`` if given; with at least ``min_score`` if given),
    at most ``timeout`` seconds (None: for ever); writes its score to the blackboard variable ``key`` if given."""

    def __init__(self, name: str, commander: EgoCommander, concept: str, *, camera: str = "",
                 min_score: float | None = None, timeout: float | None = None, key: str | None = None):
        super().__init__(name, commander, key)
        self.concept, self.camera, self.min_score, self.timeout = concept, camera, min_score, timeout

    def start(self) -> Task:
        return self.commander.wait_for_concept(self.concept, camera=self.camera, min_score=self.min_score,
                                               timeout=self.timeout)

    def running_message(self) -> str:
        return f"looking for {self.concept!r}"

    def blackboard_value(self, value):
        return value[0]

    def done_message(self, value) -> str:
        return f"recognised {self.concept!r} ({value[0]:.2f}) on {value[1].camera}"


class RecallLastSeen(_TaskBehaviour):
    """Looks up where and when ``concept`` was last seen (on ``camera`` if given; within the last ``within``
    seconds if given) and writes the newest visit to the blackboard variable ``key``."""

    def __init__(self, name: str, commander: EgoCommander, concept: str, *, camera: str = "",
                 within: float | None = None, key: str = "last_seen"):
        super().__init__(name, commander, key)
        self.concept, self.camera, self.within = concept, camera, within

    def start(self) -> Task:
        since = None if self.within is None else time.time() - self.within
        return self.commander.last_seen(self.concept, since=since, camera=self.camera, max_results=1)

    def update(self) -> Status:
        if self.task is not None and self.task.done() and self.task.exception() is None and not self.task.result():
            self.feedback_message = f"{self.concept!r} was not seen" + (
                f" in the last {self.within:g} s" if self.within is not None else "") + (
                f" on {self.camera}" if self.camera else "")
            return Status.FAILURE
        return super().update()

    def running_message(self) -> str:
        return f"recalling where {self.concept!r} was seen"

    def blackboard_value(self, value):
        return value[0]

    def done_message(self, value) -> str:
        visit = value[0]
        ago = time.time() - seconds(visit.last_seen)
        return f"{self.concept!r} was last seen {ago:.0f} s ago on {visit.camera or 'a sent image'}"


def example_tree(commander: EgoCommander, concept: str = "my mug", question: str | None = None, *,
                 timeout: float | None = 60.0, camera: str = "") -> py_trees.behaviour.Behaviour:
    """Wait until ``concept`` is seen, then ask about it: a Sequence of WaitForConcept and AskQuestion; the
    answer ends up on the blackboard as ``answer``, the score as ``score``."""
    question = question or f"Where is {concept}?"
    return py_trees.composites.Sequence("find and ask", memory=True, children=[
        WaitForConcept(f"see {concept}", commander, concept, camera=camera, timeout=timeout, key="score"),
        AskQuestion(f"ask: {question}", commander, question, camera=camera, concepts=[concept], key="answer"),
    ])


def run(root: py_trees.behaviour.Behaviour, *, period: float = 0.1, limit: float | None = None,
        show: bool = False) -> Status:
    """Tick ``root`` every ``period`` seconds until it is no longer RUNNING (or ``limit`` seconds passed: then it
    is stopped, which cancels what it started); its final status."""
    tree = py_trees.trees.BehaviourTree(root)
    tree.setup(timeout=15.0)
    end = None if limit is None else time.monotonic() + limit
    try:
        while True:
            tree.tick()
            if show:
                print(py_trees.display.unicode_tree(root, show_status=True), flush=True)
            if root.status != Status.RUNNING:
                return root.status
            if end is not None and time.monotonic() > end:
                root.stop(Status.INVALID)
                return Status.INVALID
            time.sleep(period)
    finally:
        tree.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ego_ros.ros.behaviours", description=example_tree.__doc__)
    parser.add_argument("--node", default=None, help="the ego node (default: $EGO_ROS_NODE, else /ego)")
    parser.add_argument("--concept", default="my mug")
    parser.add_argument("--question", default=None, help="default: 'Where is CONCEPT?'")
    parser.add_argument("--camera", default="", help="the camera to watch and ask about (default: the node's)")
    parser.add_argument("--timeout", type=float, default=60.0, help="how long to wait for the concept (seconds)")
    args = parser.parse_args(argv)
    with EgoCommander(args.node) as commander:
        root = example_tree(commander, args.concept, args.question, timeout=args.timeout, camera=args.camera)
        status = run(root, show=False)
        print(py_trees.display.unicode_tree(root, show_status=True))
        if status != Status.SUCCESS:
            print(f"the tree ended {status.value}", file=sys.stderr)
            return 1
        print(py_trees.blackboard.Blackboard.get("/answer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
