# SPDX-License-Identifier: Apache-2.0
"""Recognition along the toy camera's pan, against the camera's own ground truth: what the demo's events would say.

The toy camera (``ego-ros camera toy``, ``scripts/run.sh``) pans across its personal instances and other objects;
each frame knows which share of every object is in view. This registers the camera's instances from their
reference views (as run.sh does), asks the engine about every frame of ``--seconds`` of the pan (``--every``
seconds apart), and tallies per instance: how often it is said present when at least 60% of it is in view, and
absent when none of it is (frames in between are not counted), with precision, recall and F1 over those frames.
The same frames asked with the name alone (no memory: "Is Rex in this image?") make the baseline the memory must
beat; the macro F1 at other thresholds, from the same scores, shows how much the choice of one matters.

Examples::

    python bench/toy_camera.py                        # the committed toy model, camera seed 0, 60 s, as run.sh
    python bench/toy_camera.py --seed 7 --views 1 --order image_first
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

from ego_ros import toy  # noqa: E402
from ego_ros.engine import Ego  # noqa: E402
from ego_ros.engine.images import to_rgb  # noqa: E402
from ego_ros.toy.camera import ToyCamera  # noqa: E402
from ego_ros.toy.tally import Tally  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="toy model folder (default: the committed one)")
    parser.add_argument("--seed", type=int, default=0, help="the camera's seed (its instances and shots)")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--views", type=int, default=3, help="reference views registered per instance")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between the frames asked about")
    parser.add_argument("--order", choices=("concept_first", "image_first"), default=None)
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="score at which an instance is said present (default 0.5, as scripts/run.sh)")
    parser.add_argument("--out", type=Path, default=None, help="write the tally as JSON here")
    args = parser.parse_args(argv)

    model = args.model or toy.model_dir()  # a folder given is measured as it is
    camera = ToyCamera(args.instances, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="ego-toy-camera-"))
    ego = Ego.load(str(model), memory_dir=work / "memory", calibration_dir=work / "calibration")
    if args.order:
        ego.config.recognition_order = args.order
    for name in camera.names:
        ego.register(name, camera.reference_views(name, args.views))
    scored = []  # (frame, {"memory": the engine's scores, "name alone": the scores of the name alone})
    times = np.arange(0.0, args.seconds, args.every)
    for t in tqdm(times, desc="frames", unit="frame"):
        frame = camera.frame_at(float(t))
        (encoded,) = ego.backend.encode([to_rgb(frame.image, ego.config.max_image_pixels)])
        scored.append((frame, {"memory": ego.recognize(encoded),
                               "name alone": ego.yes_probabilities(encoded, {name: [] for name in camera.names})}))

    def tallied(threshold: float, way: str = "memory") -> Tally:
        tally = Tally(camera)
        for frame, scores in scored:
            tally.add(frame, {name for name, p in scores[way].items() if p >= threshold})
        return tally

    tally, name_alone = tallied(args.threshold), tallied(args.threshold, "name alone")
    print(f"\n### The toy camera, seed {args.seed}: {len(times)} frames over {args.seconds:.0f} s, "
          f"{args.views} reference view(s) each, {ego.config.recognition_order}, threshold {args.threshold:g}\n")
    print(tally.table())
    thresholds = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    others = {t: tallied(t).macro_f1 for t in thresholds}
    # the name alone's answers sit lower than a memory's: compared at its own best threshold too, not only at ours
    name_alone_at = {t: tallied(t, "name alone").macro_f1 for t in thresholds}
    best = max(name_alone_at, key=name_alone_at.get)
    print(f"\nthe name alone, no memory: macro F1 {100 * name_alone.macro_f1:.1f} "
          f"({100 * name_alone_at[best]:.1f} at its best threshold, {best:g})")
    print("macro F1 at other thresholds: " + ", ".join(f"{t:g}: {100 * f:.1f}" for t, f in others.items()))
    if args.out:
        rows = {name: dict(vars(c), precision=c.precision, recall=c.recall, f1=c.f1) for name, c in tally.rows.items()}
        record = {"seed": args.seed, "threshold": args.threshold, "rows": rows, "macro_f1": tally.macro_f1,
                  "name_alone_macro_f1": name_alone.macro_f1, "macro_f1_at": others,
                  "name_alone_macro_f1_at": name_alone_at}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
