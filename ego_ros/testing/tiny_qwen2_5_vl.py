# SPDX-License-Identifier: Apache-2.0
"""The tiny Qwen2.5-VL family: a seeded, untrained Qwen2_5_VLForConditionalGeneration, its byte-level BPE
tokenizer (trained on a few sentences, with the family's special tokens) and image processor.

The toy world's trainer builds its model here, so this file's bytes are part of the trained toy model's cache key:
other architectures live in their own modules, and ``tiny_model`` is the command line that picks one.
"""

from __future__ import annotations

from pathlib import Path

# The Qwen2.5-VL special tokens, in the order (and so with the relative ids) of the real tokenizer, followed by
# the engine's concept placeholder. The real tokenizer does not have the placeholder; the engine adds it there.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL chat template reduced to what the engine uses: system/user/assistant turns whose content is a
# string or a list of {"type": "text"} / {"type": "image"} parts, each image written as one <|image_pad|> that
# the engine expands to the image's number of visual tokens.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tiny tokenizer is trained on: the words of the engine's prompts and of everyday object descriptions,
# so prompts tokenise into a few dozen tokens rather than into bytes.
_CORPUS = """
You are a helpful assistant. Describe the main subject of this image with a few short keywords.
List five keywords, separated by commas. What percentage of the image does the main subject cover?
Answer with a single number between 0 and 100. Is the concept in this image? Answer yes or no. Yes. No.
This is my mug. Where is my mug? What did Rex just do? Anna is sitting on the red sofa near the window.
A small brown dog with floppy ears, a white ceramic mug with a blue handle, a black backpack, a green plant.
The frames below are from the last seconds of video, oldest first. Frame at minus two seconds.
red green blue yellow white black brown grey orange purple pink round square small large metal wooden
plastic glass ceramic fabric leather dog cat person woman man child cup mug bottle bag chair table sofa
kitchen office robot camera hand face shirt hat shoes ball toy book phone laptop keyboard lamp door window
""".split("\n")


def build_tokenizer(special_tokens: tuple[str, ...], placeholder: str, seed_corpus: list[str] = _CORPUS):
    """A byte-level BPE tokenizer trained on a few sentences, with the family's special tokens and ours."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    bpe.train_from_iterator([line for line in seed_corpus if line.strip()] * 4, trainer=trainer)
    model = bpe.model
    vocab = bpe.get_vocab()
    merges = _merges_of(model)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[1:]) + [placeholder]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _merges_of(bpe_model) -> list[tuple[str, str]]:
    """The merge list of a trained tokenizers BPE model (only its JSON form exposes it)."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(Tokenizer(bpe_model).to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state]


def make_qwen2_5_vl(*, seed: int = 0, max_pixels: int = 112 * 112 * 4, placeholder: str,
                    text_overrides: dict | None = None, vision_overrides: dict | None = None,
                    corpus: list[str] = _CORPUS):
    """A seeded, untrained Qwen2_5_VLForConditionalGeneration (4 decoder layers, hidden 64 unless overridden), its
    tokenizer (trained on ``corpus``) and image processor, in memory: ``(model, tokenizer, image_processor)``.

    ``text_overrides``/``vision_overrides`` change the decoder's and the vision tower's sizes (a real model's layer
    and head counts for benchmarks, a larger model for the toy world's trainer).
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(QWEN_SPECIAL_TOKENS, placeholder, corpus)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    vocab_size = len(tokenizer) + 8  # spare rows, as the real checkpoints have
    text_config = dict(
        model_type="qwen2_5_vl_text",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text_config.update(text_overrides or {})
    vision_config = dict(
        model_type="qwen2_5_vl",
        depth=2,
        hidden_act="silu",
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_chans=3,
        out_hidden_size=text_config["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        spatial_patch_size=14,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    vision_config.update(vision_overrides or {})
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_pixels})
    return model, tokenizer, image_processor


def save_checkpoint(out_dir: Path, model, tokenizer, image_processor) -> Path:
    """Write the hub-style folder that ``from_pretrained`` (and so ``Ego.load``) reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return out_dir


def build_qwen2_5_vl(out_dir: Path, *, seed: int = 0, max_pixels: int = 112 * 112 * 4, placeholder: str,
                     text_overrides: dict | None = None) -> Path:
    """Write a tiny random Qwen2_5_VLForConditionalGeneration (4 decoder layers, hidden 64) and its processor."""
    import torch

    model, tokenizer, image_processor = make_qwen2_5_vl(
        seed=seed, max_pixels=max_pixels, placeholder=placeholder, text_overrides=text_overrides)
    # Random init gives near-uniform attention; a larger spread makes token scores (and so tests) discriminative.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return save_checkpoint(out_dir, model, tokenizer, image_processor)
