# SPDX-License-Identifier: Apache-2.0
"""Put vectors into the prompt where placeholder tokens stand: concept memories and image features alike.

A forward hook on the input-embedding layer overwrites, in row-major order, the rows whose token id is one of
``token_ids``. It is the same computation as building ``inputs_embeds`` by hand (the tests check logits are
identical), but it leaves ``input_ids`` in place, so the model still derives its M-RoPE positions from them and
``generate`` works unchanged: after the prefill, decoding steps carry no placeholder and pass through untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch


@contextmanager
def injected_rows(model, token_ids: Sequence[int], vectors: torch.Tensor, *, once: bool = False):
    """While active, every forward whose input holds ``token_ids`` gets ``vectors`` (R, D) at those rows.

    ``once``: the hook removes itself after the first forward that placed the vectors (a generation's prefill), so
    the decoding steps run the model without it: nothing to place there, and a compiled decoding step (a static
    cache on a GPU) is not broken up by a Python hook.
    """
    embed = model.get_input_embeddings()
    ids = torch.tensor(list(token_ids), device=embed.weight.device)
    handle = None

    def overwrite(module, args, output):
        mask = torch.isin(args[0], ids)  # (B, S)
        count = int(mask.sum())
        if count == 0:  # a decoding step: nothing to place
            return output
        if count != vectors.shape[0]:
            raise RuntimeError(f"{count} placeholder rows in the input but {vectors.shape[0]} vectors to place")
        if once:
            handle.remove()
        return output.masked_scatter(mask.unsqueeze(-1), vectors.to(output.dtype))

    handle = embed.register_forward_hook(overwrite)
    try:
        yield
    finally:
        handle.remove()
