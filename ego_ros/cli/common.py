# SPDX-License-Identifier: Apache-2.0
"""What both halves of ``ego-ros`` share: the error type, argument types and options, and the printed output.

Imports nothing of the engine or of ROS at module level, so that ``ego-ros --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROG = "ego-ros"
MODEL_ENV = "EGO_ROS_MODEL"


class UsageError(Exception):
    """A wrong command line that argparse cannot see (e.g. no model given): exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``ego-ros: error: ...``) like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the subcommand's arguments
    run: Callable[[argparse.Namespace], int]  # the handler; returns the exit status


# --- argument types ---------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1d' -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        value = -1.0
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 10m, 2h or 1d, got {text!r}")
    return value


def positive_hz(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive rate in Hz, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive rate in Hz, got {text}")
    return value


def layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 6,7,8, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0 like 6,7,8, got {text!r}")
    return layers


def box(text: str) -> tuple[float, float, float, float]:
    """A box "X0,Y0,X1,Y1" in pixels."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not (values[2] > values[0] and values[3] > values[1]):
        raise argparse.ArgumentTypeError(f"expected a box X0,Y0,X1,Y1 in pixels with X1 > X0 and Y1 > Y0, "
                                         f"got {short(text, 40)!r}")
    return values


def percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100, got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100, got {value:g}")
    return value


# --- shared options ---------------------------------------------------------------------------------------------


def add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-dir", type=Path, default=None, metavar="DIR",
        help="where concepts are stored (default: $EGO_ROS_MEMORY_DIR, else ~/.local/share/ego_ros/memory)",
    )


def add_calibration_option(group) -> None:
    group.add_argument(
        "--calibration-dir", type=Path, default=None, metavar="DIR",
        help="where layer calibrations are kept, one per model "
             "(default: $EGO_ROS_CALIBRATION_DIR, else ~/.local/share/ego_ros/calibration)",
    )


def add_model_options(parser: argparse.ArgumentParser, *, title: str = "model",
                      model_default: str | None | type = ..., model_help: str | None = None) -> None:
    """``--model`` and the engine settings. ``model_default`` ``...`` means ``$EGO_ROS_MODEL``. ``--device`` and
    ``--dtype`` default to None so that the live half can refuse them when given; the offline half reads None as
    "auto"."""
    group = parser.add_argument_group(title)
    if model_default is ...:
        model_default = os.environ.get(MODEL_ENV) or None
    group.add_argument("--model", default=model_default,
                       help=model_help or f"hub id or local folder of the VLM (default: ${MODEL_ENV})")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: auto)")
    group.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                       help="weights' dtype (default: bfloat16 on a GPU that has it, else float32)")
    group.add_argument("--layers", type=layer_list, default=None, metavar="I,J,...",
                       help="decoder layers whose attention scores the tokens (default: the model's "
                            "calibration, see 'ego-ros calibrate'; else the middle half)")
    group.add_argument("--max-tokens-per-view", type=positive_int, default=None, metavar="K",
                       help="K: at most this many visual tokens kept per reference view (default: 64)")
    group.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="PIXELS",
                       help="images are downscaled to at most this many pixels (default: 307200 = 640x480)")
    group.add_argument("--vllm-url", default=None, metavar="URL",
                       help="answer and recognise on the vLLM server at URL (generation vllm; memories as images; "
                            "see docs/serving.md), e.g. http://localhost:8000")
    add_calibration_option(group)


# --- the model and the memory folder (imported lazily) ----------------------------------------------------------


def memory_dir(args: argparse.Namespace) -> Path:
    from ego_ros.engine.config import default_memory_dir

    return args.memory_dir if args.memory_dir is not None else default_memory_dir()


def engine_settings(args: argparse.Namespace) -> dict:
    """The engine settings given on the command line, checked now (before minutes of model loading)."""
    from ego_ros.engine import EgoConfig

    settings = {key: value for key, value in (
        ("layers", getattr(args, "layers", None)), ("max_tokens_per_view", getattr(args, "max_tokens_per_view", None)),
        ("max_image_pixels", getattr(args, "max_image_pixels", None)),
    ) if value is not None}
    if getattr(args, "vllm_url", None):
        settings.update(generation="vllm", vllm_url=args.vllm_url, memory_layout="image")
    EgoConfig(**settings)  # raises ValueError naming the bad setting
    return settings


def max_image_pixels(args: argparse.Namespace) -> int:
    from ego_ros.engine import EgoConfig

    return args.max_image_pixels or EgoConfig.max_image_pixels


def require_model(args: argparse.Namespace) -> str:
    if not args.model:
        raise UsageError(f"no model given: pass --model MODEL (a hub id or a model folder) or set {MODEL_ENV}")
    return args.model


def load_engine(args: argparse.Namespace):
    """The engine for ``args`` (model, device, dtype, memory folder, settings); reports skipped concept files."""
    from ego_ros.engine import Ego
    from ego_ros.engine.loading import resolve_device, resolve_dtype

    model, settings = require_model(args), engine_settings(args)
    device = resolve_device(args.device or "auto")
    dtype = resolve_dtype(args.dtype or "auto", device)
    info(f"loading {model} on {device} ({str(dtype).removeprefix('torch.')})...")
    ego = Ego.load(model, device=str(device), dtype=dtype, memory_dir=memory_dir(args),
                   calibration_dir=getattr(args, "calibration_dir", None), **settings)
    report_skipped(ego.store.skipped)
    return ego


def stored_concepts(root: Path):
    """Every concept under ``root``, whatever model made it (read-only: for the commands that load no model)."""
    from ego_ros.engine.memory import MemoryStore

    return MemoryStore(root, fingerprint=None)


def require_concepts(root: Path, names) -> None:
    """Fail fast, before loading a model, on a name that is invalid or has no concept file under ``root``."""
    from ego_ros.engine.memory import file_stem, validate_name

    for name in names or ():
        if not (root / f"{file_stem(validate_name(name))}.json").is_file():
            stored_concepts(root).get(name)  # raises UnknownConcept naming the known ones


# --- output -----------------------------------------------------------------------------------------------------


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: error: {message}", file=sys.stderr)


def report_skipped(skipped) -> None:
    for path, reason in skipped:
        warn(f"skipped concept file {path}: {reason}")


class StreamPrinter:
    """Writes an answer to stdout as it grows: each call gets the whole answer so far, only the new part is written."""

    def __init__(self):
        self.shown = ""

    def __call__(self, text: str) -> None:
        text = text.lstrip().rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes as U+FFFD until it completes
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self, final: str = "") -> None:
        """End the line with whatever of ``final`` was not shown (all of it, on a new line, if it differs)."""
        final = final.lstrip()
        rest = final[len(self.shown):] if final.startswith(self.shown) else ("\n" + final if self.shown else final)
        sys.stdout.write(rest + "\n")
        sys.stdout.flush()


def join(layers) -> str:
    return ",".join(str(layer) for layer in layers)


def layers_line(layers, source: str) -> str:
    """'layers 5,6,7; calibrated on 200 images (toy world) 2026-11-26': which layers score tokens, and why."""
    return f"layers {join(layers)}; {source}"


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


CONCEPT_HEADER = ("NAME", "VIEWS", "TOKENS", "AREA", "KEYWORDS", "UPDATED", "MODEL")


def concept_row(name: str, views: int, tokens: int, area: float, keywords, updated: float, model: str) -> tuple:
    """One row of the concept table (``updated`` in seconds since the epoch; 0 = unknown)."""
    return (name, str(views), str(tokens), f"{area:.0f}%", short(", ".join(keywords), 40),
            when(updated) if updated else "-", model)


def print_concepts(rows) -> None:
    """The concept table of ``list``, offline and live alike: numbers right-aligned."""
    widths = [max(len(row[i]) for row in (CONCEPT_HEADER, *rows)) for i in range(len(CONCEPT_HEADER))]
    for row in (CONCEPT_HEADER, *rows):
        cells = [c.rjust(w) if i in (1, 2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


def ago(seconds: float) -> str:
    """'12 s', '5 min', '3 h', '2 days': how long ago, in one unit."""
    seconds = max(0.0, seconds)
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds / 86400:.0f} days"


def print_visits(name: str, visits: list[tuple], args, now: float, searched: str = "") -> None:
    """``last-seen``'s output, live or offline: one line per visit (camera, first and last seen, sightings, best
    score, where the robot was), or why there is none; ``searched`` says where it looked."""
    if not visits:
        info(f"{name!r} has not been seen{' on ' + args.camera if args.camera else ''}"
             f"{' in the last ' + ago(args.since) if args.since else ''}{searched}")
    for camera, first, last, sightings, best, pose in visits:
        print(f"{name}: {visit_line(camera, first, last, sightings, best, pose, now)}")


def robot_at(frame_id: str, x: float, y: float) -> str:
    return f"robot at ({x:.2f}, {y:.2f}) in {frame_id}"


def visit_line(camera: str, first: float, last: float, sightings: int, best: float, pose: str, now: float) -> str:
    """One visit of ``last-seen``: when (how long ago, and the clock times), where, how sure."""
    span = time.strftime("%H:%M:%S", time.localtime(first))
    if last - first >= 1.0:
        span += "-" + time.strftime("%H:%M:%S", time.localtime(last))
    where = f"on {camera}" if camera else "in a given image"
    return (f"{ago(now - last)} ago ({time.strftime('%Y-%m-%d', time.localtime(last))} {span}) {where}: "
            f"{sightings} sighting{'s' * (sightings != 1)}, best {best:.2f}{'; ' + pose if pose else ''}")
