# SPDX-License-Identifier: Apache-2.0
"""The offline half of ``ego-ros``: this machine's model and memory folder, no ROS.

Each handler takes the parsed arguments (:mod:`ego_ros.cli.commands` has the command lines and the rule that picks
this half or :mod:`ego_ros.cli.live`) and returns the exit status. The engine is imported inside the handlers, so
that ``ego-ros --help`` and the live half never load torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ego_ros.cli.common import (
    StreamPrinter, UsageError, concept_row, engine_settings, info, join, layers_line, load_engine,
    max_image_pixels, memory_dir, print_concepts, print_visits, report_skipped, require_concepts, require_model,
    robot_at, stored_concepts, warn,
)

TOY_CALIBRATION_SCENES = 200  # `ego-ros calibrate toy` without --count


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
    if args.box:  # and every box, against its view's own size
        from PIL import Image

        from ego_ros.engine.regions import check_region, regions_per_view

        for path, region in zip(args.images, regions_per_view(_one_or_each(args.box), len(args.images))):
            with Image.open(path) as opened:
                check_region(region, opened.size)
    ego = load_engine(args)
    before = ego.store.get(name).num_views if name in ego.store else 0
    with tqdm(total=len(images), desc=f"registering {name!r}", unit="view", file=sys.stderr,
              disable=len(images) < 2) as bar:
        concept = ego.register(name, list(args.images) if args.box else images, append=args.append,
                               area_percent=args.area, regions=_one_or_each(args.box),
                               description=args.description, on_view=lambda done, total: bar.update(1))
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


def _stored(args: argparse.Namespace):
    """(the memory folder, its concepts), having said which files in it could not be read."""
    root = memory_dir(args)
    stored = stored_concepts(root)
    report_skipped(stored.skipped)
    return root, stored


def cmd_list(args: argparse.Namespace) -> int:
    root, stored = _stored(args)
    names = stored.names()
    layers = None
    if args.model:  # list --model: also the layers that model uses (loads it)
        ego = load_engine(args)
        layers = layers_line(ego.layers, ego.layers_source)
    if not names:
        info(f"no concepts in {root}")
        if layers:
            print(layers)
        return 0
    rows = []
    for name in names:
        m = stored.get(name)
        rows.append(concept_row(name, m.num_views, m.num_tokens, m.area_percent, m.keywords, m.updated, m.model))
    print_concepts(rows)
    if layers:
        print(f"\n{layers}")
    return 0


def forget_sightings(root: Path, name: str) -> None:
    """A forgotten concept's visits go with it (when the folder has a sightings database)."""
    from ego_ros.sightings import FILE_NAME, SightingsStore

    if (root / FILE_NAME).exists():
        store = SightingsStore(root / FILE_NAME)
        store.forget(name)
        store.close()


def cmd_last_seen(args: argparse.Namespace) -> int:
    from ego_ros.sightings import FILE_NAME, SightingsStore

    root, stored = _stored(args)
    name = stored.get(args.name).name  # an unknown name: UnknownConcept, naming the known ones
    now = time.time()
    since = now - args.since if args.since else None
    visits = SightingsStore(root / FILE_NAME, readonly=True).last_seen(name, since=since, camera=args.camera,
                                                                       limit=args.max_results)
    print_visits(name, [(v.camera, v.first_seen, v.last_seen, v.sightings, v.best_score,
                         robot_at(v.pose.frame_id, *v.pose.position[:2]) if v.pose else v.pose_note)
                        for v in visits], args, now, searched=f" (in {root / FILE_NAME})")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from ego_ros.engine.figure import remove_views

    root, stored = _stored(args)
    memory = stored.get(args.name)
    stored.remove(memory.name)
    remove_views(root, memory.name)
    forget_sightings(root, memory.name)
    print(f"forgot {memory.name!r} ({memory.num_views} view{'s' * (memory.num_views != 1)}, "
          f"{memory.num_tokens} tokens)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ego_ros.engine.figure import concept_figure, load_views

    root, stored = _stored(args)
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
        from ego_ros import toy

        seed = args.seed or 0
        return calibration_data.pair_samples(toy.calibration_samples(args.count or TOY_CALIBRATION_SCENES, seed),
                                             f"toy world, seed {seed}")
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
        print(f"saved {path}: this model now uses layers {join(calibration.layers)} (unless --layers is given)")
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
    print(f"* chosen: layers {join(c.layers)} ({c.rule} rule), overlap together {c.overlap:.3f}")
    print(f"  top rule ({RULES['top']}): {join(c.top_layers)} -> {c.top_overlap:.3f}")
    print(f"  greedy rule ({RULES['greedy']}): {join(c.greedy_layers)} -> {c.greedy_overlap:.3f}")
    print(f"  middle half (the default without calibration): {join(c.default_layers)} -> {c.default_overlap:.3f}")
    print(f"  random tokens (K/N): {c.chance_overlap:.3f}")
    print(f"at most {c.max_layers} layer{'s' * (c.max_layers != 1)}; {MEASURE}")


def _one_or_each(boxes):
    """``--box`` given once (one box for all views), once per view, or not at all."""
    return boxes[0] if boxes and len(boxes) == 1 else boxes
