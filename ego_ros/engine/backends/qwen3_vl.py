# SPDX-License-Identifier: Apache-2.0
"""Qwen3-VL: Qwen2.5-VL's prompt format and visual tokens, with three differences that matter to Ego.

* Geometry: 16 px patches merged 2x2, so visual token i of a grid (t, gh, gw) covers the 32x32 px block at merged
  row ``i // (gw // 2)``, column ``i % (gw // 2)`` (the grid-relative layout of figure.py and regions.py holds).
* Attention: q and k are RMS-normalised per head before (interleaved) M-RoPE; eq. 3's re-derivation of the
  keyword rows does the same (:meth:`Qwen3VLBackend.queries_and_keys`). Positions come from the model's own rope
  index, through ``input_ids``/``mm_token_type_ids``/``image_grid_thw``, as for Qwen2.5-VL.
* DeepStack: the vision tower also merges the outputs of L intermediate layers (3 in the released checkpoints) into
  L more vectors per visual token, and the decoder adds feature l to the hidden states at the visual rows after
  decoder layer l. An image is seen through both: the projector output at the input embeddings and the L DeepStack
  features in the first L layers.

What a concept memory holds (the decision): beside each kept token's projector vector, its L DeepStack features,
(L, T, D) in the memory file. At question time the soft tokens get both, exactly as the model's own image path
gives them to visual rows: the vector at the input embeddings, feature l added after decoder layer l. So a kept
token enters the decoder as the model saw it; what necessarily differs from its place in the image is its context
(the other visual tokens are gone) and its position (the placeholders are text positions, as in Qwen2.5-VL).
Storing only the projector vectors would drop a third of what the model took from the image into the early
layers; re-encoding the reference views at question time is what Ego avoids. Tests (test_qwen3_vl.py) check by
computation that (a) a memory of all of an image's tokens, injected at the image's rows, reproduces the hidden
states of every decoder layer of the model's own pixel path, and (b) kept tokens injected as soft tokens equal the
model's explicit ``inputs_embeds`` + ``visual_pos_masks``/``deepstack_visual_embeds`` path at those rows.

Images in prompts (the question's image, the frame to recognise in) take the same route: encoded once, their
projector outputs and DeepStack features injected at the image rows by :meth:`Qwen3VLBackend.injecting`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from ..soft_tokens import injected_rows
from . import Batch, EncodedImage, Part, SoftTokens
from .qwen2_5_vl import Qwen2_5_VLBackend


class Qwen3VLBackend(Qwen2_5_VLBackend):
    family = "qwen3_vl"

    def __init__(self, model, tokenizer, image_processor, *, placeholder: str, max_pixels: int,
                 memory_layout: str = "text"):
        super().__init__(model, tokenizer, image_processor, placeholder=placeholder, max_pixels=max_pixels,
                         memory_layout=memory_layout)
        self.deepstack_layers = len(model.config.vision_config.deepstack_visual_indexes)
        self.hidden_size = model.get_input_embeddings().weight.shape[1]

    # --- images -------------------------------------------------------------------------------------------------

    @staticmethod
    def _deepstack(output, num_images: int) -> list[torch.Tensor]:
        """Per image (L, N, D): the vision output's DeepStack features are per layer, then per image."""
        per_layer = output.deepstack_features  # L tuples of per-image (N, D) tensors
        return [torch.stack([layer[i] for layer in per_layer]) for i in range(num_images)]

    # --- prompts ------------------------------------------------------------------------------------------------

    def build(self, prompts: list[list[Part]], responses: list[list[int]] | None = None) -> Batch:
        """As Qwen2.5-VL's, plus ``Batch.deepstack`` (L, R, D): each injected row's DeepStack features, in the order
        of ``Batch.injected``. Bare tensors (soft tokens given without DeepStack features) get zeros: nothing is
        added to their rows, as for text."""
        plain = [[p.vectors if isinstance(p, SoftTokens) else p for p in parts] for parts in prompts]
        batch = super().build(plain, responses)
        stacks = [self.deepstack_rows(part) for parts in prompts for part in parts if not isinstance(part, str)]
        if stacks:  # each piece on the model's device first: memories live on the host, frames on the GPU
            batch.deepstack = torch.cat(stacks, dim=1)
        return batch

    def deepstack_rows(self, part) -> torch.Tensor:
        """(L, N, D): the DeepStack features of a prompt part's N rows, zeros where it has none (a bare memory),
        checked against this model's shape; on the model's device."""
        if isinstance(part, EncodedImage):
            rows, stack = part.num_tokens, part.deepstack
        elif isinstance(part, SoftTokens):
            rows, stack = part.vectors.shape[0], part.deepstack
        else:
            rows, stack = part.shape[0], None
        device, dtype = self.model.device, self.model.dtype
        if stack is None:
            return torch.zeros(self.deepstack_layers, rows, self.hidden_size, device=device, dtype=dtype)
        if tuple(stack.shape) != (self.deepstack_layers, rows, self.hidden_size):
            raise ValueError(f"DeepStack features of shape {tuple(stack.shape)} for {rows} rows; this model needs "
                             f"({self.deepstack_layers}, {rows}, {self.hidden_size}): made by another model?")
        return stack.to(device, dtype)

    # --- injection ----------------------------------------------------------------------------------------------

    @contextmanager
    def injecting(self, batch: Batch, *, once: bool = False):
        """Context: inside it, every forward gets ``batch.injected`` at the input embeddings of the placeholder and
        image rows and ``batch.deepstack[l]`` added at the same rows after decoder layer l: what the model does
        with an image's pixels, for rows that come from memories and pre-encoded images."""
        with ExitStack() as stack:
            stack.enter_context(injected_rows(self.model, self.injected_token_ids, batch.injected, once=once))
            if batch.deepstack is not None:
                stack.enter_context(deepstack_added(self.model, self.injected_token_ids, batch.deepstack))
            yield

    # --- attention ----------------------------------------------------------------------------------------------

    @staticmethod
    def queries_and_keys(attn, hidden_states, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As Qwen2.5-VL's, with Qwen3's per-head RMSNorm of q and k (before RoPE, as the layer does)."""
        batch, seq, _ = hidden_states.shape
        q = attn.q_norm(attn.q_proj(hidden_states[:, rows]).view(batch, len(rows), -1, attn.head_dim))
        k = attn.k_norm(attn.k_proj(hidden_states).view(batch, seq, -1, attn.head_dim))
        return q.transpose(1, 2), k.transpose(1, 2)


@contextmanager
def deepstack_added(model, token_ids, deepstack: torch.Tensor):
    """While active, every forward whose input holds ``token_ids`` gets ``deepstack[l]`` (R, D) added to the hidden
    states at those rows after decoder layer l, through the model's own DeepStack arguments
    (``visual_pos_masks``, ``deepstack_visual_embeds`` of the language model).

    The embedding layer sees the token ids, the language model only embeddings: a pre-hook on the first notes the
    rows of the forward in progress, a pre-hook on the second passes them on. Decoding steps hold no such row.
    """
    embed = model.get_input_embeddings()
    language_model = model.model.language_model
    ids = torch.tensor(list(token_ids), device=embed.weight.device)
    pending: dict[str, torch.Tensor | None] = {}

    def note_rows(module, args):
        mask = torch.isin(args[0], ids)
        pending["rows"] = mask if bool(mask.any()) else None

    def add_features(module, args, kwargs):
        mask = pending.pop("rows", None)
        if mask is None:
            return None
        if kwargs.get("deepstack_visual_embeds") is not None:
            raise RuntimeError("a forward with both pixel_values and injected rows: give its images one way")
        if int(mask.sum()) != deepstack.shape[1]:
            raise RuntimeError(f"{int(mask.sum())} placeholder rows in the input but {deepstack.shape[1]} "
                               "DeepStack rows to add")
        kwargs["visual_pos_masks"] = mask
        kwargs["deepstack_visual_embeds"] = list(deepstack.to(mask.device))
        return args, kwargs

    handles = [embed.register_forward_pre_hook(note_rows),
               language_model.register_forward_pre_hook(add_features, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
