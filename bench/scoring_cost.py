# SPDX-License-Identifier: Apache-2.0
"""Eq. 3 the way the engine computes it versus from ``output_attentions=True``: time and memory, one run.

The engine recomputes only the keyword rows' attention on the selected layers (pre-hooks) and stops the pass after
the deepest one; the textbook way runs eager attention on every layer and keeps every S x S map. The model here has
the attention shape of Qwen2.5-VL-7B (28 layers, 28 query / 4 key-value heads) with a narrow hidden size, random
weights, so the attention maps are real-size while the matmuls stay cheap; each method runs in its own process so
that its peak resident memory is its own.

Examples::

    python bench/scoring_cost.py
    python bench/scoring_cost.py --image-size 1280x720 --layers 7-20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(folder: Path) -> Path:
    """A Qwen2.5-VL with the 7B's decoder attention layout (28 layers, 28/4 heads), hidden 28 * 8."""
    from ego_ros.testing.tiny_model import build

    return build("qwen2_5_vl", folder, text_overrides=dict(
        hidden_size=224, intermediate_size=448, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}))  # sums to head_dim / 2 = 4


def measure(method: str, model_dir: str, size: tuple[int, int], layers: list[int]) -> dict:
    """Run one scoring pass the given way in this process; report seconds and peak RSS growth."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText

    from ego_ros.engine import Ego
    from ego_ros.engine import prompts
    from ego_ros.engine.images import to_rgb
    from ego_ros.engine.scoring import score_visual_tokens

    ego = Ego.load(model_dir, memory_dir=tempfile.mkdtemp(), layers=layers, max_image_pixels=size[0] * size[1])
    if method == "eager":
        ego.model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="eager").eval()
    image = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    (encoded,) = ego.backend.encode([to_rgb(image, size[0] * size[1])])
    keywords = ego.tokenizer("red mug, blue handle, ceramic, kitchen, cup", add_special_tokens=False)["input_ids"]
    batch = ego.backend.build([[encoded, prompts.KEYWORDS]], responses=[keywords])
    rows = torch.arange(batch.input_ids.shape[1] - len(keywords), batch.input_ids.shape[1])
    cols = batch.image_positions[0][0]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        if method == "engine":
            scores = score_visual_tokens(ego.model, ego.backend, batch, rows, cols, layers)
        else:
            out = ego.model(**batch.model_inputs(), pixel_values=batch.pixel_values, output_attentions=True,
                            use_cache=False)
            scores = torch.stack([out.attentions[i][0][:, rows][:, :, cols] for i in layers]).mean(dim=(0, 1, 2))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_growth_mb": (peak - baseline) / 1024, "sequence": batch.input_ids.shape[1],
            "scores": scores.tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", default="1280x720", help="WIDTHxHEIGHT of the view")
    parser.add_argument("--layers", default="7-20", help="selected layers, FIRST-LAST (default: the middle half)")
    parser.add_argument("--method", choices=("engine", "eager"), help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    first, last = (int(v) for v in args.layers.split("-"))
    layers = list(range(first, last + 1))

    if args.method:
        print(json.dumps(measure(args.method, args.model, size, layers)))
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        model = build_model(Path(scratch) / "model")
        results = {}
        for method in ("engine", "eager"):
            done = subprocess.run([sys.executable, __file__, "--method", method, "--model", str(model),
                                   "--image-size", args.image_size, "--layers", args.layers],
                                  capture_output=True, text=True, check=True)
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    engine, eager = results["engine"], results["eager"]
    difference = max(abs(a - b) for a, b in zip(engine["scores"], eager["scores"]))
    print(f"\nview {size[0]}x{size[1]}: sequence of {engine['sequence']} tokens, {len(engine['scores'])} visual; "
          f"layers {first}-{last} of 28; 28 heads; max |score difference| {difference:.1e}\n")
    print("| eq. 3 computed | seconds | peak RSS growth MB |")
    print("|---|---|---|")
    print(f"| engine: keyword rows on the selected layers, stop after layer {last} | {engine['seconds']:.3f} "
          f"| {engine['peak_growth_mb']:.0f} |")
    print(f"| output_attentions=True, eager, every layer | {eager['seconds']:.3f} | {eager['peak_growth_mb']:.0f} |")
    print(f"| ratio | {eager['seconds'] / engine['seconds']:.1f}x | "
          f"{eager['peak_growth_mb'] / max(engine['peak_growth_mb'], 1):.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
