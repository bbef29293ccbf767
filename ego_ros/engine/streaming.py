"""Hooks into ``generate``: the answer so far for a callback (the ROS action's feedback), and cancellation."""

from __future__ import annotations

import threading
from typing import Callable

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class TextCallbackStreamer(BaseStreamer):
    """Calls ``on_text(answer_so_far)`` after each generated token (the prompt itself is skipped)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the whole prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        self.on_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self) -> None:
        pass


class CancelCriteria(StoppingCriteria):
    """Stops generation at the next token once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
