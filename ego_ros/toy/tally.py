# SPDX-License-Identifier: Apache-2.0
"""What recognition said about the toy camera's frames, against what the frames showed.

The toy camera knows, for every frame, which share of each personal instance is in view. A :class:`Tally` counts,
per instance, how often it was said present in frames showing at least ``IN_VIEW`` of it, and said absent in frames
showing none of it; frames showing a part in between are not counted (a sliver at the edge is neither). Used by
``bench/toy_camera.py`` (the engine asked frame by frame) and by ``ego-ros camera toy --grade TOPIC`` (the node's
recognition events, graded by the camera that sent the frames; scripts/run.sh prints it when stopped).

    tally = Tally(camera)
    tally.add(camera.frame_at(t), said_present={"Rex"})
    tally.rows["Rex"].f1, tally.macro_f1, print(tally.table())
"""

from __future__ import annotations

from dataclasses import dataclass

from ego_ros.toy.camera import ToyCamera, ToyFrame

IN_VIEW = 0.6  # an instance counts as shown when this share of it is in the frame


@dataclass
class Counts:
    """One instance's frames: shown (>= IN_VIEW in view) and said present; hidden (none in view) and said absent."""

    shown: int = 0
    said_present: int = 0
    hidden: int = 0
    said_absent: int = 0

    @property
    def precision(self) -> float:
        said = self.said_present + (self.hidden - self.said_absent)
        return self.said_present / said if said else 0.0

    @property
    def recall(self) -> float:
        return self.said_present / self.shown if self.shown else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


class Tally:
    """Per personal instance of ``camera``, what was said about the frames added (module docstring)."""

    def __init__(self, camera: ToyCamera):
        self.camera = camera
        self.rows = {name: Counts() for name in camera.names}
        self.frames = 0

    def add(self, frame: ToyFrame, said_present: set[str]) -> None:
        self.frames += 1
        for name, instance in self.camera.names.items():
            shown = max((s.fraction for s in frame.visible if s.instance == instance), default=0.0)
            counts = self.rows[name]
            if shown >= IN_VIEW:
                counts.shown += 1
                counts.said_present += name in said_present
            elif shown == 0.0:
                counts.hidden += 1
                counts.said_absent += name not in said_present

    @property
    def macro_f1(self) -> float:
        return sum(c.f1 for c in self.rows.values()) / len(self.rows)

    def table(self) -> str:
        """A Markdown table, one row per instance, then the macro F1."""
        lines = [f"| instance | said present when >= {IN_VIEW:.0%} in view | said absent when out of view | "
                 "precision | recall | F1 |", "|---|---|---|---|---|---|"]
        for name, c in self.rows.items():
            lines.append(f"| {name} ({self.camera.names[name].phrase}) | {c.said_present}/{c.shown} | "
                         f"{c.said_absent}/{c.hidden} | {100 * c.precision:.0f} | {100 * c.recall:.0f} | "
                         f"{100 * c.f1:.0f} |")
        lines.append(f"\nmacro F1 {100 * self.macro_f1:.1f} over {self.frames} frames")
        return "\n".join(lines)
