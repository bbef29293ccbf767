# SPDX-License-Identifier: Apache-2.0
"""The tiny InternVL3 family: a seeded, untrained InternVLForConditionalGeneration (an InternViT-like vision tower
of 2 layers, a Qwen2 decoder of 4 layers, hidden 64), the tiny byte-level BPE tokenizer with InternVL's special
tokens, and the GotOcr2 image processor that cuts images into tiles plus a thumbnail.

Tiles are 112 px here rather than InternVL3's 448 (16 visual tokens a tile instead of 256, same 14 px patches and
0.5 pixel shuffle), so that a test image cut into several tiles stays a few dozen tokens; the engine reads the tile
size from the processor and the vision config, so nothing else differs from a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tiny_qwen2_5_vl import QWEN_SPECIAL_TOKENS, build_tokenizer

# InternVL's own special tokens follow Qwen2's in the real tokenizer; the converted (-hf) checkpoints name the image
# ones in tokenizer_config.json, where InternVLProcessor reads them.
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + tuple(INTERNVL_NAMED_TOKENS.values())

# The chat template of the converted InternVL3 checkpoints (transformers' convert_internvl_weights_to_hf; 481
# characters, the size of the -hf repositories' chat_template.jinja): each image is one <IMG_CONTEXT> and a new
# line, which the processor (and the engine) expand to <img> + <IMG_CONTEXT> * (tokens of all tiles) + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

TILE_SIZE = 112  # px a side of a tile (InternVL3: 448)
MAX_TILES = 12  # the processor's default max_patches, as in InternVL3's


def make_internvl(*, seed: int = 0, placeholder: str, tile_size: int = TILE_SIZE, text_overrides: dict | None = None):
    """A seeded, untrained InternVLForConditionalGeneration, its tokenizer and image processor, in memory:
    ``(model, tokenizer, image_processor)``."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = build_tokenizer(INTERNVL_SPECIAL_TOKENS, placeholder)
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in INTERNVL_SPECIAL_TOKENS}
    text_config = dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        vocab_size=len(tokenizer) + 8,  # spare rows, as the real checkpoints have
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text_config.update(text_overrides or {})
    patch = 14
    vision_config = dict(
        model_type="internvl_vision",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[tile_size, tile_size],
        patch_size=[patch, patch],
        use_qk_norm=False,
        norm_type="layer_norm",
        use_mean_pooling=True,
    )
    config = InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=(tile_size // patch) ** 2 // 4,  # 0.5 pixel shuffle: a quarter of the patches
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile_size, "width": tile_size}, crop_to_patches=True,
                                               min_patches=1, max_patches=MAX_TILES)
    return model, tokenizer, image_processor


def build_internvl(out_dir: Path, *, seed: int = 0, max_pixels: int | None = None, placeholder: str,
                   text_overrides: dict | None = None) -> Path:
    """Write a tiny random InternVLForConditionalGeneration and its processor (``max_pixels`` does not apply: the
    processor cuts tiles, and the engine bounds their number)."""
    import torch

    model, tokenizer, image_processor = make_internvl(seed=seed, placeholder=placeholder,
                                                      text_overrides=text_overrides)
    # Random init gives near-uniform attention; a larger spread makes token scores (and so tests) discriminative.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(INTERNVL_NAMED_TOKENS)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out_dir
