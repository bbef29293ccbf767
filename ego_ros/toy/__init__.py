# SPDX-License-Identifier: Apache-2.0
"""The toy world, a product part: procedural scenes with exact ground truth, a camera panning over them, and a small
Qwen2.5-VL trained on them here.

It makes the method measurable and demonstrable on a machine without real weights: calibration data (images with
masks), personal instances to recognise, a camera source (``ego-ros camera toy``), and a model that has learned to
see them (what ``scripts/run.sh`` serves when no model is given).

    from ego_ros import toy
    scene = toy.scene(seed=3)                  # scene.image (PIL), scene.objects[0] is the main subject
    scene.subject.mask, scene.subject.box, scene.subject.instance.keywords
    mine = toy.personal_instances(10, seed=0)  # patterned objects: "my mug", told apart by a detail
    view = toy.view_of(mine[0], seed=1)        # a new view of one of them (position, scale, rotation, scene)
    toy.calibration_samples(50, seed=0)        # [(image, mask)] of main subjects
    toy.model_dir("build/toy-model")           # the trained checkpoint, trained first if missing

Modules: ``world`` (instances, scenes, drawing), ``camera`` (the panning camera), ``tasks`` (what the model is
taught, in the engine's prompt format), ``train`` (the recipe and its model card).

Command line (``python -m ego_ros.toy --help``)::

    python -m ego_ros.toy scenes OUT_DIR --count 20 --seed 0   # NAME.png, NAME.mask.png, scenes.json
    python -m ego_ros.toy model OUT_DIR                       # trained checkpoint (trains if needed)
    python -m ego_ros.toy train OUT_DIR --seed 0              # always trains
"""

from __future__ import annotations

from pathlib import Path

from .world import (COLOURS, KINDS, PATTERNS, Instance, PlacedObject, Scene, calibration_samples, look_alike,
                    personal_instances, random_instance, render_scene, scene, view_of, write_scenes)

__all__ = ["COLOURS", "KINDS", "PATTERNS", "Instance", "PlacedObject", "Scene", "calibration_samples",
           "look_alike", "model_dir", "personal_instances", "random_instance", "render_scene", "scene", "view_of",
           "write_scenes"]


def model_dir(out_dir: Path, *, seed: int = 0, progress: bool = True) -> Path:
    """The trained toy model in ``out_dir``, trained first (about 10 minutes on 2 cores) if it is not there."""
    from .train import model_dir as trained

    return trained(Path(out_dir), seed=seed, progress=progress)
