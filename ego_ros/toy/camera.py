# SPDX-License-Identifier: Apache-2.0
"""The toy world as a camera: a pan along a strip of toy scenes, the personal instances moving in and out of view.

The strip alternates *shots*: one of the personal instances (``world.view_of``: the main subject of a new
scene) and a scene of other objects, none of them personal. The camera rests on a shot for ``dwell`` seconds, then
pans to the next one in ``move`` seconds, so each personal instance slides in, stays, and slides out. A frame is a
function of time alone (:meth:`ToyCamera.frame_at`), with its exact ground truth: which objects it shows, where,
and how much of each. Scenes are 224 x 224, the size the toy model was trained on.

    camera = ToyCamera()
    frame = camera.frame_at(1.5)        # frame.image: (224, 224, 3) uint8 RGB; frame.visible: [Sighting]
    camera.names                        # {"Rex": Instance(...), ...}: the names run.sh registers them under
    camera.reference_views("Rex", 3)    # other views of Rex (seeds the strip never uses), to register it from

Command line: ``python -m ego_ros.toy.camera views OUT_DIR [--views N]`` writes ``NAME_k.png``, the
reference views of each personal instance, for ``ego-ros register NAME OUT_DIR/NAME_*.png``;
``python -m ego_ros.toy.camera frame SECONDS OUT.png`` writes the frame at that time of the pan, and says which
instances it shows and how much of each.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ego_ros.toy.world import Instance, Scene, personal_instances, random_instance, render_scene, view_of

# Names of the personal instances, in order (ordinary names: the toy model was taught made-up ones of random letters).
NAMES = ("Rex", "Anna", "Milo", "Kiki", "Otto", "Luna")
SHOT_SEED = 0xCA3  # the strip's scenes; reference views use other seeds (REFERENCE_SEED)
REFERENCE_SEED = 0x4EF


@dataclass(frozen=True)
class Sighting:
    """One object of a frame: its instance, its box in frame pixels (x0, y0, x1, y1, exclusive), and the share of
    its mask inside the frame (1.0: wholly in view)."""

    instance: Instance
    box: tuple[int, int, int, int]
    fraction: float


@dataclass(frozen=True)
class ToyFrame:
    image: np.ndarray  # (size, size, 3) uint8 RGB
    visible: tuple[Sighting, ...]  # objects with any part in view

    def shows(self, instance: Instance, fraction: float = 1.0) -> bool:
        """Whether at least ``fraction`` of ``instance`` is in view."""
        return self.share(instance) >= fraction

    def share(self, instance: Instance) -> float:
        """How much of ``instance`` is in view: 0 (none of it) to 1 (all of it)."""
        return max((s.fraction for s in self.visible if s.instance == instance), default=0.0)


class ToyCamera:
    """Frames of a pan along the toy world's strip of shots (module docstring); the same arguments give the same
    frames."""

    def __init__(self, instances: int = 3, *, seed: int = 0, dwell: float = 3.0, move: float = 2.0):
        if not 1 <= instances <= len(NAMES):
            raise ValueError(f"the toy camera shows 1 to {len(NAMES)} personal instances, not {instances}")
        if dwell < 0 or move <= 0:
            raise ValueError(f"dwell must be >= 0 and move > 0 seconds, got {dwell} and {move}")
        self.seed, self.dwell, self.move = seed, float(dwell), float(move)
        self.names: dict[str, Instance] = dict(zip(NAMES, personal_instances(instances, seed)))
        self._shot = lru_cache(maxsize=8)(self._render_shot)

    @property
    def period(self) -> float:
        """Seconds from one shot to the next."""
        return self.dwell + self.move

    def shot(self, index: int) -> Scene:
        """The strip's shot ``index``: even ones show personal instance ``index // 2`` (in turn), odd ones none."""
        return self._shot(index)

    def _render_shot(self, index: int) -> Scene:
        mine = list(self.names.values())
        if index % 2 == 0:
            return view_of(mine[(index // 2) % len(mine)], seed=self.seed * 1_000_003 + index, distractors=0)
        rng = np.random.default_rng([self.seed, SHOT_SEED, index])
        while True:  # other objects only: a random instance is patterned like a personal one, rarely the same
            scene = render_scene(rng, random_instance(rng), distractors=[random_instance(rng)])
            if not any(scene.contains(instance) for instance in mine):
                return scene

    def frame_at(self, t: float) -> ToyFrame:
        """The frame at ``t`` seconds from the start (t >= 0)."""
        index = int(math.floor(max(t, 0.0) / self.period))
        phase = max(t, 0.0) - index * self.period
        first = self.shot(index)
        size = first.image.width
        progress = 0.0 if phase < self.dwell else (phase - self.dwell) / self.move
        offset = min(size, int(round(size * (3 * progress ** 2 - 2 * progress ** 3))))  # eased pan
        parts = [(first, -offset)] + ([(self.shot(index + 1), size - offset)] if offset else [])
        # Scene pixel column x lands on frame column x + shift: the frame shows scene columns [-shift, size - shift).
        image = np.concatenate([np.asarray(scene.image)[:, max(0, -shift): size - max(0, shift)]
                                for scene, shift in parts], axis=1)
        visible = []
        for scene, shift in parts:
            for placed in scene.objects:
                x0, y0, x1, y1 = placed.box
                lo, hi = max(x0 + shift, 0), min(x1 + shift, size)
                if hi <= lo:
                    continue
                columns = placed.mask.sum(axis=0)  # mask pixels per column of the scene
                inside = columns[max(0, -shift): size - max(0, shift)].sum()
                visible.append(Sighting(placed.instance, (lo, y0, hi, y1), float(inside) / float(columns.sum())))
        return ToyFrame(np.ascontiguousarray(image), tuple(visible))

    def reference_views(self, name: str, count: int = 3) -> list[np.ndarray]:
        """``count`` views of the personal instance ``name`` that the strip never shows (to register it from)."""
        instance = self.names[name]
        return [np.asarray(view_of(instance, seed=REFERENCE_SEED * 1_000_003 + 97 * NAMES.index(name) + k,
                                   distractors=0).image) for k in range(count)]


def write_reference_views(out_dir: Path, camera: ToyCamera, count: int) -> list[Path]:
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in camera.names:
        for k, view in enumerate(camera.reference_views(name, count)):
            written.append(out_dir / f"{name}_{k}.png")
            Image.fromarray(view).save(written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ego_ros.toy.camera", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    views = commands.add_parser("views", help="write NAME_k.png: reference views of each personal instance")
    views.add_argument("out_dir", type=Path)
    views.add_argument("--views", type=int, default=3, help="views per instance (default: 3)")
    views.add_argument("--instances", type=int, default=3,
                       help="personal instances (default: 3, as ego-ros camera toy)")
    frame = commands.add_parser("frame", help="write the camera's frame at SECONDS into its pan as a PNG, and say "
                                              "which instances it shows")
    frame.add_argument("seconds", type=float)
    frame.add_argument("out", type=Path)
    frame.add_argument("--instances", type=int, default=3)
    args = parser.parse_args(argv)
    camera = ToyCamera(args.instances)
    if args.command == "frame":
        from PIL import Image

        shot = camera.frame_at(args.seconds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shot.image).save(args.out)
        for name, instance in camera.names.items():
            share = shot.share(instance)
            if share > 0:
                print(f"{name}\t{instance.phrase}\t{share:.0%} in view")
        return 0
    write_reference_views(args.out_dir, camera, args.views)
    for name, instance in camera.names.items():
        print(f"{name}\t{instance.phrase}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
