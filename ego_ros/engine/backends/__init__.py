# SPDX-License-Identifier: Apache-2.0
"""One module per VLM family. Each knows the family's prompt format, where visual tokens sit and how to compute
the attention of a few query rows on one decoder layer; the method itself (engine/scoring.py, engine/ego.py) is
written once against this small surface.

A backend provides:
    ``encode(images) -> list[EncodedImage]``      vision encoder + projector, one call for all images
    ``build(prompts) -> Batch``                   token ids, masks and the rows to overwrite, left-padded
    ``decoder_layers``                            the LLM's decoder layers (hook points for scoring)
    ``query_attention(layer, hidden, position_embeddings, rows)``  softmax rows of one layer, (B, H, R, S)
    ``injecting(batch)``                          context: every forward inside gets the batch's vectors in place

The backend is chosen by the checkpoint's ``config.model_type`` in :data:`BACKENDS`, one line per family.

For prompts that continue a cached prefix (engine/prefix_cache.py: the concept block of a question, the frame of
image-first recognition):
    ``prefix_ids(parts) -> list[int]``            the ids every prompt beginning with ``parts`` starts with, as
                                                  ``build`` tokenises it (system turn, user turn's opening, parts)
    ``rope_positions(batch) -> Tensor``           the position ids the model's forward computes for ``batch`` (its
                                                  own rope index over the whole, left-padded prompts), in the shape
                                                  its forward takes as ``position_ids``; the engine passes their
                                                  continuation columns with the cache
    ``forget_positions()``                        drop any position state the model keeps between calls (Qwen's
                                                  ``rope_deltas``) before ``generate`` continues a cache; a no-op for
                                                  a model without such state
    ``pad_id``                                    the id of padding rows (masked out)
A backend without ``prefix_ids`` (InternVL) or with DeepStack rows (Qwen3-VL) has its prompts prefilled whole.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..token_layout import Tiles, token_boxes

# The supported families: the checkpoint's config.model_type -> (module, backend class). One line per family.
BACKENDS = {
    "qwen2_5_vl": ("ego_ros.engine.backends.qwen2_5_vl", "Qwen2_5_VLBackend"),
    "qwen3_vl": ("ego_ros.engine.backends.qwen3_vl", "Qwen3VLBackend"),
    "internvl": ("ego_ros.engine.backends.internvl", "InternVLBackend"),
}


@dataclass
class EncodedImage:
    """One image as the LLM sees it: its visual tokens (already in the LLM's embedding space) and where they lie."""

    features: torch.Tensor  # (N, D): projector outputs, N visual tokens
    grid_thw: tuple[int, int, int]  # patch grid (t, h, w) before the 2x2 merge (of the tiles side by side)
    pixel_values: torch.Tensor  # the processor's output, kept for independent re-computation
    size: tuple[int, int]  # (width, height) of the image given to the processor
    tiles: Tiles = None  # (columns, rows) of an InternVL tiling (+ a thumbnail when more than one); see token_layout
    # (L, N, D): for DeepStack families (Qwen3-VL), what the model adds to the hidden states of the first L decoder
    # layers at this image's rows, from L intermediate vision layers; None for the others.
    deepstack: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def token_boxes(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(N, 4): each visual token's cell (x0, y0, x1, y1) in pixels of this image at ``size`` (default: as
        given to the processor); a thumbnail token's cell is a coarse block of the whole image."""
        return token_boxes(self.grid_thw, self.tiles, size or self.size)


@dataclass
class SoftTokens:
    """A concept memory as a prompt part: its vectors, and for DeepStack families their DeepStack features."""

    vectors: torch.Tensor  # (T, D): kept projector outputs, placed at the input embeddings
    deepstack: torch.Tensor | None = None  # (L, T, D): added after decoder layers 0..L-1 at the same rows


# A prompt is a sequence of parts: text, an image, or soft tokens (a concept memory: SoftTokens, or bare (n, D)
# vectors, which for a DeepStack family get nothing added in the early layers).
Part = str | EncodedImage | SoftTokens | torch.Tensor


@dataclass
class Batch:
    """Model inputs for one or more prompts (left-padded), and the vectors for the placeholder rows."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)
    mm_token_type_ids: torch.Tensor  # (B, S): 1 at image tokens, 0 elsewhere
    image_grid_thw: torch.Tensor | None  # (num images in the batch, 3)
    injected: torch.Tensor  # (R, D): rows for every placeholder/image token, in row-major order
    pixel_values: torch.Tensor | None = None  # concatenated processor outputs, for reference computations
    image_positions: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt, per image: (N,) positions
    deepstack: torch.Tensor | None = None  # (L, R, D): DeepStack rows beside ``injected`` (DeepStack families only)

    def model_inputs(self) -> dict:
        """The keyword arguments of ``model(...)``/``model.generate(...)``; images arrive through ``injected``."""
        inputs = dict(
            input_ids=self.input_ids, attention_mask=self.attention_mask, mm_token_type_ids=self.mm_token_type_ids
        )
        if self.image_grid_thw is not None:
            inputs["image_grid_thw"] = self.image_grid_thw
        return inputs


class UnsupportedModel(ValueError):
    """A checkpoint of a family ego_ros has no backend for."""


def check_supported(model_type: str) -> None:
    """Raise UnsupportedModel, listing the supported families, unless ``model_type`` is one of them."""
    if model_type not in BACKENDS:
        raise UnsupportedModel(f"model type {model_type!r} is not supported; supported families (config "
                               f"model_type): {', '.join(BACKENDS)}")


def processor_options(image_processor, model) -> dict:
    """Extra arguments for ``image_processor``: the model's GPU as its device when it can work there.

    transformers' torchvision image processors (what a checkpoint loads where torchvision is installed) resize and
    normalise on any device; on an H100 machine a 640x480 frame took 2 ms on the GPU against 5 ms on the host with
    torchvision and 25-35 ms with the PIL processor (``bench/gpu_phases.py``).
    """
    on_gpu = getattr(model.device, "type", None) == "cuda"
    torchvision = any(cls.__name__ == "TorchvisionBackend" for cls in type(image_processor).__mro__)
    return {"device": model.device} if on_gpu and torchvision else {}


def check_memory_layout(layout: str, supported: tuple[str, ...], family: str) -> None:
    """Raise a ValueError unless ``family``'s backend can lay a memory out as ``layout``."""
    if layout not in supported:
        raise ValueError(f"memory_layout {layout!r} is not supported for {family}; use one of {', '.join(supported)}")


def backend_for(model, tokenizer, image_processor, *, placeholder: str, max_pixels: int, memory_layout: str = "text"):
    """The backend of ``model``'s family, or UnsupportedModel (a ValueError) listing the families we support."""
    model_type = model.config.model_type
    check_supported(model_type)
    module, name = BACKENDS[model_type]
    backend = getattr(importlib.import_module(module), name)
    return backend(model, tokenizer, image_processor, placeholder=placeholder, max_pixels=max_pixels,
                   memory_layout=memory_layout)
