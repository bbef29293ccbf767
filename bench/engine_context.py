# SPDX-License-Identifier: Apache-2.0
"""Prompt tokens Ego puts in context versus the full reference views, and register/ask wall time.

Runs the real engine on a tiny random Qwen2.5-VL (built offline into a temporary folder unless --model is given),
so times are those of this machine's CPU and only their ratios carry over; token counts are exact for any
Qwen2.5-VL at the same image size.

Examples::

    python bench/engine_context.py
    python bench/engine_context.py --image-size 640x480 --repeats 3
    python bench/engine_context.py --model /path/to/Qwen2.5-VL-7B-Instruct --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ego_ros.engine import Ego  # noqa: E402
from ego_ros.engine import prompts  # noqa: E402
from ego_ros.testing.tiny_model import build  # noqa: E402


def view(seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (height, width, 3), dtype=np.uint8)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: a tiny random Qwen2.5-VL built now)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of views and test images")
    parser.add_argument("--max-tokens-per-view", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of ask (median reported)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or str(build("qwen2_5_vl", Path(scratch) / "tiny"))
        rows = []
        for num_concepts in (1, 10):
            for num_views in (1, 5):
                ego = Ego.load(model, device=args.device, memory_dir=Path(scratch) / f"m{num_concepts}-{num_views}",
                               max_tokens_per_view=args.max_tokens_per_view, max_image_pixels=width * height,
                               max_concepts_in_context=num_concepts, area_max_new_tokens=4)
                register_times = []
                for c in range(num_concepts):
                    views = [view(100 * c + v, width, height) for v in range(num_views)]
                    start = time.perf_counter()
                    ego.register(f"concept {c}", views, area_percent=100.0)
                    register_times.append(time.perf_counter() - start)
                test = view(9999, width, height)
                ask_s, answer = timed(lambda: ego.ask("Where is concept 0?", test,
                                                      max_new_tokens=args.max_new_tokens), args.repeats)

                # The same question with every reference view itself in context instead of its memory.
                (test_image,) = ego.backend.encode([ego_image(test, width * height)])
                parts = [prompts.CONCEPTS_HEADER]
                for c in range(num_concepts):
                    refs = ego.backend.encode([ego_image(view(100 * c + v, width, height), width * height)
                                               for v in range(num_views)])
                    parts += [prompts.CONCEPT_INTRO.format(name=f"concept {c}"), *refs, ".\n"]
                parts += [test_image, "Where is concept 0?"]
                full_batch = ego.backend.build([parts])
                full_s, _ = timed(lambda: ego._generate(full_batch, args.max_new_tokens), args.repeats)
                rows.append((num_concepts, num_views, answer.prompt_tokens, full_batch.input_ids.shape[1],
                             statistics.median(register_times) / num_views, ask_s, full_s))

    print(f"\nimage {width}x{height}, K = {args.max_tokens_per_view}, {args.max_new_tokens} new tokens, "
          f"model {'tiny random Qwen2.5-VL' if not args.model else args.model}\n")
    header = ("concepts", "views", "Ego prompt", "full-view prompt", "ratio", "register/view s", "ask s",
              "full-view ask s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for c, v, ego_tokens, full_tokens, register_s, ask_s, full_s in rows:
        print(f"| {c} | {v} | {ego_tokens} | {full_tokens} | {full_tokens / ego_tokens:.1f}x | {register_s:.3f} "
              f"| {ask_s:.3f} | {full_s:.3f} |")
    return 0


def ego_image(array, max_pixels):
    from ego_ros.engine.images import to_rgb

    return to_rgb(array, max_pixels)


if __name__ == "__main__":
    sys.exit(main())
