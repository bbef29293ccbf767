# SPDX-License-Identifier: Apache-2.0
"""The engine at real model sizes with random weights: register, answer and recognition times, and peak memory.

Builds each preset's architecture (``ego_ros/testing/presets``: the published Qwen2.5-VL-7B and 3B configs) with
random weights directly on the device, in bf16, and runs the real engine on it: random weights give real timings,
not real answers (a keyword answer is random text, so every view keeps K tokens: the slow case). Measures:

- register: seconds per view (10 concepts of 1 view, and 1 concept of 5 views), after a warm-up (a registration,
  an appended view and an answer: kernels chosen, a static cache's compile paid);
- ask with 10 concepts in context: time to the first answer token and to 64 answer tokens;
- recognize 10 concepts per frame: frames per second;
- peak GPU memory (``torch.cuda.max_memory_allocated``) over all of it, and the weights' share.

- with ``--askers N``: N questions at once (threads), aggregate answer tokens per second: through one lock for the
  in-process engine (what a node's one inference thread does), all in flight for the vLLM variant.

The ``vllm`` variant serves the same weights from a vLLM server (``scripts/serve_vllm.sh`` from
``$EGO_ROS_VLLM_VENV``, default ``.venv-vllm``; on a GPU a venv with ``pip install vllm``), started here on the
model's folder (a preset is saved to a temporary one first), with ``--vllm-memory`` of the GPU for it beside the
engine's own copy; ``image_layout`` is the in-process engine with the same memory layout, the token-for-token
comparison.

On a CPU, ``--narrow`` builds the same layouts at 16 per head so the script can be checked end to end here, and
``--model`` runs a checkpoint folder instead of the presets (the toy model: the vLLM variant's dry run, since
vLLM's CPU attention needs heads at least 32 wide).

Examples::

    python bench/gpu.py                                   # both presets, cuda, bf16
    python bench/gpu.py --presets qwen2_5_vl_3b --json out.json
    python bench/gpu.py --variants default static_cache --decode-probe   # engine settings side by side
    python bench/gpu.py --device cpu --dtype float32 --narrow --repeats 1   # a dry run on a laptop
    python bench/gpu.py --variants default image_layout vllm --askers 16  # vLLM side by side (GPU)
    python bench/gpu.py --model ego_ros/toy/model --device cpu --dtype float32 --variants default vllm --askers 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ego_ros.engine import Ego, prompts  # noqa: E402
from ego_ros.engine.config import EgoConfig  # noqa: E402
from ego_ros.engine.loading import LoadedModel, load_model  # noqa: E402
from ego_ros.testing import vllm_server as local_vllm  # noqa: E402
from ego_ros.testing.real_sizes import make_model, preset_names  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def frame(seed: int, width: int = 640, height: int = 480) -> np.ndarray:
    """A camera-sized image with some structure (random pixels are the worst case for nothing, but look odd)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(60, 200, 3), dtype=np.uint8)
    x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
    image[y:y + height // 3, x:x + width // 3] = rng.integers(0, 255, 3)
    return image


class Clock:
    """Wall time with the device's queue drained first, so asynchronous kernels are counted where they run."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


# Engine settings compared on the same model: EgoConfig fields over the defaults.
VARIANTS = {
    "default": {},  # the concept prefix cache on, one prompt per concept in recognition
    "no_prefix_cache": {"prefix_cache": False},
    "image_first": {"recognition_order": "image_first"},  # one image pass for all concepts
    "static_cache": {"static_cache": True},  # compiled decoding (replaces the prefix cache in generation)
    "image_layout": {"memory_layout": "image"},  # memories as images: the vLLM variant's prompts, in process
    "vllm": {"memory_layout": "image", "generation": "vllm"},  # a vLLM server on the same weights
}
REPO = Path(__file__).resolve().parents[1]


def measure(name: str, args) -> list[dict]:
    """Every variant of ``args.variants`` on one model of preset ``name``: one result row each."""
    device = torch.device(args.device)
    clock = Clock(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = clock.now()
    if args.model:
        loaded = load_model(name, device=str(device), dtype=DTYPES[args.dtype], placeholder=prompts.CONCEPT_PLACEHOLDER)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer, image_processor = make_model(name, device=device, dtype=DTYPES[args.dtype],
                                                       narrow=args.narrow)
        loaded = LoadedModel(model, tokenizer, image_processor, name, device, DTYPES[args.dtype])
    built_s = clock.now() - started
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    common = {"preset": name, "narrow": args.narrow, "dtype": args.dtype, "build_s": round(built_s, 1),
              "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "weights_gib": round(weights_gib, 2) if cuda else None}
    print(f"[{name}] built in {built_s:.1f} s", flush=True)
    rows = []
    for variant in args.variants:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        row = {**common, "variant": variant}
        try:
            settings = dict(max_concepts_in_context=args.concepts, max_image_pixels=640 * 480, **VARIANTS[variant])
            with vllm_server(loaded, args) if variant == "vllm" else nullcontext() as url:
                config = EgoConfig(**settings, **({"vllm_url": url} if url else {}))
                row.update(engine_figures(loaded, config, clock, args, f"{name}, {variant}"))
        except Exception as error:  # one variant failing (a compile, say) must not lose the others' figures
            row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
            print(f"[{name}, {variant}] failed: {row['error']}", flush=True)
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
    if args.decode_probe:
        rows[-1]["decode_probe_64_tokens"] = decode_probe(model, tokenizer, clock)
        print(f"[{name}] decode probe: {rows[-1]['decode_probe_64_tokens']}", flush=True)
    del model, loaded
    return rows


def engine_figures(loaded, config: EgoConfig, clock: Clock, args, label: str) -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as scratch:
        ego = Ego(loaded, config, Path(scratch) / "memory", calibration_dir=Path(scratch) / "calibration")
        print(f"[{label}] layers for scoring: {ego.layers}", flush=True)
        start = clock.now()
        ego.register("warm-up", [frame(0)])  # kernels compiled, allocator grown: not counted
        ego.register("warm-up", [frame(1)], append=True)
        ego.ask("Where is warm-up?", frame(2), max_new_tokens=64)
        ego.forget("warm-up")
        result["warm_up_s"] = round(clock.now() - start, 1)
        per_view = []
        for c in range(args.concepts):
            start = clock.now()
            ego.register(f"concept {c}", [frame(100 + c)])
            per_view.append(clock.now() - start)
        start = clock.now()
        ego.register("five views", [frame(200 + v) for v in range(5)])
        five_views_s = clock.now() - start
        ego.forget("five views")
        result["register_s_per_view"] = round(statistics.median(per_view), 3)
        result["register_s_per_view_of_5"] = round(five_views_s / 5, 3)
        print(f"[{label}] register: {result['register_s_per_view']} s/view (1 view), "
              f"{result['register_s_per_view_of_5']} s/view (5 views)", flush=True)

        question = "What is concept 0 doing, and where is concept 1?"
        first_token, totals, tokens = [], [], []
        for r in range(args.repeats):
            arrivals = []
            start = clock.now()
            answer = ego.ask(question, frame(300 + r), max_new_tokens=64,
                             on_new_text=lambda text, count: arrivals.append(time.perf_counter()))
            total = clock.now() - start
            first_token.append((arrivals[0] if arrivals else total + start) - start)
            totals.append(total)
            tokens.append(answer.new_tokens)
        result["concepts_in_context"] = len(answer.concepts)
        result["prompt_tokens"] = answer.prompt_tokens
        result["first_token_s"] = round(statistics.median(first_token), 3)
        result["answer_s"] = round(statistics.median(totals), 3)
        result["answer_tokens"] = int(statistics.median(tokens))
        print(f"[{label}] ask ({result['concepts_in_context']} concepts, {answer.prompt_tokens} prompt tokens): "
              f"first token {result['first_token_s']} s, {result['answer_tokens']} tokens in {result['answer_s']} s",
              flush=True)

        ego.recognize(frame(400))  # warm-up
        start = clock.now()
        frames = max(2, args.repeats * 2)
        for f in range(frames):
            scores = ego.recognize(frame(401 + f))
        result["recognize_concepts"] = len(scores)
        result["recognize_fps"] = round(frames / (clock.now() - start), 2)
        print(f"[{label}] recognize {len(scores)} concepts: {result['recognize_fps']} frames/s", flush=True)
        if args.askers:
            result.update(concurrent_askers(ego, question, clock, args.askers))
            print(f"[{label}] {args.askers} askers at once: {result['askers_tokens_per_s']} answer tokens/s "
                  f"({result['askers_s']} s for all)", flush=True)
    return result


def concurrent_askers(ego: Ego, question: str, clock: Clock, askers: int) -> dict:
    """``askers`` questions at once, 64 tokens each: in process through one lock (one worker, as a node), to a
    vLLM server all in flight (it batches them)."""
    lock = threading.Lock() if ego.server is None else nullcontext()
    tokens = []

    def one(i: int):
        with lock:
            tokens.append(ego.ask(question, frame(500 + i), max_new_tokens=64).new_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(askers)]
    start = clock.now()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = clock.now() - start
    return {"askers": askers, "askers_s": round(seconds, 3), "askers_tokens_per_s": round(sum(tokens) / seconds, 1)}


@contextmanager
def vllm_server(loaded, args):
    """A vLLM server on ``loaded``'s weights until the block ends: yields its URL. A preset's random weights are
    saved to a temporary folder first (the server reads a checkpoint)."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(loaded.name)
        if not folder.is_dir():
            folder = Path(scratch) / "model"
            loaded.model.save_pretrained(folder)
            loaded.tokenizer.save_pretrained(folder)
            loaded.image_processor.save_pretrained(folder)
        port, log = 8090, Path(scratch) / "server.log"
        extra = ["--gpu-memory-utilization", str(args.vllm_memory)] if torch.cuda.is_available() else []
        server = local_vllm.start(folder, port, log, extra, timeout=900)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            local_vllm.stop(server, timeout=120)


def decode_probe(model, tokenizer, clock: Clock, prompt_tokens: int = 1200, new_tokens: int = 64) -> dict:
    """The model's own 64-token decode on a text-only prompt, outside the engine: with the default dynamic cache,
    and with a static cache (which transformers compiles on a GPU, CUDA graphs included). Tells how much of an
    answer's time is the decoding loop's per-step overhead rather than the engine's."""
    device = next(model.parameters()).device
    words = tokenizer("a small brown dog with floppy ears near the red sofa ", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([(words * prompt_tokens)[:prompt_tokens]], device=device)  # plain text: no image tokens
    probe = {}
    for label, extra in (("dynamic", {}), ("static_compiled", {"cache_implementation": "static"})):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
        try:
            start = clock.now()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)  # warm-up / compile
            first = clock.now() - start
            start = clock.now()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            probe[label] = {"first_call_s": round(first, 2), "s": round(clock.now() - start, 3)}
        except Exception as error:  # a probe: report why it could not run, keep the other figures
            probe[label] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return probe


def table(results: list[dict]) -> str:
    rows = [("preset", "engine", "device", "register s/view", "first token s", "64 tokens s", "recognize fps (10)",
             "askers: tokens/s", "peak GiB")]
    for r in results:
        name = r["preset"] + (" (narrow)" if r["narrow"] else "")
        if "error" in r:
            rows.append((name, r["variant"], r["device"], f"failed: {r['error'][:60]}", "", "", "", "", ""))
            continue
        register = f"{r['register_s_per_view']} ({r['register_s_per_view_of_5']} of 5)"
        rows.append((name, r["variant"], r["device"], register,
                     str(r["first_token_s"]), f"{r['answer_s']} ({r['answer_tokens']} tok)", str(r["recognize_fps"]),
                     f"{r['askers_tokens_per_s']} ({r['askers']})" if "askers" in r else "-",
                     str(r.get("peak_gib", "-"))))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["qwen2_5_vl_7b", "qwen2_5_vl_3b"], choices=preset_names())
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--narrow", action="store_true", help="16 per head: the layouts at a CPU's cost")
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=["default"], choices=VARIANTS,
                        help="engine settings to compare on the same model")
    parser.add_argument("--repeats", type=int, default=3, help="timed answers (median); recognition frames: twice")
    parser.add_argument("--model", default=None,
                        help="a checkpoint folder instead of the presets (the toy model: a CPU dry run of vllm)")
    parser.add_argument("--askers", type=int, default=0, help="also N questions at once: aggregate tokens/s")
    parser.add_argument("--vllm-memory", type=float, default=0.45,
                        help="share of the GPU the vllm variant's server may take (the engine holds its own copy)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--decode-probe", action="store_true",
                        help="also time the model's own 64-token decode, dynamic versus static (compiled) cache")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: use --device cpu --dtype float32 --narrow for a dry run")
    torch.manual_seed(0)
    results = []
    for name in [args.model] if args.model else args.presets:
        results.extend(measure(name, args))
        if args.json:  # after each preset, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
