# SPDX-License-Identifier: Apache-2.0
"""The live half of ``ego-ros``: a client of a running ``ego`` node over ROS 2, thin over
:class:`ego_ros.ros.client.EgoClient`, and ``ego-ros node``, which runs the node in this process.

Each handler takes the parsed arguments (:mod:`ego_ros.cli.commands` has the command lines and the rule that picks
this half or :mod:`ego_ros.cli.offline`) and returns the exit status. Live errors are one line, like the offline
ones: no node answering within ``--timeout`` seconds, or the node's own ``success=false`` message, print
``ego-ros: error: ...`` and exit 1; Ctrl-C during ``ask`` cancels the goal on the node and exits 130; ``watch``
ends with Ctrl-C and exits 0. rclpy is imported inside :class:`EgoClient` only, so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ego_ros.cli.common import PROG, StreamPrinter, UsageError, concept_row, error_line, info, layers_line, \
    print_concepts, print_visits, robot_at, warn
from ego_ros.ros.client import EgoClient, NodeError, NodeNotFound, seconds

# Images read from files are sent at most this big (rgb8, about 6 MB); the node downscales to its max_image_pixels.
SEND_MAX_PIXELS = 1920 * 1080

WITH_MODEL = "pass --model to work offline"
WITH_STORE = "pass --offline to use this machine's memory folder"
CHECK_NAME = "check --node and $ROS_DOMAIN_ID"
CAMERA_TOPIC = "camera/image_raw"  # = ego_ros.ros.camera.DEFAULT_TOPIC, and the node's camera_topics in ego.yaml
CAMERA_FRAME_ID = "camera"
WEB_HOST = "127.0.0.1"  # = ego_ros.web.server.DEFAULT_HOST (that module imports aiohttp)
WEB_PORT = 8080
CLOSE_WITHIN = 5.0  # seconds a finished command gives its ROS client to tear down (see ego_ros.cli.entry)


def run_live(run: Callable[[argparse.Namespace, EgoClient], int], args: argparse.Namespace, offline_hint: str) -> int:
    """Run ``run`` with a client of the node; its errors become one ``ego-ros: error:`` line and exit status 1."""
    try:
        ego = EgoClient(args.node, args.timeout)
        try:
            return run(args, ego)
        finally:
            ego.close(timeout=CLOSE_WITHIN)  # the command is done: its exit does not wait on the middleware
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith(("rclpy", "ego_ros.msg", "ego_ros.srv", "ego_ros.action")):
            raise
        message = (f"ROS 2 is not usable here ({error}): build the venv with scripts/setup.sh, or source a ROS 2 "
                   f"install with ego_ros built; or {offline_hint}")
    except NodeNotFound as error:
        message = f"no ego node answering at {error.endpoint} (start one with 'ego-ros node', or {offline_hint})"
    except NodeError as error:
        message = " ".join(str(error).split()) or type(error).__name__
    error_line(message)
    return 1


def read_images(paths: Sequence[Path]) -> list:
    import numpy as np

    from ego_ros.engine.images import to_rgb

    return [np.asarray(to_rgb(path, SEND_MAX_PIXELS), dtype=np.uint8) for path in paths]


# --- the node's calls -------------------------------------------------------------------------------------------


def cmd_register(args: argparse.Namespace) -> int:
    if args.images and args.camera is not None:
        raise UsageError("give reference views either as files (IMG ...) or from --camera, not both")
    if args.images and (args.views or args.window):
        raise UsageError("--views and --window choose frames from --camera; they do not apply to image files")
    if not args.images and args.camera is None:
        raise UsageError("register needs reference views: image files (NAME IMG ...), or --camera [TOPIC] "
                         "to take them from the node's camera buffer")
    views = read_images(args.images)  # every file checked before contacting the node

    def run(args, ego: EgoClient) -> int:
        concept = ego.register(args.name, views, camera=args.camera or "", num_views=args.views or 0,
                               window_sec=args.window or 0.0, append=args.append, regions=args.box or (),
                               description=args.description or "")
        plural = "s" * (concept.num_views != 1)
        if args.append:
            print(f"added views to {concept.name!r}: now {concept.num_views} view{plural}, "
                  f"{concept.num_tokens} tokens")
        else:
            print(f"registered {concept.name!r}: {concept.num_views} view{plural}, {concept.num_tokens} tokens")
        print(f"  area {concept.area_percent:.0f}%; keywords: {', '.join(concept.keywords) or '(none)'}")
        return 0

    return run_live(run, args, WITH_MODEL)


def cmd_ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise UsageError("the question is empty")
    if args.images and len(args.images) > 1:
        raise UsageError("a node answers about one --image; for a clip ask about its camera with --video SEC, "
                         "or work offline with --model")
    if args.images and (args.video is not None or args.camera is not None):
        raise UsageError("--image asks about that file; --video and --camera ask about a camera: pass one")
    image = read_images(args.images)[0] if args.images else None
    printer = StreamPrinter()

    def run(args, ego: EgoClient) -> int:
        try:
            answer = ego.ask(args.question, image=image, camera=args.camera or "", video_sec=args.video,
                             concepts=args.concepts or (), max_new_tokens=args.max_new_tokens or 0, on_text=printer)
        except KeyboardInterrupt:
            if printer.shown:
                printer.finish(printer.shown)
            info(f"{PROG}: interrupted (a question already sent to {ego.node} was cancelled there)")
            return 130
        except NodeError:
            if printer.shown:
                printer.finish(printer.shown)
            raise
        printer.finish(answer.answer)
        if not answer.answer.strip():
            warn("the model gave an empty answer")
        context = ", ".join(repr(n) for n in answer.concepts_used) or "none"
        info(f"(concepts in context: {context}; {answer.tokens} tokens in {answer.latency_sec:.1f} s)")
        return 0

    return run_live(run, args, WITH_MODEL)


def cmd_recognize(args: argparse.Namespace) -> int:
    if args.image is not None and args.camera is not None:
        raise UsageError("pass an image file or --camera, not both")
    image = read_images([args.image])[0] if args.image is not None else None

    def run(args, ego: EgoClient) -> int:
        scores = ego.recognize(image, camera=args.camera or "", concepts=args.concepts or ())
        if not scores:
            info("(no concept recognised)")
            return 0
        width = max(len(name) for name in scores)
        for name, score in sorted(scores.items(), key=lambda item: (-item[1], item[0])):
            print(f"{name:<{width}}  {score:.3f}")
        return 0

    return run_live(run, args, WITH_MODEL)


def cmd_list(args: argparse.Namespace) -> int:
    def run(args, ego: EgoClient) -> int:
        concepts, layers, layers_source = ego.concepts_and_layers()
        layers = layers_line(layers, layers_source) if layers else ""
        if not concepts:
            info(f"no concepts on the node {ego.node}")
            if layers:
                print(layers)
            return 0
        print_concepts([concept_row(c.name, c.num_views, c.num_tokens, c.area_percent, c.keywords,
                                    seconds(c.updated), c.model) for c in sorted(concepts, key=lambda c: c.name)])
        if layers:
            print(f"\n{layers}")
        return 0

    return run_live(run, args, WITH_STORE)


def cmd_last_seen(args: argparse.Namespace) -> int:
    def run(args, ego: EgoClient) -> int:
        now = time.time()
        visits = ego.last_seen(args.name, since=now - args.since if args.since else None, camera=args.camera or "",
                               max_results=args.max_results)
        print_visits(args.name, [(v.camera, seconds(v.first_seen), seconds(v.last_seen), v.sightings, v.best_score,
                                  robot_at(v.pose.header.frame_id, v.pose.pose.position.x, v.pose.pose.position.y)
                                  if v.has_pose else v.pose_note) for v in visits], args, now)
        return 0

    return run_live(run, args, WITH_STORE)


def cmd_forget(args: argparse.Namespace) -> int:
    def run(args, ego: EgoClient) -> int:
        print(ego.forget(args.name) or f"forgot {args.name!r}")  # the node's confirmation, e.g. "forgot 'Rex'"
        return 0

    return run_live(run, args, WITH_STORE)


# --- watch ------------------------------------------------------------------------------------------------------


def event_line(event) -> str:
    """``22:13:20.250  /camera/image_raw  my mug(0.87), Rex(0.31)  +Rex  -cat``: the analysed frame's stamp (local
    time), the camera, the concepts present with their scores (most likely first), then what appeared and left."""
    stamp = event.header.stamp
    when = time.strftime("%H:%M:%S", time.localtime(stamp.sec)) + f".{stamp.nanosec // 1_000_000:03d}"
    present = ", ".join(f"{d.name}({d.score:.2f})" for d in sorted(event.detections, key=lambda d: (-d.score, d.name)))
    parts = [when, event.camera or "-", present or "(nothing)"]
    parts += [f"+{name}" for name in event.appeared] + [f"-{name}" for name in event.disappeared]
    return "  ".join(parts)


def cmd_watch(args: argparse.Namespace) -> int:
    def run(args, ego: EgoClient) -> int:
        try:
            ego.watch(lambda event: print(event_line(event), flush=True),
                      on_ready=lambda topic: info(f"watching {topic} (Ctrl-C to stop)"))
        except KeyboardInterrupt:
            pass  # the way to end it: not an error
        return 0

    return run_live(run, args, CHECK_NAME)


# --- node -------------------------------------------------------------------------------------------------------


def default_params_file() -> Path | None:
    """config/ego.yaml of this source checkout, else share/ego_ros/config/ego.yaml of an install prefix."""
    here = Path(__file__).resolve().parents[2] / "config" / "ego.yaml"
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p] + [sys.prefix]
    for candidate in (here, *(Path(p) / "share" / "ego_ros" / "config" / "ego.yaml" for p in prefixes)):
        if candidate.is_file():
            return candidate
    return None


def node_arguments(args: argparse.Namespace) -> list[str]:
    """The node's command line: the params file first, then our -p overrides, then the user's (later wins)."""
    ros_args = ["--ros-args"]
    if args.params_file is not None:
        if not args.params_file.is_file():
            raise FileNotFoundError(f"no params file {args.params_file}")
        ros_args += ["--params-file", str(args.params_file)]
    overrides = {"autostart": args.autostart, "model": args.model,
                 "memory_dir": str(args.memory_dir) if args.memory_dir is not None else None}
    for name, value in overrides.items():
        if value is not None:  # JSON is YAML: a model named "true" or "1" stays a string
            ros_args += ["-p", f"{name}:={json.dumps(value)}"]
    rest = list(args.ros_args)
    if rest[:1] == ["--ros-args"]:
        rest = rest[1:]
    return ["ego_node", *ros_args, *rest]


def cmd_node(args: argparse.Namespace) -> int:
    argv = node_arguments(args)
    try:
        from ego_ros.ros import node
    except ModuleNotFoundError as error:
        if error.name not in ("ego_ros.ros.node", "rclpy"):
            raise
        raise UsageError(f"this install cannot run the ego node ({error})") from None
    status = node.main(args=argv)
    return status if isinstance(status, int) else 0


# --- camera -----------------------------------------------------------------------------------------------------


def cmd_camera(args: argparse.Namespace) -> int:
    """Open SOURCE first (one error line and exit 1 if it does not open: nothing is published), then publish it."""
    from ego_ros.ros.camera_sources import DEFAULT_RATE, open_source

    if args.grade and args.source.strip() != "toy":
        raise UsageError("--grade needs the toy camera (ego-ros camera toy): only the toy world knows what its "
                         "frames show")
    source = open_source(args.source, loop=not args.once)  # SourceError (an OSError): ego-ros: error: ..., exit 1
    try:
        from ego_ros.ros.camera import publish
    except ModuleNotFoundError as error:
        source.close()
        raise UsageError(f"ROS 2 is not usable here ({error}): build the venv with scripts/setup.sh, or source a "
                         "ROS 2 install") from None
    rest = list(args.ros_args)
    publish(source, topic=args.topic, rate=args.rate or source.rate or DEFAULT_RATE, frame_id=args.frame_id,
            compressed=args.compressed, count=args.count, ros_args=rest[1:] if rest[:1] == ["--ros-args"] else rest,
            grade=args.grade)
    return 0


# --- web --------------------------------------------------------------------------------------------------------


def cmd_web(args: argparse.Namespace) -> int:
    """The teleop page (:mod:`ego_ros.web`), a client of the node like the others; runs until Ctrl-C."""
    try:
        from ego_ros.web.server import serve
    except ModuleNotFoundError as error:
        if error.name != "aiohttp":
            raise
        raise UsageError("ego-ros web needs aiohttp: pip install -r requirements.txt") from None
    try:
        return serve(host=args.host, port=args.port, node=args.node, camera=args.camera,
                     memory_dir=args.memory_dir, timeout=args.timeout)
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith(("rclpy", "ego_ros.msg", "ego_ros.srv", "ego_ros.action")):
            raise
        raise UsageError(f"ROS 2 is not usable here ({error}): build the venv with scripts/setup.sh, or source a "
                         "ROS 2 install with ego_ros built") from None
