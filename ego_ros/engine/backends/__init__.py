# SPDX-License-Identifier: Apache-2.0
"""One module per VLM family. Each knows the family's prompt format, where visual tokens sit and how to compute
the attention of a few query rows on one decoder layer; the method itself (engine/scoring.py, engine/ego.py) is
written once against this small surface.

A backend provides:
    ``encode(images) -> list[EncodedImage]``      vision encoder + projector, one call for all images
    ``build(prompts) -> Batch``                   token ids, masks and the rows to overwrite, left-padded
    ``decoder_layers``                            the LLM's decoder layers (hook points for scoring)
    ``query_attention(layer, hidden, position_embeddings, rows)``  softmax rows of one layer, (B, H, R, S)

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncodedImage:
    """One image as the LLM sees it: its visual tokens (already in the LLM's embedding space) and its grid."""

    features: torch.Tensor  # (N, D): projector outputs, N visual tokens
    grid_thw: tuple[int, int, int]  # patch grid (t, h, w) before the 2x2 merge
    pixel_values: torch.Tensor  # (t*h*w, C*T*P*P): the processor's output, kept for independent re-computation
    size: tuple[int, int]  # (width, height) of the image given to the processor

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


# A prompt is a sequence of parts: text, an image, or soft tokens (a concept memory, (n, D) vectors).
Part = str | EncodedImage | torch.Tensor


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

    def model_inputs(self) -> dict:
        """The keyword arguments of ``model(...)``/``model.generate(...)``; images arrive through ``injected``."""
        inputs = dict(
            input_ids=self.input_ids, attention_mask=self.attention_mask, mm_token_type_ids=self.mm_token_type_ids
        )
        if self.image_grid_thw is not None:
            inputs["image_grid_thw"] = self.image_grid_thw
        return inputs


def backend_for(model, tokenizer, image_processor, *, placeholder: str, max_pixels: int):
    """The backend of ``model``'s family, or a ValueError listing the families we support."""
    model_type = model.config.model_type
    if model_type == "qwen2_5_vl":
        from .qwen2_5_vl import Qwen2_5_VLBackend

        return Qwen2_5_VLBackend(
            model, tokenizer, image_processor, placeholder=placeholder, max_pixels=max_pixels
        )
    raise ValueError(f"model type {model_type!r} is not supported yet; supported: qwen2_5_vl")
