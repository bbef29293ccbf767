# SPDX-License-Identifier: Apache-2.0
"""The concept prefix cache and one image pass for recognition: time to first token and recognition per frame.

On a model with Qwen2.5-VL-7B's layout narrowed for a CPU (``real_sizes.make_model("qwen2_5_vl_7b",
narrow=True)``: 28 decoder layers, 28 query / 4 key-value heads, a 32-deep vision tower, 16 wide per head), random
weights, wrapped in an Ego. Every figure of a table comes from the same run, so only the ratios carry over to
other machines. Concept memories are made directly (the first K visual tokens of a random view per concept, K = 64
as ``max_tokens_per_view``): registration is not what is timed, and a memory's cost in a prompt is its length.

The frame is encoded once and timed once (both ways of every row encode it the same way); what is timed per row
is what differs. Medians over ``--repeats``, the two ways of each row alternating (load on the machine drifts):

* time to first token of a question after encoding: ask's prompt built, prefilled (whole, or its rest after the
  cached concept prefix: warm, the same concepts as the question before) and one token generated, for 1 and 10
  concepts in context; and what copying the cached prefix would cost per question (a deep copy) against the
  shared-tensor fork the engine uses, next to the prefill it saves;
* recognition of one encoded frame (``recognize``) with 1, 10 and 30 concepts: one prompt per concept (concept
  first) versus one image pass (image first, the frame prefilled once).

Examples::

    python bench/prefix_and_recognition.py
    python bench/prefix_and_recognition.py --repeats 5 --image-size 320x240 --recognition-concepts 1,10
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
    parser.add_argument("--image-size", default="640x480", help="test image and view size, WxH")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared machine more threads spin against other "
                             "jobs (a 111-token forward took 0.16 s on 1 thread, 0.7 to 3.4 s on 2)")
    parser.add_argument("--question-concepts", default="1,10")
    parser.add_argument("--recognition-concepts", default="1,10,30")
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.image_size.split("x"))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

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
    encode = timed(lambda: ego.backend.encode([to_rgb(frame, config.max_image_pixels)]), args.repeats, "encode")
    (encoded,) = ego.backend.encode([to_rgb(frame, config.max_image_pixels)])
    print(f"\n{PRESET}, narrow (28 layers, 28/4 heads, hidden {ego.hidden_size}), random weights, float32 on the CPU "
          f"({torch.get_num_threads()} threads); {width}x{height} frame = {encoded.num_tokens} visual tokens, "
          f"{config.max_tokens_per_view} tokens per concept; median of {args.repeats}; encoding the frame: "
          f"{encode:.2f} s\n")

    rows = [first_token(ego, encoded, names[:int(n)], args.repeats) for n in args.question_concepts.split(",")]
    recognition = [recognition_row(ego, encoded, names[:int(n)], args.repeats)
                   for n in args.recognition_concepts.split(",")]

    print("| concepts in context | prompt tokens | cached prefix tokens | first token after encoding, no cache | "
          "cached prefix | speed-up | prefix prefill | deep copy of its cache | fork |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['count']} | {row['prompt_tokens']} | {row['prefix_tokens']} | {row['off']:.2f} s | "
              f"{row['on']:.2f} s | {row['off'] / row['on']:.2f}x | {row['prefill']:.2f} s | "
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
    """Median seconds per encoded frame of ``recognize`` over ``names``, in each order, the two alternating."""
    seconds = {"concept_first": [], "image_first": []}
    ego.recognize(frame, names[:1])  # warm-up
    for _ in tqdm(range(repeats), desc=f"recognition, {len(names)} concepts"):
        for order in seconds:
            ego.config.recognition_order = order
            start = time.perf_counter()
            ego.recognize(frame, names)
            seconds[order].append(time.perf_counter() - start)
    return {"count": len(names), **{order: statistics.median(s) for order, s in seconds.items()}}


def first_token(ego: Ego, encoded, names: list[str], repeats: int) -> dict:
    """Median seconds to ask's first token after encoding, without and with the cached prefix, alternating: what
    ``ask`` does once the frame is encoded (prompt, prefix lookup, generation of one token)."""
    question = "What is in this image?"

    def first():
        memories = ego.store.snapshot(names)
        prompt, parts = ego._question_prompt(question, [encoded], None, names, memories)
        batch = ego.backend.build([prompt])
        ego._generate(batch, 1, prefix=ego._concept_prefix(batch, parts, [memories[n] for n in names]))
        return batch

    batch = first()  # fills the cache with this prefix
    seconds = {"off": [], "on": []}
    for _ in tqdm(range(repeats), desc=f"first token, {len(names)} concepts"):
        for way in seconds:
            ego.config.prefix_cache = way == "on"
            start = time.perf_counter()
            first()
            seconds[way].append(time.perf_counter() - start)
    ego.config.prefix_cache = True

    # The prefix alone: its prefill, and copying its cache per question (deep) versus the engine's fork.
    memories = ego.store.snapshot(names)
    prompt, parts = ego._question_prompt(question, [encoded], None, names, memories)
    batch = ego.backend.build([prompt])
    length, rows, _ = ego._concept_prefix(batch, parts, list(memories.values()))
    prefix = prefix_batch(batch, length, batch.injected[:rows], [])
    cache = prefill(ego.model, ego.backend, prefix)
    return {
        "count": len(names), **{way: statistics.median(s) for way, s in seconds.items()},
        "prompt_tokens": batch.input_ids.shape[1], "prefix_tokens": length,
        "prefill": timed(lambda: prefill(ego.model, ego.backend, prefix), repeats, "prefix prefill"),
        "deepcopy": timed(lambda: copy.deepcopy(cache), repeats, "deep copy"),
        "fork": timed(lambda: fork(cache), repeats, "fork"),
    }


if __name__ == "__main__":
    sys.exit(main())
