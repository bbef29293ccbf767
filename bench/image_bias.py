# SPDX-License-Identifier: Apache-2.0
"""Whether the toy model's answer moves with the frame where its evidence does not: a bias of the image.

Each of ``--pairs`` personal (patterned) instances gets a memory of its own tokens in a reference view (as the trainer
makes memories) and is asked about three frames laid out alike (one random stream each: background, place, size and
distractors the same): the instance itself; another patterned instance (another kind or body colour); and that other
instance plain, without its pattern. The last two are negatives the memory tells apart equally well (the written
heads' evidence, the image-first pooling head's value at the answer's row, is about the same for both); an answer
that says "yes" more readily to the patterned one answers the frame's make-up, not the memory. Image first, as the
engine asks by default. Example::

    python bench/image_bias.py --pairs 120                 # the committed toy model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.feature_ceiling import pooled_evidence  # noqa: E402
from ego_ros import toy as toy_world  # noqa: E402
from ego_ros.engine import Ego  # noqa: E402
from ego_ros.engine.images import to_rgb  # noqa: E402
from ego_ros.toy import tasks as toy_tasks  # noqa: E402
from ego_ros.toy import world  # noqa: E402

FRAMES = ("the instance", "another, patterned", "another, plain")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="toy model folder (default: the committed one)")
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--seed", type=int, default=11, help="draws [seed, i]: two numbers, never a training stream")
    parser.add_argument("--out", type=Path, default=Path("bench/out/image_bias.json"))
    args = parser.parse_args(argv)
    model = args.model or toy_world.model_dir()  # a folder given is measured as it is
    work = Path(tempfile.mkdtemp())
    ego = Ego.load(str(model), memory_dir=work / "memory", calibration_dir=work / "calibration")
    log_odds, evidence = measure(ego, args.pairs, args.seed)
    results = {"model": str(model), "pairs": args.pairs, "seed": args.seed, "frames": {}}
    print("| frame | answer's log-odds, mean | said yes (P > 0.5) | written heads' evidence, mean |")
    print("|---|---|---|---|")
    for k, frame in enumerate(FRAMES):
        row = {"log-odds": float(log_odds[:, k].mean()), "said yes": float((log_odds[:, k] > 0).mean()),
               "evidence": float(evidence[:, k].mean())}
        results["frames"][frame] = row
        print(f"| {frame} | {row['log-odds']:+.2f} | {100 * row['said yes']:.0f}% | {row['evidence']:.3f} |")
    shift = log_odds[:, 1] - log_odds[:, 2]  # the same memory, two negatives alike to it
    results["patterned less plain"] = {"log-odds": float(shift.mean()),
                                       "standard error": float(shift.std() / np.sqrt(len(shift))),
                                       "evidence": float((evidence[:, 1] - evidence[:, 2]).mean())}
    print("patterned less plain: log-odds {log-odds:+.2f} (standard error {standard error:.2f}), "
          "evidence {evidence:+.3f}".format_map(results["patterned less plain"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


@torch.no_grad()
def measure(ego, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer's log-odds and the pooled evidence for each pair's three frames (``FRAMES``): (pairs, 3) each."""
    log_odds, evidence = np.zeros((pairs, len(FRAMES))), np.zeros((pairs, len(FRAMES)))
    with pooled_evidence(ego) as pooled:
        for i in tqdm(range(pairs), desc="pairs", unit="pair", file=sys.stderr):
            rng = np.random.default_rng([seed, i])
            instance = world.random_instance(rng, patterned=True)
            reference = world.render_scene(rng, instance)
            while (other := world.random_instance(rng, patterned=True)).kind == instance.kind \
                    and other.colour == instance.colour:
                pass
            layout = [int(x) for x in rng.integers(2 ** 31, size=2)]  # the three frames' one stream
            shown = (instance, other, world.Instance(other.kind, other.colour))
            frames = [world.render_scene(np.random.default_rng(layout), s) for s in shown]
            encoded = ego.backend.encode([to_rgb(s.image, ego.config.max_image_pixels) for s in [reference, *frames]])
            memory = encoded[0].features[list(toy_tasks.object_tokens(reference.subject.mask))]
            for k, frame in enumerate(encoded[1:]):
                p = ego.yes_probabilities(frame, {"Kalo": [memory]}, order="image_first")["Kalo"]
                log_odds[i, k] = np.log(p) - np.log1p(-p)
                evidence[i, k] = pooled[-1]
    return log_odds, evidence


if __name__ == "__main__":
    raise SystemExit(main())
