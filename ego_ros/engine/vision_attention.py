# SPDX-License-Identifier: Apache-2.0
"""One attention call per vision layer for all of its windows (or images), instead of one call for each.

Qwen's vision towers attend within groups of patches: Qwen2.5-VL within windows of 8x8 patches (4x4 visual tokens) on
most layers and within each image on a few, Qwen3-VL within each image. With any attention implementation but
flash-attention's variable-length kernel, transformers runs one attention call per group. A 640x480 frame has 30
windows, so Qwen2.5-VL's 32-layer tower makes about 840 small calls per frame; on an H100 with the 7B model the
tower took 106-112 ms that way, nearly all of it the host launching kernels (``bench/gpu_phases.py``).

Here the groups are gathered into one padded batch (groups x longest group) and attended in one
``scaled_dot_product_attention`` call, a key mask hiding the padding: each query still sees exactly its own group's
keys, so it is the same arithmetic in a handful of kernels. It plugs in through transformers' own extension point,
an attention function registered with ``AttentionInterface`` and named in the vision config. The tower hands the
groups' boundaries (``cu_seqlens``) only to an implementation whose name says "flash", hence the name.

Used on CUDA, where launches dominate (by the Qwen backends). On a CPU the per-group loop costs little next to the
arithmetic, and padding would add work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "ego_ros_grouped_sdpa_flash_layout"


def grouped_attention(module, query, key, value, attention_mask=None, *, cu_seq_lens_q, max_length_q,
                      scaling=None, dropout=0.0, **kwargs):
    """Attention within consecutive groups of positions, in one call.

    ``query``/``key``/``value``: (1, H, N, d); group g holds positions ``cu_seq_lens_q[g]`` to
    ``cu_seq_lens_q[g + 1]`` (the tower's cu_seqlens, consecutive and in order). Returns ``(output (1, N, H, d),
    None)``, the layout of transformers' flash-attention functions that the tower reshapes.
    """
    bounds = cu_seq_lens_q.to(device=query.device, dtype=torch.long)
    lengths = bounds[1:] - bounds[:-1]  # (G,)
    offsets = torch.arange(int(max_length_q), device=query.device)
    inside = offsets < lengths[:, None]  # (G, L): which padded slots hold a position of the group
    # (G, L) positions; a padded slot points at some real row (the next group's, or the last): masked as a key,
    # dropped as a query
    rows = (bounds[:-1, None] + offsets).clamp(max=query.shape[2] - 1)

    def grouped(states):  # (1, H, N, d) -> (G, H, L, d)
        return states[0][:, rows].transpose(0, 1)

    output = F.scaled_dot_product_attention(grouped(query), grouped(key), grouped(value),
                                            attn_mask=inside[:, None, None, :], dropout_p=dropout, scale=scaling)
    # (G, H, L, d) -> (G, L, H, d) -> the real slots in group order, which is position order: (N, H, d)
    return output.transpose(1, 2)[inside].unsqueeze(0), None


def attend_groups_at_once(vision_tower) -> bool:
    """Make ``vision_tower``'s attention layers use :func:`grouped_attention`; False if it has none that take
    cu_seqlens (then nothing is changed)."""
    from transformers import AttentionInterface

    configs = {id(m.config): m.config for m in vision_tower.modules()
               if type(m).__name__.endswith("VisionAttention") and hasattr(m, "config")}
    if not configs:
        return False
    AttentionInterface.register(NAME, grouped_attention)
    for config in configs.values():
        config._attn_implementation = NAME
    return True
