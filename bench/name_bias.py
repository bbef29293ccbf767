# SPDX-License-Identifier: Apache-2.0
"""Whether the toy model's answer depends on what a concept is called.

A name says nothing of what a concept looks like, so a model that recognises from the memory answers alike under
any name. Each concept of the toy protocol (Ego's tokens from one view, the default recognition order) is asked about
every test image under each of a list of names: the protocol's own, names with pieces that training names rarely
have, one with a letter they never have ("Quinn"). Per name: the share of "yes" to images without the concept and to
images with it, over the concepts and seeds, and how far that name lies from the median name. A name far from the
rest has a piece whose embedding the layers above the written heads read as evidence: one trained draw said "yes" to
nearly every image for any name with the piece "or" (which begins "orange" where a keyword answer starts with it).
Examples::

    python bench/name_bias.py                         # the committed toy model, seed 3
    python bench/name_bias.py --model build/my-toy-model --seeds 3 5 --out bench/out/name_bias.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ego_ros import toy as toy_world  # noqa: E402
from ego_ros.engine import Ego  # noqa: E402
from ego_ros.evaluation import toy  # noqa: E402

NAMES = ("Rex", "Anna", "Bruno", "Zora", "Dora", "Cora", "Kalo", "Quinn", "Ivy", "Oscar", "Maya", "Finn")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="toy model folder (default: the committed one, ego_ros/toy/model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3], help="protocol seeds")
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--names", nargs="+", default=list(NAMES))
    parser.add_argument("--out", type=Path, default=Path("bench/out/name_bias.json"))
    args = parser.parse_args(argv)
    # a folder given is measured as it is, whatever recipe made it (model_dir would retrain a stale one in it)
    model = args.model or toy_world.model_dir()
    work = Path(tempfile.mkdtemp())
    ego = Ego.load(str(model), memory_dir=work / "memory", calibration_dir=work / "calibration")
    said = {name: {False: [], True: []} for name in args.names}  # name -> concept present -> answers
    for seed in args.seeds:
        data = toy.recognition_set(args.concepts, seed=seed, views=1)
        with tqdm(total=len(data.tests), desc=f"seed {seed}", unit="image", file=sys.stderr) as bar:
            answers, present = toy.answers_under_names(ego, data, toy.introduce(ego, data), args.names, bar.update)
        for concept in data.concepts:
            ego.forget(concept)
        for name, yes in zip(args.names, answers):
            for shown in (False, True):
                said[name][shown] += yes[present == shown].tolist()
    shares = {name: {present: float(np.mean(answers[present])) for present in (False, True)}
              for name, answers in said.items()}
    median = {present: float(np.median([s[present] for s in shares.values()])) for present in (False, True)}
    print("| name | said yes, concept absent | said yes, concept present | largest gap from the median name |")
    print("|---|---|---|---|")
    for name, share in shares.items():
        gap = max(abs(share[present] - median[present]) for present in (False, True))
        print(f"| {name} | {share[False]:.3f} | {share[True]:.3f} | {gap:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(model), "seeds": args.seeds, "concepts": args.concepts,
                                    "layers": list(ego.layers), "order": ego.config.recognition_order,
                                    "said yes": {name: {"absent": s[False], "present": s[True]}
                                                 for name, s in shares.items()}}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
