# SPDX-License-Identifier: Apache-2.0
"""The InternVL3 backend on a tiny random InternVLForConditionalGeneration loaded with from_pretrained: prompts and
pixels against transformers' own InternVLProcessor, eq. 3 against eager ``output_attentions``, stored vectors against
``get_image_features``, soft tokens against an explicit ``inputs_embeds`` path, the tiling against images whose
halves differ; then register/ask/recognize through ``Ego.load``.

Tolerances as in test_method_fidelity: float32 on the CPU, scores to 1e-6, logits to 1e-5, vectors to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, InternVLProcessor

from ego_ros.engine import Ego
from ego_ros.engine.backends.internvl import InternVLBackend
from ego_ros.engine.figure import concept_figure, load_views
from ego_ros.engine.soft_tokens import injected_rows
from ego_ros.testing.tiny_internvl import TILE_SIZE
from ego_ros.testing.tiny_model import build

MAX_TILES = 4
MAX_PIXELS = MAX_TILES * TILE_SIZE * TILE_SIZE


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    return build("internvl", tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture
def ego(internvl_dir, tmp_path):
    return Ego.load(str(internvl_dir), memory_dir=tmp_path / "memory", max_image_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def eager_model(internvl_dir):
    """An independent load of the same checkpoint with eager attention, the reference for eq. 3."""
    return AutoModelForImageTextToText.from_pretrained(str(internvl_dir), attn_implementation="eager").eval()


def wide_view(seed: int, width: int = 448, height: int = 200) -> Image.Image:
    """A view about twice as wide as high: cut into 2x1 tiles and a thumbnail (48 tokens on the tiny model)."""
    from conftest import random_view

    return Image.fromarray(random_view(seed, height, width))


class _ImageProcessorOnly(InternVLProcessor):
    """transformers' InternVLProcessor without its video processor (that one needs torchvision)."""

    def __init__(self, image_processor, tokenizer, chat_template=None, image_seq_length=256):
        InternVLProcessor.__init__(self, image_processor, tokenizer, None, image_seq_length, chat_template)


def test_ego_load_picks_the_internvl_backend_and_bounds_the_tiles(ego, internvl_dir, tmp_path):
    assert isinstance(ego.backend, InternVLBackend)
    assert ego.backend.max_tiles == MAX_TILES
    (image,) = ego.backend.encode([wide_view(0)])
    assert image.tiles == (2, 1) and image.grid_thw == (1, 8, 16) and image.num_tokens == 48
    # A view with the aspect of 2x2 tiles is cut into four and a thumbnail; one tile's worth of pixels: no tiling.
    (square,) = ego.backend.encode([wide_view(1, 300, 300)])
    assert square.tiles == (2, 2) and square.num_tokens == 5 * 16
    small = Ego.load(str(internvl_dir), memory_dir=tmp_path / "small", max_image_pixels=TILE_SIZE * TILE_SIZE + 5)
    (one,) = small.backend.encode([wide_view(0)])
    assert small.backend.max_tiles == 1 and one.tiles == (1, 1) and one.num_tokens == 16


def test_prompts_and_pixels_equal_the_internvl_processors(ego, internvl_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(internvl_dir))
    processor = _ImageProcessorOnly(AutoImageProcessor.from_pretrained(str(internvl_dir)), tokenizer,
                                    chat_template=ego.tokenizer.chat_template, image_seq_length=16)
    view = wide_view(2)
    text = ego.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        tokenize=False, add_generation_prompt=True)
    expected = processor(images=[view], text=[text], max_patches=MAX_TILES, return_tensors="pt")
    (image,) = ego.backend.encode([view])
    batch = ego.backend.build([[image, "What is this?"]])
    assert batch.input_ids.tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(batch.pixel_values, expected["pixel_values"], atol=0, rtol=0)


def test_tiles_and_thumbnail_see_the_parts_of_the_image_the_layout_says(ego):
    # Left half red, right half blue: the left tile is red, the right one blue, the thumbnail half and half.
    array = np.zeros((200, 448, 3), dtype=np.uint8)
    array[:, :224] = (255, 0, 0)
    array[:, 224:] = (0, 0, 255)
    (image,) = ego.backend.encode([Image.fromarray(array)])
    red_minus_blue = image.pixel_values[:, 0] - image.pixel_values[:, 2]  # (3 tiles, 112, 112)
    assert (red_minus_blue[0] > 2).all() and (red_minus_blue[1] < -2).all()  # bicubic blurs the seam a little
    assert (red_minus_blue[2][:, :54] > 2).all() and (red_minus_blue[2][:, 58:] < -2).all()
    # And the token order inside a tile is the pixel shuffle's: token k merges patches of block row k // 4,
    # column k % 4. Feed patch coordinates through the model's own pixel_shuffle and read them back.
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    patches = torch.stack([rows, cols], dim=-1)[None]  # (1, 8, 8, 2): patch (r, c) holds (r, c)
    merged = ego.model.model.pixel_shuffle(patches, scale_factor=0.5).reshape(16, 4, 2)  # (tokens, 4 patches, rc)
    cells = torch.tensor(image.token_boxes((224, 112))[:16]) / 14  # in patches
    for k in range(16):
        r, c = merged[k, :, 0], merged[k, :, 1]
        assert (r.min(), r.max() + 1, c.min(), c.max() + 1) == (cells[k, 1], cells[k, 3], cells[k, 0], cells[k, 2])


def reference_scores(model, trace) -> torch.Tensor:
    """Eq. 3 from ``output_attentions=True`` on the trace's exact inputs, through the model's own image path."""
    inputs = trace.model_inputs
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"], output_attentions=True, use_cache=False)
    rows, cols = trace.keyword_positions, trace.visual_positions
    per_layer = [out.attentions[layer][0][:, rows][:, :, cols] for layer in trace.layers]  # (H, R, N) each
    return torch.stack(per_layer).mean(dim=(0, 1, 2))


@pytest.mark.parametrize("layers", [None, [0], [0, 2, 3]])
def test_scores_match_eager_attention_reference(internvl_dir, tmp_path, eager_model, layers):
    ego = Ego.load(str(internvl_dir), memory_dir=tmp_path, layers=layers, max_image_pixels=MAX_PIXELS)
    info = ego.register("mug", [wide_view(3), wide_view(4, 300, 300)])
    for trace in info.traces:
        expected = reference_scores(eager_model, trace)
        assert trace.layers == (layers or [1, 2])
        assert trace.scores.shape == (trace.image.num_tokens,)
        torch.testing.assert_close(trace.scores, expected, atol=1e-6, rtol=0)
        k = trace.selected.numel()
        assert set(trace.selected.tolist()) == set(torch.topk(expected, k).indices.tolist())
        assert expected.std() > 1e-4  # a real signal: a wrong row or column would not reproduce it


def test_stored_vectors_are_the_models_image_features_at_stored_indices(ego, internvl_dir, eager_model):
    info = ego.register("rex", [wide_view(5), wide_view(6, 300, 300)], area_percent=30.0)
    reopened = Ego.load(str(internvl_dir), memory_dir=ego.store.root, max_image_pixels=MAX_PIXELS)
    memory = reopened.store.get("rex")
    for i, (trace, view) in enumerate(zip(info.traces, memory.views)):
        with torch.no_grad():
            features = eager_model.get_image_features(pixel_values=trace.model_inputs["pixel_values"]).pooler_output
        features = features.reshape(-1, features.shape[-1])  # tiles in order, then the thumbnail
        assert view.tiles == trace.image.tiles and view.num_visual_tokens == features.shape[0]
        assert view.indices == trace.selected.tolist()
        torch.testing.assert_close(memory.view_vectors(i), features[view.indices], atol=1e-6, rtol=0)
    assert [v.tiles for v in memory.views] == [(2, 1), (2, 2)]


def test_soft_token_hook_equals_explicit_inputs_embeds(ego):
    ego.register("mug", [wide_view(7)])
    (image,) = ego.backend.encode([wide_view(8)])
    memory = ego.store.get("mug").vectors
    batch = ego.backend.build([["mug is ", memory, ".\n", image, "Where is mug?"]])
    with torch.no_grad(), injected_rows(ego.model, ego.backend.injected_token_ids, batch.injected):
        hooked = ego.model(**batch.model_inputs(), use_cache=False).logits
    with torch.no_grad():
        embeds = ego.model.get_input_embeddings()(batch.input_ids).clone()
        rows = torch.isin(batch.input_ids, torch.tensor(ego.backend.injected_token_ids))
        embeds[rows] = batch.injected
        explicit = ego.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).logits
    torch.testing.assert_close(hooked, explicit, atol=1e-5, rtol=0)
    assert int((batch.input_ids == ego.backend.placeholder_id).sum()) == memory.shape[0]
    # The memory changes the answer: the same prompt without it gives other logits.
    plain = ego.backend.build([["mug is .\n", image, "Where is mug?"]])
    with torch.no_grad(), injected_rows(ego.model, ego.backend.injected_token_ids, plain.injected):
        without = ego.model(**plain.model_inputs(), use_cache=False).logits
    assert (hooked[0, -1] - without[0, -1]).abs().max() > 1e-3


def test_injected_image_features_equal_the_models_pixel_path(ego):
    (image,) = ego.backend.encode([wide_view(9)])
    batch = ego.backend.build([[image, "What is this?"]])
    with torch.no_grad():
        with injected_rows(ego.model, ego.backend.injected_token_ids, batch.injected):
            hooked = ego.model(**batch.model_inputs(), use_cache=False).logits
        native = ego.model(**batch.model_inputs(), pixel_values=batch.pixel_values, use_cache=False).logits
    torch.testing.assert_close(hooked, native, atol=1e-5, rtol=0)


def test_register_ask_recognize_end_to_end(ego, internvl_dir):
    info = ego.register("mug", [wide_view(10)], regions=(0, 0, 224, 200), area_percent=40.0)
    (trace,) = info.traces
    inside = set(range(16)) | {32, 33, 36, 37, 40, 41, 44, 45}  # left tile + the thumbnail's left half
    assert trace.selected.numel() > 0 and set(trace.selected.tolist()) <= inside
    ego.register("rex", [wide_view(11), wide_view(12, 300, 300)])
    answer = ego.ask("Where is my mug?", wide_view(13), max_new_tokens=4)
    assert answer.concepts == ["mug", "rex"] and answer.new_tokens > 0
    # The prompt holds both memories and the test image's 48 tokens between <img> and </img>.
    assert answer.prompt_tokens > info.num_tokens + ego.store.get("rex").num_tokens + 48
    frame = wide_view(14)
    scores = ego.recognize(frame)
    boxed = ego.recognize(frame, boxes=True)
    assert set(scores) == set(boxed) == {"mug", "rex"}
    for name, (p, box) in boxed.items():
        assert p == pytest.approx(scores[name], abs=1e-6) and 0.0 <= p <= 1.0
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 448 and 0 <= y0 < y1 <= 200
    # show's picture, from the saved views: the tiles side by side (224x112 canvas).
    memory = ego.store.get("mug")
    figure = concept_figure(memory, load_views(ego.store.root, "mug", memory.num_views))
    assert figure.size[0] >= 224
    # A memory of this model family does not load into another's store (another fingerprint).
    assert memory.fingerprint == ego.fingerprint


def test_batched_recognition_equals_one_prompt_at_a_time(internvl_dir, tmp_path):
    # Left padding with plain 1-D positions: a padded prompt's positions shift, which RoPE (relative) must not see.
    ego = Ego.load(str(internvl_dir), memory_dir=tmp_path, max_image_pixels=MAX_PIXELS, recognition_batch_size=8)
    ego.register("mug", [wide_view(20)], area_percent=10.0)
    ego.register("a much longer concept name", [wide_view(21), wide_view(22, 300, 300)], area_percent=60.0)
    frame = wide_view(23)
    batched = ego.recognize(frame)
    assert set(batched) == {"mug", "a much longer concept name"}
    for name in batched:
        assert batched[name] == pytest.approx(ego.recognize(frame, [name])[name], abs=1e-5)


def test_calibration_counts_subject_tokens_on_tiles_and_thumbnail(ego):
    view = wide_view(24)
    mask = np.zeros((200, 448), dtype=bool)
    mask[:, 224:] = True  # the right half: the right tile's 16 tokens and the thumbnail's right half (8)
    result = ego.calibrate([(view, mask)], max_layers=2)
    assert result.num_layers == 4 and result.num_skipped == 0 and 1 <= len(result.layers) <= 2


def test_an_internvl_with_another_decoder_is_refused_clearly(tmp_path):
    folder = build("internvl", tmp_path / "qwen3", text_overrides={"model_type": "qwen3", "head_dim": 16})
    with pytest.raises(ValueError, match="InternVL with a 'qwen3' decoder is not supported yet; supported: qwen2"):
        Ego.load(str(folder), memory_dir=tmp_path / "memory")
