# SPDX-License-Identifier: Apache-2.0
"""Layer calibration (paper §3.4): which decoder layers' keyword->image attention best finds the subject.

Eq. 3 averages keyword-to-image attention over a set of layers L. Which layers localise the subject depends on the
model, so the paper picks them once per model on images with segmentation masks. Here:

1. For each calibration image (with a mask of its main subject) the model describes the subject with the same
   keyword prompt as ``register``, and one teacher-forced pass scores every visual token on *every* decoder layer
   (``scoring.score_visual_tokens_per_layer``, (layers, N)).
2. Ground truth per token: the mask, resized to the image the vision encoder saw (gw*14 x gh*14 px, see figure.py),
   marks a token as *subject* when at least half of its 28x28 px block is mask.
3. The measure (:data:`MEASURE`): per image, with K its number of subject tokens, the share of the K
   highest-scoring tokens that are subject tokens (R-precision, which equals recall at K), averaged over images.
4. Two rules choose at most ``max_layers`` layers; the one whose layers score higher *together* (eq. 3 over
   them: the mean of their rows) is kept:

   - ``top``: the paper's, the ``max_layers`` layers with the best overlap of their own;
   - ``greedy``: the best single layer, then repeatedly the layer that most improves the combined overlap,
     until nothing improves it or ``max_layers`` are chosen.

   Unless the middle-half default scores strictly higher together than both (``middle``: it is kept, so that
   calibrating never localises worse, on its own images, than not calibrating; a model whose keyword attention
   is spread evenly over many layers can do that, since the rules keep few). The chance level (the expected share
   of a random choice of K tokens: K/N, averaged over images) is recorded beside them.

The result is a :class:`Calibration`, saved as ``<calibration_dir>/<model fingerprint>.json``; ``Ego.load`` uses
it when no layers are given explicitly. The rules and the measure are pure functions of per-image score arrays,
so they can be checked without a model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .config import default_layers
from .figure import MERGE_SIZE, PATCH_SIZE, processed_size
from .token_layout import token_cells
from .memory import _atomic_write  # the store's write: temp file in the same folder, fsync, os.replace

log = logging.getLogger("ego_ros.calibration")

MEASURE = (
    "overlap = R-precision of the token scores against the subject mask: per image, with K the number of subject "
    "tokens (a visual token is a subject token when at least 50% of its 28x28 px cell is mask), the share of the "
    "K highest-scoring tokens that are subject tokens (equal to recall at K); averaged over images"
)
RULES = {
    "top": "the paper's: the best layers on their own",
    "greedy": "forward selection on the combined scores",
    "middle": "the middle-half default, better together than either rule's layers",
}
SUBJECT_SHARE = 0.5  # a token is a subject token when at least this share of its cell is mask
FORMAT = "ego_ros.calibration"
VERSION = 1


class InvalidCalibration(ValueError):
    """Calibration data or a calibration file that cannot be used; the message says what was expected."""


def default_max_layers(num_layers: int) -> int:
    """A quarter of the decoder, at least one layer.

    The middle-half default averages half of the layers; calibration should pick fewer, better ones, but still a
    few rather than one: eq. 3's mean over several layers smooths the per-image noise of any single layer's
    attention (Qwen2.5-VL-7B: 28 layers -> at most 7).
    """
    return max(1, num_layers // 4)


# --- ground truth -----------------------------------------------------------------------------------------------


def as_mask(mask, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Sample ``index``'s subject mask as a boolean (H, W) array: True (white in an image) is the subject.

    Accepts a boolean array or a PIL image (any mode, read as grey: >= 128 is subject). Other arrays are refused
    rather than guessed at (0/1 and 0/255 masks would need different thresholds). ``image_size`` (width, height):
    the mask must have it. An all-background mask is refused: it is a mistake in the data, not a hard image.
    """
    if isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L")) >= 128
    elif isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        array = mask
    else:
        kind = f"a {mask.dtype} array" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InvalidCalibration(f"sample {index}: the mask must be a boolean (H, W) array or a PIL image "
                                 f"(white = subject), got {kind}; e.g. pass mask > 0")
    if array.ndim != 2:
        raise InvalidCalibration(f"sample {index}: the mask must be 2-D (H, W), got shape {array.shape}")
    if image_size is not None and (array.shape[1], array.shape[0]) != tuple(image_size):
        raise InvalidCalibration(f"sample {index}: the mask is {array.shape[1]}x{array.shape[0]} but the image is "
                                 f"{image_size[0]}x{image_size[1]}; they must be the same size")
    if not array.any():
        raise InvalidCalibration(f"sample {index}: the mask is empty (no subject pixel); a mask marks the main "
                                 "subject in white (True)")
    return array


def input_size(image) -> tuple[int, int]:
    """(width, height) of an image as the caller gave it (an array, a PIL image or a readable file), before any
    downscaling: the size its mask must have."""
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as opened:  # the header only
        return opened.size


def subject_tokens(mask: np.ndarray, grid_thw: Sequence[int], patch_size: int = PATCH_SIZE,
                   merge_size: int = MERGE_SIZE, tiles=None) -> np.ndarray:
    """Which visual tokens of an image with patch grid ``grid_thw`` (and ``tiles``) are subject tokens: bool (N,).

    The mask (of the image before the processor) is resized, area-averaged, to the processed image (gw*14 x gh*14
    px); a token is a subject token when at least :data:`SUBJECT_SHARE` of its cell (``token_layout``: a 28x28
    block, or a thumbnail's coarse cell) is mask.
    """
    width, height = processed_size(grid_thw, patch_size)
    resized = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((width, height), Image.Resampling.BOX))
    integral = np.pad(resized.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0, y0, x1, y1 = token_cells(grid_thw, tiles, patch_size, merge_size).T
    share = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / ((x1 - x0) * (y1 - y0))
    return share >= SUBJECT_SHARE - 1e-6


# --- the measure and the rules (pure) ---------------------------------------------------------------------------


def r_precision(scores, subject) -> float:
    """The share of the K highest ``scores`` that are ``subject`` tokens, K = number of subject tokens.

    Ties are broken towards the lower token index (a stable sort), so the value is deterministic.
    """
    scores, subject = np.asarray(scores, dtype=np.float64), np.asarray(subject, dtype=bool)
    k = int(subject.sum())
    if k == 0:
        raise ValueError("R-precision needs at least one subject token")
    top = np.argsort(-scores, kind="stable")[:k]
    return float(subject[top].mean())


def layer_overlaps(per_image: Sequence, subjects: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's own overlap: (mean over images, population std over images), both (L,).

    ``per_image[i]``: image i's scores per layer, (L, N_i); ``subjects[i]``: its subject tokens, bool (N_i,).
    """
    values = np.array([[r_precision(row, subject) for row in np.asarray(scores)]
                       for scores, subject in zip(per_image, subjects, strict=True)])  # (images, L)
    return values.mean(axis=0), values.std(axis=0)


def combined_overlap(per_image: Sequence, subjects: Sequence, layers: Sequence[int]) -> float:
    """The overlap of eq. 3 over ``layers`` (the mean of their rows), averaged over images."""
    layers = list(layers)
    return float(np.mean([r_precision(np.asarray(scores, dtype=np.float64)[layers].mean(axis=0), subject)
                          for scores, subject in zip(per_image, subjects, strict=True)]))


def top_layers(overlaps: Sequence[float], max_layers: int) -> list[int]:
    """The paper's rule: the ``max_layers`` layers with the highest overlap of their own (ties: the lower layer),
    ascending."""
    order = sorted(range(len(overlaps)), key=lambda layer: (-overlaps[layer], layer))
    return sorted(order[:max_layers])


def greedy_layers(per_image: Sequence, subjects: Sequence, max_layers: int) -> list[int]:
    """Forward selection on the combined overlap: from the best single layer, add the layer that raises the
    combined overlap most (ties: the lower layer), while it strictly rises and fewer than ``max_layers`` are
    chosen. Ascending."""
    singles, _ = layer_overlaps(per_image, subjects)
    chosen = [top_layers(singles, 1)[0]]
    best = float(singles[chosen[0]])
    while len(chosen) < max_layers:
        candidates = [(combined_overlap(per_image, subjects, chosen + [layer]), layer)
                      for layer in range(len(singles)) if layer not in chosen]
        if not candidates:
            break
        value, layer = max(candidates, key=lambda c: (c[0], -c[1]))
        if value <= best:
            break
        chosen.append(layer)
        best = value
    return sorted(chosen)


def chance_overlap(subjects: Sequence) -> float:
    """The expected overlap of K tokens chosen at random: K/N per image, averaged."""
    return float(np.mean([np.mean(np.asarray(subject, dtype=bool)) for subject in subjects]))


# --- the result -------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """The layers chosen for one model, and the figures behind the choice (all overlaps per :data:`MEASURE`)."""

    model: str  # what the user called the model (folder or hub id) when it was calibrated
    fingerprint: str  # the model's weights: the file is keyed by it
    num_layers: int  # decoder layers of the model
    layers: list[int]  # the chosen layers, ascending
    rule: str  # which rule chose them: a key of RULES
    max_layers: int
    per_layer_overlap: list[float]  # index: layer
    per_layer_std: list[float]  # population std over images
    top_layers: list[int]
    top_overlap: float  # the combined overlap of top_layers
    greedy_layers: list[int]
    greedy_overlap: float
    default_layers: list[int]  # the middle half, used without a calibration
    default_overlap: float
    chance_overlap: float  # K/N averaged: a random choice of tokens
    num_images: int  # images measured
    num_skipped: int  # samples whose mask covered no visual token, or every one (they measure nothing)
    source: str  # where the images came from, in words
    created: float  # seconds since the epoch
    measure: str = MEASURE

    @property
    def overlap(self) -> float:
        """The combined overlap of the chosen layers on the calibration images."""
        return {"top": self.top_overlap, "greedy": self.greedy_overlap, "middle": self.default_overlap}[self.rule]

    def summary(self) -> str:
        """One line for ``layers_source``: 'calibrated on 200 images (toy world) 2026-11-26'."""
        images = f"{self.num_images} image{'s' * (self.num_images != 1)}"
        source = f" ({self.source})" if self.source else ""
        return f"calibrated on {images}{source} {time.strftime('%Y-%m-%d', time.localtime(self.created))}"

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self),
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))}

    @classmethod
    def from_json(cls, record: dict) -> "Calibration":
        """Parse and check a saved record; raises InvalidCalibration naming the first problem."""
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise InvalidCalibration(f"not an {FORMAT} record")
        if record.get("version") != VERSION:
            raise InvalidCalibration(f"version {record.get('version')!r}, this code reads version {VERSION}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in record]
        if missing:
            raise InvalidCalibration(f"missing fields {missing}")
        calibration = cls(**{name: record[name] for name in names})
        calibration.check()
        return calibration

    def check(self) -> None:
        n = self.num_layers
        if not isinstance(n, int) or n < 1:
            raise InvalidCalibration(f"num_layers {n!r}")
        for name in ("layers", "top_layers", "greedy_layers", "default_layers"):
            layers = getattr(self, name)
            if (not isinstance(layers, list) or not layers or layers != sorted(set(layers))
                    or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n for i in layers)):
                raise InvalidCalibration(f"{name} {layers!r} are not distinct ascending layers of {n}")
        if self.rule not in RULES:
            raise InvalidCalibration(f"unknown rule {self.rule!r}")
        for name in ("per_layer_overlap", "per_layer_std"):
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != n:
                raise InvalidCalibration(f"{name} must have one value per layer ({n})")
        numbers = [*self.per_layer_overlap, *self.per_layer_std, self.top_overlap, self.greedy_overlap,
                   self.default_overlap, self.chance_overlap, self.created]
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) for x in numbers):
            raise InvalidCalibration("a figure is not a finite number")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise InvalidCalibration("empty fingerprint")
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise InvalidCalibration(f"num_images {self.num_images!r}")


def summarise(per_image: Sequence, subjects: Sequence, *, max_layers: int, model: str, fingerprint: str,
              source: str = "", num_skipped: int = 0) -> Calibration:
    """Both rules, the baselines and the choice, from every layer's scores of each image (L, N_i)."""
    if not per_image:
        raise InvalidCalibration("no calibration image to measure")
    num_layers = int(np.asarray(per_image[0]).shape[0])
    if not isinstance(max_layers, int) or isinstance(max_layers, bool) or max_layers < 1:
        raise InvalidCalibration(f"max_layers must be a positive integer, got {max_layers!r}")
    max_layers = min(max_layers, num_layers)
    means, stds = layer_overlaps(per_image, subjects)
    top = top_layers(means.tolist(), max_layers)
    greedy = greedy_layers(per_image, subjects, max_layers)
    middle = list(default_layers(num_layers))
    top_value, greedy_value, middle_value = (combined_overlap(per_image, subjects, top),
                                             combined_overlap(per_image, subjects, greedy),
                                             combined_overlap(per_image, subjects, middle))
    # The paper's rule unless greedy is strictly better: on a tie, the reference method; and the default unless a
    # rule does at least as well, so that a calibration is never worse than none on the images it measured.
    rule = "greedy" if greedy_value > top_value else "top"
    if middle_value > max(top_value, greedy_value):
        rule = "middle"
    return Calibration(
        model=model, fingerprint=fingerprint, num_layers=num_layers,
        layers={"top": top, "greedy": greedy, "middle": middle}[rule],
        rule=rule, max_layers=max_layers, per_layer_overlap=means.tolist(), per_layer_std=stds.tolist(),
        top_layers=top, top_overlap=top_value, greedy_layers=greedy, greedy_overlap=greedy_value,
        default_layers=middle, default_overlap=middle_value,
        chance_overlap=chance_overlap(subjects), num_images=len(per_image), num_skipped=num_skipped,
        source=source, created=time.time(),
    )


# --- persistence ------------------------------------------------------------------------------------------------


def calibration_path(directory: Path | str, fingerprint: str) -> Path:
    return Path(directory).expanduser() / f"{fingerprint}.json"


def save_calibration(calibration: Calibration, directory: Path | str) -> Path:
    """Write ``<directory>/<fingerprint>.json`` atomically (a reader sees the old file or the new one)."""
    calibration.check()
    path = calibration_path(directory, calibration.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (json.dumps(calibration.to_json(), indent=2) + "\n").encode())
    return path


def load_calibration(directory: Path | str, fingerprint: str, num_layers: int) -> Calibration | None:
    """The saved calibration of the model ``fingerprint`` (with ``num_layers`` decoder layers), or None.

    A file that cannot be used (unreadable, malformed, another model's, layers out of range) is logged as a
    warning and ignored, never deleted: the caller falls back to the default layers.
    """
    path = calibration_path(directory, fingerprint)
    if not path.is_file():
        return None
    try:
        calibration = Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
        if calibration.fingerprint != fingerprint:
            raise InvalidCalibration(f"it belongs to the model {calibration.fingerprint}")
        if calibration.num_layers != num_layers:
            raise InvalidCalibration(f"it is for {calibration.num_layers} layers, the model has {num_layers}")
    except (OSError, ValueError, TypeError) as error:  # JSONDecodeError and InvalidCalibration are ValueErrors
        log.warning("ignoring the calibration file %s (%s); using the default layers", path, error)
        return None
    return calibration


@dataclass
class LayerChoice:
    """The layers an engine uses and why."""

    layers: list[int]
    source: str  # a short sentence for people: set explicitly / calibrated on ... / default: ...
    calibration: Calibration | None = field(default=None, repr=False)


DEFAULT_SOURCE = "default: middle half of the decoder"


def choose_layers(explicit: Sequence[int] | None, directory: Path | str, fingerprint: str,
                  num_layers: int) -> LayerChoice:
    """Explicit layers win; else this model's saved calibration; else the middle half of the decoder."""
    if explicit is not None:
        return LayerChoice(list(explicit), "set explicitly")
    calibration = load_calibration(directory, fingerprint, num_layers)
    if calibration is not None:
        return LayerChoice(list(calibration.layers), calibration.summary(), calibration)
    why = ("its calibration file is unusable, see the warning" if calibration_path(directory, fingerprint).exists()
           else "this model has no calibration")
    return LayerChoice(list(default_layers(num_layers)), f"{DEFAULT_SOURCE} ({why})")
