"""The ``ego-ros`` commands that talk to a running ``ego`` node over ROS 2, thin over :mod:`ego_ros.ros.client`.

Examples::

    ego-ros node --params-file config/ego.yaml        # the node, here (on a distro: ros2 launch ego_ros ego.launch.py)
    ego-ros node --model /models/Qwen2.5-VL-7B-Instruct --ros-args -p 'camera_topics:=["/camera/image_raw"]'

    ego-ros register "my mug" --camera                # views from the node's buffer of its default camera
    ego-ros register "my mug" --camera /arm/image_raw --views 5 --window 4 --append
    ego-ros register Rex rex_front.jpg rex_side.jpg   # views from files, sent to the node
    ego-ros ask "Where is my mug?"                    # about the latest frame; the answer streams, Ctrl-C cancels
    ego-ros ask "What did Rex just do?" --video 5     # about the last 5 s of the camera
    ego-ros ask "Is this my mug?" --image photo.jpg
    ego-ros recognize                                 # one line per concept found, most likely first
    ego-ros list
    ego-ros forget Rex
    ego-ros watch                                     # recognition events as they come, until Ctrl-C

Mode: ``register``, ``ask``, ``recognize``, ``list`` and ``forget`` exist offline too (``ego_ros.cli``). One rule
picks, before anything is loaded or contacted: a command works OFFLINE (the model and the memory folder of this
machine, no ROS) when a model is given (``--model`` or ``$EGO_ROS_MODEL``), or ``--memory-dir``, or ``--offline``;
otherwise it is a client of the running node ``--node`` (default ``$EGO_ROS_NODE``, else ``/ego``). An explicit
``--node`` asks for the node even when ``$EGO_ROS_MODEL`` is set, and is refused next to ``--model``,
``--memory-dir`` or ``--offline``. ``show`` is always offline; ``node`` and ``watch`` are always ROS.

Live errors are one line, like the offline ones: no node answering within ``--timeout`` seconds (default 10), or the
node's own ``success=false`` message, print ``ego-ros: error: ...`` and exit 1; Ctrl-C during ``ask`` cancels the
goal on the node and exits 130; ``watch`` ends with Ctrl-C and exits 0.

rclpy is imported inside the handlers and :class:`ego_ros.ros.client.EgoClient` only, so ``ego-ros --help`` and the
offline commands never load ROS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ego_ros import cli
from ego_ros.cli import Command, UsageError, info
from ego_ros.ros.client import DEFAULT_NODE, DEFAULT_TIMEOUT, NODE_ENV, EgoClient, NodeError, NodeNotFound, node_name

# Images read from files are sent at most this big (rgb8, about 6 MB); the node downscales to its max_image_pixels.
SEND_MAX_PIXELS = 1920 * 1080


# --- the commands -----------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _add_node_options(p: argparse.ArgumentParser, *, offline: bool) -> None:
    title = "running node (the default mode: no --model, $EGO_ROS_MODEL, --memory-dir or --offline)" if offline \
        else "running node"
    group = p.add_argument_group(title)
    group.add_argument("--node", default=None, metavar="NAME",
                       help=f"the ego node to talk to (default: ${NODE_ENV}, else {DEFAULT_NODE})")
    group.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SEC",
                       help=f"how long to wait for the node to appear (default: {DEFAULT_TIMEOUT:g}); "
                            "an answer itself may take as long as the model needs")
    if offline:
        group.add_argument("--offline", action="store_true",
                           help="work without a node, on this machine's model and memory folder")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    cli.add_model_options(p)
    # None (not "auto") so that a --device or --dtype given in node mode can be refused; offline restores "auto".
    p.set_defaults(device=None, dtype=None)


def is_offline(args: argparse.Namespace) -> bool:
    """The mode rule (module docstring): OFFLINE with a model, --memory-dir or --offline; else the node."""
    env_model = os.environ.get(cli.MODEL_ENV) or None
    model = getattr(args, "model", None)  # $EGO_ROS_MODEL by default (list: none); forget has no --model
    given = [flag for flag, on in (("--model", model is not None and model != env_model),
                                   ("--memory-dir", args.memory_dir is not None),
                                   ("--offline", args.offline)) if on]
    if args.node is not None:  # an explicit --node beats $EGO_ROS_MODEL, and contradicts the offline flags
        if given:
            raise UsageError(f"--node talks to a running node and {given[0]} works offline: pass one of them")
        return False
    return bool(given or env_model)


def _refuse_offline_only(args: argparse.Namespace, names: Iterable[str]) -> None:
    for name in names:
        if getattr(args, name, None) not in (None, False, []):
            raise UsageError(f"--{name.replace('_', '-')} only works offline (with --model, --memory-dir or "
                             f"--offline); the node at {node_name(args.node)} uses its own settings")


_MODEL_ONLY = ("layers", "max_tokens_per_view", "max_image_pixels", "device", "dtype", "calibration_dir")


def _refuse_node_only(args: argparse.Namespace, names: Iterable[str]) -> None:
    for name in names:
        if getattr(args, name, None) not in (None, False, []):
            raise UsageError(f"--{name.replace('_', '-')} needs a running node; it cannot be used with --model, "
                             f"--memory-dir, --offline or ${cli.MODEL_ENV}")


def _offline(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The offline handler of ego_ros.cli, with the defaults it expects."""
    if hasattr(args, "device"):
        args.device, args.dtype = args.device or "auto", args.dtype or "auto"
    return handler(args)


def _live(run: Callable[[argparse.Namespace, EgoClient], int], args: argparse.Namespace, offline_hint: str) -> int:
    """Run ``run`` with a client of the node; its errors become one ``ego-ros: error:`` line and exit status 1."""
    try:
        with EgoClient(args.node, args.timeout) as ego:
            return run(args, ego)
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith(("rclpy", "ego_ros.msg", "ego_ros.srv", "ego_ros.action")):
            raise
        message = (f"ROS 2 is not usable here ({error}): build the venv with scripts/setup.sh, or source a ROS 2 "
                   f"install with ego_ros built; or {offline_hint}")
    except NodeNotFound as error:
        message = f"no ego node answering at {error.endpoint} (start one with 'ego-ros node', or {offline_hint})"
    except NodeError as error:
        message = " ".join(str(error).split()) or type(error).__name__
    sys.stdout.flush()
    print(f"{cli.PROG}: error: {message}", file=sys.stderr)
    return 1


_WITH_MODEL = "pass --model to work offline"
_WITH_STORE = "pass --offline to use this machine's memory folder"
_CHECK_NAME = "check --node and $ROS_DOMAIN_ID"


def _read_images(paths: Sequence[Path]) -> list:
    import numpy as np

    from ego_ros.engine.images import to_rgb

    return [np.asarray(to_rgb(path, SEND_MAX_PIXELS), dtype=np.uint8) for path in paths]


# register


def _register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the concept's name, as you will use it in questions")
    p.add_argument("images", metavar="IMG", nargs="*", type=Path,
                   help="reference views (photos of the concept); with a node, or --camera instead")
    p.add_argument("--append", action="store_true", help="add these views to an existing concept")
    p.add_argument("--camera", nargs="?", const="", default=None, metavar="TOPIC",
                   help="take the views from the node's buffer of this camera (no TOPIC: the node's default camera)")
    p.add_argument("--views", type=cli._positive_int, default=None, metavar="N",
                   help="with --camera: how many frames to take (default: the node's)")
    p.add_argument("--window", type=_positive_float, default=None, metavar="SEC",
                   help="with --camera: spread them over the last SEC seconds (default: the node's)")
    p.add_argument("--area", type=cli._percent, default=None, metavar="PCT",
                   help="offline: how much of each view the concept covers, in percent (default: the model estimates)")
    _add_model_options(p)
    _add_node_options(p, offline=True)


def cmd_register(args: argparse.Namespace) -> int:
    if is_offline(args):
        _refuse_node_only(args, ("camera", "views", "window"))
        if not args.images:
            raise UsageError("register needs reference views offline: NAME IMG [IMG ...]")
        return _offline(cli.cmd_register, args)
    _refuse_offline_only(args, ("area", *_MODEL_ONLY))
    if args.images and args.camera is not None:
        raise UsageError("give reference views either as files (IMG ...) or from --camera, not both")
    if args.images and (args.views or args.window):
        raise UsageError("--views and --window choose frames from --camera; they do not apply to image files")
    if not args.images and args.camera is None:
        raise UsageError("register needs reference views: image files (NAME IMG ...), or --camera [TOPIC] "
                         "to take them from the node's camera buffer")
    views = _read_images(args.images)  # every file checked before contacting the node

    def run(args, ego: EgoClient) -> int:
        concept = ego.register(args.name, views, camera=args.camera or "", num_views=args.views or 0,
                               window_sec=args.window or 0.0, append=args.append)
        plural = "s" * (concept.num_views != 1)
        if args.append:
            print(f"added views to {concept.name!r}: now {concept.num_views} view{plural}, "
                  f"{concept.num_tokens} tokens")
        else:
            print(f"registered {concept.name!r}: {concept.num_views} view{plural}, {concept.num_tokens} tokens")
        print(f"  area {concept.area_percent:.0f}%; keywords: {', '.join(concept.keywords) or '(none)'}")
        return 0

    return _live(run, args, _WITH_MODEL)


# ask


def _ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--image", dest="images", metavar="IMG", type=Path, action="append", default=None,
                   help="the image (offline: repeat for the frames of a clip, oldest first); "
                        "with a node, default: the camera's latest frame")
    p.add_argument("--video", type=_positive_float, default=None, metavar="SEC",
                   help="with a node: about the last SEC seconds of the camera")
    p.add_argument("--camera", default=None, metavar="TOPIC",
                   help="with a node: the camera to look through (default: the node's default camera)")
    p.add_argument("--concept", dest="concepts", metavar="NAME", action="append", default=None,
                   help="put only this concept in context (repeatable; default: all, the most similar if many)")
    p.add_argument("--max-new-tokens", type=cli._positive_int, default=None, metavar="N",
                   help="answer length limit in tokens (default: 128, or the node's)")
    _add_model_options(p)
    _add_node_options(p, offline=True)


def cmd_ask(args: argparse.Namespace) -> int:
    if is_offline(args):
        _refuse_node_only(args, ("video", "camera"))
        if not args.images:
            raise UsageError("ask needs --image IMG offline (repeat it for the frames of a clip)")
        return _offline(cli.cmd_ask, args)
    _refuse_offline_only(args, _MODEL_ONLY)
    if not args.question.strip():
        raise UsageError("the question is empty")
    if args.images and len(args.images) > 1:
        raise UsageError("a node answers about one --image; for a clip ask about its camera with --video SEC, "
                         "or work offline with --model")
    if args.images and (args.video is not None or args.camera is not None):
        raise UsageError("--image asks about that file; --video and --camera ask about a camera: pass one")
    image = _read_images(args.images)[0] if args.images else None

    printer = cli.StreamPrinter()

    def run(args, ego: EgoClient) -> int:
        try:
            answer = ego.ask(args.question, image=image, camera=args.camera or "", video_sec=args.video,
                             concepts=args.concepts or (), max_new_tokens=args.max_new_tokens or 0, on_text=printer)
        except KeyboardInterrupt:
            if printer.shown:
                printer.finish(printer.shown)
            info(f"{cli.PROG}: interrupted (a question already sent to {ego.node} was cancelled there)")
            return 130
        except NodeError:
            if printer.shown:
                printer.finish(printer.shown)
            raise
        printer.finish(answer.answer)
        if not answer.answer.strip():
            cli.warn("the model gave an empty answer")
        context = ", ".join(repr(n) for n in answer.concepts_used) or "none"
        tokens = f"{answer.tokens} tokens in " if answer.tokens is not None else ""
        info(f"(concepts in context: {context}; {tokens}{answer.latency_sec:.1f} s)")
        return 0

    return _live(run, args, _WITH_MODEL)


# recognize


def _recognize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMG", type=Path, nargs="?", default=None,
                   help="the image (required offline); with a node, default: the camera's latest frame")
    p.add_argument("--camera", default=None, metavar="TOPIC",
                   help="with a node: the camera whose latest frame to analyse (default: the node's default camera)")
    p.add_argument("--concept", dest="concepts", metavar="NAME", action="append", default=None,
                   help="score only this concept (repeatable; default: all)")
    _add_model_options(p)
    _add_node_options(p, offline=True)


def cmd_recognize(args: argparse.Namespace) -> int:
    if is_offline(args):
        _refuse_node_only(args, ("camera",))
        if args.image is None:
            raise UsageError("recognize needs an image file offline: recognize IMG")
        return _offline(cli.cmd_recognize, args)
    _refuse_offline_only(args, _MODEL_ONLY)
    if args.image is not None and args.camera is not None:
        raise UsageError("pass an image file or --camera, not both")
    image = _read_images([args.image])[0] if args.image is not None else None

    def run(args, ego: EgoClient) -> int:
        scores = ego.recognize(image, camera=args.camera or "", concepts=args.concepts or ())
        if not scores:
            info("(no concept recognised)")
            return 0
        width = max(len(name) for name in scores)
        for name, score in sorted(scores.items(), key=lambda item: (-item[1], item[0])):
            print(f"{name:<{width}}  {score:.3f}")
        return 0

    return _live(run, args, _WITH_MODEL)


# list, forget


def _list_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_store_options(p)
    cli.add_list_model_options(p)  # list --model: offline, and says which layers that model uses
    _add_node_options(p, offline=True)


def _time(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def cmd_list(args: argparse.Namespace) -> int:
    if is_offline(args):
        return _offline(cli.cmd_list, args)
    _refuse_offline_only(args, ("device", "dtype", "calibration_dir"))

    def run(args, ego: EgoClient) -> int:
        concepts, layers, layers_source = ego.concepts_and_layers()
        concepts = sorted(concepts, key=lambda c: c.name)
        layers = cli.layers_line(layers, layers_source) if layers else ""
        if not concepts:
            info(f"no concepts on the node {ego.node}")
            if layers:
                print(layers)
            return 0
        header = ("NAME", "VIEWS", "TOKENS", "AREA", "KEYWORDS", "UPDATED", "MODEL")
        rows = [(c.name, str(c.num_views), str(c.num_tokens), f"{c.area_percent:.0f}%",
                 cli._short(", ".join(c.keywords), 40), cli._when(_time(c.updated)) if _time(c.updated) else "-",
                 c.model) for c in concepts]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            cells = [c.rjust(w) if i in (1, 2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            print("  ".join(cells).rstrip())
        if layers:
            print(f"\n{layers}")
        return 0

    return _live(run, args, _WITH_STORE)


def _forget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    cli.add_store_options(p)
    _add_node_options(p, offline=True)


def cmd_forget(args: argparse.Namespace) -> int:
    if is_offline(args):
        return _offline(cli.cmd_forget, args)

    def run(args, ego: EgoClient) -> int:
        print(ego.forget(args.name) or f"forgot {args.name!r}")  # the node's confirmation, e.g. "forgot 'Rex'"
        return 0

    return _live(run, args, _WITH_STORE)


# watch


def _watch_arguments(p: argparse.ArgumentParser) -> None:
    _add_node_options(p, offline=False)


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

    return _live(run, args, _CHECK_NAME)


# node


def _node_arguments(p: argparse.ArgumentParser) -> None:
    default = default_params_file()
    p.add_argument("--params-file", type=Path, default=default, metavar="FILE",
                   help=f"the node's parameters (default: {default or 'none found; the node defaults'})")
    p.add_argument("--model", default=os.environ.get(cli.MODEL_ENV) or None,
                   help=f"sets the parameter model (default: ${cli.MODEL_ENV}, else the params file's)")
    p.add_argument("--memory-dir", type=Path, default=None, metavar="DIR",
                   help="sets the parameter memory_dir (default: the params file's)")
    p.add_argument("--autostart", action=argparse.BooleanOptionalAction, default=True,
                   help="configure and activate at once, loading the model (default: on)")
    p.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                   help="the rest goes to the node as ROS arguments, e.g. --ros-args -p recognition_rate_hz:=1.0 "
                        "-r __ns:=/robot1")


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
        if error.name != "ego_ros.ros.node":
            raise
        raise UsageError("this install has no ego node (ego_ros.ros.node)") from None
    status = node.main(args=argv)
    return status if isinstance(status, int) else 0


COMMANDS: dict[str, Command] = {
    "register": Command("introduce a concept: from image files, or from the node's camera (--camera)",
                        _register_arguments, cmd_register),
    "ask": Command("ask a question about the camera (latest frame or --video), or an image, with your concepts "
                   "in context", _ask_arguments, cmd_ask),
    "recognize": Command("which concepts are in the camera's latest frame or an image, with scores",
                         _recognize_arguments, cmd_recognize),
    "list": Command("list the concepts (the node's, or offline the memory folder's)", _list_arguments, cmd_list),
    "forget": Command("delete a concept (on the node, or offline in the memory folder)", _forget_arguments,
                      cmd_forget),
    "node": Command("run the ego node in this process (what ros2 launch ego_ros ego.launch.py runs)",
                    _node_arguments, cmd_node),
    "watch": Command("print the node's recognition events as they come, until Ctrl-C", _watch_arguments,
                     cmd_watch),
}
