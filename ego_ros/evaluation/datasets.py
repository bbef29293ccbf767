# SPDX-License-Identifier: Apache-2.0
"""The evaluation's datasets, each in the layout its authors publish, parsed into one structure with fixed splits.

    myvlm     <concept>/*.jpg (+ a captions .json per concept, where present)                    MyVLM, 29 concepts
    yollava   {train,test}/<concept>/*.png and an A/B VQA .json at the top                        Yo'LLaVA, 40 concepts
    thisismy  Single-concept/{train,test}/<concept>/ (test: Positive, Negative (Hard), Negative (Other), Fake);
              Multi-concept/{train/<concept>, test/<A_and_B>, VQA/}                              This-Is-My-Img
    toy       references/<concept>/*.png, test/*.png, test.json ({image: [concepts in it]}), vqa.json (optional)
              the toy world (``ego_ros.evaluation.toy_layouts`` writes it, and the toy world in the other layouts)

Every dataset becomes a :class:`Dataset`: concepts with their reference views in a fixed order (a run with
``views`` uses the first ``views`` of them), test images with the concepts each shows, A/B questions and the
images to caption. The split is fixed by the files alone (sorted names, and for MyVLM, which has no split, a shuffle
seeded by ``seed`` and the concept's name), and :meth:`Dataset.split` writes it out, so two runs can be compared.

A folder that does not match the layout raises :class:`LayoutError`, naming the layout expected and what was found.
Bad files (an image that does not decode, a VQA file that does not parse, a concept without reference views) are
left out with a reason in :attr:`Dataset.skipped`; the rest is evaluated.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("myvlm", "yollava", "thisismy", "toy")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MAX_REFERENCES = 5  # the paper's largest number of reference views; MyVLM keeps this many of each concept apart
PLACEHOLDER = re.compile(r"<sks>|<\s*concept\s*>", re.IGNORECASE)  # the concept's name in Yo'LLaVA questions
THISISMY_TEST_FOLDERS = ("Positive", "Negative (Hard)", "Negative (Other)", "Fake")

LAYOUTS = {
    "myvlm": "MyVLM: one folder per concept, <concept>/*.jpg (a captions .json beside the images is allowed)",
    "yollava": "Yo'LLaVA: train/<concept>/*.png (reference views), test/<concept>/*.png, and the A/B VQA .json",
    "thisismy": "This-Is-My-Img: Single-concept/{train,test}/<concept>/ with test folders Positive, "
                "'Negative (Hard)', 'Negative (Other)', Fake; optionally Multi-concept/{train/<concept>, "
                "test/<A_and_B>, VQA/}",
    "toy": "the toy world: references/<concept>/*.png, test/*.png, test.json ({image: [concepts]}), optional vqa.json",
}


class LayoutError(ValueError):
    """The folder is not in the layout asked for: says which layout was expected and what is there."""


@dataclass
class Concept:
    name: str
    references: list[Path]  # fixed order: a run with V views uses the first V
    group: str = "single"  # "single", or "multi" for This-Is-My-Img's multi-concept set
    folder: Path | None = None  # where its reference views are


@dataclass
class TestImage:
    path: Path
    present: tuple[str, ...]  # the concepts it shows
    group: str = "test"  # where it came from: "Positive", "Negative (Hard)", "A_and_B"...


@dataclass
class Question:
    """An A/B question about ``concept`` in ``image``; ``question`` has the concept's name in place of <sks>."""

    image: Path
    concept: str
    question: str
    options: dict[str, str]  # {"A": ..., "B": ...}
    answer: str  # the correct option's letter
    source: str = ""  # the file it came from


@dataclass
class Dataset:
    kind: str
    root: Path
    concepts: dict[str, Concept] = field(default_factory=dict)
    recognition: list[TestImage] = field(default_factory=list)  # every one asked about every single concept
    multi: list[TestImage] = field(default_factory=list)  # images of several concepts
    vqa: list[Question] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    seed: int = 0

    @property
    def single(self) -> list[str]:
        return [n for n, c in self.concepts.items() if c.group == "single"]

    @property
    def captions(self) -> list[TestImage]:
        """Images to caption: those showing at least one concept (captioning recall names them all)."""
        return [t for t in self.recognition + self.multi if t.present]

    def tasks(self) -> list[str]:
        """The tasks this data supports."""
        tasks = ["recognition"] if self.recognition and self.single else []
        tasks += ["vqa"] if self.vqa else []
        tasks += ["captioning"] if self.captions else []
        tasks += ["multi"] if self.multi else []
        return tasks

    def split(self) -> dict:
        """The fixed split, relative to the root: written into the results so two runs can be compared."""
        rel = self.relative
        return {
            "kind": self.kind, "root": str(self.root), "seed": self.seed,
            "references": {n: [rel(p) for p in c.references] for n, c in self.concepts.items()},
            "groups": {n: c.group for n, c in self.concepts.items()},
            "recognition": [[rel(t.path), list(t.present)] for t in self.recognition],
            "multi": [[rel(t.path), list(t.present)] for t in self.multi],
            "vqa": len(self.vqa),
        }

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)


def load_dataset(kind: str, root, *, seed: int = 0) -> Dataset:
    """Parse ``root`` in the layout ``kind``; raises :class:`LayoutError` when it does not match."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {', '.join(KINDS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutError(f"dataset folder {root} does not exist (expected {LAYOUTS[kind]})")
    data = Dataset(kind, root.resolve(), seed=seed)
    {"myvlm": _myvlm, "yollava": _yollava, "thisismy": _thisismy, "toy": _toy}[kind](data)
    for name, concept in list(data.concepts.items()):
        if not concept.references:
            data.skipped.append((data.relative(concept.folder or data.root / name), f"concept {name!r} has no "
                                 "reference views that decode; left out"))
            del data.concepts[name]
    known = set(data.concepts)
    for test in data.recognition + data.multi:
        test.present = tuple(n for n in test.present if n in known)
    data.multi = [t for t in data.multi if len(t.present) >= 1]
    before = len(data.vqa)
    data.vqa = [q for q in data.vqa if q.concept in known]
    if len(data.vqa) < before:
        data.skipped.append(("VQA", f"{before - len(data.vqa)} questions about concepts that were left out"))
    if not data.concepts:
        raise LayoutError(f"{root}: no concept with reference views found (expected {LAYOUTS[kind]}); "
                          + _found(root))
    return data


# --- the layouts --------------------------------------------------------------------------------------------------


def _myvlm(data: Dataset) -> None:
    folders = _subfolders(data.root)
    if not folders or not any(_images(f, data, check=False) for f in folders):
        _mismatch(data, "no <concept>/ folder with images")
    for folder in folders:
        images = _images(folder, data)
        if not images:
            data.skipped.append((data.relative(folder), "no images; not a concept folder"))
            continue
        order = np.random.default_rng([data.seed, zlib.crc32(folder.name.encode())]).permutation(len(images))
        shuffled = [images[i] for i in order]
        references, tests = shuffled[:MAX_REFERENCES], shuffled[MAX_REFERENCES:]
        data.concepts[folder.name] = Concept(folder.name, references, folder=folder)
        data.recognition += [TestImage(p, (folder.name,), folder.name) for p in tests]
        for captions in sorted(folder.glob("*.json")):  # read only to report a broken one: recall needs the name
            try:
                json.loads(captions.read_text())
            except (OSError, ValueError) as error:
                data.skipped.append((data.relative(captions), f"captions file does not parse: {error}"))


def _yollava(data: Dataset) -> None:
    train, test = data.root / "train", data.root / "test"
    if not train.is_dir() or not test.is_dir():
        _mismatch(data, "no train/ and test/ folders")
    for folder in _subfolders(train):
        data.concepts[folder.name] = Concept(folder.name, _images(folder, data), folder=folder)
    for folder in _subfolders(test):
        if folder.name not in data.concepts:
            data.skipped.append((data.relative(folder), f"test concept {folder.name!r} has no train/ folder"))
        data.recognition += [TestImage(p, (folder.name,), folder.name) for p in _images(folder, data)]
    for path in sorted(data.root.glob("*.json")):
        data.vqa += _questions(path, data, test)


def _thisismy(data: Dataset) -> None:
    single, multi = data.root / "Single-concept", data.root / "Multi-concept"
    if not (single / "train").is_dir() or not (single / "test").is_dir():
        _mismatch(data, "no Single-concept/train and Single-concept/test folders")
    for folder in _subfolders(single / "train"):
        data.concepts[folder.name] = Concept(folder.name, _images(folder, data), folder=folder)
    for folder in _subfolders(single / "test"):
        if folder.name not in data.concepts:
            data.skipped.append((data.relative(folder), f"test concept {folder.name!r} has no train/ folder"))
        for group in THISISMY_TEST_FOLDERS:
            present = (folder.name,) if group == "Positive" else ()
            data.recognition += [TestImage(p, present, group) for p in _images(folder / group, data)]
        others = [f.name for f in _subfolders(folder) if f.name not in THISISMY_TEST_FOLDERS]
        if others:
            data.skipped.append((data.relative(folder), f"unknown test folders {others} (expected "
                                 f"{', '.join(THISISMY_TEST_FOLDERS)})"))
    if not multi.is_dir():
        return
    for folder in _subfolders(multi / "train"):
        if folder.name in data.concepts:
            data.skipped.append((data.relative(folder), f"multi-concept {folder.name!r} has the name of a "
                                 "single concept; left out"))
            continue
        data.concepts[folder.name] = Concept(folder.name, _images(folder, data), "multi", folder)
    for folder in _subfolders(multi / "test"):
        names = tuple(folder.name.split("_and_"))
        unknown = [n for n in names if n not in data.concepts]
        if len(names) < 2 or unknown:
            data.skipped.append((data.relative(folder), "expected <A>_and_<B> of Multi-concept/train concepts"
                                 + (f"; unknown: {unknown}" if unknown else "")))
            continue
        data.multi += [TestImage(p, names, folder.name) for p in _images(folder, data)]
    for path in sorted((multi / "VQA").glob("*.json")) if (multi / "VQA").is_dir() else []:
        data.vqa += _questions(path, data, multi / "test")


def _toy(data: Dataset) -> None:
    references, test, truth = data.root / "references", data.root / "test", data.root / "test.json"
    if not references.is_dir() or not test.is_dir() or not truth.is_file():
        _mismatch(data, "no references/, test/ and test.json")
    for folder in _subfolders(references):
        data.concepts[folder.name] = Concept(folder.name, _images(folder, data), folder=folder)
    try:
        present = json.loads(truth.read_text())
        if not isinstance(present, dict):
            raise ValueError("expected an object {image: [concepts]}")
    except (OSError, ValueError) as error:
        raise LayoutError(f"{truth} does not parse: {error}") from None
    for path in _images(test, data):
        names = tuple(present.get(path.name, ()))
        target = data.multi if len(names) > 1 else data.recognition
        target.append(TestImage(path, names, "multi" if len(names) > 1 else "test"))
    if (data.root / "vqa.json").is_file():
        data.vqa += _questions(data.root / "vqa.json", data, test)


# --- files --------------------------------------------------------------------------------------------------------


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path, data: Dataset, *, check: bool = True) -> list[Path]:
    """The images in ``folder``, sorted by name; those that do not decode are skipped (reported)."""
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not check:
        return found
    good = []
    for path in found:
        try:
            with Image.open(path) as image:
                image.load()
            good.append(path)
        except Exception as error:  # PIL raises several kinds for a bad file
            data.skipped.append((data.relative(path), f"image does not decode ({type(error).__name__}: {error})"))
    return good


def _questions(path: Path, data: Dataset, images: Path) -> list[Question]:
    """A/B questions from ``path``. Accepted shapes: {concept: {image: entry | [entries]}} (Yo'LLaVA's), or a list
    of entries with "image" and "concept"; an entry has "question", "options" ({"A","B"} or a list of two) and
    "correct_answer" or "answer" (a letter, or the text of the right option)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        data.skipped.append((data.relative(path), f"VQA file does not parse: {error}"))
        return []
    entries = []
    if isinstance(raw, dict):
        for concept, per_image in raw.items():
            if not isinstance(per_image, dict):
                continue
            for image, items in per_image.items():
                for item in items if isinstance(items, list) else [items]:
                    entries.append((concept, image, item))
    elif isinstance(raw, list):
        entries = [(e.get("concept") or e.get("name"), e.get("image") or e.get("image_path"), e)
                   for e in raw if isinstance(e, dict)]
    questions, bad = [], 0
    for concept, image, item in entries:
        question = _question(concept, image, item, path, images, data)
        if question is None:
            bad += 1
        else:
            questions.append(question)
    if bad or not entries:
        data.skipped.append((data.relative(path), f"{bad} of {len(entries)} VQA entries unusable (need concept, "
                             "an image that exists, question, options A/B and the correct answer)"))
    return questions


def _question(concept, image, item, path: Path, images: Path, data: Dataset) -> Question | None:
    if not isinstance(concept, str) or not isinstance(image, str) or not isinstance(item, dict):
        return None
    options = item.get("options")
    if isinstance(options, list) and len(options) == 2:
        options = dict(zip("AB", options))
    if not isinstance(options, dict) or set(options) != {"A", "B"} or not isinstance(item.get("question"), str):
        return None
    answer = str(item.get("correct_answer", item.get("answer", ""))).strip()
    if answer not in options:
        answer = next((k for k, v in options.items() if str(v).strip().casefold() == answer.casefold()), "")
    located = _locate(image, concept, path, images, data)
    if not answer or located is None:
        return None
    text = PLACEHOLDER.sub(concept, item["question"])
    return Question(located, concept, text, {k: str(v) for k, v in options.items()}, answer, data.relative(path))


def _locate(image: str, concept: str, path: Path, images: Path, data: Dataset) -> Path | None:
    """An image named in a VQA file: relative to that file, to the root, or by its name under the test folder."""
    name = Path(image)
    for candidate in (path.parent / name, data.root / name, images / concept / name.name, images / name.name):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _found(root: Path, limit: int = 8) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()) if root.is_dir() else []
    shown = ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
    return f"found: {shown or 'nothing'}"


def _mismatch(data: Dataset, problem: str) -> None:
    raise LayoutError(f"{data.root} is not a {data.kind} dataset ({problem}); expected {LAYOUTS[data.kind]}; "
                      + _found(data.root))
