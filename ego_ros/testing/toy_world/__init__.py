# SPDX-License-Identifier: Apache-2.0
"""The toy world: procedural scenes with exact ground truth, and a small Qwen2.5-VL trained on them here.

It makes the method measurable on a machine without real weights: calibration data (images with masks), personal
instances to recognise, a camera source, and a model that has learned to see them.

    from ego_ros.testing import toy_world
    scene = toy_world.scene(seed=3)                  # scene.image (PIL), scene.objects[0] is the main subject
    scene.subject.mask, scene.subject.box, scene.subject.instance.keywords
    mine = toy_world.personal_instances(10, seed=0)  # patterned objects: "my mug", told apart by a detail
    view = toy_world.view_of(mine[0], seed=1)        # a new view of one of them (position, scale, rotation, scene)
    toy_world.calibration_samples(50, seed=0)        # [(image, mask)] of main subjects
    toy_world.model_dir("build/toy-model")           # the trained checkpoint, trained first if missing

Command line (``python -m ego_ros.testing.toy_world --help``)::

    python -m ego_ros.testing.toy_world scenes OUT_DIR --count 20 --seed 0   # NAME.png, NAME.mask.png, scenes.json
    python -m ego_ros.testing.toy_world model OUT_DIR                       # trained checkpoint (trains if needed)
    python -m ego_ros.testing.toy_world train OUT_DIR --seed 0              # always trains
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ego_ros.engine.memory import _atomic_write  # the store's: temp file, fsync, os.replace

from .scenes import (COLOURS, KINDS, PATTERNS, Instance, PlacedObject, Scene, look_alike, personal_instances,
                     random_instance, render_scene)

__all__ = ["COLOURS", "KINDS", "PATTERNS", "Instance", "PlacedObject", "Scene", "calibration_samples",
           "look_alike", "model_dir", "personal_instances", "random_instance", "render_scene", "scene", "view_of",
           "write_scenes"]


def scene(seed: int) -> Scene:
    """One random scene: a main subject and 0-2 smaller distractors."""
    return render_scene(np.random.default_rng([seed, 0x5CE]))


def view_of(instance: Instance, seed: int, *, distractors: int | None = None) -> Scene:
    """A view of ``instance`` as the main subject of a new scene (its own position, scale, rotation, background)."""
    return render_scene(np.random.default_rng([seed, 0x71E]), instance, distractors=distractors)


def calibration_samples(count: int, seed: int = 0) -> list[tuple[Image.Image, np.ndarray]]:
    """``count`` (image, mask of the main subject) pairs, the data of layer calibration (paper §3.4)."""
    return [(s.image, s.subject.mask) for s in (scene(seed * 1_000_003 + i) for i in range(count))]


def write_scenes(out_dir: Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` scenes: ``NAME.png``, the main subject's ``NAME.mask.png`` and ``scenes.json``."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for i in range(count):
        name = f"scene_{seed}_{i:05d}"
        made = scene(seed * 1_000_003 + i)
        made.image.save(out_dir / f"{name}.png")
        Image.fromarray(made.subject.mask.astype(np.uint8) * 255, "L").save(out_dir / f"{name}.mask.png")
        records[name] = made.to_json()
    _atomic_write(out_dir / "scenes.json", (json.dumps({"seed": seed, "scenes": records}, indent=1) + "\n").encode())
    return out_dir


def model_dir(out_dir: Path, *, seed: int = 0, progress: bool = True) -> Path:
    """The trained toy model in ``out_dir``, trained first (about 10 minutes on 2 cores) if it is not there."""
    from .train import model_dir as trained

    return trained(Path(out_dir), seed=seed, progress=progress)
