# SPDX-License-Identifier: Apache-2.0
"""The subcommands of ``ego-ros``: each one's command line, and which half runs it.

``register``, ``ask``, ``recognize``, ``list`` and ``forget`` have an offline half (:mod:`ego_ros.cli.offline`) and
a live half (:mod:`ego_ros.cli.live`) side by side, with one command line that holds the options of both. One rule
(:func:`is_offline`) picks, before anything is loaded or contacted: OFFLINE (the model and the memory folder of this
machine, no ROS) when a model is given (``--model`` or ``$EGO_ROS_MODEL``), or ``--memory-dir``, or ``--offline``;
otherwise a client of the running node ``--node`` (default ``$EGO_ROS_NODE``, else ``/ego``). An explicit ``--node``
asks the node even when ``$EGO_ROS_MODEL`` is set, and is refused next to ``--model``, ``--memory-dir`` or
``--offline``. ``show`` and ``calibrate`` are always offline; ``node``, ``watch``, ``camera`` and ``web`` always use
ROS.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable

from ego_ros.cli import evaluate, live, offline
from ego_ros.cli.common import (
    MODEL_ENV, Command, UsageError, add_model_options, add_store_options, box, duration, percent,
    positive_float, positive_hz, positive_int,
)
from ego_ros.ros.client import DEFAULT_NODE, DEFAULT_TIMEOUT, NODE_ENV, node_name

# The engine settings: meaningful offline only (a node uses its own parameters).
MODEL_ONLY = ("layers", "max_tokens_per_view", "max_image_pixels", "device", "dtype", "calibration_dir", "vllm_url")


# --- the mode rule ----------------------------------------------------------------------------------------------


def add_node_options(p: argparse.ArgumentParser, *, offline: bool) -> None:
    title = "running node (the default mode: no --model, $EGO_ROS_MODEL, --memory-dir or --offline)" if offline \
        else "running node"
    group = p.add_argument_group(title)
    group.add_argument("--node", default=None, metavar="NAME",
                       help=f"the ego node to talk to (default: ${NODE_ENV}, else {DEFAULT_NODE})")
    group.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="SEC",
                       help=f"how long to wait for the node to appear (default: {DEFAULT_TIMEOUT:g}); "
                            "an answer itself may take as long as the model needs")
    if offline:
        group.add_argument("--offline", action="store_true",
                           help="work without a node, on this machine's model and memory folder")


def is_offline(args: argparse.Namespace) -> bool:
    """The mode rule (module docstring): OFFLINE with a model, --memory-dir or --offline; else the node."""
    env_model = os.environ.get(MODEL_ENV) or None
    model = getattr(args, "model", None)  # $EGO_ROS_MODEL by default (list, show, forget: none)
    given = [flag for flag, on in (("--model", model is not None and model != env_model),
                                   ("--memory-dir", args.memory_dir is not None),
                                   ("--offline", args.offline)) if on]
    if args.node is not None:  # an explicit --node beats $EGO_ROS_MODEL, and contradicts the offline flags
        if given:
            raise UsageError(f"--node talks to a running node and {given[0]} works offline: pass one of them")
        return False
    return bool(given or env_model)


def refuse_offline_only(args: argparse.Namespace, names: Iterable[str]) -> None:
    for name in names:
        if getattr(args, name, None) not in (None, False, []):
            raise UsageError(f"--{name.replace('_', '-')} only works offline (with --model, --memory-dir or "
                             f"--offline); the node at {node_name(args.node)} uses its own settings")


def refuse_node_only(args: argparse.Namespace, names: Iterable[str]) -> None:
    for name in names:
        if getattr(args, name, None) not in (None, False, []):
            raise UsageError(f"--{name.replace('_', '-')} needs a running node; it cannot be used with --model, "
                             f"--memory-dir, --offline or ${MODEL_ENV}")


# --- register ---------------------------------------------------------------------------------------------------


def register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the concept's name, as you will use it in questions")
    p.add_argument("images", metavar="IMG", nargs="*", type=Path,
                   help="reference views (photos of the concept); with a node, or --camera instead")
    p.add_argument("--append", action="store_true", help="add these views to an existing concept")
    p.add_argument("--camera", nargs="?", const="", default=None, metavar="TOPIC",
                   help="take the views from the node's buffer of this camera (no TOPIC: the node's default camera)")
    p.add_argument("--views", type=positive_int, default=None, metavar="N",
                   help="with --camera: how many frames to take (default: the node's)")
    p.add_argument("--window", type=positive_float, default=None, metavar="SEC",
                   help="with --camera: spread them over the last SEC seconds (default: the node's)")
    p.add_argument("--box", type=box, action="append", default=None, metavar="X0,Y0,X1,Y1",
                   help="which object the views are about, in their pixels: once for all views or once per view "
                        "(only tokens inside it are kept; its share of the view is the area)")
    p.add_argument("--description", default=None, metavar="TEXT",
                   help="the object in your words (\"the blue mug with the star\"), scored instead of the "
                        "model's keywords")
    p.add_argument("--area", type=percent, default=None, metavar="PCT",
                   help="offline: how much of each view the concept covers, in percent (default: the model estimates)")
    add_store_options(p)
    add_model_options(p)
    add_node_options(p, offline=True)


def register(args: argparse.Namespace) -> int:
    if is_offline(args):
        refuse_node_only(args, ("camera", "views", "window"))
        if not args.images:
            raise UsageError("register needs reference views offline: NAME IMG [IMG ...]")
        return offline.cmd_register(args)
    refuse_offline_only(args, ("area", *MODEL_ONLY))
    return live.cmd_register(args)


# --- ask --------------------------------------------------------------------------------------------------------


def ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--image", dest="images", metavar="IMG", type=Path, action="append", default=None,
                   help="the image (offline: repeat for the frames of a clip, oldest first); "
                        "with a node, default: the camera's latest frame")
    p.add_argument("--video", type=positive_float, default=None, metavar="SEC",
                   help="with a node: about the last SEC seconds of the camera")
    p.add_argument("--camera", default=None, metavar="TOPIC",
                   help="with a node: the camera to look through (default: the node's default camera)")
    p.add_argument("--concept", dest="concepts", metavar="NAME", action="append", default=None,
                   help="put only this concept in context (repeatable; default: all, the most similar if many)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help="answer length limit in tokens (default: 128, or the node's)")
    add_store_options(p)
    add_model_options(p)
    add_node_options(p, offline=True)


def ask(args: argparse.Namespace) -> int:
    if is_offline(args):
        refuse_node_only(args, ("video", "camera"))
        if not args.images:
            raise UsageError("ask needs --image IMG offline (repeat it for the frames of a clip)")
        return offline.cmd_ask(args)
    refuse_offline_only(args, MODEL_ONLY)
    return live.cmd_ask(args)


# --- recognize --------------------------------------------------------------------------------------------------


def recognize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMG", type=Path, nargs="?", default=None,
                   help="the image (required offline); with a node, default: the camera's latest frame")
    p.add_argument("--camera", default=None, metavar="TOPIC",
                   help="with a node: the camera whose latest frame to analyse (default: the node's default camera)")
    p.add_argument("--concept", dest="concepts", metavar="NAME", action="append", default=None,
                   help="score only this concept (repeatable; default: all)")
    add_store_options(p)
    add_model_options(p)
    add_node_options(p, offline=True)


def recognize(args: argparse.Namespace) -> int:
    if is_offline(args):
        refuse_node_only(args, ("camera",))
        if args.image is None:
            raise UsageError("recognize needs an image file offline: recognize IMG")
        return offline.cmd_recognize(args)
    refuse_offline_only(args, MODEL_ONLY)
    return live.cmd_recognize(args)


# --- list, forget, show: the memory ---------------------------------------------------------------------------


def list_arguments(p: argparse.ArgumentParser) -> None:
    add_store_options(p)
    # list --model M: offline, and also loads M to say which layers it uses. Not $EGO_ROS_MODEL by default, so that
    # a plain `list` stays instant.
    add_model_options(p, title="model (optional; offline)", model_default=None,
                      model_help="also load this model and print the decoder layers it uses, and where they come "
                                 "from")
    add_node_options(p, offline=True)


def list_concepts(args: argparse.Namespace) -> int:
    if is_offline(args):
        return offline.cmd_list(args)
    refuse_offline_only(args, MODEL_ONLY)
    return live.cmd_list(args)


def _memory_model_option(p: argparse.ArgumentParser) -> None:
    """``--model`` on the commands that read the memory without a model: accepted so that the same flags work for
    every command, and (like everywhere) it means offline; the model is not loaded."""
    p.add_argument("--model", default=None,
                   help="accepted like everywhere: works offline on the memory folder (the model is not loaded)")


def forget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    add_store_options(p)
    _memory_model_option(p)
    add_node_options(p, offline=True)


def forget(args: argparse.Namespace) -> int:
    if is_offline(args):
        return offline.cmd_forget(args)
    return live.cmd_forget(args)


def last_seen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--since", type=duration, default=None, metavar="DURATION",
                   help="only visits in the last DURATION (90s, 10m, 2h, 1d)")
    p.add_argument("--camera", default=None, metavar="TOPIC", help="only visits of this camera")
    p.add_argument("--max", dest="max_results", type=positive_int, default=5, metavar="N",
                   help="at most N visits, newest first (default: 5)")
    add_store_options(p)
    _memory_model_option(p)
    add_node_options(p, offline=True)


def last_seen(args: argparse.Namespace) -> int:
    if is_offline(args):
        return offline.cmd_last_seen(args)
    return live.cmd_last_seen(args)


def show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="image file to write")
    add_store_options(p)
    _memory_model_option(p)


# --- calibrate --------------------------------------------------------------------------------------------------


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", metavar="DATA",
                   help="a folder of NAME.png (or .jpg) images with NAME.mask.png subject masks (white = subject), "
                        "or 'toy' for the toy world's scenes; leave out with --coco")
    p.add_argument("--coco", type=Path, default=None, metavar="ANNOTATIONS_JSON",
                   help="COCO instances file (e.g. instances_val2017.json): its images showing exactly one instance "
                        "of one category, with --images")
    p.add_argument("--images", type=Path, default=None, metavar="DIR", help="the folder of the COCO images")
    p.add_argument("--count", type=positive_int, default=None, metavar="N",
                   help="use at most N images (default: all; 200 scenes for the toy world)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="the toy world's scenes (default: 0)")
    p.add_argument("--max-layers", type=positive_int, default=None, metavar="L",
                   help="choose at most L layers (default: a quarter of the decoder, at least 1)")
    p.add_argument("--out", type=Path, default=None, metavar="PLOT.png",
                   help="also draw each layer's overlap, the chosen layers and the baselines")
    p.add_argument("--no-save", action="store_true",
                   help="only measure: keep the layers this model uses now")
    add_store_options(p)
    add_model_options(p)


# --- watch, node: ROS only --------------------------------------------------------------------------------------


def watch_arguments(p: argparse.ArgumentParser) -> None:
    add_node_options(p, offline=False)


def node_options(p: argparse.ArgumentParser) -> None:
    default = live.default_params_file()
    p.add_argument("--params-file", type=Path, default=default, metavar="FILE",
                   help=f"the node's parameters (default: {default or 'none found; the node defaults'})")
    p.add_argument("--model", default=os.environ.get(MODEL_ENV) or None,
                   help=f"sets the parameter model (default: ${MODEL_ENV}, else the params file's)")
    p.add_argument("--memory-dir", type=Path, default=None, metavar="DIR",
                   help="sets the parameter memory_dir (default: the params file's)")
    p.add_argument("--autostart", action=argparse.BooleanOptionalAction, default=True,
                   help="configure and activate at once, loading the model (default: on)")
    p.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                   help="the rest goes to the node as ROS arguments, e.g. --ros-args -p recognition_rate_hz:=1.0 "
                        "-r __ns:=/robot1")


def camera_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="a camera device index (0) or /dev/video*, a video file, a folder of images (played in name "
                        "order), one image, or 'toy': the toy world, its personal instances moving in and out of view")
    p.add_argument("--topic", default=live.CAMERA_TOPIC, metavar="T",
                   help=f"the sensor_msgs/Image topic (default: {live.CAMERA_TOPIC}, relative like the node's "
                        "camera_topics, so both agree in any namespace)")
    p.add_argument("--rate", type=positive_hz, default=None, metavar="HZ",
                   help="frames per second (default: a video file's or device's own rate, else 10)")
    p.add_argument("--frame-id", default=live.CAMERA_FRAME_ID, metavar="ID",
                   help=f"the headers' frame_id (default: {live.CAMERA_FRAME_ID})")
    p.add_argument("--compressed", action="store_true", help="also publish JPEG sensor_msgs/CompressedImage on "
                                                             "T/compressed")
    p.add_argument("--once", action="store_true",
                   help="a video file or folder: stop at its end (default: start over)")
    p.add_argument("--count", type=positive_int, default=None, metavar="N", help="stop after N frames")
    p.add_argument("--grade", default=None, metavar="TOPIC",
                   help="toy only: grade the node's recognition events on TOPIC (e.g. ego/recognitions) against "
                        "what each frame showed, and print the tally when stopped")
    p.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                   help="the rest goes to the camera's ROS node, e.g. --ros-args -r __ns:=/robot1")


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535 (0: any free one), got {text!r}")
    return value


def web_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=live.WEB_HOST, metavar="H",
                   help=f"the address to serve on (default: {live.WEB_HOST}, this machine only; 0.0.0.0: every "
                        "network of the robot, and then every request needs the token printed at start)")
    p.add_argument("--port", type=port, default=live.WEB_PORT, metavar="P",
                   help=f"the TCP port (default: {live.WEB_PORT}; 0: any free one, printed)")
    p.add_argument("--camera", default=live.CAMERA_TOPIC, metavar="TOPIC",
                   help=f"the camera the page shows and registers from (default: {live.CAMERA_TOPIC}, the node's "
                        "camera in config/ego.yaml; .../compressed: a CompressedImage topic)")
    p.add_argument("--memory-dir", type=Path, default=None, metavar="DIR",
                   help="where the node keeps its concepts, for their pictures (default: the node's memory_dir "
                        "parameter)")
    add_node_options(p, offline=False)


COMMANDS: dict[str, Command] = {
    "register": Command("introduce a concept: from image files, or from the node's camera (--camera)",
                        register_arguments, register),
    "ask": Command("ask a question about the camera (latest frame or --video), or an image, with your concepts "
                   "in context", ask_arguments, ask),
    "recognize": Command("which concepts are in the camera's latest frame or an image, with scores",
                         recognize_arguments, recognize),
    "list": Command("list the concepts (the node's, or offline the memory folder's)", list_arguments, list_concepts),
    "forget": Command("delete a concept (on the node, or offline in the memory folder)", forget_arguments, forget),
    "last-seen": Command("where and when a concept was last recognised: its visits, newest first (the node's, or "
                         "offline the memory folder's)", last_seen_arguments, last_seen),
    "show": Command("draw a concept's kept tokens on its reference views (offline; no model needed)", show_arguments,
                    offline.cmd_show),
    "calibrate": Command("choose the decoder layers that score tokens, from images with subject masks (§3.4)",
                         calibrate_arguments, offline.cmd_calibrate),
    "eval": Command(evaluate.HELP, evaluate.arguments, evaluate.run),
    "node": Command("run the ego node in this process (what ros2 launch ego_ros ego.launch.py runs)",
                    node_options, live.cmd_node),
    "watch": Command("print the node's recognition events as they come, until Ctrl-C", watch_arguments,
                     live.cmd_watch),
    "camera": Command("publish a camera device, a video file, a folder of images or the toy world as a ROS 2 "
                      "camera (sensor_msgs/Image)", camera_arguments, live.cmd_camera),
    "web": Command("serve the teleop page: the live camera with what the node recognises, register by drawing a "
                   "box, ask, forget; from any browser, a phone's included", web_arguments, live.cmd_web),
}
