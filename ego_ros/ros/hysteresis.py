# SPDX-License-Identifier: Apache-2.0
"""Per-frame recognition scores -> which concepts are present, and which appeared or disappeared.

A score that hovers around the threshold (0.52, 0.48, 0.51, ...) would announce the mug appearing and disappearing
every frame. Two thresholds and a count fix that: a concept appears once its score is >= ``on_threshold`` for
``min_on_frames`` updates in a row, and disappears only once it is < ``off_threshold`` (lower) for
``min_off_frames`` updates in a row, or when it is no longer scored at all (forgotten). Between the two thresholds
nothing changes. One tracker per camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

DEFAULT_GAP = 0.1  # off_threshold defaults to on_threshold - DEFAULT_GAP


class PresenceUpdate(NamedTuple):
    present: dict[str, float]  # name -> this update's score, for every concept present after it
    appeared: list[str]
    disappeared: list[str]


@dataclass
class _State:
    present: bool = False
    # Consecutive updates pointing to the other state: above `on` while absent, below `off` while present.
    streak: int = 0


class PresenceTracker:
    def __init__(self, on_threshold: float, off_threshold: float | None = None,
                 min_on_frames: int = 1, min_off_frames: int = 2):
        if not _number(on_threshold) or not 0.0 <= on_threshold <= 1.0:
            raise ValueError(f"on_threshold must be in [0, 1], got {on_threshold!r}")
        if off_threshold is None:
            off_threshold = max(0.0, on_threshold - DEFAULT_GAP)
        if not _number(off_threshold) or not 0.0 <= off_threshold <= on_threshold:
            raise ValueError(f"off_threshold must be in [0, on_threshold={on_threshold}], got {off_threshold!r}")
        for field, value in (("min_on_frames", min_on_frames), ("min_off_frames", min_off_frames)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        self.on_threshold = float(on_threshold)
        self.off_threshold = float(off_threshold)
        self.min_on_frames = min_on_frames
        self.min_off_frames = min_off_frames
        self._states: dict[str, _State] = {}

    def update(self, scores: Mapping[str, float]) -> PresenceUpdate:
        """Feed one frame's scores (every known concept). A NaN score counts as "not seen"."""
        present, appeared, disappeared = {}, [], []
        for name, score in scores.items():
            state = self._states.setdefault(name, _State())
            score = float(score)
            if state.present:
                state.streak = state.streak + 1 if not score >= self.off_threshold else 0  # NaN counts as below
                if state.streak >= self.min_off_frames:
                    state.present, state.streak = False, 0
                    disappeared.append(name)
            else:
                state.streak = state.streak + 1 if score >= self.on_threshold else 0
                if state.streak >= self.min_on_frames:
                    state.present, state.streak = True, 0
                    appeared.append(name)
            if state.present:
                present[name] = score
        for name in [name for name in self._states if name not in scores]:  # forgotten: gone for good
            if self._states.pop(name).present:
                disappeared.append(name)
        return PresenceUpdate(present, appeared, disappeared)

    @property
    def present(self) -> list[str]:
        return [name for name, state in self._states.items() if state.present]

    def set_thresholds(self, on_threshold: float, off_threshold: float, min_off_frames: int | None = None,
                       min_on_frames: int | None = None) -> None:
        """New thresholds (a live parameter change); presence so far is kept and judged by them from now on."""
        checked = PresenceTracker(on_threshold, off_threshold,
                                  self.min_on_frames if min_on_frames is None else min_on_frames,
                                  self.min_off_frames if min_off_frames is None else min_off_frames)
        self.on_threshold, self.off_threshold = checked.on_threshold, checked.off_threshold
        self.min_on_frames, self.min_off_frames = checked.min_on_frames, checked.min_off_frames

    def reset(self) -> None:
        """Forget all state (camera restarted, node deactivated): everything present will appear again."""
        self._states.clear()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
