# SPDX-License-Identifier: Apache-2.0
"""A procedural world of coloured objects with exact ground truth: the data a small model can learn to see from.

Objects are of a few *kinds* (ball, box, mug, bottle, star) in a few body *colours*; an object may carry a
*pattern* (stripes, dots, checks) drawn in an *accent* colour. An :class:`Instance` is one particular object: kind,
colour, pattern and accent. Personal instances ("my mug") are patterned, so that another instance of the same kind
and colour differs from it only by a detail (another pattern, or the same pattern in another accent colour): a
model must look at the detail to tell them apart, as it must tell *my* mug from *a* mug.

A :class:`Scene` is a square image (224 px by default) of one main subject (the largest object) and up to two
smaller distractors on a noisy, near-grey background with a few clutter lines. Each object is drawn on its own layer,
rotated a little and placed without overlap, so every object's mask is exact. Everything is drawn from a NumPy
``Generator``: the same seed gives the same pixels.

The words used for an instance (its kind, colour and pattern) are the vocabulary of the toy model's answers; the
accent colour is never said, which is what makes it a *personal* detail.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ego_ros.engine.memory import _atomic_write  # the store's: temp file, fsync, os.replace

KINDS = ("ball", "box", "mug", "bottle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "orange": (250, 140, 20),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
# The keyword each pattern is described with (a plain object has none).
PATTERN_WORDS = {"plain": None, "striped": "stripes", "dotted": "dots", "checked": "checks"}

SIZE = 224  # scene side in pixels: 8 x 8 visual tokens of 28 px for Qwen2.5-VL
SUBJECT_SIDE = (90, 140)  # the main subject's layer side, pixels (before rotation)
DISTRACTOR_SIDE = (32, 56)
MAX_ROTATION = 15.0  # degrees, either way


@dataclass(frozen=True)
class Instance:
    """One particular object. ``accent`` is None exactly when ``pattern`` is "plain"."""

    kind: str
    colour: str
    pattern: str = "plain"
    accent: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS or self.colour not in COLOURS or self.pattern not in PATTERNS:
            raise ValueError(f"unknown kind, colour or pattern in {self}")
        if (self.pattern == "plain") != (self.accent is None):
            raise ValueError(f"{self}: a plain object has no accent colour, a patterned one has one")
        if self.accent is not None and (self.accent not in COLOURS or self.accent == self.colour):
            raise ValueError(f"{self}: the accent must be another known colour")

    @property
    def keywords(self) -> list[str]:
        """What a model says of it: colour, kind and the pattern's word (never the accent colour)."""
        words = [self.colour, self.kind]
        if PATTERN_WORDS[self.pattern]:
            words.append(PATTERN_WORDS[self.pattern])
        return words

    @property
    def phrase(self) -> str:
        """A noun phrase: "red mug with stripes", "blue ball"."""
        word = PATTERN_WORDS[self.pattern]
        return f"{self.colour} {self.kind}" + (f" with {word}" if word else "")

    @property
    def label(self) -> str:
        """A unique, readable id: "red-mug-striped-white"."""
        return "-".join(p for p in (self.colour, self.kind, self.pattern, self.accent) if p and p != "plain")


@dataclass
class PlacedObject:
    instance: Instance
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    mask: np.ndarray = field(repr=False)  # (H, W) bool
    role: str = "distractor"  # "subject" for the main subject

    @property
    def area_percent(self) -> float:
        return 100.0 * float(self.mask.mean())

    def to_json(self) -> dict:
        return {"role": self.role, **asdict(self.instance), "label": self.instance.label, "box": list(self.box),
                "area_percent": round(self.area_percent, 2)}


@dataclass
class Scene:
    image: Image.Image  # RGB, SIZE x SIZE
    objects: list[PlacedObject]  # objects[0] is the main subject

    @property
    def subject(self) -> PlacedObject:
        return self.objects[0]

    def contains(self, instance: Instance) -> bool:
        return any(o.instance == instance for o in self.objects)

    def to_json(self) -> dict:
        return {"objects": [o.to_json() for o in self.objects]}


# --- instances ----------------------------------------------------------------------------------------------------


def random_instance(rng: np.random.Generator, *, kind: str | None = None, colour: str | None = None,
                    patterned: bool | None = None) -> Instance:
    kind = kind or _pick(rng, KINDS)
    colour = colour or _pick(rng, list(COLOURS))
    if patterned is None:
        patterned = rng.random() < 0.6
    if not patterned:
        return Instance(kind, colour)
    return Instance(kind, colour, _pick(rng, PATTERNS[1:]), _pick(rng, [c for c in COLOURS if c != colour]))


def personal_instances(count: int, seed: int) -> list[Instance]:
    """``count`` distinct patterned instances, different kinds and colours first: "my" objects."""
    rng = np.random.default_rng([seed, 0x0E60])
    chosen: list[Instance] = []
    while len(chosen) < count:
        candidate = random_instance(rng, patterned=True)
        same_look = sum(1 for c in chosen if (c.kind, c.colour) == (candidate.kind, candidate.colour))
        if candidate not in chosen and same_look <= len(chosen) // (len(KINDS) * len(COLOURS)):
            chosen.append(candidate)
    return chosen


def look_alike(instance: Instance, rng: np.random.Generator) -> Instance:
    """Same kind and colour, another detail: another pattern, or the same pattern in another accent colour."""
    while True:
        other = random_instance(rng, kind=instance.kind, colour=instance.colour, patterned=rng.random() < 0.85)
        if other != instance:
            return other


# --- scenes -------------------------------------------------------------------------------------------------------


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


# --- drawing ------------------------------------------------------------------------------------------------------


def render_scene(rng: np.random.Generator, subject: Instance | None = None, *,
                 distractors: list[Instance] | int | None = None, size: int = SIZE,
                 subject_side: tuple[int, int] = SUBJECT_SIDE) -> Scene:
    """A scene whose main subject is ``subject`` (random if None), with ``distractors`` (instances, a count, or
    a random count of 0-2) drawn smaller and without overlap."""
    subject = subject or random_instance(rng)
    if distractors is None:
        distractors = int(rng.integers(0, 3))
    if isinstance(distractors, int):
        distractors = [random_instance(rng) for _ in range(distractors)]
    canvas = _background(rng, size)
    taken: list[tuple[int, int, int, int]] = []
    objects = []
    for role, instance in [("subject", subject)] + [("distractor", d) for d in distractors]:
        side = int(rng.integers(*subject_side)) if role == "subject" else int(rng.integers(*DISTRACTOR_SIDE))
        layer = _object_layer(instance, side, rng)
        placed = _place(layer, size, taken, rng)
        if placed is None:  # no free room left for this distractor: the scene has fewer of them
            continue
        x, y = placed
        canvas.paste(layer, (x, y), layer)
        mask = np.zeros((size, size), dtype=bool)
        alpha = np.asarray(layer.getchannel("A")) > 127
        mask[y : y + layer.height, x : x + layer.width] = alpha
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        taken.append((x, y, x + layer.width, y + layer.height))
        objects.append(PlacedObject(instance, box, mask, role))
    return Scene(_add_noise(canvas, rng), objects)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A near-grey tint with a vertical gradient and a few thin clutter lines: texture, but never an object (the
    objects' colours are saturated, the background's are not)."""
    tint = int(rng.integers(90, 170)) + rng.integers(-8, 9, 3)
    ramp = np.linspace(-15, 15, size)[:, None, None] * rng.choice([-1, 1])
    pixels = np.clip(tint[None, None, :] + ramp + np.zeros((size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        shade = tuple(int(v) for v in np.clip(tint + rng.integers(-40, 40, 3), 0, 255))
        draw.line([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)], fill=shade,
                  width=int(rng.integers(1, 4)))
    return image


def _add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 10, (image.height, image.width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _object_layer(instance: Instance, side: int, rng: np.random.Generator) -> Image.Image:
    """The object drawn on a transparent ``side`` x ``side`` layer, pattern clipped to its silhouette, rotated."""
    silhouette = Image.new("L", (side, side), 0)
    _draw_silhouette(ImageDraw.Draw(silhouette), instance.kind, side)
    body = Image.new("RGB", (side, side), COLOURS[instance.colour])
    if instance.pattern != "plain":
        _draw_pattern(ImageDraw.Draw(body), instance.pattern, COLOURS[instance.accent], side)
    layer = body.convert("RGBA")
    layer.putalpha(silhouette)
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    layer = layer.rotate(angle, resample=Image.BILINEAR, expand=True)
    return layer.crop(layer.getbbox())


def _draw_silhouette(draw: ImageDraw.ImageDraw, kind: str, s: int) -> None:
    if kind == "ball":
        draw.ellipse([0, 0, s - 1, s - 1], fill=255)
    elif kind == "box":
        draw.rectangle([s * 0.08, s * 0.08, s * 0.92, s * 0.92], fill=255)
    elif kind == "mug":  # a body with a ring handle on the right
        draw.rectangle([0, s * 0.12, s * 0.72, s * 0.98], fill=255)
        draw.ellipse([s * 0.5, s * 0.3, s * 0.99, s * 0.8], fill=255)
        draw.ellipse([s * 0.66, s * 0.43, s * 0.86, s * 0.67], fill=0)
    elif kind == "bottle":  # a tall body, shoulders and a neck
        draw.rectangle([s * 0.25, s * 0.38, s * 0.75, s * 0.99], fill=255)
        draw.polygon([(s * 0.25, s * 0.4), (s * 0.4, s * 0.22), (s * 0.6, s * 0.22), (s * 0.75, s * 0.4)], fill=255)
        draw.rectangle([s * 0.4, 0, s * 0.6, s * 0.24], fill=255)
    elif kind == "star":
        centre, outer, inner = s / 2, s / 2, s / 4.6
        points = [(centre + (outer if i % 2 == 0 else inner) * math.sin(i * math.pi / 5),
                   centre - (outer if i % 2 == 0 else inner) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown kind {kind!r}")


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: str, accent: tuple[int, int, int], s: int) -> None:
    """The pattern in the accent colour, over at most about a quarter of the object: the body colour stays the
    object's colour, the pattern a detail."""
    period = max(8, s // 6)  # a few repeats across any object, at least a few pixels each
    if pattern == "striped":  # thin horizontal stripes
        for y in range(period // 2, s, period):
            draw.rectangle([0, y, s, y + period // 4 - 1], fill=accent)
    elif pattern == "dotted":  # small dots on a grid
        r = max(2, period // 6)
        for y in range(period // 2, s, period):
            for x in range(period // 2, s, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    elif pattern == "checked":  # small squares in every other cell
        side = max(3, period // 2)
        for y in range(0, s, period):
            for x in range(0, s, period):
                if (x // period + y // period) % 2:
                    draw.rectangle([x, y, x + side - 1, y + side - 1], fill=accent)


def _place(layer: Image.Image, size: int, taken, rng: np.random.Generator, tries: int = 60):
    """A top-left corner where ``layer`` fits inside the scene without touching a taken box (4 px apart)."""
    if layer.width > size or layer.height > size:
        raise ValueError(f"a {layer.width}x{layer.height} object does not fit a {size} px scene")
    for _ in range(tries):
        x, y = int(rng.integers(0, size - layer.width + 1)), int(rng.integers(0, size - layer.height + 1))
        box = (x - 4, y - 4, x + layer.width + 4, y + layer.height + 4)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return x, y
    return None


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]
