# SPDX-License-Identifier: Apache-2.0
"""The toy world written as a dataset, in its own layout or in the layout of each public benchmark.

The data of the tests (small folders in every layout) and of the toy-world table in docs/evaluation.md::

    python -m ego_ros.evaluation.toy_layouts toy build/toy-eval --concepts 10 --seed 3
    python -m ego_ros.evaluation.toy_layouts yollava /tmp/yollava-like --concepts 3

Concepts are personal instances of the toy world (patterned objects told apart by a detail), named with the
ordinary names of ``evaluation.toy.NAMES``. For each: ``views`` reference views (a new scene each), ``positives``
test scenes showing it (as the main subject, or small among others), ``negatives`` showing a look-alike (same kind
and colour, another detail); the toy layout also gets scenes of two concepts at once (multi-concept recognition),
and every layout with questions gets A/B questions on the concept's colour ("What colour is <sks>?").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ego_ros.toy.world import COLOURS, look_alike, personal_instances, random_instance, render_scene, view_of

from .datasets import KINDS, MAX_REFERENCES
from .toy import NAMES


def write(kind: str, out, *, concepts: int = 4, views: int = 5, positives: int = 2, negatives: int = 2,
          pairs: int = 2, seed: int = 0) -> Path:
    """Write the toy world into ``out`` in the layout ``kind`` (one of datasets.KINDS); returns ``out``."""
    if kind not in KINDS:
        raise ValueError(f"unknown layout {kind!r}; choose from {', '.join(KINDS)}")
    count = concepts + (pairs + 1 if kind == "thisismy" and pairs else 0)
    if count > len(NAMES):
        raise ValueError(f"at most {len(NAMES)} concepts")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    instances = personal_instances(count, seed)
    named = dict(zip(NAMES, instances))
    single = dict(list(named.items())[:concepts])
    rng = np.random.default_rng([seed, 0xE7A1])

    def refs(name, instance, count=views):
        index = list(named).index(name)
        return [view_of(instance, seed=seed * 7919 + 100 * index + v).image for v in range(count)]

    def shows(instance, j):
        if j % 2 == 0:
            return render_scene(rng, instance).image
        return render_scene(rng, None, distractors=[instance, random_instance(rng)]).image

    def question(instance):
        other = [c for c in COLOURS if c != instance.colour][int(rng.integers(len(COLOURS) - 1))]
        options = [instance.colour, other] if rng.random() < 0.5 else [other, instance.colour]
        return {"question": "What colour is <sks>?", "options": {"A": options[0], "B": options[1]},
                "correct_answer": "AB"[options.index(instance.colour)]}

    if kind == "myvlm":  # views and positives in one folder: the harness keeps 5 apart as references, seeded
        for name, instance in single.items():
            views_made = refs(name, instance, max(views, MAX_REFERENCES))
            for i, image in enumerate(views_made + [shows(instance, j) for j in range(positives)]):
                _save(image, out / name / f"{i:03d}.jpg")
    elif kind == "yollava":
        vqa = {}
        for name, instance in single.items():
            for v, image in enumerate(refs(name, instance)):
                _save(image, out / "train" / name / f"{v}.png")
            for j in range(positives):
                _save(shows(instance, j), out / "test" / name / f"{j}.png")
                vqa.setdefault(name, {})[f"./test/{name}/{j}.png"] = question(instance)
        (out / "yollava-visual-qa.json").write_text(json.dumps(vqa, indent=1) + "\n")
    elif kind == "thisismy":
        single_root, multi_root = out / "Single-concept", out / "Multi-concept"
        for name, instance in single.items():
            for v, image in enumerate(refs(name, instance)):
                _save(image, single_root / "train" / name / f"{v}.png")
            test = single_root / "test" / name
            for j in range(positives):
                _save(shows(instance, j), test / "Positive" / f"{j}.png")
            for j in range(negatives):
                _save(render_scene(rng, look_alike(instance, rng)).image, test / "Negative (Hard)" / f"{j}.png")
                _save(render_scene(rng).image, test / "Negative (Other)" / f"{j}.png")
            _save(render_scene(rng, look_alike(instance, rng), distractors=0).image, test / "Fake" / "0.png")
        if pairs:
            group = list(named.items())[concepts:]
            for name, instance in group:
                for v, image in enumerate(refs(name, instance)):
                    _save(image, multi_root / "train" / name / f"{v}.png")
            vqa = []
            for p in range(pairs):
                (a, ia), (b, ib) = group[p], group[p + 1]
                path = multi_root / "test" / f"{a}_and_{b}" / "0.png"
                _save(render_scene(rng, ia, distractors=[ib]).image, path)
                vqa.append({"concept": a, "image": f"../test/{a}_and_{b}/0.png", **question(ia)})
            (multi_root / "VQA").mkdir(parents=True, exist_ok=True)
            (multi_root / "VQA" / "vqa.json").write_text(json.dumps(vqa, indent=1) + "\n")
    else:  # toy
        truth, vqa, index = {}, [], 0

        def add(image, names):
            nonlocal index
            file = f"{index:04d}.png"
            _save(image, out / "test" / file)
            truth[file] = list(names)
            index += 1
            return file

        items = list(single.items())
        for name, instance in items:
            for v, image in enumerate(refs(name, instance)):
                _save(image, out / "references" / name / f"{v}.png")
            for j in range(positives):
                file = add(shows(instance, j), [name])
                vqa.append({"concept": name, "image": f"test/{file}", **question(instance)})
            for _ in range(negatives):
                add(render_scene(rng, look_alike(instance, rng)).image, [])
        for p in range(min(pairs, len(items) - 1)):
            (a, ia), (b, ib) = items[p], items[p + 1]
            add(render_scene(rng, ia, distractors=[ib]).image, [a, b])
        (out / "test.json").write_text(json.dumps(truth, indent=1) + "\n")
        (out / "vqa.json").write_text(json.dumps(vqa, indent=1) + "\n")
    return out


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the toy world as an evaluation dataset.")
    parser.add_argument("kind", choices=KINDS, help="the layout")
    parser.add_argument("out", type=Path)
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--views", type=int, default=5, help="reference views per concept")
    parser.add_argument("--positives", type=int, default=2, help="test images showing each concept")
    parser.add_argument("--negatives", type=int, default=2, help="test images of a look-alike, per concept")
    parser.add_argument("--pairs", type=int, default=2, help="images of two concepts (toy, thisismy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.kind, args.out, concepts=args.concepts, views=args.views, positives=args.positives,
          negatives=args.negatives, pairs=args.pairs, seed=args.seed)
    print(f"wrote the toy world as a {args.kind} dataset in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
