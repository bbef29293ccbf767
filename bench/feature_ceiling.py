# SPDX-License-Identifier: Apache-2.0
"""How much of the toy protocol the visual features alone can tell, against what the model's answer makes of them.

For every question of the toy protocol (each test image asked about each concept, Ego's tokens from one view, the
image first), these scores: the model's P(yes); the evidence the written heads hand to the layers above them (the
image-first pooling head's value at the answer's row, ``circuit.POOL_HEADS``: the memory rows' matches, pooled); both
again with a memory of the instance's own tokens (those it covers a quarter of in the reference view, as the trainer
makes memories) in place of Ego's: what the model makes of a memory like those it was trained on; a score with no
decoder at all: each memory row's best cosine match among the frame's visual tokens, averaged over the memory (the
comparison the toy model's written heads make, without their softmax); the same score for the instance's own tokens
(what the vision tower can tell, whatever Ego keeps); and Ego's memory again with each row seen only on the
directions the written matchers compare rows on (``circuit.BASIS_WIDTH`` directions the features vary most along,
from scenes of the trainer's writing stream, never a test seed; unit rows projected, as a layer's RMSNorm and the
matchers' queries and keys see them). Each is scored as the protocol scores (precision and recall per concept,
averaged, F1 from the two), with P(yes) at 0.5 and the written heads' evidence at 0 (the threshold their fit set:
what the layers above them would answer if they only passed the evidence on) and, for all, at the threshold that
does best on that seed: chosen with hindsight, an upper bound on what any read-out of the same evidence could reach.
Examples::

    python bench/feature_ceiling.py                  # the committed toy model, protocol seeds 3, 5 and 8
    python bench/feature_ceiling.py --model build/my-toy-model --seeds 3 --out bench/out/ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ego_ros import toy as toy_world  # noqa: E402
from ego_ros.engine import Ego  # noqa: E402
from ego_ros.engine.images import to_rgb  # noqa: E402
from ego_ros.evaluation import toy  # noqa: E402
from ego_ros.evaluation.methods import introduction  # noqa: E402
from ego_ros.evaluation.metrics import recognition_score  # noqa: E402
from ego_ros.toy import circuit as toy_circuit  # noqa: E402
from ego_ros.toy import tasks as toy_tasks  # noqa: E402
from ego_ros.toy import train as toy_train  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="toy model folder (default: the committed one, ego_ros/toy/model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 8], help="protocol seeds")
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/out/feature_ceiling.json"))
    args = parser.parse_args(argv)
    # a folder given is measured as it is, whatever recipe made it (model_dir would retrain a stale one in it)
    model = args.model or toy_world.model_dir()
    work = Path(tempfile.mkdtemp())
    ego = Ego.load(str(model), memory_dir=work / "memory", calibration_dir=work / "calibration")
    results = {"model": str(model), "layers": list(ego.layers), "seeds": {}}
    basis = matcher_basis(ego)
    for seed in args.seeds:
        scores, present = questions(ego, seed, args.concepts, basis)
        # the evidence at 0: where the writing stage put its threshold (circuit.install), no hindsight
        row = {"P(yes) at 0.5": f1(scores["answer"] > 0.5, present),
               "written heads' evidence at 0": f1(scores["evidence"] > 0, present),
               **{f"{COLUMNS[key]}, best threshold": best_f1(score, present) for key, score in scores.items()}}
        if not results["seeds"]:
            print("| seed | " + " | ".join(row) + " |")
            print("|---" * (len(row) + 1) + "|")
        results["seeds"][seed] = row
        print(f"| {seed} | " + " | ".join(f"{100 * v:.1f}" for v in row.values()) + " |")
    means = {key: float(np.mean([r[key] for r in results["seeds"].values()])) for key in row}
    results["mean"] = means
    print("| mean | " + " | ".join(f"{100 * v:.1f}" for v in means.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


@torch.no_grad()
def matcher_basis(ego, scenes: int = 400) -> torch.Tensor:
    """The ``circuit.BASIS_WIDTH`` directions the unit feature rows of ``scenes`` scenes vary most along (rows of
    a (width, D) tensor), the scenes drawn from the trainer's writing stage's stream, past the steps it uses."""
    rng = toy_train.data_rng(0, "writing", 1)
    images = [toy_world.render_scene(rng).image for _ in range(scenes)]
    rows = torch.cat([e.features for e in ego.backend.encode([to_rgb(i, ego.config.max_image_pixels) for i in images])])
    _, _, vt = torch.linalg.svd(unit_rows(rows - rows.mean(0)).double(), full_matrices=False)
    return vt[: toy_circuit.BASIS_WIDTH].float()


# The scores of every (test image, concept) question, by key, and their columns' names
COLUMNS = {"answer": "P(yes)", "evidence": "written heads' evidence",
           "answer, own tokens": "P(yes), the instance's own tokens as memory",
           "evidence, own tokens": "written heads' evidence, the instance's own tokens as memory",
           "features": "features alone", "features, own tokens": "features of the instance's own tokens",
           "features on basis": "features on the matchers' directions"}


@torch.no_grad()
def questions(ego, seed: int, concepts: int, basis: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every score of ``COLUMNS`` for every (test image, concept) question, (images, concepts) each, and the truth.

    P(yes) and the written heads' evidence come twice: with Ego's memory, and with a memory of the instance's own
    tokens, as the trainer makes one; the features' scores are of Ego's memory, of the own tokens, and of Ego's
    memory on the matchers' ``basis``."""
    data = toy.recognition_set(concepts, seed=seed, views=1)
    introductions = {name: introduction("ego", info, 1) for name, info in toy.introduce(ego, data).items()}
    names = list(introductions)
    scores = {key: np.zeros((len(data.tests), len(names))) for key in COLUMNS}
    # Ego's memory of each concept; and as the trainer makes one, the tokens its instance covers (as the model
    # reads them, and as unit rows)
    kept, kept_on_basis, owned, owned_units = {}, {}, {}, {}
    for name in names:
        (memory,) = introductions[name]  # Ego's kept vectors of the one view
        kept[name] = unit_rows(memory)
        kept_on_basis[name] = kept[name] @ basis.T
        (view,) = ego.backend.encode([to_rgb(data.references[name][0], ego.config.max_image_pixels)])
        owned[name] = view.features[list(toy_tasks.object_tokens(data.reference_masks[name][0]))]
        owned_units[name] = unit_rows(owned[name])
    present = np.array([[data.present(scene, name) for name in names] for scene in data.tests])
    with pooled_evidence(ego) as pooled:
        for i, scene in enumerate(tqdm(data.tests, desc=f"seed {seed}", unit="image", file=sys.stderr)):
            (encoded,) = ego.backend.encode([to_rgb(scene.image, ego.config.max_image_pixels)])
            frame = unit_rows(encoded.features)
            frame_on_basis = frame @ basis.T
            for j, name in enumerate(names):
                # one concept a call, so that the last forward is this concept's question
                for suffix, memory in (("", introductions[name]), (", own tokens", [owned[name]])):
                    scores["answer" + suffix][i, j] = ego.yes_probabilities(
                        encoded, {name: memory}, order="image_first")[name]
                    scores["evidence" + suffix][i, j] = pooled[-1]
                scores["features"][i, j] = best_match(kept[name], frame)
                scores["features, own tokens"][i, j] = best_match(owned_units[name], frame)
                scores["features on basis"][i, j] = best_match(kept_on_basis[name], frame_on_basis)
    for name in names:  # every seed names its concepts alike
        ego.forget(name)
    return scores, present


@contextmanager
def pooled_evidence(ego):
    """A list that gets, for every forward of ``ego``'s model, the written heads' evidence at its last row: the
    image-first pooling head's value (``circuit.POOL_HEADS``) before ``o_proj``, of the batch's first prompt."""
    layer, head = toy_circuit.POOL_HEADS["image_first"]
    pooling = ego.backend.attention_module(layer)
    pooled: list[float] = []
    hook = pooling.o_proj.register_forward_pre_hook(
        lambda _, args: pooled.append(float(args[0][0, -1, head * pooling.head_dim])))
    try:
        yield pooled
    finally:
        hook.remove()


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def best_match(memory: torch.Tensor, frame: torch.Tensor) -> float:
    """Each memory row's best cosine among the frame's rows (both unit rows), averaged over the memory."""
    return float((memory @ frame.T).max(dim=1).values.mean())


def f1(said_yes: np.ndarray, present: np.ndarray) -> float:
    """The protocol's F1 of (images, concepts) decisions."""
    return recognition_score([(j, said_yes[i, j], present[i, j]) for i in range(present.shape[0])
                              for j in range(present.shape[1])]).f1


def best_f1(score: np.ndarray, present: np.ndarray) -> float:
    """The protocol's F1 at the threshold on ``score`` that does best (hindsight)."""
    return max(f1(score > t, present) for t in np.unique(np.quantile(score, np.linspace(0.5, 0.999, 300))))


if __name__ == "__main__":
    raise SystemExit(main())
