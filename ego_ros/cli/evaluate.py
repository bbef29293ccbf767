# SPDX-License-Identifier: Apache-2.0
"""``ego-ros eval``: the paper's evaluation protocol on a dataset folder, with the baselines in the same run.

    ego-ros eval --model Qwen/Qwen2.5-VL-7B-Instruct --dataset yollava data/yollava --views 1 5 --out results/yollava
    ego-ros eval --model ego_ros/toy/model --dataset toy build/toy-eval --out results/toy

The subcommand's arguments and handler; ``ego_ros.cli.commands`` registers them as "eval".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ego_ros.cli.common import layer_list, positive_int

HELP = "run the paper's evaluation (recognition, A/B VQA, captioning, multi-concept) on a dataset, with baselines"
KINDS = ("myvlm", "yollava", "thisismy", "toy")
METHOD_NAMES = ("ego", "none", "keywords", "full", "random")
TASK_NAMES = ("recognition", "vqa", "captioning", "multi")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", nargs=2, metavar=("KIND", "DIR"), required=True,
                   help=f"the dataset's layout ({', '.join(KINDS)}) and its folder")
    p.add_argument("--views", type=positive_int, nargs="+", default=[1, 5], metavar="V",
                   help="reference views per concept; each number is a run of every method (default: 1 5)")
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES), metavar="M",
                   help=f"of {', '.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None, metavar="T",
                   help=f"of {', '.join(TASK_NAMES)} (default: every one the data supports)")
    p.add_argument("--out", type=Path, default=Path("eval-results"), metavar="RESULTS_DIR",
                   help="results, and the registered concepts (a stopped run continues there); default eval-results")
    p.add_argument("--seed", type=int, default=0, help="MyVLM's reference split and the random method (default 0)")
    p.add_argument("--threshold", type=float, default=0.5, help="yes when P(yes) is above this (default 0.5)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="for captions and A/B answers")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    group = p.add_argument_group("model")
    group.add_argument("--model", default=os.environ.get("EGO_ROS_MODEL") or None,
                       help="hub id or local folder of the VLM (default: $EGO_ROS_MODEL)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: auto)")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    group.add_argument("--layers", type=layer_list, default=None, metavar="I,J,...",
                       help="decoder layers whose attention scores the tokens (default: the model's calibration, "
                            "else the middle half)")
    group.add_argument("--max-tokens-per-view", type=positive_int, default=None, metavar="K")
    group.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="PIXELS")
    group.add_argument("--calibration-dir", type=Path, default=None, metavar="DIR")


def run(args: argparse.Namespace) -> int:
    from ego_ros.evaluation.datasets import load_dataset
    from ego_ros.evaluation.report import table
    from ego_ros.evaluation.runner import run as run_eval
    from ego_ros.evaluation.runner import check_resumable, runs_for

    kind, directory = args.dataset
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {', '.join(KINDS)}")
    if not args.model:
        raise ValueError("no model given: pass --model MODEL (a hub id or a model folder) or set EGO_ROS_MODEL")
    data = load_dataset(kind, directory, seed=args.seed)  # a layout error before minutes of loading
    runs_for(args.methods, args.views)
    check_resumable(args.out, {"seed": args.seed, "threshold": args.threshold, "max_new_tokens": args.max_new_tokens,
                               "judge": "keyword_judge", "split": data.split()})  # before the model loads
    for file, reason in data.skipped:
        print(f"ego-ros: warning: skipped {file}: {reason}", file=sys.stderr)

    from ego_ros.engine import Ego
    from ego_ros.engine.loading import resolve_device, resolve_dtype

    settings = {k: v for k, v in (("layers", args.layers), ("max_tokens_per_view", args.max_tokens_per_view),
                                  ("max_image_pixels", args.max_image_pixels)) if v is not None}
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"loading {args.model} on {device} ({str(dtype).removeprefix('torch.')})...", file=sys.stderr, flush=True)
    ego = Ego.load(args.model, device=str(device), dtype=dtype, memory_dir=args.out / "memory",
                   calibration_dir=args.calibration_dir, **settings)
    skipped_before = len(data.skipped)
    summary = run_eval(ego, data, args.out, views=args.views, methods=args.methods, tasks=args.tasks,
                       seed=args.seed, threshold=args.threshold, max_new_tokens=args.max_new_tokens,
                       progress=not args.quiet)
    for entry in summary["skipped"][skipped_before:]:
        print(f"ego-ros: warning: skipped {entry['file']}: {entry['reason']}", file=sys.stderr)
    print(table(summary), end="")
    intro = summary["timings"]["introduction_seconds_per_concept"]
    if intro is not None:
        print(f"\nintroduction: {intro:.2f} s per concept ({summary['timings']['introduction_views']} views)")
    print(f"wrote {args.out / 'samples.jsonl'}, {args.out / 'summary.json'}, {args.out / 'summary.md'}, "
          f"{args.out / 'summary.png'}" + (f"; {len(summary['skipped'])} skipped (listed in summary.md)"
                                           if summary["skipped"] else ""))
    return 0
