# SPDX-License-Identifier: Apache-2.0
"""The tiny Qwen3-VL family: a seeded, untrained Qwen3VLForConditionalGeneration with the family's layout in
miniature (q/k norms in the decoder's attention, interleaved M-RoPE, 16 px patches merged 2x2, learned position
grid in the vision tower, and DeepStack: three intermediate vision layers merged and added to the first three
decoder layers' hidden states at visual positions), with the Qwen2.5-VL tiny tokenizer and chat template (the
special tokens the engine uses are the same in both families).
"""

from __future__ import annotations

from pathlib import Path

from ego_ros.testing.tiny_qwen2_5_vl import QWEN_SPECIAL_TOKENS, build_tokenizer, save_checkpoint

PATCH_SIZE = 16  # Qwen3-VL's patch: one visual token per 32x32 px after the 2x2 merge


def make_qwen3_vl(*, seed: int = 0, max_pixels: int = 112 * 112 * 4, placeholder: str,
                  text_overrides: dict | None = None, vision_overrides: dict | None = None):
    """A seeded, untrained Qwen3VLForConditionalGeneration (4 decoder layers, hidden 64 unless overridden), its
    tokenizer and image processor, in memory: ``(model, tokenizer, image_processor)``."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(QWEN_SPECIAL_TOKENS, placeholder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_config = dict(
        model_type="qwen3_vl_text",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # Interleaved M-RoPE as in the real checkpoints ([24, 20, 20] of 64 frequencies): sums to head_dim / 2.
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        vocab_size=len(tokenizer) + 8,  # spare rows, as the real checkpoints have
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text_config.update(text_overrides or {})
    vision_config = dict(
        model_type="qwen3_vl_vision",
        depth=4,
        hidden_size=32,
        hidden_act="gelu_pytorch_tanh",
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text_config["hidden_size"],
        num_position_embeddings=64,  # an 8x8 learned grid, interpolated to each image's patch grid
        deepstack_visual_indexes=[0, 1, 2],  # three DeepStack layers, as the real ones ([5, 11, 17] of 24 for 2B)
    )
    vision_config.update(vision_overrides or {})
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    cell = PATCH_SIZE * 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], size={"shortest_edge": cell * cell, "longest_edge": max_pixels})
    return model, tokenizer, image_processor


def build_qwen3_vl(out_dir: Path, *, seed: int = 0, max_pixels: int = 112 * 112 * 4, placeholder: str,
                   text_overrides: dict | None = None) -> Path:
    """Write a tiny random Qwen3VLForConditionalGeneration (4 decoder layers, hidden 64) and its processor."""
    import torch

    model, tokenizer, image_processor = make_qwen3_vl(
        seed=seed, max_pixels=max_pixels, placeholder=placeholder, text_overrides=text_overrides)
    # Random init gives near-uniform attention; a larger spread makes token scores (and so tests) discriminative.
    # Qwen3 normalises q and k per head (RMSNorm) before RoPE, so the spread goes on the norms' gains: scaling
    # q_proj/k_proj alone would be undone by the norm.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.mul_(4.0)
            layer.self_attn.k_norm.weight.mul_(4.0)
    return save_checkpoint(out_dir, model, tokenizer, image_processor)
