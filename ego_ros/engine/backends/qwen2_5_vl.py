# SPDX-License-Identifier: Apache-2.0
"""Qwen2.5-VL: chat-template prompts, ``<|image_pad|>`` visual tokens, M-RoPE decoder attention.

Visual token i of an image with patch grid (t, gh, gw) covers the 28x28 px block at merged-grid row
``i // (gw // 2)``, column ``i % (gw // 2)`` of the resized image (2x2 patches of 14 px are merged); see figure.py.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

from ..soft_tokens import injected_rows
from ..vision_attention import attend_groups_at_once
from . import Batch, EncodedImage, Part, SoftTokens, check_memory_layout, processor_options


class Qwen2_5_VLBackend:
    family = "qwen2_5_vl"
    merge_size = 2  # spatial merge of the projector: one visual token per 2x2 patches
    deepstack_layers = 0  # decoder layers that get vision features beside the input embeddings (Qwen3-VL: 3)

    def __init__(self, model, tokenizer, image_processor, *, placeholder: str, max_pixels: int,
                 memory_layout: str = "text"):
        check_memory_layout(memory_layout, ("text", "image"), self.family)
        self.memory_layout = memory_layout
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
        self.placeholder = placeholder
        self.image_token_id = model.config.image_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Rows of these ids are overwritten with vectors: concept memories and image features.
        self.injected_token_ids = (self.placeholder_id, self.image_token_id)
        patch = image_processor.patch_size * image_processor.merge_size
        self.image_size = {"shortest_edge": patch * patch, "longest_edge": max(max_pixels, patch * patch)}
        self.processor_options = processor_options(image_processor, model)
        if model.device.type == "cuda":  # one attention call per vision layer, not one per window: see the module
            attend_groups_at_once(model.model.visual)

    # --- images -------------------------------------------------------------------------------------------------

    def encode(self, images, *, grad: bool = False) -> list[EncodedImage]:
        """Vision encoder + projector for PIL RGB images, in one batched call.

        ``grad`` keeps the autograd graph of the features: only for training (the toy world's trainer).
        """
        processed = self.image_processor(images=list(images), size=self.image_size, return_tensors="pt",
                                         **self.processor_options)
        grids = processed["image_grid_thw"]  # (n, 3)
        pixel_values = processed["pixel_values"]  # (sum of t*h*w, C*T*P*P)
        with torch.set_grad_enabled(grad):
            output = self.model.get_image_features(
                pixel_values=pixel_values.to(self.model.device, self.model.dtype),
                image_grid_thw=grids.to(self.model.device),
            )
        # transformers >= 5.20 returns a model output whose pooler_output holds the per-image projector outputs.
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        per_image_pixels = torch.split(pixel_values, grids.prod(-1).tolist())
        return [
            EncodedImage(features=f, grid_thw=tuple(g.tolist()), pixel_values=p, size=image.size, deepstack=d)
            for f, g, p, image, d in zip(features, grids, per_image_pixels, images, self._deepstack(output, len(grids)))
        ]

    @staticmethod
    def _deepstack(output, num_images: int) -> list[torch.Tensor | None]:
        """Each image's DeepStack features (L, N, D) from the vision tower's output: none in this family."""
        return [None] * num_images

    # --- prompts ------------------------------------------------------------------------------------------------

    def build(self, prompts: list[list[Part]], responses: list[list[int]] | None = None) -> Batch:
        """Tokenise user turns made of parts, optionally followed by a teacher-forced assistant response."""
        rows, injected, grids, pixels, image_spans = [], [], [], [], []
        for i, parts in enumerate(prompts):
            content, vectors, images = [], [], []
            for part in parts:
                if isinstance(part, EncodedImage):
                    vectors.append(part.features)
                elif not isinstance(part, str):  # soft tokens
                    if isinstance(part, SoftTokens):
                        if part.deepstack is not None:
                            raise ValueError(f"soft tokens with DeepStack features, which {self.family} has no use "
                                             "for: the memory was made by another model family")
                        part = part.vectors
                    vectors.append(part)
                content.append(self._content(part, images))
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = self._expand_images(ids, [grid for grid, _ in images])
            if responses is not None:
                ids = ids + list(responses[i])
            expected = sum(v.shape[0] for v in vectors)
            found = sum(1 for t in ids if t in (self.placeholder_id, self.image_token_id))
            if found != expected:  # a stray special token in the text would shift every injected row
                raise ValueError(f"prompt has {found} placeholder/image tokens but {expected} vectors to inject")
            rows.append(ids)
            injected.extend(vectors)
            grids.extend(grid for grid, _ in images)
            pixels.extend(image.pixel_values for _, image in images if image is not None)
            image_spans.append([image is not None for _, image in images])

        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ids in enumerate(rows):  # left padding: every prompt ends where generation starts
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention_mask[b, width - len(ids) :] = 1
        is_image = input_ids == self.image_token_id
        device, dtype = self.model.device, self.model.dtype
        return Batch(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            mm_token_type_ids=is_image.int().to(device),
            image_grid_thw=torch.tensor(grids, dtype=torch.long, device=device) if grids else None,
            injected=torch.cat([v.to(device, dtype) for v in injected]) if injected else torch.zeros(0, 0),
            pixel_values=torch.cat(pixels) if pixels else None,
            image_positions=[[span for span, is_frame in zip(self._image_spans(row), frames) if is_frame]
                             for row, frames in zip(is_image, image_spans)],
        )

    def prefix_ids(self, parts: list[Part]) -> list[int]:
        """The token ids that every prompt beginning with ``parts`` starts with, as :meth:`build` tokenises it.

        The chat template is rendered over ``parts`` and a marker, and cut at the marker: the system turn, the
        user turn's opening and ``parts``. A caller must still check that a built prompt begins with these ids (the
        tokeniser could merge the last token of ``parts`` with the text after it).
        """
        marker = "\x00prefix-end\x00"
        images = []
        content = [self._content(part.vectors if isinstance(part, SoftTokens) else part, images) for part in parts]
        content.append({"type": "text", "text": marker})
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if text.count(marker) != 1:
            raise ValueError("the chat template did not keep the prompt's text in one place")
        ids = self.tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]
        return self._expand_images(ids, [grid for grid, _ in images])

    def rope_positions(self, batch: Batch) -> torch.Tensor:
        """The model's own M-RoPE positions of ``batch``, (3, B, S): the ones its forward would compute."""
        return self.model.model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
            attention_mask=batch.attention_mask,
        )[0]

    def forget_positions(self) -> None:
        """Drop the position state the model keeps between calls (Qwen2.5-VL's ``rope_deltas``): ``generate``
        continuing a cache would otherwise reuse the previous prompt's offset for a prompt without new images."""
        self.model.model.rope_deltas = None

    def _content(self, part, images: list) -> dict:
        """The chat-template content of one part (text, an image, or a memory's vectors), noting each image-like
        part's (patch grid, EncodedImage or None for a memory) in ``images``.

        A memory is text by default: one placeholder per vector, at text positions. With ``memory_layout: image``
        it is an image of its own, as a serving engine takes precomputed embeddings: the family's vision
        delimiters around one ``<|image_pad|>`` per vector, on a synthetic patch grid (``memory_grid``), so the
        model's rope index gives its rows 2-D image positions.
        """
        if isinstance(part, str):
            return {"type": "text", "text": part}
        if isinstance(part, EncodedImage):
            images.append((part.grid_thw, part))
            return {"type": "image"}
        if self.memory_layout == "image":
            images.append((memory_grid(part.shape[0], self.merge_size), None))
            return {"type": "image"}
        return {"type": "text", "text": self.placeholder * part.shape[0]}

    def _expand_images(self, ids: list[int], grids: list[tuple[int, int, int]]) -> list[int]:
        """Replace each single ``<|image_pad|>`` of the chat template by its image's number of visual tokens."""
        out, queue = [], iter(grids)
        for token in ids:
            if token != self.image_token_id:
                out.append(token)
                continue
            grid = next(queue, None)
            if grid is None:
                raise ValueError("prompt text contains more image tokens than images")
            t, h, w = grid
            out.extend([self.image_token_id] * (t * h * w // self.merge_size**2))
        if next(queue, None) is not None:
            raise ValueError("chat template did not place every image")
        return out

    @staticmethod
    def _image_spans(is_image_row: torch.Tensor) -> list[torch.Tensor]:
        positions = torch.nonzero(is_image_row).flatten()
        if positions.numel() == 0:
            return []
        breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
        return list(torch.tensor_split(positions.cpu(), breaks.cpu()))

    # --- attention ----------------------------------------------------------------------------------------------

    @property
    def decoder_layers(self):
        return self.model.model.language_model.layers

    def attention_module(self, layer_index: int):
        return self.decoder_layers[layer_index].self_attn

    def injecting(self, batch: Batch, *, once: bool = False):
        """Context: every forward of the model inside it gets ``batch.injected`` at the placeholder/image rows (with
        ``once``, only the first forward that holds them: a generation's prefill; see soft_tokens)."""
        return injected_rows(self.model, self.injected_token_ids, batch.injected, once=once)

    @classmethod
    def query_attention(cls, attn, hidden_states, position_embeddings, rows: torch.Tensor) -> torch.Tensor:
        """Causal softmax attention of query ``rows`` over all keys on one layer, (B, H, R, S), in float32.

        The same computation as the layer's eager attention (q/k projections, M-RoPE, GQA, scaling, causal mask,
        softmax), restricted to the rows we need, so the other layers keep their fast attention kernel.
        """
        batch, seq, _ = hidden_states.shape
        cos, sin = position_embeddings  # (B, S, head_dim), M-RoPE sections already interleaved
        q, k = cls.queries_and_keys(attn, hidden_states, rows)
        q = q * cos[:, rows].unsqueeze(1) + rotate_half(q) * sin[:, rows].unsqueeze(1)
        k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query: share each kv head
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # (B,H,R,S)
        future = torch.arange(seq, device=rows.device)[None, :] > rows[:, None]  # (R,S) causal mask
        return logits.masked_fill(future, float("-inf")).softmax(dim=-1)

    @staticmethod
    def queries_and_keys(attn, hidden_states, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's queries of ``rows`` (B, H, R, d) and keys of every position (B, Hkv, S, d), before RoPE."""
        batch, seq, _ = hidden_states.shape
        q = attn.q_proj(hidden_states[:, rows]).view(batch, len(rows), -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        return q, k


def memory_grid(tokens: int, merge_size: int) -> tuple[int, int, int]:
    """A patch grid (t, h, w) for ``tokens`` memory vectors as an image of their own: after the merge, h x w
    tokens in the most nearly square rectangle (a prime count lies in one row)."""
    rows = max(r for r in range(1, int(tokens**0.5) + 1) if tokens % r == 0)
    return 1, rows * merge_size, tokens // rows * merge_size
