# SPDX-License-Identifier: Apache-2.0
"""``memory_layout: image``: a memory as an image of its own (vision delimiters, a synthetic patch grid), the way a
serving engine takes precomputed embeddings.

The check that it is laid out as the model lays out an image is a computation: a memory made of every token of a
view, on a grid equal to the view's, gives exactly the logits of that view given as an image, through the model's
own rope index; as text (the default layout) it does not. Then each engine path that builds prompts (the concept
prefix cache, one image pass for recognition) gives in this layout what the whole prompt gives.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_MAX_PIXELS
from ego_ros.engine import Ego, prompts
from ego_ros.engine.backends import SoftTokens
from ego_ros.engine.backends.qwen2_5_vl import memory_grid
from ego_ros.engine.config import EgoConfig
from ego_ros.engine.images import to_rgb
from test_prefix_cache import ask_both_ways, image_first_whole


@pytest.fixture(params=["tiny_model_dir", "tiny_qwen3_vl_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def load(model_dir, path, layout: str, **settings) -> Ego:
    return Ego.load(str(model_dir), memory_dir=path / layout, max_image_pixels=TEST_MAX_PIXELS,
                    memory_layout=layout, **settings)


def last_logits(ego: Ego, parts) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer position's logits of one prompt, and its rope positions (3, S)."""
    batch = ego.backend.build([parts])
    with torch.no_grad(), ego.backend.injecting(batch):
        logits = ego.model(**batch.model_inputs(), use_cache=False).logits[0, -1]
    return logits, ego.backend.rope_positions(batch)[:, 0]


def test_a_memory_of_a_whole_view_as_an_image_is_that_view(model_dir, tmp_path, make_view):
    as_image, as_text = load(model_dir, tmp_path, "image"), load(model_dir, tmp_path, "text")
    view, frame = as_image.backend.encode([to_rgb(make_view(s, 224, 336), TEST_MAX_PIXELS) for s in (1, 2)])
    assert memory_grid(view.num_tokens, as_image.backend.merge_size) == view.grid_thw  # its own grid, rebuilt
    memory = SoftTokens(view.features, view.deepstack)  # every token of the view (and its DeepStack features)

    def prompt(concept):
        return [prompts.CONCEPT_INTRO.format(name="Rex"), concept, ".\n", frame, prompts.RECOGNIZE.format(name="Rex")]

    of_view, view_positions = last_logits(as_image, prompt(view))
    of_memory, memory_positions = last_logits(as_image, prompt(memory))
    assert torch.equal(memory_positions, view_positions)
    torch.testing.assert_close(of_memory, of_view, atol=1e-5, rtol=1e-5)
    as_words, text_positions = last_logits(as_text, prompt(memory))
    assert not torch.equal(text_positions, view_positions)  # the default layout: text positions, no delimiters
    assert not torch.allclose(as_words, of_view, atol=1e-3)


def test_image_positions_name_the_frames_not_the_memories(tmp_path, tiny_model_dir, make_view):
    ego = load(tiny_model_dir, tmp_path, "image")
    view, frame = ego.backend.encode([to_rgb(make_view(s), TEST_MAX_PIXELS) for s in (3, 4)])
    memory = view.features[:7]  # 7 tokens: a 1 x 7 grid
    batch = ego.backend.build([["Rex is ", memory, ".\n", frame, "Is Rex here?"]])
    assert batch.image_grid_thw.tolist() == [[1, 2, 14], list(frame.grid_thw)]
    image_rows = torch.nonzero(batch.input_ids[0] == ego.backend.image_token_id).flatten()
    assert len(image_rows) == 7 + frame.num_tokens
    (frame_rows,) = batch.image_positions[0]
    assert frame_rows.tolist() == image_rows[7:].tolist()
    end = image_rows[6] + 1  # the memory's last row, then its <|vision_end|>
    assert batch.input_ids[0, end] == ego.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert ego.backend.prefix_ids(["Rex is ", memory]) == batch.input_ids[0, : end + 1].tolist()


def test_each_engine_path_gives_the_whole_prompts_answer_in_the_image_layout(model_dir, tmp_path, make_view):
    ego = load(model_dir, tmp_path, "image", recognition_batch_size=2)
    for i, name in enumerate(["mug", "Rex", "Anna"]):
        ego.register(name, [make_view(20 + i), make_view(30 + i)][: 1 + i % 2])
    whole, with_cache_on = ask_both_ways(ego, make_view(33))  # a question's concept block is prefilled with it
    assert with_cache_on.text == whole.text and len(ego.prefixes) == 0
    (image,) = ego.backend.encode([to_rgb(make_view(33), TEST_MAX_PIXELS)])
    introductions = {name: [ego.store.get(name).vectors] for name in ego.store.names()}
    if ego.backend.deepstack_layers:  # one image pass is for families without DeepStack rows (prefilled whole)
        return
    one_pass = ego.yes_probabilities(image, introductions, order="image_first")
    assert one_pass == pytest.approx(image_first_whole(ego, image, introductions), abs=1e-5)


def test_the_layout_is_validated_and_refused_where_a_family_has_none(tmp_path):
    with pytest.raises(ValueError, match="memory_layout must be text or image"):
        EgoConfig(memory_layout="pixels")
    from ego_ros.testing.tiny_model import build

    internvl = build("internvl", tmp_path / "internvl")
    with pytest.raises(ValueError, match="memory_layout 'image' is not supported for internvl"):
        Ego.load(str(internvl), memory_dir=tmp_path / "memory", memory_layout="image")
