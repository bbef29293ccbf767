# SPDX-License-Identifier: Apache-2.0
"""The concept prefix cache and one image pass for recognition: time to first token and recognition per frame.

On a model with Qwen2.5-VL-7B's layout narrowed for a CPU (``real_sizes.make_model("qwen2_5_vl_7b",
narrow=True)``: 28 decoder layers, 28 query / 4 key-value heads, a 32-deep vision tower, 16 wide per head), random
weights, wrapped in an Ego. Every figure of a table comes from the same run, so only the ratios carry over to
other machines. Concept memories are made directly (the first K visual tokens of a random view per concept, K = 64
as ``max_tokens_per_view``): registration is not what is timed, and a memory's cost in a prompt is its length.

Measured, as medians over ``--repeats``, the two ways of each row alternating (load on the machine drifts):

* time to first token of a question (``ask`` with one new token: encode the frame, prefill, one step; and the part
  after encoding), with the concept prefix cache off and on (warm: the same concepts as the question before), for
  1 and 10 concepts in context; and what copying the cached prefix would cost per question (a deep copy) against
  the shared-tensor fork the engine uses, next to the prefill it saves;
* recognition of one frame (``recognize``: encode, then score) with 1, 10 and 30 concepts: one prompt per concept
  (concept first) versus one image pass (image first, the frame prefilled once).

Examples::

    python bench/prefix_and_recognition.py
    python bench/prefix_and_recognition.py --repeats 5 --image-size 640x480 --recognition-concepts 1,10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ego_ros.engine import Ego  # noqa: E402
from ego_ros.engine.config import EgoConfig  # noqa: E402
from ego_ros.engine.images import to_rgb  # noqa: E402
from ego_ros.engine.loading import LoadedModel  # noqa: E402
from ego_ros.engine.memory import ConceptMemory, ViewRecord  # noqa: E402
from ego_ros.engine.prefix_cache import fork, prefill, prefix_batch  # noqa: E402
from ego_ros.testing.real_sizes import make_model  # noqa: E402

PRESET = "qwen2_5_vl_7b"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median reported)")
    parser.add_argument("--image-size", default="320x240", help="test image and view size, WxH")
    parser.add_argument("--question-concepts", default="1,10")
    parser.add_argument("--recognition-concepts", default="1,10,30")
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.image_size.split("x"))
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())

    model, tokenizer, image_processor = make_model(PRESET, narrow=True, max_pixels=width * height)
    loaded = LoadedModel(model, tokenizer, image_processor, f"{PRESET} (narrow, random weights)",
                         torch.device("cpu"), torch.float32)
    most = max(int(n) for n in args.recognition_concepts.split(",") + args.question_concepts.split(","))
    config = EgoConfig(max_image_pixels=width * height, max_concepts_in_context=most, layers=(7, 14))
    ego = Ego(loaded, config, Path(tempfile.mkdtemp(prefix="ego-bench-memory-")))
    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    names = [f"concept {i}" for i in range(most)]
    make_memories(ego, names, width, height, rng)
    (encoded,) = ego.backend.encode([to_rgb(frame, config.max_image_pixels)])
    print(f"\n{PRESET}, narrow (28 layers, 28/4 heads, hidden {ego.hidden_size}), random weights, float32 on the CPU "
          f"({torch.get_num_threads()} threads); {width}x{height} frame = {encoded.num_tokens} visual tokens, "
          f"{config.max_tokens_per_view} tokens per concept; median of {args.repeats}\n")

    ego.ask("Warm up.", frame, max_new_tokens=1)
    rows = [first_token(ego, frame, names[:int(n)], args.repeats) for n in args.question_concepts.split(",")]
    recognition = [recognition_row(ego, frame, names[:int(n)], args.repeats)
                   for n in args.recognition_concepts.split(",")]

    print("| concepts in context | prompt tokens | cached prefix tokens | first token, no cache | first token, "
          "cached prefix | speed-up | after encoding: no cache | cached prefix | speed-up | prefix prefill | "
          "deep copy of its cache | fork |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        off, on = row["off"], row["on"]
        print(f"| {row['count']} | {row['prompt_tokens']} | {row['prefix_tokens']} | {off['total']:.2f} s | "
              f"{on['total']:.2f} s | {off['total'] / on['total']:.2f}x | {off['generate']:.2f} s | "
              f"{on['generate']:.2f} s | {off['generate'] / on['generate']:.2f}x | {row['prefill']:.2f} s | "
              f"{row['deepcopy'] * 1e3:.1f} ms | {row['fork'] * 1e3:.2f} ms |")

    print("\n| concepts per frame | one prompt per concept | one image pass | speed-up | frames/s, per concept | "
          "frames/s, one pass |")
    print("|---|---|---|---|---|---|")
    for row in recognition:
        first, after = row["concept_first"], row["image_first"]
        print(f"| {row['count']} | {first:.2f} s | {after:.2f} s | {first / after:.1f}x | {1 / first:.2f} | "
              f"{1 / after:.2f} |")
    return 0


def make_memories(ego: Ego, names: list[str], width: int, height: int, rng) -> None:
    """One memory per name: the first K visual tokens of a random view (their number is what costs)."""
    views = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(2)]
    encoded = ego.backend.encode([to_rgb(v, ego.config.max_image_pixels) for v in views])
    k = ego.config.max_tokens_per_view
    for i, name in enumerate(tqdm(names, desc="memories")):
        image = encoded[i % len(encoded)]
        now = time.time()
        record = ViewRecord(grid_thw=image.grid_thw, indices=list(range(k)), keywords=["thing"], area_percent=20.0,
                            area_parsed=True, num_visual_tokens=image.num_tokens, layers=list(ego.layers))
        ego.store.put(ConceptMemory(name, image.features[:k].detach().clone(), [record], list(ego.layers), k,
                                    ego.model_name, ego.fingerprint, now, now))


def timed(fn, repeats: int, label: str) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs."""
    seconds = []
    for _ in tqdm(range(repeats), desc=label, leave=False):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def recognition_row(ego: Ego, frame, names: list[str], repeats: int) -> dict:
    """Median seconds per frame of ``recognize`` over ``names``, in each order, the two alternating."""
    seconds = {"concept_first": [], "image_first": []}
    for _ in tqdm(range(repeats), desc=f"recognition, {len(names)} concepts"):
        for order in seconds:
            ego.config.recognition_order = order
            start = time.perf_counter()
            ego.recognize(frame, names)
            seconds[order].append(time.perf_counter() - start)
    return {"count": len(names), **{order: statistics.median(s) for order, s in seconds.items()}}


def first_token(ego: Ego, frame, names: list[str], repeats: int) -> dict:
    """Medians of ask's first token (total, and after encoding) without and with the cached prefix, alternating."""
    question = "What is in this image?"
    ego.ask(question, frame, concepts=names, max_new_tokens=1)  # fills the cache with this prefix
    timings = {"off": [], "on": []}
    for _ in tqdm(range(repeats), desc=f"first token, {len(names)} concepts"):
        for way in timings:
            ego.config.prefix_cache = way == "on"
            answer = ego.ask(question, frame, concepts=names, max_new_tokens=1)
            timings[way].append(answer.timings)
    ego.config.prefix_cache = True
    medians = {way: {key: statistics.median(t[key] for t in runs) for key in ("total", "generate")}
               for way, runs in timings.items()}

    # The prefix alone: its prefill, and copying its cache per question (deep) versus the engine's fork.
    (encoded,) = ego.backend.encode([to_rgb(frame, ego.config.max_image_pixels)])
    memories = ego.store.snapshot(names)
    batch, parts = ego._question_prompt(question, [encoded], None, names, memories)
    length, rows, _ = ego._concept_prefix(batch, parts, list(memories.values()))
    prefix = prefix_batch(batch, length, batch.injected[:rows], [])
    cache = prefill(ego.model, ego.backend, prefix)
    return {
        "count": len(names), **medians, "prompt_tokens": answer.prompt_tokens, "prefix_tokens": length,
        "prefill": timed(lambda: prefill(ego.model, ego.backend, prefix), repeats, "prefix prefill"),
        "deepcopy": timed(lambda: copy.deepcopy(cache), repeats, "deep copy"),
        "fork": timed(lambda: fork(cache), repeats, "fork"),
    }


if __name__ == "__main__":
    sys.exit(main())
