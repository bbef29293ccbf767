# SPDX-License-Identifier: Apache-2.0
"""Real model architectures with random weights, for timing and memory measurements where no weights can be had.

``presets/`` holds the published configs of real checkpoints (layer, head and hidden sizes; no weights). A model
built from one has the real compute and memory of that checkpoint, so its timings are real; its answers are not.
The tokenizer is the tiny one: token ids are small, the embedding table keeps the real vocabulary's size.

``narrow=True`` keeps the decoder's layout (layers, attention heads, key/value heads, vocabulary rows dropped to the
tokenizer's) but narrows every width to 16 per head: on a CPU this gives the real number of layers, heads and
sequence positions at a cost a laptop can measure, so ratios (cached versus uncached prefill, one image pass versus
one per concept) have the real model's shape.

Examples::

    from ego_ros.testing.real_sizes import make_model
    model, tokenizer, image_processor = make_model("qwen2_5_vl_7b", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PRESETS = Path(__file__).parent / "presets"
_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "model_type")  # the tiny tokenizer's ids win


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.json"))


def preset(name: str) -> dict:
    """The config of ``name`` as published (``config.json`` fields)."""
    path = PRESETS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no preset {name!r}; presets: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def overrides(name: str, *, narrow: bool = False) -> tuple[dict, dict]:
    """``(text_overrides, vision_overrides)`` for the tiny builder that give ``name``'s architecture."""
    config = preset(name)
    text = {k: v for k, v in config["text_config"].items() if k not in _IDS}
    vision = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    if narrow:
        head = 16
        text["hidden_size"] = text["num_attention_heads"] * head
        text["intermediate_size"] = 2 * text["hidden_size"]
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}  # sums to head / 2
        text.pop("vocab_size")
        vision["hidden_size"] = vision["num_heads"] * head
        vision["intermediate_size"] = 2 * vision["hidden_size"]
    vision["out_hidden_size"] = text["hidden_size"]
    return text, vision


def make_model(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               narrow: bool = False, seed: int = 0, max_pixels: int = 640 * 480):
    """``(model, tokenizer, image_processor)`` of ``name``'s architecture, random weights created on ``device`` in
    ``dtype`` (a 7B model is never materialised in float32 on the host)."""
    from ego_ros.engine.prompts import CONCEPT_PLACEHOLDER
    from ego_ros.testing.tiny_qwen2_5_vl import make_qwen2_5_vl

    if not name.startswith("qwen2_5_vl"):
        raise ValueError(f"preset {name!r}: only Qwen2.5-VL presets can be built")
    text, vision = overrides(name, narrow=narrow)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, tokenizer, image_processor = make_qwen2_5_vl(
                seed=seed, max_pixels=max_pixels, placeholder=CONCEPT_PLACEHOLDER,
                text_overrides=text, vision_overrides=vision)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, as_loaded(image_processor)


def as_loaded(image_processor):
    """The image processor a real checkpoint loads: transformers' torchvision processor where torchvision is
    installed (a GPU machine's usual set-up; it can work on the GPU), else the PIL one the tiny builder makes."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    except ImportError:  # no torchvision
        return image_processor
    return Qwen2VLImageProcessor(size=image_processor.size)
