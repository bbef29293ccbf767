# SPDX-License-Identifier: Apache-2.0
"""Where calibration images and their subject masks come from: a folder of pairs, COCO 2017, pairs a caller made.

Each source is a :class:`SampleSet`: a sized iterable of (PIL image, boolean mask) that reads its files only as it
is iterated, and describes itself in a few words for the calibration record. Everything a user can get wrong
(layout, missing masks, an empty mask, a COCO file without a usable image) is checked when the set is made, before
any model is loaded, and reported as one :class:`~ego_ros.engine.calibration.InvalidCalibration` naming what was
expected and what was found.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .calibration import InvalidCalibration, as_mask

MASK_SUFFIX = ".mask.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_LAYOUT = ("NAME.png (or NAME.jpg / NAME.jpeg) images, each with its subject mask NAME.mask.png beside it "
                 "(same size; white = subject)")


class SampleSet:
    """(image, mask) pairs, loaded one at a time by ``load(i)``; ``description`` says where they come from."""

    def __init__(self, description: str, count: int, load: Callable[[int], tuple[Image.Image, np.ndarray]]):
        self.description = description
        self._count = count
        self._load = load

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[Image.Image, np.ndarray]]:
        return (self._load(i) for i in range(self._count))


def _limit(count: int | None) -> int | None:
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise InvalidCalibration(f"count must be a positive integer, got {count!r}")
    return count


def _open_image(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as opened:
            return opened.convert(mode)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise InvalidCalibration(f"cannot read {path} as an image: {error}") from None


# --- a folder of pairs ------------------------------------------------------------------------------------------


def folder_samples(folder: Path | str, count: int | None = None) -> SampleSet:
    """The image/mask pairs of ``folder`` (see :data:`FOLDER_LAYOUT`), by name; at most ``count`` of them.

    Every mask is read now: a folder that does not follow the layout (no image, an image without its mask, a mask
    without its image), a mask of another size than its image, or an empty mask is refused before any work.
    """
    folder, count = Path(folder).expanduser(), _limit(count)
    if not folder.is_dir():
        raise InvalidCalibration(f"no folder at {folder}; expected a folder of {FOLDER_LAYOUT}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    masks = {p.name[: -len(MASK_SUFFIX)]: p for p in files if p.name.lower().endswith(MASK_SUFFIX)}
    images: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.lower().endswith(MASK_SUFFIX):
            images.setdefault(path.stem, path)
    unmasked = [images[stem].name for stem in images if stem not in masks]
    orphans = [masks[stem].name for stem in masks if stem not in images]
    if not images or unmasked or orphans:
        found = (f"{_count(len(images), 'image')} and {_count(len(masks), 'mask')}" if images or masks
                 else f"{len(files)} files, none of them an image or mask")
        problems = [f"images without a mask: {_some(unmasked)}" if unmasked else "",
                    f"masks without an image: {_some(orphans)}" if orphans else ""]
        detail = "; ".join(p for p in problems if p)
        raise InvalidCalibration(f"{folder} does not hold calibration pairs: expected {FOLDER_LAYOUT}; found "
                                 f"{found}" + (f" ({detail})" if detail else ""))
    stems = sorted(images)[:count]
    for index, stem in enumerate(stems):  # every mask checked up front: the run may take minutes per image
        with Image.open(images[stem]) as opened:
            size = opened.size
        as_mask(_open_image(masks[stem], "L"), index, size)

    def load(i: int):
        stem = stems[i]
        return _open_image(images[stem], "RGB"), as_mask(_open_image(masks[stem], "L"), i)

    return SampleSet(f"folder {folder.name}", len(stems), load)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _some(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# --- COCO 2017 instances ----------------------------------------------------------------------------------------


def coco_samples(annotations: Path | str, images: Path | str, count: int | None = None) -> SampleSet:
    """COCO instance annotations, filtered as in the paper: images showing exactly one instance of one category.

    An image qualifies when it has exactly one annotation with ``iscrowd=0`` and none with ``iscrowd=1`` (a crowd
    region means more instances of something). Its mask is that instance's segmentation. Images in ascending id
    order whose file is in ``images``; at most ``count``. Needs pycocotools.
    """
    annotations, images, count = Path(annotations).expanduser(), Path(images).expanduser(), _limit(count)
    if not annotations.is_file():
        raise InvalidCalibration(f"no COCO annotation file at {annotations}; expected instances_*.json")
    if not images.is_dir():
        raise InvalidCalibration(f"no image folder at {images}; expected the folder of the COCO images "
                                 "(e.g. val2017/)")
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise InvalidCalibration(f"reading COCO needs pycocotools (pip install -r requirements.txt): {error}") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            coco = COCO(str(annotations))
    except (ValueError, KeyError, TypeError, AssertionError, json.JSONDecodeError) as error:
        raise InvalidCalibration(f"{annotations} is not a COCO instances file: {type(error).__name__} "
                                 f"{error}") from None
    if "annotations" not in coco.dataset or "images" not in coco.dataset:
        raise InvalidCalibration(f"{annotations} is not a COCO instances file: it needs 'images' and 'annotations'")

    single = []
    for image_id in sorted(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        if len(anns) == 1 and not anns[0].get("iscrowd", 0) and anns[0].get("segmentation"):
            single.append((image_id, anns[0]))
    present = [(i, a) for i, a in single if (images / coco.imgs[i]["file_name"]).is_file()]
    if not present:
        why = (f"none of its {len(single)} single-instance images is in {images} (e.g. "
               f"{coco.imgs[single[0][0]]['file_name']})" if single
               else f"none of its {len(coco.imgs)} images shows exactly one instance of one category")
        raise InvalidCalibration(f"no usable calibration image in {annotations}: {why}")
    chosen = present[:count]

    def load(i: int):
        image_id, annotation = chosen[i]
        record = coco.imgs[image_id]
        image = _open_image(images / record["file_name"], "RGB")
        mask = coco.annToMask(annotation).astype(bool)
        if (mask.shape[1], mask.shape[0]) != image.size:  # COCO's sizes are the files' own; a resized copy is not
            raise InvalidCalibration(f"{record['file_name']} is {image.size[0]}x{image.size[1]} but {annotations} "
                                     f"says {record['width']}x{record['height']}")
        return image, mask

    missing = len(single) - len(present)
    note = f", {_count(missing, 'missing file')} skipped" if missing else ""
    return SampleSet(f"COCO {annotations.name}, single-instance images{note}", len(chosen), load)


# --- pairs in memory ---------------------------------------------------------------------------------------------


def pair_samples(pairs, description: str) -> SampleSet:
    """(image, mask) pairs already in memory (a caller's generated data, such as the toy world's scenes)."""
    pairs = list(pairs)
    if not pairs:
        raise InvalidCalibration(f"no calibration samples in {description}")
    return SampleSet(description, len(pairs), lambda i: (pairs[i][0], as_mask(pairs[i][1], i)))
