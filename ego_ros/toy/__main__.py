# SPDX-License-Identifier: Apache-2.0
"""The toy world's command: write scenes with ground truth, or produce the trained toy model.

Examples::

    python -m ego_ros.toy scenes build/scenes --count 20 --seed 0
    python -m ego_ros.toy model                          # the committed model's folder (checked current)
    python -m ego_ros.toy model build/toy-model          # trains only if not there yet
    python -m ego_ros.toy train build/toy-model --seed 1  # always trains
    python -m ego_ros.toy train build/toy-model --seeing-from ego_ros/toy/model  # its seeing stage reused
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import model_dir, write_scenes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ego_ros.toy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scenes = commands.add_parser("scenes", help="write NAME.png, NAME.mask.png (main subject) and scenes.json")
    scenes.add_argument("out_dir", type=Path)
    scenes.add_argument("--count", type=int, default=20)
    scenes.add_argument("--seed", type=int, default=0)
    model = commands.add_parser("model", help="the committed toy model's folder; with OUT_DIR, the toy model in "
                                              "OUT_DIR, trained first if missing or stale")
    model.add_argument("out_dir", type=Path, nargs="?", default=None)
    model.add_argument("--seed", type=int, default=0)
    train = commands.add_parser("train", help="train the toy model into OUT_DIR, even if it is there")
    train.add_argument("out_dir", type=Path)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--seeing-from", type=Path, default=None, metavar="MODEL_DIR",
                       help="take the seeing stage (a quarter of the time) from the toy model in MODEL_DIR, made by "
                            "the same seeing-stage sources, recipe and seed (checked)")
    args = parser.parse_args(argv)

    if args.command == "scenes":
        if args.count < 1:
            parser.error(f"--count must be at least 1, got {args.count}")
        write_scenes(args.out_dir, args.count, args.seed)
        print(f"wrote {args.count} scenes to {args.out_dir} (NAME.png, NAME.mask.png, scenes.json)")
    elif args.command == "model":
        from . import StaleCheckpoint

        try:
            path = model_dir(args.out_dir, seed=args.seed)
        except StaleCheckpoint as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"toy model ready in {path}")
    else:
        from .train import SeeingStageRefused, train

        try:
            path = train(args.out_dir, seed=args.seed, seeing_from=args.seeing_from)
        except SeeingStageRefused as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"trained the toy model into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
