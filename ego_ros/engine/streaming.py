# SPDX-License-Identifier: Apache-2.0
"""Hooks into ``generate``: the answer's new text for a callback (the ROS action's feedback), and cancellation."""

from __future__ import annotations

import threading
from typing import Callable

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class TextCallbackStreamer(BaseStreamer):
    """After each generated token (the prompt itself is skipped): ``on_text(answer_so_far)`` and/or
    ``on_new_text(text_this_token_added, tokens_so_far)``; the text may be "" (a token whose character is not
    complete yet). If text is still held back when generation ends, one last call delivers it (its token count
    unchanged: it is no new token).

    Incremental: each token decodes a few tokens, never the whole answer again (that was quadratic in the answer's
    length, up to 8192 tokens). The pieces join to ``tokenizer.decode(all_ids)``. Text ending in an incomplete
    UTF-8 character (U+FFFD) is held back for up to MAX_HELD tokens, until the token that completes it.
    """

    MAX_HELD = 4  # a UTF-8 character is at most 4 bytes, hence 4 byte-level tokens

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None,
                 on_new_text: Callable[[str, int], None] | None = None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.on_new_text = on_new_text
        self.ids: list[int] = []
        self.text = ""
        self.prompt_seen = False
        # ids[_prefix:_read] are decoded already; they are decoded again as the context of the newer ones (a
        # token's text can depend on its neighbour: a leading space, a character split over two tokens).
        self._prefix = 0
        self._read = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the whole prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        held = len(self.ids) - self._read
        new = self._advance() if held >= self.MAX_HELD else self._advance(hold_incomplete=True)
        self._emit(new)

    def end(self) -> None:
        if len(self.ids) > self._read and (new := self._advance()):
            self._emit(new)

    def _advance(self, hold_incomplete: bool = False) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if hold_incomplete and after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def _emit(self, new: str) -> None:
        self.text += new
        if self.on_new_text is not None:
            self.on_new_text(new, len(self.ids))
        if self.on_text is not None:
            self.on_text(self.text)


class CancelCriteria(StoppingCriteria):
    """Stops generation at the next token once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
