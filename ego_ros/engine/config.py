# SPDX-License-Identifier: Apache-2.0
"""The engine's settings, validated once at construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_memory_dir() -> Path:
    """``$EGO_ROS_MEMORY_DIR``, else ``$XDG_DATA_HOME/ego_ros/memory`` (``~/.local/share/ego_ros/memory``)."""
    if os.environ.get("EGO_ROS_MEMORY_DIR"):
        return Path(os.environ["EGO_ROS_MEMORY_DIR"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "ego_ros" / "memory"


def default_calibration_dir() -> Path:
    """``$EGO_ROS_CALIBRATION_DIR``, else ``$XDG_DATA_HOME/ego_ros/calibration``
    (``~/.local/share/ego_ros/calibration``): one ``<model fingerprint>.json`` per calibrated model."""
    if os.environ.get("EGO_ROS_CALIBRATION_DIR"):
        return Path(os.environ["EGO_ROS_CALIBRATION_DIR"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "ego_ros" / "calibration"


@dataclass
class EgoConfig:
    # Concept introduction
    max_tokens_per_view: int = 64  # K: at most this many visual tokens kept per view (~16% of a 640x480 view)
    min_tokens_per_view: int = 4  # floor of K_c, so a subject reported as tiny still leaves a trace
    fallback_area_percent: float = 100.0  # alpha when the model's area answer holds no number: K_c = K
    layers: tuple[int, ...] | None = None  # decoder layers for eq. 3; None: calibrated, else the middle half
    keyword_max_new_tokens: int = 24  # bounds the keyword answer (greedy, so deterministic)
    area_max_new_tokens: int = 8

    # Images
    max_image_pixels: int = 640 * 480  # every image is downscaled to this before the processor sees it

    # Inference
    max_concepts_in_context: int = 8  # beyond this, the most similar concepts are chosen (paper §3.5)
    max_new_tokens: int = 128
    recognition_batch_size: int = 8  # concepts scored per forward pass in recognize()
    # Decode with a fixed-size KV cache, which transformers compiles on a GPU (CUDA graphs): a decoding step's
    # Python and launch overhead, most of an answer's time there (bench/gpu.py), mostly goes; each new prompt
    # shape pays a compile first. Off on the CPU, where nothing is compiled and it only costs memory. It replaces
    # the prefix cache in generation (transformers allocates the static cache itself).
    static_cache: bool = False
    # Keep the KV cache of the concept block that begins every question and reuse it while the concepts in
    # context stay the same (the answers are the same either way; see engine/prefix_cache.py).
    prefix_cache: bool = True
    # Recognition prompt: "image_first" (the frame, then each concept: the frame is prefilled once for all
    # concepts; several times faster with many concepts, and on the toy model the better order: F1 71.2 against
    # 37.2 from one view, 80.6 against 31.9 from five, docs/toy-world.md) or "concept_first" (each concept's memory,
    # then the frame: one whole prompt per concept, the paper's order).
    recognition_order: str = "image_first"
    # How a memory sits in a prompt: "text" (one placeholder per vector, at text positions, the paper's layout) or
    # "image" (an image of its own: the family's vision delimiters, a synthetic patch grid, 2-D image positions;
    # how a serving engine such as vLLM takes precomputed embeddings). Qwen2.5-VL and Qwen3-VL.
    memory_layout: str = "text"
    # Who generates answers and scores recognition: "transformers" (in this process, the embedded default) or
    # "vllm": a vLLM server at ``vllm_url`` serving the same weights (engine/vllm_server.py); registration's
    # attention pass and the vision encoder stay here. vLLM takes memories as images: memory_layout image.
    generation: str = "transformers"
    vllm_url: str = ""

    def __post_init__(self):
        positive = ("max_tokens_per_view", "min_tokens_per_view", "keyword_max_new_tokens", "area_max_new_tokens",
                    "max_image_pixels", "max_concepts_in_context", "max_new_tokens", "recognition_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.recognition_order not in ("concept_first", "image_first"):
            raise ValueError(f"recognition_order must be concept_first or image_first, got {self.recognition_order!r}")
        if self.memory_layout not in ("text", "image"):
            raise ValueError(f"memory_layout must be text or image, got {self.memory_layout!r}")
        if self.generation not in ("transformers", "vllm"):
            raise ValueError(f"generation must be transformers or vllm, got {self.generation!r}")
        if self.generation == "vllm" and not self.vllm_url:
            raise ValueError("generation vllm needs vllm_url, the server's address (http://host:port)")
        if self.generation == "vllm" and self.memory_layout != "image":
            raise ValueError("generation vllm takes memories as image items: set memory_layout image")
        if self.min_tokens_per_view > self.max_tokens_per_view:
            raise ValueError(
                f"min_tokens_per_view ({self.min_tokens_per_view}) exceeds max_tokens_per_view "
                f"({self.max_tokens_per_view})"
            )
        if not 0.0 < float(self.fallback_area_percent) <= 100.0:
            raise ValueError(f"fallback_area_percent must be in (0, 100], got {self.fallback_area_percent!r}")
        if self.max_image_pixels < 28 * 28:
            raise ValueError(f"max_image_pixels must be at least 784 (one 28x28 patch), got {self.max_image_pixels}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers has duplicates: {self.layers!r}")
            self.layers = tuple(sorted(layers))


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The middle half of the decoder, for models without a calibration (the paper selects layers per model, §3.4;
    see calibration.py).

    Early layers still mix token identity, the last ones specialise to next-token prediction; the keyword-to-image
    attention that localises a subject is strongest in between.
    """
    start = num_layers // 4
    return tuple(range(start, max(start + 1, num_layers - num_layers // 4)))
