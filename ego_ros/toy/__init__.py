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
    toy.model_dir()                            # the committed trained checkpoint (ego_ros/toy/model/)
    toy.model_dir("build/toy-model")           # one trained here, first if missing or stale

Modules: ``world`` (instances, scenes, drawing), ``camera`` (the panning camera), ``tasks`` (what the model is
taught, in the engine's prompt format), ``train`` (the recipe and its model card).

Command line (``python -m ego_ros.toy --help``)::

    python -m ego_ros.toy scenes OUT_DIR --count 20 --seed 0   # NAME.png, NAME.mask.png, scenes.json
    python -m ego_ros.toy model                               # the committed checkpoint's folder
    python -m ego_ros.toy model OUT_DIR                       # a checkpoint in OUT_DIR (trains if needed)
    python -m ego_ros.toy train OUT_DIR --seed 0              # always trains (about 30 minutes on two cores)
"""

from __future__ import annotations

from pathlib import Path

from .world import (COLOURS, KINDS, PATTERNS, Instance, PlacedObject, Scene, calibration_samples, look_alike,
                    personal_instances, random_instance, render_scene, scene, view_of, write_scenes)

__all__ = ["CHECKPOINT", "COLOURS", "KINDS", "PATTERNS", "Instance", "PlacedObject", "Scene", "StaleCheckpoint",
           "calibration_samples", "look_alike", "model_dir", "personal_instances", "random_instance", "render_scene",
           "scene", "view_of", "write_scenes"]


# The toy model this project trained with its own recipe and committed, like a golden test fixture: what the
# tests, the demo and the evaluation use, so none of them trains. Its card is CHECKPOINT / "toy_world.json".
CHECKPOINT = Path(__file__).resolve().parent / "model"


class StaleCheckpoint(RuntimeError):
    """The committed toy model was not made by the recipe as it now is."""


def model_dir(out_dir: Path | None = None, *, seed: int = 0, progress: bool = True) -> Path:
    """The trained toy model: the committed one (``out_dir`` None), which must match the recipe as it is; or the
    one in ``out_dir``, trained there first (about 30 minutes on 2 cores) if it is missing or stale."""
    from .train import is_current
    from .train import model_dir as trained

    if out_dir is None:
        if not is_current(CHECKPOINT, seed=seed):
            raise StaleCheckpoint(f"the committed toy model ({CHECKPOINT}) was not made by the recipe as it is now: "
                                  f"retrain it with `python -m ego_ros.toy train {CHECKPOINT}` and commit it with "
                                  "the change")
        return CHECKPOINT
    return trained(Path(out_dir), seed=seed, progress=progress)
