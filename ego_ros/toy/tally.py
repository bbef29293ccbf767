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

from ego_ros.evaluation.metrics import ConceptCounts
from ego_ros.toy.camera import ToyCamera, ToyFrame

IN_VIEW = 0.6  # an instance counts as shown when this share of it is in the frame


class Tally:
    """Per personal instance of ``camera``, what was said about the frames added (module docstring)."""

    def __init__(self, camera: ToyCamera):
        self.camera = camera
        self.rows = {name: ConceptCounts() for name in camera.names}
        self.frames = 0

    def add(self, frame: ToyFrame, said_present: set[str]) -> None:
        self.frames += 1
        for name, instance in self.camera.names.items():
            shown = frame.share(instance)
            if shown >= IN_VIEW or shown == 0.0:  # a sliver at the edge is neither
                self.rows[name].add(said_yes=name in said_present, present=shown > 0.0)

    @property
    def macro_f1(self) -> float:
        return sum(c.f1 for c in self.rows.values()) / len(self.rows)

    def table(self) -> str:
        """A Markdown table, one row per instance, then the macro F1."""
        lines = [f"| instance | said present when >= {IN_VIEW:.0%} in view | said absent when out of view | "
                 "precision | recall | F1 |", "|---|---|---|---|---|---|"]
        for name, c in self.rows.items():
            shown, hidden = c.true_positives + c.false_negatives, c.true_negatives + c.false_positives
            lines.append(f"| {name} ({self.camera.names[name].phrase}) | {c.true_positives}/{shown} | "
                         f"{c.true_negatives}/{hidden} | {100 * c.precision:.0f} | {100 * c.recall:.0f} | "
                         f"{100 * c.f1:.0f} |")
        lines.append(f"\nmacro F1 {100 * self.macro_f1:.1f} over {self.frames} frames")
        return "\n".join(lines)
