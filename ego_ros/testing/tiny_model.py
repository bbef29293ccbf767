# SPDX-License-Identifier: Apache-2.0
"""Write a tiny, randomly initialised VLM of a real architecture, with a matching processor, to a folder.

The folder has the layout of a hub checkpoint (``config.json``, ``model.safetensors``, tokenizer files,
``preprocessor_config.json``, ``chat_template.jinja``), so the engine loads it exactly as it would load
``Qwen/Qwen2.5-VL-7B-Instruct``: through ``from_pretrained``. Weights are seeded, so two builds are identical.

Examples::

    python -m ego_ros.testing.tiny_model --arch qwen2_5_vl /tmp/tiny-qwen
    python -m ego_ros.testing.tiny_model --arch qwen2_5_vl --max-pixels 50176 --seed 1 /tmp/tiny-qwen
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Each architecture's builder: (module, function). A builder takes (out_dir, *, seed, max_pixels, placeholder,
# text_overrides) and returns the folder it wrote.
BUILDERS = {
    "qwen2_5_vl": ("ego_ros.testing.tiny_qwen2_5_vl", "build_qwen2_5_vl"),
    "internvl": ("ego_ros.testing.tiny_internvl", "build_internvl"),
    "qwen3_vl": ("ego_ros.testing.tiny_qwen3_vl", "build_qwen3_vl"),
}
ARCHS = tuple(BUILDERS)


def build(arch: str, out_dir: Path, *, seed: int = 0, max_pixels: int = 112 * 112 * 4,
          text_overrides: dict | None = None) -> Path:
    """Build the tiny model of ``arch`` into ``out_dir`` and return the folder."""
    from ego_ros.engine.prompts import CONCEPT_PLACEHOLDER

    if arch not in BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    module, function = BUILDERS[arch]
    builder = getattr(importlib.import_module(module), function)
    return builder(Path(out_dir), seed=seed, max_pixels=max_pixels, placeholder=CONCEPT_PLACEHOLDER,
                   text_overrides=text_overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ego_ros.testing.tiny_model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor into")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-pixels", type=int, default=112 * 112 * 4, help="image processor's longest_edge (pixels)"
    )
    args = parser.parse_args(argv)
    path = build(args.arch, args.out_dir, seed=args.seed, max_pixels=args.max_pixels)
    print(f"wrote tiny {args.arch} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
