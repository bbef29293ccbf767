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

    # The memory itself; these three never load the model (list --model also says which layers that model uses)
    ego-ros list
    ego-ros show "my mug" --out mug.png              # each view with its kept tokens outlined (the paper's Fig. 3)
    ego-ros forget "my mug"

    # All of it offline, on a tiny random model (gibberish answers, real plumbing)
    python -m ego_ros.testing.tiny_model /tmp/tiny-qwen
    ego-ros register mug mug.jpg --model /tmp/tiny-qwen --memory-dir /tmp/ego-memory --max-image-pixels 50176

    # Live, through a running ego node over ROS 2 (ego_ros.ros.cli)
    ego-ros node --params-file config/ego.yaml       # the node, here (on a distro: ros2 launch ego_ros ego.launch.py)
    ego-ros register "my mug" --camera               # views from the node's camera buffer (--views N --window SEC)
    ego-ros ask "Where is my mug?"                   # the latest frame; or --video SEC, --image FILE; Ctrl-C cancels
    ego-ros recognize --camera /camera/image_raw
    ego-ros list
    ego-ros watch                                    # recognition events, one line each, until Ctrl-C

mode:
    register, ask, recognize, list and forget work OFFLINE (this machine's model and memory folder, no ROS) when a
    model is given (--model or $EGO_ROS_MODEL), or --memory-dir, or --offline; otherwise they are clients of the
    running node --node (default $EGO_ROS_NODE, else /ego). An explicit --node asks the node even when
    $EGO_ROS_MODEL is set. show and calibrate are always offline; node and watch always use ROS.

Errors a user can fix (a missing file, an unknown concept, a taken name, a model that does not load) print one
line, ``ego-ros: error: ...``, and exit with 1 (2 for a wrong command line), never a traceback.

Subcommands are a table, :data:`COMMANDS` (name -> :class:`Command`). The ROS client commands (``node``,
``watch``, and live versions of ``register``, ``ask``, ``recognize``, ``list``, ``forget``) come from
``ego_ros.ros.cli.COMMANDS`` when that module exists; an entry there with the same name as one here replaces it and
falls back to the handler here when the mode rule above says offline.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ego_ros.evaluation import cli as _evaluation_cli  # `ego-ros eval` (light: its handler imports the rest)

PROG = "ego-ros"
MODEL_ENV = "EGO_ROS_MODEL"
RESERVED = ("node", "watch")  # for the ROS side (ego_ros.ros.cli)


class UsageError(Exception):
    """A wrong command line that argparse cannot see (e.g. no model given): exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``ego-ros: error: ...``) like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the subcommand's arguments
    run: Callable[[argparse.Namespace], int]  # the handler; returns the exit status


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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    add_store_options(parser)
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=os.environ.get(MODEL_ENV) or None,
                       help=f"hub id or local folder of the VLM (default: ${MODEL_ENV})")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: auto)")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weights' dtype (default: bfloat16 on a GPU that has it, else float32)")
    group.add_argument("--layers", type=_layer_list, default=None, metavar="I,J,...",
                       help="decoder layers whose attention scores the tokens (default: the model's "
                            "calibration, see 'ego-ros calibrate'; else the middle half)")
    group.add_argument("--max-tokens-per-view", type=_positive_int, default=None, metavar="K",
                       help="K: at most this many visual tokens kept per reference view (default: 64)")
    group.add_argument("--max-image-pixels", type=_positive_int, default=None, metavar="PIXELS",
                       help="images are downscaled to at most this many pixels (default: 307200 = 640x480)")
    add_calibration_option(group)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 6,7,8, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0 like 6,7,8, got {text!r}")
    return layers


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100, got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100, got {value:g}")
    return value


def memory_dir(args: argparse.Namespace) -> Path:
    from ego_ros.engine.config import default_memory_dir

    return args.memory_dir if args.memory_dir is not None else default_memory_dir()


def engine_settings(args: argparse.Namespace) -> dict:
    """The engine settings given on the command line, checked now (before minutes of model loading)."""
    from ego_ros.engine import EgoConfig

    settings = {key: value for key, value in (
        ("layers", args.layers), ("max_tokens_per_view", args.max_tokens_per_view),
        ("max_image_pixels", args.max_image_pixels),
    ) if value is not None}
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
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    info(f"loading {model} on {device} ({str(dtype).removeprefix('torch.')})...")
    ego = Ego.load(model, device=str(device), dtype=dtype, memory_dir=memory_dir(args),
                   calibration_dir=getattr(args, "calibration_dir", None), **settings)
    report_skipped(ego.store.skipped)
    return ego


# --- output -----------------------------------------------------------------------------------------------------


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


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


def layers_line(layers, source: str) -> str:
    """'layers 5,6,7; calibrated on 200 images (toy world) 2026-11-26': which layers score tokens, and why."""
    return f"layers {_join(layers)}; {source}"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# --- the memory without a model ---------------------------------------------------------------------------------


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


# --- offline commands -------------------------------------------------------------------------------------------


def _register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the concept's name, as you will use it in questions")
    p.add_argument("images", metavar="IMG", nargs="+", type=Path, help="reference views (photos of the concept)")
    p.add_argument("--append", action="store_true", help="add these views to an existing concept")
    p.add_argument("--area", type=_percent, default=None, metavar="PCT",
                   help="how much of each view the concept covers, in percent (default: the model estimates it)")
    add_model_options(p)


def cmd_register(args: argparse.Namespace) -> int:
    require_model(args)  # before the engine's imports: the quickest possible answer to a wrong command line
    from ego_ros.engine import ConceptExists
    from tqdm import tqdm

    from ego_ros.engine.images import to_rgb
    from ego_ros.engine.memory import file_stem, validate_name

    root = memory_dir(args)
    engine_settings(args)  # a bad setting is refused before anything is read or loaded
    name = validate_name(args.name)
    if not args.append and (root / f"{file_stem(name)}.json").exists():
        raise ConceptExists(f"concept {name!r} already exists in {root}; use --append to add views, or forget it first")
    images = [to_rgb(path, max_image_pixels(args)) for path in args.images]  # every file checked before loading
    ego = load_engine(args)
    before = ego.store.get(name).num_views if name in ego.store else 0
    with tqdm(total=len(images), desc=f"registering {name!r}", unit="view", file=sys.stderr,
              disable=len(images) < 2) as bar:
        concept = ego.register(name, images, append=args.append, area_percent=args.area,
                               on_view=lambda done, total: bar.update(1))
    added = len(concept.traces)
    verb = f"added {added} view{'s' * (added != 1)} to" if before else "registered"
    print(f"{verb} {name!r}: {concept.num_views} view{'s' * (concept.num_views != 1)}, "
          f"{concept.num_tokens} tokens")
    for k, trace in enumerate(concept.traces, before + 1):
        area = f"area {trace.area_percent:.0f}%" + ("" if trace.area_parsed else " (no estimate; default)")
        keywords = ", ".join(trace.keywords) or "(none)"
        if trace.keywords_fallback:
            keywords += " (the model gave no keywords; scored 'main subject')"
        print(f"  view {k}: kept {len(trace.selected)} of {trace.image.num_tokens} tokens, {area}; "
              f"keywords: {keywords}")
    return 0


def _ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--image", dest="images", metavar="IMG", type=Path, action="append", required=True,
                   help="the image; repeat for the frames of a clip, oldest first")
    p.add_argument("--concept", dest="concepts", metavar="NAME", action="append", default=None,
                   help="put only this concept in context (repeatable; default: all, the most similar if many)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                   help="answer length limit in tokens (default: 128)")
    add_model_options(p)


def cmd_ask(args: argparse.Namespace) -> int:
    require_model(args)
    from ego_ros.engine.images import to_rgb

    root = memory_dir(args)
    engine_settings(args)
    if not args.question.strip():
        raise ValueError("the question is empty")
    require_concepts(root, args.concepts)
    frames = [to_rgb(path, max_image_pixels(args)) for path in args.images]
    ego = load_engine(args)

    printer = StreamPrinter()
    answer = ego.ask(args.question, frames, concepts=args.concepts, max_new_tokens=args.max_new_tokens,
                     on_text=printer)
    printer.finish(answer.text)
    if not answer.text:
        warn("the model gave an empty answer")
    context = ", ".join(repr(n) for n in answer.concepts) or "none"
    info(f"(concepts in context: {context}; {answer.new_tokens} tokens in {answer.timings['total']:.1f} s)")
    return 0


def _recognize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMG", type=Path)
    p.add_argument("--concept", dest="concepts", metavar="NAME", action="append", default=None,
                   help="score only this concept (repeatable; default: all)")
    add_model_options(p)


def cmd_recognize(args: argparse.Namespace) -> int:
    require_model(args)
    from ego_ros.engine.images import to_rgb

    root = memory_dir(args)
    engine_settings(args)
    require_concepts(root, args.concepts)
    image = to_rgb(args.image, max_image_pixels(args))
    ego = load_engine(args)
    if not args.concepts and not len(ego.store):
        raise ValueError(f"no concepts of this model in {root}; register one first (ego-ros register NAME IMG)")
    probabilities = ego.recognize(image, args.concepts)
    width = max(len(name) for name in probabilities)
    for name, p in sorted(probabilities.items(), key=lambda item: (-item[1], item[0])):
        print(f"{name:<{width}}  {p:.3f}")
    return 0


def add_list_model_options(p: argparse.ArgumentParser) -> None:
    """``list --model M``: also say which layers that model uses and why (this loads the model; $EGO_ROS_MODEL
    alone does not, so that a plain ``list`` stays instant)."""
    group = p.add_argument_group("model (optional)")
    group.add_argument("--model", default=None,
                       help="also load this model and print the decoder layers it uses, and where they come from")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: auto)")
    group.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"))
    add_calibration_option(group)
    p.set_defaults(layers=None, max_tokens_per_view=None, max_image_pixels=None)


def _list_arguments(p: argparse.ArgumentParser) -> None:
    add_store_options(p)
    add_list_model_options(p)


def cmd_list(args: argparse.Namespace) -> int:
    root = memory_dir(args)
    stored = stored_concepts(root)
    report_skipped(stored.skipped)
    names = stored.names()
    layers = None
    if getattr(args, "model", None):
        args.device, args.dtype = args.device or "auto", args.dtype or "auto"
        ego = load_engine(args)
        layers = layers_line(ego.layers, ego.layers_source)
    if not names:
        info(f"no concepts in {root}")
        if layers:
            print(layers)
        return 0
    header = ("NAME", "VIEWS", "TOKENS", "AREA", "KEYWORDS", "UPDATED", "MODEL")
    rows = []
    for name in names:
        m = stored.get(name)
        rows.append((name, str(m.num_views), str(m.num_tokens), f"{m.area_percent:.0f}%",
                     _short(", ".join(m.keywords), 40), _when(m.updated), m.model))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {1, 2, 3}  # numbers
    for row in (header, *rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    if layers:
        print(f"\n{layers}")
    return 0


def _forget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    add_store_options(p)


def cmd_forget(args: argparse.Namespace) -> int:
    from ego_ros.engine.figure import remove_views

    root = memory_dir(args)
    stored = stored_concepts(root)
    report_skipped(stored.skipped)
    memory = stored.get(args.name)
    stored.remove(memory.name)
    remove_views(root, memory.name)
    print(f"forgot {memory.name!r} ({memory.num_views} view{'s' * (memory.num_views != 1)}, "
          f"{memory.num_tokens} tokens)")
    return 0


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="image file to write")
    add_store_options(p)


def cmd_show(args: argparse.Namespace) -> int:
    from ego_ros.engine.figure import concept_figure, load_views

    root = memory_dir(args)
    stored = stored_concepts(root)
    report_skipped(stored.skipped)
    memory = stored.get(args.name)
    views = load_views(root, memory.name, memory.num_views)
    figure = concept_figure(memory, views)
    try:
        figure.save(args.out)  # the format from the extension
    except ValueError as error:  # PIL: "unknown file extension: .foo"
        raise ValueError(f"cannot write {args.out}: {error}; use a .png file name") from None
    missing = sum(v is None for v in views)
    note = f"; {missing} view{'s' * (missing != 1)} without a saved image, drawn on grey" if missing else ""
    print(f"wrote {args.out} ({figure.width}x{figure.height}){note}")
    return 0


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", metavar="DATA",
                   help="a folder of NAME.png (or .jpg) images with NAME.mask.png subject masks (white = subject), "
                        "or 'toy' for the toy world's scenes; leave out with --coco")
    p.add_argument("--coco", type=Path, default=None, metavar="ANNOTATIONS_JSON",
                   help="COCO instances file (e.g. instances_val2017.json): its images showing exactly one instance "
                        "of one category, with --images")
    p.add_argument("--images", type=Path, default=None, metavar="DIR", help="the folder of the COCO images")
    p.add_argument("--count", type=_positive_int, default=None, metavar="N",
                   help="use at most N images (default: all; 200 scenes for the toy world)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="the toy world's scenes (default: 0)")
    p.add_argument("--max-layers", type=_positive_int, default=None, metavar="L",
                   help="choose at most L layers (default: a quarter of the decoder, at least 1)")
    p.add_argument("--out", type=Path, default=None, metavar="PLOT.png",
                   help="also draw each layer's overlap, the chosen layers and the baselines")
    p.add_argument("--no-save", action="store_true",
                   help="only measure: keep the layers this model uses now")
    add_model_options(p)


def calibration_samples(args: argparse.Namespace):
    """The calibration data named on the command line, checked (layout, masks) before any model is loaded."""
    from ego_ros.engine import calibration_data

    if args.coco is not None or args.images is not None:
        if args.coco is None or args.images is None:
            raise UsageError("COCO data needs both --coco ANNOTATIONS_JSON and --images DIR")
        if args.data is not None:
            raise UsageError(f"give either DATA ({args.data}) or --coco, not both")
    elif args.data is None:
        raise UsageError("no calibration data: give a folder of image/mask pairs, 'toy', or --coco ANN --images DIR")
    if args.seed is not None and args.data != "toy":
        raise UsageError("--seed chooses the toy world's scenes; it only goes with DATA 'toy'")
    if args.coco is not None:
        return calibration_data.coco_samples(args.coco, args.images, args.count)
    if args.data == "toy":  # a folder called toy: ./toy
        return calibration_data.toy_samples(args.count, args.seed or 0)
    return calibration_data.folder_samples(args.data, args.count)


def _check_plot_path(path: Path | None) -> None:
    """Refuse an unwritable plot name now rather than after the whole run."""
    if path is None:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"cannot write the plot {path}: use a .png file name")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write the plot {path}: no folder {path.parent}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    require_model(args)
    if args.layers is not None:
        raise UsageError("calibrate measures every layer and chooses; --layers sets them by hand for other commands")
    engine_settings(args)
    samples = calibration_samples(args)
    _check_plot_path(args.out)
    from tqdm import tqdm

    ego = load_engine(args)
    with tqdm(total=len(samples), desc="calibrating", unit="image", file=sys.stderr) as bar:
        calibration = ego.calibrate(samples, max_layers=args.max_layers, source=samples.description,
                                    on_sample=lambda done, total: bar.update(1))
    print_calibration(calibration)
    if args.no_save:
        print(f"not saved (--no-save): this model keeps {layers_line(ego.layers, ego.layers_source)}")
    else:
        path = ego.save_calibration(calibration)
        print(f"saved {path}: this model now uses layers {_join(calibration.layers)} (unless --layers is given)")
    if args.out is not None:
        from ego_ros.engine.calibration_plot import plot_calibration

        plot_calibration(calibration, args.out)
        print(f"wrote {args.out}")
    return 0


def print_calibration(c) -> None:
    """The per-layer table, the choice, both rules' figures and the baselines."""
    from ego_ros.engine.calibration import MEASURE, RULES

    skipped = f"; {c.num_skipped} skipped (mask over no visual token, or every one)" if c.num_skipped else ""
    print(f"{c.num_images} image{'s' * (c.num_images != 1)} ({c.source}){skipped}")
    print("LAYER  OVERLAP    STD")
    for layer, (mean, std) in enumerate(zip(c.per_layer_overlap, c.per_layer_std)):
        print(f"{layer:>5}  {mean:>7.3f}  {std:>5.3f}" + ("  *" if layer in c.layers else ""))
    print(f"* chosen: layers {_join(c.layers)} ({c.rule} rule), overlap together {c.overlap:.3f}")
    print(f"  top rule ({RULES['top']}): {_join(c.top_layers)} -> {c.top_overlap:.3f}")
    print(f"  greedy rule ({RULES['greedy']}): {_join(c.greedy_layers)} -> {c.greedy_overlap:.3f}")
    print(f"  middle half (the default without calibration): {_join(c.default_layers)} -> {c.default_overlap:.3f}")
    print(f"  random tokens (K/N): {c.chance_overlap:.3f}")
    print(f"at most {c.max_layers} layer{'s' * (c.max_layers != 1)}; {MEASURE}")


def _join(layers) -> str:
    return ",".join(str(layer) for layer in layers)


COMMANDS: dict[str, Command] = {
    "register": Command("introduce a concept from reference views (or --append views)", _register_arguments,
                        cmd_register),
    "ask": Command("ask a question about an image or a clip, with your concepts in context", _ask_arguments,
                   cmd_ask),
    "recognize": Command("which concepts are in an image, with probabilities", _recognize_arguments, cmd_recognize),
    "list": Command("list the stored concepts (no model needed)", _list_arguments, cmd_list),
    "forget": Command("delete a concept (no model needed)", _forget_arguments, cmd_forget),
    "show": Command("draw a concept's kept tokens on its reference views (no model needed)", _show_arguments,
                    cmd_show),
    "calibrate": Command("choose the decoder layers that score tokens, from images with subject masks (§3.4)",
                         _calibrate_arguments, cmd_calibrate),
    "eval": Command(_evaluation_cli.HELP, _evaluation_cli.arguments, _evaluation_cli.run),
}


def commands() -> dict[str, Command]:
    """The offline commands, then the ROS client's (``ego_ros.ros.cli.COMMANDS``) when that module exists."""
    table = dict(COMMANDS)
    try:  # that module must import rclpy lazily, in its handlers, so that --help and the offline commands stay fast
        ros_cli = importlib.import_module("ego_ros.ros.cli")
    except ModuleNotFoundError as error:
        if error.name not in ("ego_ros.ros", "ego_ros.ros.cli"):
            raise
    else:
        table.update(ros_cli.COMMANDS)
    return table


def build_parser(table: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    title, rest = __doc__.replace("``", "").split("\n", 1)
    examples = rest.split("Examples::\n", 1)[1].split("\nErrors a user", 1)[0].rstrip()
    parser = _Parser(
        prog=PROG, description=title, epilog="examples:" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, command in (table if table is not None else commands()).items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, (ValueError, OSError, UsageError)):  # InvalidImage, InvalidName, ConceptExists, config
        return True
    engine = sys.modules.get("ego_ros.engine")  # not imported: none of its errors can have been raised
    return engine is not None and isinstance(error, (engine.UnknownConcept, engine.ModelLoadError))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    # `python -m ego_ros.cli` runs this file as __main__; ego_ros.ros.cli imports ego_ros.cli, a second copy of it.
    # Run the importable copy, so that the errors its handlers raise (UsageError...) are the ones main() catches.
    from ego_ros.cli import main as _main

    sys.exit(_main())
