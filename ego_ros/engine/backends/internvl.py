# SPDX-License-Identifier: Apache-2.0
"""InternVL3 (the converted ``-hf`` checkpoints): tiles plus a thumbnail, ``<img><IMG_CONTEXT>...</img>`` visual
tokens, a Qwen2 decoder with 1-D RoPE.

An image is resized to a canvas of columns x rows square tiles (InternVL3: 448 px), the arrangement whose aspect
is closest to the image's among those of at most ``max_tiles`` tiles, and cut into them; with more than one tile,
the whole image resized to one tile (the thumbnail) follows. Each tile goes through the vision tower alone and a
0.5 pixel shuffle leaves one token per 28x28 px block (256 a 448 px tile), in raster order inside the tile, tiles
in raster order, the thumbnail last (``token_layout`` maps each token to its place on the image).

``max_image_pixels`` bounds the tiles' pixels: at most ``max_image_pixels // tile_size**2`` tiles (at least one).
"""

from __future__ import annotations

import torch
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.qwen2.modeling_qwen2 import rotate_half

from ..soft_tokens import injected_rows
from . import Batch, EncodedImage, Part, SoftTokens, check_memory_layout, processor_options

# Decoders whose attention query_attention reproduces (q/k projections with bias, RoPE, GQA, causal softmax).
TEXT_MODELS = ("qwen2",)


class InternVLBackend:
    family = "internvl"
    deepstack_layers = 0  # no vision features beside the input embeddings

    def __init__(self, model, tokenizer, image_processor, *, placeholder: str, max_pixels: int,
                 memory_layout: str = "text"):
        # A memory as an image (<img>, one <IMG_CONTEXT> per vector, </img>) is not built for this family yet.
        check_memory_layout(memory_layout, ("text",), "internvl")
        text_type = model.config.text_config.model_type
        if text_type not in TEXT_MODELS:
            raise ValueError(f"InternVL with a {text_type!r} decoder is not supported yet; supported: "
                             f"{', '.join(TEXT_MODELS)}")
        if model.config.downsample_ratio != 0.5 or model.config.vision_feature_select_strategy != "default":
            raise ValueError("only InternVL's 0.5 pixel shuffle over the patch tokens (CLS dropped) is supported")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor_options = processor_options(image_processor, model)
        self.placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
        self.placeholder = placeholder
        self.image_token_id = model.config.image_token_id  # <IMG_CONTEXT>
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.start_image_id = tokenizer.convert_tokens_to_ids("<img>")
        self.end_image_id = tokenizer.convert_tokens_to_ids("</img>")
        if tokenizer.unk_token_id in (self.start_image_id, self.end_image_id):
            raise ValueError("the tokenizer has no <img>/</img> tokens: not an InternVL tokenizer")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Rows of these ids are overwritten with vectors: concept memories and image features.
        self.injected_token_ids = (self.placeholder_id, self.image_token_id)
        vision = model.config.vision_config
        self.tile_size = int(vision.image_size[0])
        self.patch_size = int(vision.patch_size[0])
        processor_tile = (image_processor.size.height, image_processor.size.width)
        if processor_tile != (self.tile_size, self.tile_size):
            raise ValueError(f"the image processor's tiles are {processor_tile}, the vision tower's "
                             f"{self.tile_size} px")
        self.max_tiles = max(1, max_pixels // self.tile_size**2)
        self.min_tiles = 1

    # --- images -------------------------------------------------------------------------------------------------

    def tiling(self, size: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of the tiles an image of ``size`` = (width, height) is cut into (the processor's rule)."""
        return get_optimal_tiled_canvas((size[1], size[0]), (self.tile_size, self.tile_size), self.min_tiles,
                                        self.max_tiles)

    def encode(self, images, *, grad: bool = False) -> list[EncodedImage]:
        """Vision encoder + projector for PIL RGB images: every tile of every image in one batched call."""
        images = list(images)
        processed = self.image_processor(images=images, crop_to_patches=True, min_patches=self.min_tiles,
                                         max_patches=self.max_tiles, return_tensors="pt",
                                         **self.processor_options)
        pixel_values = processed["pixel_values"]  # (tiles of all images, C, tile, tile)
        counts = processed["num_patches"].tolist()
        with torch.set_grad_enabled(grad):
            output = self.model.get_image_features(pixel_values=pixel_values.to(self.model.device, self.model.dtype))
        features = output.pooler_output if hasattr(output, "pooler_output") else output  # (tiles, T, D)
        encoded = []
        for image, count, f, p in zip(images, counts, features.split(counts), pixel_values.split(counts)):
            columns, rows = self.tiling(image.size)
            if count != columns * rows + (columns * rows > 1):
                raise RuntimeError(f"the processor cut a {image.size} image into {count} tiles, not {columns}x{rows}"
                                   " (+ thumbnail): its tiling rule differs from this backend's")
            side = self.tile_size // self.patch_size
            encoded.append(EncodedImage(features=f.reshape(-1, f.shape[-1]), grid_thw=(1, rows * side, columns * side),
                                        pixel_values=p, size=image.size, tiles=(columns, rows)))
        return encoded

    # --- prompts ------------------------------------------------------------------------------------------------

    def build(self, prompts: list[list[Part]], responses: list[list[int]] | None = None) -> Batch:
        """Tokenise user turns made of parts, optionally followed by a teacher-forced assistant response."""
        rows, injected, pixels = [], [], []
        for i, parts in enumerate(prompts):
            content, vectors, images = [], [], []
            for part in parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                elif isinstance(part, EncodedImage):
                    content.append({"type": "image"})
                    images.append(part)
                    vectors.append(part.features)
                else:  # soft tokens: one placeholder per memory vector
                    if isinstance(part, SoftTokens):
                        if part.deepstack is not None:
                            raise ValueError(f"soft tokens with DeepStack features, which {self.family} has no use "
                                             "for: the memory was made by another model family")
                        part = part.vectors
                    content.append({"type": "text", "text": self.placeholder * part.shape[0]})
                    vectors.append(part)
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = self._expand_images(ids, images)
            if responses is not None:
                ids = ids + list(responses[i])
            expected = sum(v.shape[0] for v in vectors)
            found = sum(1 for t in ids if t in self.injected_token_ids)
            if found != expected:  # a stray special token in the text would shift every injected row
                raise ValueError(f"prompt has {found} placeholder/image tokens but {expected} vectors to inject")
            rows.append(ids)
            injected.extend(vectors)
            pixels.extend(image.pixel_values for image in images)

        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ids in enumerate(rows):  # left padding: every prompt ends where generation starts
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention_mask[b, width - len(ids) :] = 1
        is_image = input_ids == self.image_token_id
        device, dtype = self.model.device, self.model.dtype
        return InternVLBatch(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            mm_token_type_ids=is_image.int().to(device),
            image_grid_thw=None,
            injected=torch.cat(injected).to(device, dtype) if injected else torch.zeros(0, 0),
            pixel_values=torch.cat(pixels) if pixels else None,
            image_positions=[self._image_spans(row) for row in is_image],
        )

    def _expand_images(self, ids: list[int], images: list[EncodedImage]) -> list[int]:
        """Replace each ``<IMG_CONTEXT>`` of the chat template by ``<img>``, the image's tokens, ``</img>``, as
        InternVLProcessor does."""
        out, queue = [], iter(images)
        for token in ids:
            if token != self.image_token_id:
                out.append(token)
                continue
            image = next(queue, None)
            if image is None:
                raise ValueError("prompt text contains more image tokens than images")
            out.extend([self.start_image_id] + [self.image_token_id] * image.num_tokens + [self.end_image_id])
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

    @staticmethod
    def query_attention(attn, hidden_states, position_embeddings, rows: torch.Tensor) -> torch.Tensor:
        """Causal softmax attention of query ``rows`` over all keys on one layer, (B, H, R, S), in float32.

        The same computation as the Qwen2 layer's eager attention (q/k projections, RoPE, GQA, scaling, causal
        mask, softmax), restricted to the rows we need.
        """
        batch, seq, _ = hidden_states.shape
        head_dim = attn.head_dim
        cos, sin = position_embeddings  # (B, S, head_dim)
        q = attn.q_proj(hidden_states[:, rows]).view(batch, len(rows), -1, head_dim).transpose(1, 2)  # (B,H,R,d)
        k = attn.k_proj(hidden_states).view(batch, seq, -1, head_dim).transpose(1, 2)  # (B,Hkv,S,d)
        q = q * cos[:, rows].unsqueeze(1) + rotate_half(q) * sin[:, rows].unsqueeze(1)
        k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query: share each kv head
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # (B,H,R,S)
        future = torch.arange(seq, device=rows.device)[None, :] > rows[:, None]  # (R,S) causal mask
        return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


class InternVLBatch(Batch):
    """InternVL's decoder takes plain 1-D positions: no ``mm_token_type_ids`` or grid among the model inputs."""

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask)
