# SPDX-License-Identifier: Apache-2.0
"""Attention-guided visual-token importance: eq. 3 of the Ego paper, on the selected layers only.

For one reference view, the model has generated keywords describing the subject. In a teacher-forced pass over
[instruction, image, keywords] we read, on each selected decoder layer l, the attention A_l[h, r, j] of keyword
token r to visual token j in head h, and score each visual token by

    I_j = mean_{l in L} mean_{h} mean_{r in keywords} A_l[h, r, j]                               (eq. 3)

The top K_c tokens, K_c = min(K, alpha * N_r / 100) with alpha the subject's area in percent, are the memory.

Note: rather than ``output_attentions=True`` (eager attention, every layer's full S x S map kept), a pre-hook on
each selected layer's attention recomputes the softmax rows of the keyword tokens only, and the pass stops after
the deepest selected layer. Memory is O(|L| * H * R * S) instead of O(layers * H * S^2).

:func:`score_visual_tokens_per_layer` keeps the layers apart, (L, N): layer calibration (paper §3.4,
``calibration.py``) scores every layer in one pass and compares them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .backends import Batch


class _DeepestLayerDone(Exception):
    """Raised from the deepest selected layer's hook: the rest of the forward pass is not needed."""


@contextmanager
def keyword_attention(backend, layers: list[int], rows: torch.Tensor, cols: torch.Tensor):
    """Capture, per selected layer, the attention of query ``rows`` to key ``cols``: {layer: (B, H, R, C)}."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int):
        def capture(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            probs = backend.query_attention(module, hidden, kwargs["position_embeddings"], rows)
            captured[layer] = probs[..., cols]
            if layer == deepest:
                raise _DeepestLayerDone

        return capture

    handles = [
        backend.attention_module(layer).register_forward_pre_hook(hook_for(layer), with_kwargs=True)
        for layer in layers
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def score_visual_tokens_per_layer(
    model, backend, batch: Batch, keyword_positions: torch.Tensor, visual_positions: torch.Tensor, layers: list[int]
) -> torch.Tensor:
    """Eq. 3 on each layer of ``layers`` separately, for a single teacher-forced sequence: (L, N), float32.

    Row i is ``mean_h mean_r A_{layers[i]}[h, r, j]``, in the order of ``layers``. Eq. 3 is linear in the layers,
    so the scores of any subset of them are the mean of its rows: one pass over every layer (calibration, §3.4)
    answers for every choice of layers.
    """
    if batch.input_ids.shape[0] != 1 or not bool(batch.attention_mask.all()):
        raise ValueError("scoring expects one unpadded sequence")
    layers = list(layers)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct decoder layer indices, got {layers}")
    device = batch.input_ids.device
    rows, cols = keyword_positions.to(device), visual_positions.to(device)
    with keyword_attention(backend, layers, rows, cols) as captured:
        with backend.injecting(batch):
            try:
                model(**batch.model_inputs(), use_cache=False)
            except _DeepestLayerDone:
                pass
    attention = torch.stack([captured[layer][0] for layer in layers])  # (L, H, R, N)
    return attention.mean(dim=(1, 2)).cpu()  # (L, N)


def score_visual_tokens(
    model, backend, batch: Batch, keyword_positions: torch.Tensor, visual_positions: torch.Tensor, layers: list[int]
) -> torch.Tensor:
    """Eq. 3 for a single teacher-forced sequence: one importance score per visual token, (N,), float32.

    The mean over ``layers`` of :func:`score_visual_tokens_per_layer`'s rows.
    """
    return combine_layers(score_visual_tokens_per_layer(model, backend, batch, keyword_positions, visual_positions,
                                                        layers))


def combine_layers(per_layer: torch.Tensor) -> torch.Tensor:
    """Eq. 3's outer mean: the scores of a set of layers from their per-layer rows (L, N) -> (N,)."""
    return per_layer.mean(dim=0)


def tokens_to_keep(max_tokens: int, area_percent: float, num_tokens: int, min_tokens: int) -> int:
    """K_c = min(K, ceil(alpha * N_r / 100)), at least ``min_tokens`` (a tiny subject still gets a few), at most N_r."""
    budget = min(max_tokens, math.ceil(area_percent * num_tokens / 100.0))
    return min(num_tokens, max(budget, min_tokens))


def select_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original (raster) order."""
    return torch.topk(scores, k).indices.sort().values
