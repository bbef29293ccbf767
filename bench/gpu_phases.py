# SPDX-License-Identifier: Apache-2.0
"""Where a registration's, an answer's and a recognition's time goes, at a real model size on a GPU.

``bench/gpu.py`` gives the totals; this script splits them. Each engine phase is timed with the device's queue
drained at its edges (so asynchronous kernels count where they run), and every forward of the model is timed on its
own: a generation's time minus its forwards is the decoding loop's own overhead (logits processors, streamer,
cache bookkeeping). Then the profiler's operators with the most host time for one answer, and what the image
processor costs on the host against torchvision's processor on the device.

Examples::

    python bench/gpu_phases.py --out results/                       # qwen2_5_vl_7b, cuda, bf16
    python bench/gpu_phases.py --device cpu --dtype float32 --narrow  # a dry run here
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import DTYPES, VARIANTS, Clock, frame  # noqa: E402
from ego_ros.engine import Ego  # noqa: E402
from ego_ros.engine import ego as ego_module  # noqa: E402
from ego_ros.engine.config import EgoConfig  # noqa: E402
from ego_ros.engine.loading import LoadedModel  # noqa: E402
from ego_ros.testing.real_sizes import make_model, preset_names  # noqa: E402


class Phases:
    """Seconds and calls per named phase; ``wrap`` times an attribute's calls in place."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = self.clock.now()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += self.clock.now() - start
                self.calls[label] += 1

        setattr(owner, attribute, timed)

    def time_forwards(self, model) -> None:
        """Every forward of ``model``, as a prefill (more than one new position) or a one-token decoding step."""
        started = {}

        def before(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            started["label"] = "forward: prefill" if ids is None or ids.shape[1] > 1 else "forward: 1-token step"
            started["at"] = self.clock.now()

        def after(module, args, kwargs, output):
            label = started.pop("label")
            self.seconds[label] += self.clock.now() - started.pop("at")
            self.calls[label] += 1

        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def table(self, title: str, runs: int) -> str:
        lines = [f"### {title} (per run, mean of {runs})", "", "| phase | calls | ms per call | ms per run |",
                 "|---|---|---|---|"]
        for label in sorted(self.seconds, key=self.seconds.get, reverse=True):
            seconds, calls = self.seconds[label], self.calls[label]
            lines.append(f"| {label} | {calls / runs:g} | {1000 * seconds / calls:.1f} | {1000 * seconds / runs:.1f} |")
        return "\n".join(lines)


def instrument(ego: Ego, phases: Phases) -> None:
    model, backend = ego.model, ego.backend
    phases.wrap(backend, "image_processor", "image processor (host)")
    phases.wrap(model, "get_image_features", "vision tower + projector")
    phases.wrap(backend, "build", "prompt building (tokeniser, template)")
    phases.wrap(model.model, "get_rope_index", "rope index")
    phases.wrap(model, "generate", "generate (whole)")
    phases.wrap(ego, "_describe", "register: keywords + area generation")
    phases.wrap(ego, "concepts_for", "ask: concepts_for")
    phases.wrap(ego, "_concept_prefix", "ask: concept prefix (cache hit or prefill)")
    phases.wrap(ego_module, "score_visual_tokens", "register: eq. 3 scoring pass")
    phases.wrap(ego.store, "put", "register: memory written")
    phases.time_forwards(model)


def profile_answer(ego: Ego, out: Path | None, name: str) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ego.model.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        ego.ask("What is concept 0 doing, and where is concept 1?", frame(900), max_new_tokens=64)
    averages = profiler.key_averages()
    text = ("## profiler, one 64-token answer: top operators by host time\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    if ego.model.device.type == "cuda":
        text += ("\n\n## same answer: top operators by device time\n\n"
                 + averages.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    if out is not None:
        (out / f"profile_answer_{name}.txt").write_text(text)
    return text


def processors(ego: Ego, clock: Clock) -> str:
    """The PIL image processor of transformers against its torchvision one, on the host and on the model's device (the
    engine uses the torchvision one on the device where it can: backends.processor_options)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = Image.fromarray(frame(950))
    size = ego.backend.image_size
    pil = Qwen2VLImageProcessorPil(size=size)
    lines = ["## image processor, one 640x480 frame (ms, median of 5)", "",
             f"the engine's: {type(ego.backend.image_processor).__name__}, options {ego.backend.processor_options}"]
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        fast = Qwen2VLImageProcessor(size=size)
    except ImportError as error:  # torchvision missing: say so, keep the rest
        return "\n".join(lines + [f"torchvision processor unavailable: {error}"])
    reference = pil(images=[image], return_tensors="pt")["pixel_values"]
    for label, call in (("PIL, host", lambda: pil(images=[image], return_tensors="pt")),
                        ("torchvision, host", lambda: fast(images=[image], return_tensors="pt")),
                        ("torchvision, device", lambda: fast(images=[image], return_tensors="pt",
                                                             device=ego.model.device))):
        try:
            times = []
            for _ in range(5):
                start = clock.now()
                values = call()["pixel_values"]
                times.append(clock.now() - start)
            difference = (values.float().cpu() - reference.float()).abs().max().item()
            lines.append(f"- {label}: {1000 * sorted(times)[2]:.1f} ms, max difference from PIL {difference:.3g}")
        except Exception as error:
            lines.append(f"- {label}: failed: {type(error).__name__}: {str(error)[:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen2_5_vl_7b", choices=preset_names())
    parser.add_argument("--variant", default="default", choices=VARIANTS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--narrow", action="store_true", help="16 per head: the layout at a CPU's cost")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the report (and the profile) here")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    clock = Clock(device)
    model, tokenizer, image_processor = make_model(args.preset, device=device, dtype=DTYPES[args.dtype],
                                                   narrow=args.narrow)
    loaded = LoadedModel(model, tokenizer, image_processor, args.preset, device, DTYPES[args.dtype])
    report = [f"# {args.preset}, {args.variant}, {args.dtype} on "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"]
    with tempfile.TemporaryDirectory() as scratch:
        config = EgoConfig(max_concepts_in_context=10, max_image_pixels=640 * 480, **VARIANTS[args.variant])
        ego = Ego(loaded, config, Path(scratch) / "memory", calibration_dir=Path(scratch) / "calibration")
        for c in range(10):  # the concepts in context; also the warm-up
            ego.register(f"concept {c}", [frame(100 + c)])
        ego.ask("Where is concept 3?", frame(5), max_new_tokens=64)
        ego.recognize(frame(6))
        processor_report = processors(ego, clock)  # before instrument() wraps the engine's processor
        phases = Phases(clock)
        instrument(ego, phases)
        scenarios = (
            ("register 1 view", lambda r: (ego.register(f"timed {r}", [frame(200 + r)]), ego.forget(f"timed {r}"))),
            ("ask, 10 concepts, 64 tokens",
             lambda r: ego.ask("What is concept 0 doing, and where is concept 1?", frame(300 + r), max_new_tokens=64)),
            ("recognize 10 concepts", lambda r: ego.recognize(frame(400 + r))),
        )
        for title, scenario in scenarios:
            scenario(args.runs)  # untimed: the forget of the registration scenario emptied the prefix cache
            phases.reset()
            start = clock.now()
            for r in range(args.runs):
                scenario(r)
            total = (clock.now() - start) / args.runs
            report.append(phases.table(f"{title}: {1000 * total:.0f} ms", args.runs))
            print(report[-1] + "\n", flush=True)
        report.append(processor_report)
        print(report[-1] + "\n", flush=True)
        report.append(profile_answer(ego, args.out, f"{args.preset}_{args.variant}"))
        print(report[-1], flush=True)
    if args.out is not None:
        (args.out / f"phases_{args.preset}_{args.variant}.md").write_text("\n\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
