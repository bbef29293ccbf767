# SPDX-License-Identifier: Apache-2.0
"""What the page may send, checked before anything reaches the node: a bad value is a :class:`BadInput` whose
message the page shows as it is, and nothing is sent."""

from __future__ import annotations

import math

from ego_ros.ros.requests import MAX_QUESTION_CHARS

MAX_NAME_CHARS = 200  # the node allows 64 and says so; this only bounds what is relayed
MAX_DESCRIPTION_CHARS = 1000


class BadInput(ValueError):
    """A request the page should not have sent; the message says what to fix."""


def shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


KINDS = {str: "text", int: "a whole number", list: "a list"}


def field(body: dict, key: str, kind: type, *, required: bool = True):
    """``body[key]`` of type ``kind`` (a JSON true is not a number); None when absent and not required."""
    if key not in body or body[key] is None:
        if required:
            raise BadInput(f"{key} is missing")
        return None
    value = body[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise BadInput(f"{key} must be {KINDS.get(kind, kind.__name__)}")
    return value


def text(body: dict, key: str, limit: int, *, required: bool = True) -> str:
    """A text field: at most ``limit`` characters; one that is required must not be blank."""
    value = field(body, key, str, required=required) or ""
    if len(value) > limit:
        raise BadInput(f"the {key} is {len(value)} characters long; at most {limit}")
    if "\x00" in value:
        raise BadInput(f"the {key} holds a NUL character")
    if required and not value.strip():
        raise BadInput(f"the {key} is empty")
    return value


def name(body: dict) -> str:
    return text(body, "name", MAX_NAME_CHARS)


def description(body: dict) -> str:
    return text(body, "description", MAX_DESCRIPTION_CHARS, required=False).strip()


def question(body: dict) -> str:
    return text(body, "question", MAX_QUESTION_CHARS).strip()


def frame_id(body: dict, *, required: bool = True) -> int | None:
    value = field(body, "frame", int, required=required)
    if value is not None and value < 1:
        raise BadInput(f"frame {value} is not a frame id")
    return value


def box(body: dict, width: int, height: int) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] in the frame's pixels (x1, y1 exclusive), rounded to whole pixels: inside the
    ``width`` x ``height`` frame and at least one pixel wide and high."""
    value = field(body, "box", list)
    if len(value) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise BadInput("box must be four numbers [x0, y0, x1, y1] in the frame's pixels")
    if not all(math.isfinite(v) for v in value):
        raise BadInput("box must be four finite numbers")
    x0, y0, x1, y1 = (round(v) for v in value)
    if x1 <= x0 or y1 <= y0:
        raise BadInput(f"the box [{x0}, {y0}, {x1}, {y1}] has no area: drag to draw one around the object")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise BadInput(f"the box [{x0}, {y0}, {x1}, {y1}] is not inside the {width}x{height} frame")
    return x0, y0, x1, y1
