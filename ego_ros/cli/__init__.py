# SPDX-License-Identifier: Apache-2.0
"""The ``ego-ros`` command: teach a VLM your concepts, ask about them and look at what it kept, offline or live.

Examples::

    export EGO_ROS_MODEL=Qwen/Qwen2.5-VL-7B-Instruct   # or pass --model MODEL (a hub id or a folder) each time

    # Introduce a concept from one or more photos of it; add views later with --append
    ego-ros register "my mug" mug_front.jpg mug_side.jpg
    ego-ros register "my mug" mug_top.jpg --append
    ego-ros register Rex rex.jpg --area 30           # you know Rex fills about 30% of the photo

    # Ask about an image, or about a clip (several --image, oldest first); the answer streams as it is generated
    ego-ros ask "Where is my mug?" --image kitchen.jpg
    ego-ros ask "What did Rex just do?" --image t0.jpg --image t1.jpg --image t2.jpg --concept Rex

    # Which concepts are in an image: one line per concept, most likely first
    ego-ros recognize kitchen.jpg

    # Which decoder layers' attention finds a subject best (paper §3.4): measured on images with subject masks,
    # saved for this model and used from then on (unless --layers is given); --out draws the per-layer figures
    ego-ros calibrate photos/                        # photos/NAME.png + photos/NAME.mask.png (white = subject)
    ego-ros calibrate --coco instances_val2017.json --images val2017/ --count 200 --out layers.png

    # The memory itself; these three never load the model (they accept --model like the others; list --model also
    # loads it to say which layers that model uses)
    ego-ros list
    ego-ros show "my mug" --out mug.png              # each view with its kept tokens outlined (the paper's Fig. 3)
    ego-ros forget "my mug"

    # All of it offline, on a tiny random model (gibberish answers, real plumbing)
    python -m ego_ros.testing.tiny_model /tmp/tiny-qwen
    ego-ros register mug mug.jpg --model /tmp/tiny-qwen --memory-dir /tmp/ego-memory --max-image-pixels 50176

    # Live, through a running ego node over ROS 2
    ego-ros node --params-file config/ego.yaml       # the node, here (on a distro: ros2 launch ego_ros ego.launch.py)
    ego-ros camera toy                               # a camera for it on camera/image_raw: the toy world, moving
    ego-ros camera 0 --rate 5                        # ... or webcam 0, a video file, a folder of images
    ego-ros register "my mug" --camera               # views from the node's camera buffer (--views N --window SEC)
    ego-ros ask "Where is my mug?"                   # the latest frame; or --video SEC, --image FILE; Ctrl-C cancels
    ego-ros recognize --camera camera/image_raw      # a camera as named in the node's camera_topics
    ego-ros list
    ego-ros watch                                    # recognition events, one line each, until Ctrl-C
    ego-ros web                                      # the teleop page: http://127.0.0.1:8080/ (--host 0.0.0.0:
                                                     # the robot's network, with the token it prints)

mode:
    register, ask, recognize, list and forget work OFFLINE (this machine's model and memory folder, no ROS) when a
    model is given (--model or $EGO_ROS_MODEL), or --memory-dir, or --offline; otherwise they are clients of the
    running node --node (default $EGO_ROS_NODE, else /ego). An explicit --node asks the node even when
    $EGO_ROS_MODEL is set. show and calibrate are always offline; node, watch, camera and web always use ROS.

Errors a user can fix (a missing file, an unknown concept, a taken name, a model that does not load) print one
line, ``ego-ros: error: ...``, and exit with 1 (2 for a wrong command line), never a traceback.

The command has one home, this package: :mod:`ego_ros.cli.commands` holds each subcommand's command line and the
mode rule, with the two halves beside each other, :mod:`ego_ros.cli.offline` (engine, no ROS) and
:mod:`ego_ros.cli.live` (a client of the node over ROS 2, and ``node``); :mod:`ego_ros.cli.common` what both share.
Neither half imports the engine or rclpy at module level, so ``ego-ros --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ego_ros.cli.commands import COMMANDS
from ego_ros.cli.common import PROG, Command, Parser, UsageError

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "entry", "main"]


def build_parser(table: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    title, rest = __doc__.replace("``", "").split("\n", 1)
    examples = rest.split("Examples::\n", 1)[1].split("\nErrors a user", 1)[0].rstrip()
    parser = Parser(
        prog=PROG, description=title, epilog="examples:" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, command in (table if table is not None else COMMANDS).items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, (ValueError, OSError, UsageError)):  # InvalidImage, InvalidName, ConceptExists, config
        return True
    engine = sys.modules.get("ego_ros.engine")  # not imported: none of its errors can have been raised
    return engine is not None and isinstance(error, (engine.UnknownConcept, engine.ModelLoadError))


def entry() -> None:
    """The ``ego-ros`` program (and ``python -m ego_ros.cli``): :func:`main`, then exit with its status.

    A command that used ROS 2 ends its process as soon as its output is out (``os._exit``), with no interpreter
    teardown after it: the middleware's own (its DDS participants, destroyed at exit) has been seen to hang now and
    then after a command had printed its result, which would leave a planner's or a script's call waiting forever
    on a command that is done. ``node`` exits the usual way: its shutdown is its own (and launch's)."""
    args = build_parser().parse_args()
    status = run_command(args)
    if "rclpy" in sys.modules and args.command != "node":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: this process's) in this process and return its exit status."""
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run one parsed command; user errors become one ``ego-ros: error:`` line and a status, never a traceback."""
    # The store logs each file it skips; the commands report them once, as warnings, instead.
    logging.getLogger("ego_ros.memory").addHandler(logging.NullHandler())
    logging.getLogger("ego_ros.memory").propagate = False
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ego-ros list | head`: the reader left; say nothing more
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return 1
    except Exception as error:
        if not _is_user_error(error):
            raise
        message = " ".join(str(error).split("\n")).strip() or type(error).__name__
        sys.stdout.flush()
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
