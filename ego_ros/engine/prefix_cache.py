# SPDX-License-Identifier: Apache-2.0
"""Prefill a prompt's shared beginning once and continue every prompt that starts with it from its KV cache.

Two uses in the engine:

* A question's prompt starts with the system turn and the concept block ("NAME is <soft tokens>." for each concept
  in context). That block only changes when a concept does, so its KV cache is kept (:class:`PrefixCache`) and each
  question prefills only its image(s) and words.
* Recognition with the frame first: the frame is prefilled once and every concept's short continuation (its soft
  tokens and the yes/no question) is scored from that cache in one batch (:func:`score_continuations`).

A continuation must see exactly what it would see in the whole prompt: the same keys and values for the prefix
(causal attention: the prefix's do not depend on what follows) and the same positions. Positions are the model's
own, computed over the whole prompt (``backend.rope_positions``): for Qwen2.5-VL's M-RoPE the text after an image
continues from the image's largest position, not from its token count.

A cache is only reused for the exact same prefix: the same token ids and the same concept memories (the objects
themselves, as read together from the store, and their tensors unmodified). A concept registered, appended or
forgotten gives the next question other memories, hence a miss and a new prefill; a question already running keeps
the memories it read, and its cache, to the end. A stale prefix cannot be used.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .backends import Batch, EncodedImage
from .soft_tokens import injected_rows


@dataclass
class _Entry:
    model: object  # the model that computed it (an Ego whose model is replaced must not use it)
    ids: tuple[int, ...]
    memories: tuple  # the ConceptMemory objects themselves: holding them keeps their identity meaningful
    versions: tuple[int, ...]  # their vectors' in-place modification counters
    cache: DynamicCache


def _versions(memories: Sequence) -> tuple[int, ...]:
    return tuple(memory.vectors._version for memory in memories)


class PrefixCache:
    """The KV cache of the latest concept prefix, keyed on its exact content. Thread-safe.

    One entry: a robot asks about the same concepts again and again; when they change, the old prefix is of no use.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entry: _Entry | None = None
        self.hits = 0
        self.misses = 0

    def get(self, model, ids: Sequence[int], memories: Sequence) -> DynamicCache | None:
        """A private copy of the cache of exactly this prefix of ``model`` (its tensors shared, never modified), or
        None."""
        with self._lock:
            entry = self._entry
            if (entry is None or entry.model is not model or entry.ids != tuple(ids)
                    or len(entry.memories) != len(memories)
                    or any(a is not b for a, b in zip(entry.memories, memories))
                    or entry.versions != _versions(memories)):
                self.misses += 1
                return None
            self.hits += 1
            return fork(entry.cache)

    def put(self, model, ids: Sequence[int], memories: Sequence, cache: DynamicCache) -> None:
        """Keep ``cache`` (the caller must not extend it: use :func:`fork`) as ``model``'s prefix ``ids`` of
        ``memories``."""
        with self._lock:
            self._entry = _Entry(model, tuple(ids), tuple(memories), _versions(memories), cache)

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    def __len__(self) -> int:
        with self._lock:
            return int(self._entry is not None)


def fork(cache: DynamicCache, repeats: int = 1) -> DynamicCache:
    """A cache that ``generate`` or a forward may extend without touching ``cache``, repeated ``repeats`` times
    along the batch.

    The tensors are shared, not copied: a :class:`DynamicLayer` grows by concatenation into new tensors, so the
    original's are never written (the tests check it). Any other layer type is deep-copied.
    """
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        copied = copy.copy(cache)
        copied.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        copied = copy.deepcopy(cache)
    if repeats != 1:
        copied.batch_repeat_interleave(repeats)
    return copied


def prefix_length(batch: Batch, row: int, ids: Sequence[int]) -> int | None:
    """len(ids) if ``batch``'s row ``row`` (its real tokens) begins with ``ids``, else None."""
    real = batch.input_ids[row][batch.attention_mask[row].bool()]
    if real.shape[0] <= len(ids) or real[: len(ids)].tolist() != list(ids):
        return None
    return len(ids)


def prefix_batch(batch: Batch, length: int, vectors: torch.Tensor, images: Sequence[EncodedImage]) -> Batch:
    """The first ``length`` real tokens of ``batch``'s first row as a batch of their own, with the ``vectors``
    of their placeholder/image rows and the grids of their ``images``."""
    real = batch.attention_mask[0].bool()
    device = batch.input_ids.device
    return Batch(
        input_ids=batch.input_ids[0][real][:length].unsqueeze(0),
        attention_mask=torch.ones((1, length), dtype=batch.attention_mask.dtype, device=device),
        mm_token_type_ids=batch.mm_token_type_ids[0][real][:length].unsqueeze(0),
        image_grid_thw=(torch.tensor([i.grid_thw for i in images], dtype=torch.long, device=device)
                        if images else None),
        injected=vectors,
    )


@torch.no_grad()
def prefill(model, backend, prefix: Batch) -> DynamicCache:
    """The KV cache of ``prefix`` (one unpadded row)."""
    with injected_rows(model, backend.injected_token_ids, prefix.injected):
        output = model(**prefix.model_inputs(), use_cache=True, logits_to_keep=1)
    return output.cache


@torch.no_grad()
def score_continuations(model, backend, batch: Batch, length: int, cache: DynamicCache,
                        vectors: torch.Tensor) -> torch.Tensor:
    """The last position's logits of every row of ``batch``, (B, V), computed from ``cache``, the KV of the
    ``length`` tokens every row begins with; only the rest of each row is run.

    ``vectors``: the placeholder/image rows of the continuations (after the prefix), in row-major order.
    Equal to running the whole of ``batch`` (the tests check it): positions are the model's own over the whole
    prompts, and each continuation attends to the prefix and to itself, never to another row's padding.
    """
    positions = backend.rope_positions(batch)  # (3, B, W) over the whole prompts
    width = batch.input_ids.shape[1]
    lengths = batch.attention_mask.sum(dim=1)  # real tokens per row
    rest = lengths - length  # continuation tokens per row, right-aligned (rows are left-padded)
    columns = torch.arange(width - length, device=batch.input_ids.device)
    keep = columns[None, :] >= (width - length - rest)[:, None]  # (B, S) the continuation's own tokens
    input_ids = batch.input_ids[:, length:].masked_fill(~keep, backend.pad_id)
    attention_mask = torch.cat([torch.ones_like(batch.attention_mask[:, :length]), keep.long()], dim=1)
    position_ids = positions[:, :, length:].masked_fill(~keep, 0)
    forked = fork(cache, repeats=batch.input_ids.shape[0])
    with injected_rows(model, backend.injected_token_ids, vectors):
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       mm_token_type_ids=batch.mm_token_type_ids[:, length:].masked_fill(~keep, 0),
                       cache=forked, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1]
