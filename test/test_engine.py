# SPDX-License-Identifier: Apache-2.0
"""The engine's behaviour through its public API, on the tiny model: concepts, questions, recognition, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ego_ros.engine import (ConceptExists, Ego, InvalidImage, InvalidName, ModelLoadError, UnknownConcept)
from conftest import TEST_MAX_PIXELS
from ego_ros.engine.scoring import tokens_to_keep

REPO = Path(__file__).resolve().parents[1]


def test_register_list_forget(ego, make_view):
    progress = []
    info = ego.register("my mug", [make_view(1), make_view(2)],
                        on_view=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)]
    assert info.name == "my mug" and info.num_views == 2
    assert info.num_tokens == sum(t.selected.numel() for t in info.traces) == ego.store.get("my mug").num_tokens
    assert info.keywords and all(isinstance(k, str) and k for k in info.keywords)
    assert [c.name for c in ego.concepts()] == ["my mug"]
    ego.forget("my mug")
    assert ego.concepts() == []
    with pytest.raises(UnknownConcept, match="my mug"):
        ego.forget("my mug")


def test_existing_name_is_refused_unless_appending(ego, make_view):
    ego.register("Rex", [make_view(1)])
    before = ego.store.get("Rex").vectors.clone()
    with pytest.raises(ConceptExists, match="Rex"):
        ego.register("Rex", [make_view(2)])
    assert torch.equal(ego.store.get("Rex").vectors, before)
    info = ego.register("Rex", [make_view(2)], append=True)
    assert info.num_views == 2
    memory = ego.store.get("Rex")
    assert torch.equal(memory.view_vectors(0), before)  # the first view's memory is kept as it was
    assert memory.num_tokens == before.shape[0] + info.traces[0].selected.numel()


def test_ask_single_image_and_clip(ego, make_view):
    ego.register("Rex", [make_view(1)])
    streamed = []
    answer = ego.ask("What is Rex doing?", make_view(2), max_new_tokens=5, on_text=streamed.append)
    assert answer.concepts == ["Rex"] and answer.new_tokens == 5
    assert streamed and streamed[-1].strip() == answer.text  # the callback saw the answer grow to the end
    assert set(answer.timings) == {"encode", "generate", "total"}
    clip = ego.ask("What did Rex just do?", [make_view(3), make_view(4), make_view(5)], times=[10.0, 10.5, 11.0],
                   max_new_tokens=3)
    single = ego.ask("What did Rex just do?", make_view(5), max_new_tokens=3)
    assert clip.prompt_tokens > single.prompt_tokens + 2 * 60  # two more frames of 64 visual tokens each


def test_ask_without_concepts_and_restricted(ego, make_view):
    assert ego.ask("What is this?", make_view(1), max_new_tokens=2).concepts == []
    ego.register("Rex", [make_view(1)])
    ego.register("Anna", [make_view(2)])
    assert ego.ask("Who?", make_view(3), concepts=["Anna"], max_new_tokens=2).concepts == ["Anna"]
    with pytest.raises(UnknownConcept, match="Bob"):
        ego.ask("Who?", make_view(3), concepts=["Bob"])


def test_cancel_stops_generation(ego, make_view):
    cancel = threading.Event()
    seen = []

    def on_text(text):
        seen.append(text)
        if len(seen) == 3:
            cancel.set()

    answer = ego.ask("Describe it.", make_view(1), max_new_tokens=50, on_text=on_text, cancel=cancel)
    assert answer.new_tokens <= 4


def test_most_similar_concepts_go_in_context_when_they_do_not_all_fit(tiny_model_dir, tmp_path, make_view):
    ego = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS,
                   max_concepts_in_context=1)
    views = {name: make_view(40 + i) for i, name in enumerate(["mug", "Rex", "Anna"])}
    for name, view in views.items():
        ego.register(name, [view])
    for name, view in views.items():  # each view's own memory tokens match it exactly (cosine 1)
        assert ego.ask("What is here?", view, max_new_tokens=1).concepts == [name]
    # A concept named in the question goes first, whatever the image.
    assert ego.ask("Is Anna here?", views["mug"], max_new_tokens=1).concepts == ["Anna"]


def test_recognize_scores_every_concept(ego, make_view):
    assert ego.recognize(make_view(1)) == {}
    for i, name in enumerate(["mug", "Rex", "Anna"]):
        ego.register(name, [make_view(i)])
    scores = ego.recognize(make_view(9))
    assert set(scores) == {"mug", "Rex", "Anna"}
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    assert set(ego.recognize(make_view(9), ["Rex"])) == {"Rex"}
    with pytest.raises(UnknownConcept):
        ego.recognize(make_view(9), ["nobody"])


def test_concepts_persist_across_processes(tiny_model_dir, tmp_path, make_view):
    memory_dir = tmp_path / "memory"
    np.save(tmp_path / "view.npy", make_view(1))
    child = f"""
import numpy as np
from ego_ros.engine import Ego
ego = Ego.load({str(tiny_model_dir)!r}, memory_dir={str(memory_dir)!r}, max_image_pixels={TEST_MAX_PIXELS})
info = ego.register("Anna", [np.load({str(tmp_path / 'view.npy')!r})])
print(info.num_tokens)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ego = Ego.load(str(tiny_model_dir), memory_dir=memory_dir, max_image_pixels=TEST_MAX_PIXELS)
    (info,) = ego.concepts()
    assert info.name == "Anna" and info.num_tokens == int(done.stdout.strip().splitlines()[-1])
    assert ego.ask("Where is Anna?", make_view(2), max_new_tokens=2).concepts == ["Anna"]


def test_memories_of_another_model_are_skipped_not_deleted(tiny_model_dir, other_model_dir, tmp_path, make_view):
    ego = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS)
    ego.register("mug", [make_view(1)])
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    other = Ego.load(str(other_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS)
    assert other.concepts() == []
    ((path, reason),) = other.store.skipped
    assert "fingerprint" in reason or "model" in reason
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files
    other.register("Rex", [make_view(2)])  # the other model's memories live beside them
    assert [c.name for c in Ego.load(str(tiny_model_dir), memory_dir=tmp_path).concepts()] == ["mug"]


@pytest.mark.parametrize("name", ["", "   ", "../x", "a/b", "..", "x" * 10_000, "tab\there", "<|ego_concept|>"])
def test_hostile_names_are_refused_and_write_nothing(ego, make_view, name):
    with pytest.raises((InvalidName, ValueError)) as error:
        ego.register(name, [make_view(1)])
    assert len(str(error.value)) < 400  # the message does not echo a 10,000-character name
    root = Path(ego.store.root)
    assert not [p for p in root.rglob("*") if p.is_file()]
    assert not (root.parent / "x").exists()


@pytest.mark.parametrize("name", ["小明", "Ñoño", "Rex 🐶", "mug (blue)", "R2-D2"])
def test_unicode_names_are_fine(ego, make_view, name):
    ego.register(name, [make_view(1)])
    assert [c.name for c in ego.concepts()] == [name]


def test_no_views_is_refused(ego):
    with pytest.raises(ValueError, match="at least one view"):
        ego.register("mug", [])
    assert ego.concepts() == []


@pytest.mark.parametrize(
    "view",
    [
        np.full((1, 1, 3), 200, np.uint8),  # one pixel
        np.random.default_rng(0).integers(0, 255, (100, 120), dtype=np.uint8),  # greyscale
        np.random.default_rng(1).integers(0, 255, (100, 120, 4), dtype=np.uint8),  # RGBA
        np.random.default_rng(2).integers(0, 65535, (100, 120, 3), dtype=np.uint16),  # 16 bit
        np.random.default_rng(3).random((100, 120, 3)),  # float in [0, 1]
    ],
    ids=["1px", "grey", "rgba", "16bit", "float"],
)
def test_unusual_but_valid_images_register(ego, view):
    info = ego.register("thing", [view])
    visual_tokens = info.traces[0].image.num_tokens  # a 1-pixel view becomes one 28x28 patch: one token
    # K_c from the area the (random) model answered, or the 100 % fallback when its answer holds no number
    expected = tokens_to_keep(ego.config.max_tokens_per_view, info.area_percent, visual_tokens,
                              ego.config.min_tokens_per_view)
    assert info.num_tokens == expected
    assert np.isfinite(ego.store.get("thing").vectors.numpy()).all()


@pytest.mark.parametrize(
    "view, message",
    [
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 2), np.uint8), "shape"),
        (np.zeros((10,), np.uint8), "shape"),
        (np.zeros((10, 10, 3), np.int64), "pixel type"),
        (np.full((10, 10, 3), np.nan), "NaN"),
        ("/nonexistent/view.png", "no image file"),
        (12, "expected an image"),
    ],
)
def test_malformed_images_are_refused_and_change_nothing(ego, make_view, view, message):
    ego.register("mug", [make_view(1)])
    before = ego.store.get("mug").vectors.clone()
    with pytest.raises(InvalidImage, match=message):
        ego.register("mug", [make_view(2), view], append=True)
    assert torch.equal(ego.store.get("mug").vectors, before)
    assert ego.store.get("mug").num_views == 1


def test_non_image_file_is_refused(ego, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(InvalidImage, match="cannot read"):
        ego.register("mug", [path])


def test_image_paths_and_pil_images_are_accepted(ego, tmp_path, make_view):
    Image.fromarray(make_view(1)).save(tmp_path / "view.png")
    info = ego.register("mug", [tmp_path / "view.png", str(tmp_path / "view.png"), Image.fromarray(make_view(2))])
    assert info.num_views == 3
    assert torch.equal(info.traces[0].image.features, info.traces[1].image.features)


def test_very_large_image_is_downscaled_without_copying_it(ego):
    huge = np.zeros((6000, 8000, 3), np.uint8)  # 144 MB
    huge[2000:4000, 3000:5000] = 255
    tracemalloc.start()
    info = ego.register("big", [huge])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    width, height = info.traces[0].image.size
    assert width * height <= TEST_MAX_PIXELS and abs(width / height - 8000 / 6000) < 0.05
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB traced while registering a 144 MB frame"


def test_question_with_control_tokens_is_refused(ego, make_view):
    with pytest.raises(ValueError, match="control token"):
        ego.ask("Where is <|image_pad|>?", make_view(1))
    with pytest.raises(ValueError, match="empty"):
        ego.ask("   ", make_view(1))
    with pytest.raises(ValueError, match="at least one image"):
        ego.ask("Where?", [])


HUB_LOAD = """
import sys
from ego_ros.engine import Ego, ModelLoadError
try:
    ego = Ego.load(sys.argv[1], memory_dir=sys.argv[2])
    print("loaded", ego.model_name)
except ModelLoadError as error:
    print("error", error)
"""


@pytest.mark.parametrize("offline", ["1", ""], ids=["HF_HUB_OFFLINE", "no-network"])
def test_hub_id_without_hub_access_names_the_id_and_the_fix(tmp_path, offline):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": offline}
    done = subprocess.run([sys.executable, "-c", HUB_LOAD, "Qwen/Qwen2.5-VL-7B-Instruct", str(tmp_path / "m")],
                          env=env, capture_output=True, text=True, timeout=300)
    message = done.stdout.strip().splitlines()[-1]
    assert message.startswith("error") and "Qwen/Qwen2.5-VL-7B-Instruct" in message
    assert "local" in message and "folder" in message


def test_hub_id_in_the_local_cache_loads_without_network(tiny_model_dir, tmp_path):
    # The cache layout huggingface_hub writes: hub/models--ORG--NAME/{refs/main, snapshots/REVISION/...}.
    repo = tmp_path / "hf" / "hub" / "models--ego--tiny-qwen"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", HUB_LOAD, "ego/tiny-qwen", str(tmp_path / "m")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "loaded ego/tiny-qwen", done.stdout + done.stderr


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Ego.load(str(tmp_path / "nowhere"), memory_dir=tmp_path / "memory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Ego.load(str(tmp_path / "empty"), memory_dir=tmp_path / "memory")


def test_invalid_settings_name_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="max_tokens_per_view"):
        Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_tokens_per_view=0)
    with pytest.raises(ValueError, match="out of range"):
        Ego.load(str(tiny_model_dir), memory_dir=tmp_path, layers=[7])
    with pytest.raises(ValueError, match="layers"):
        Ego.load(str(tiny_model_dir), memory_dir=tmp_path, layers=[-1])


def test_memory_record_names_model_layers_and_k(ego, make_view):
    ego.register("mug", [make_view(1)])
    (record,) = [json.loads(p.read_text()) for p in Path(ego.store.root).glob("*.json")]
    assert record["name"] == "mug" and record["fingerprint"] == ego.fingerprint
    assert record["layers"] == ego.layers and record["max_tokens_per_view"] == ego.config.max_tokens_per_view
    assert record["model"] == ego.model_name


def test_reference_views_are_saved_for_show_and_removed_on_forget(ego, make_view):
    from ego_ros.engine.figure import load_views, views_dir

    info = ego.register("mug", [make_view(1), make_view(2, 168, 280)])
    ego.register("mug", [make_view(3)], append=True)
    saved = load_views(ego.store.root, "mug", 3)
    assert [image.size for image in saved] == [t.image.size for t in info.traces] + [(224, 224)]
    assert np.array_equal(np.asarray(saved[0]), make_view(1))  # as the model saw it (already within max pixels)
    ego.forget("mug")
    assert not views_dir(ego.store.root, "mug").exists()


def test_append_with_a_smaller_k_keeps_the_older_views(tiny_model_dir, tmp_path, make_view):
    big = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS, max_tokens_per_view=32)
    big.register("mug", [make_view(1)])
    small = Ego.load(str(tiny_model_dir), memory_dir=tmp_path, max_image_pixels=TEST_MAX_PIXELS, max_tokens_per_view=8)
    info = small.register("mug", [make_view(2)], append=True)
    memory = small.store.get("mug")
    kept = [tokens_to_keep(k, v.area_percent, v.num_visual_tokens, small.config.min_tokens_per_view)
            for k, v in zip([32, 8], memory.views)]  # each view's K_c under the K it was registered with
    assert [len(v.indices) for v in memory.views] == kept and info.num_tokens == sum(kept)
    assert memory.max_tokens_per_view == 32


@pytest.mark.parametrize("where", ["chat_template.json", "nowhere"])
def test_chat_template_beside_the_processor_is_used(tiny_model_dir, tmp_path, make_view, where):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()  # the tokenizer now loads without a template
    if where == "nowhere":
        with pytest.raises(ModelLoadError, match="no chat template"):
            Ego.load(str(folder), memory_dir=tmp_path / "memory")
        return
    (folder / where).write_text(json.dumps({"chat_template": template}))
    ego = Ego.load(str(folder), memory_dir=tmp_path / "memory", max_image_pixels=TEST_MAX_PIXELS)
    assert ego.tokenizer.chat_template == template
    assert ego.ask("What is this?", make_view(1), max_new_tokens=2).new_tokens == 2


# --- a forget on another thread, appends, the area answer, names in questions, streaming -----------------------


def test_an_append_does_not_resurrect_a_concept_forgotten_meanwhile(ego, make_view):
    from ego_ros.engine.memory import ConceptChanged

    ego.register("Rex", [make_view(1)])
    # on_view runs between the views' work and the commit: the forget lands exactly where a worker race would.
    with pytest.raises(ConceptChanged, match="forgotten"):
        ego.register("Rex", [make_view(2)], append=True, on_view=lambda done, total: ego.forget("Rex"))
    assert "Rex" not in ego.store and ego.concepts() == []
    assert not list(ego.store.root.glob("*.json"))
    with pytest.raises(UnknownConcept, match="Rex"):
        ego.register("Rex", [make_view(2)], append=True, create=False)  # append to an unknown name: refused
    assert "Rex" not in ego.store


def test_recognize_and_ask_survive_concurrent_forgets(ego, make_view):
    ego.register("Rex", [make_view(1)])
    ego.register("Anna", [make_view(2)])
    anna = ego.store.get("Anna")
    stop = threading.Event()

    def forget_and_restore():  # the store only: the model stays on this test's thread, as in the node
        while not stop.is_set():
            ego.store.remove("Anna")
            ego.store.put(anna)

    churn = threading.Thread(target=forget_and_restore)
    churn.start()
    try:
        for i in range(30):
            assert set(ego.recognize(make_view(3 + i % 3))) <= {"Rex", "Anna"}
        for _ in range(5):
            assert set(ego.ask("Who is here?", make_view(4), max_new_tokens=1).concepts) <= {"Rex", "Anna"}
    finally:
        stop.set()
        churn.join()


def test_appended_views_record_the_layers_they_were_scored_with(ego, make_view):
    ego.register("mug", [make_view(1)])
    first = list(ego.layers)
    ego.layers = [0]  # e.g. a calibration saved between the two registrations
    ego.register("mug", [make_view(2)], append=True)
    views = ego.store.get("mug").views
    assert views[0].layers == first and views[1].layers == [0]


def test_the_whole_area_answer_is_parsed(ego, make_view):
    from ego_ros.engine.ego import parse_area

    (image,) = ego.backend.encode([make_view(1)])
    _, area_ids = ego._describe(image, ask_area=True)
    # The random tiny model never stops early: the answer runs past area_max_new_tokens and is kept whole.
    assert len(area_ids) > ego.config.area_max_new_tokens
    wordy = ego.tokenizer("The main subject, a blue ceramic mug with a handle, covers about 35% of the image")
    assert len(wordy["input_ids"]) > ego.config.area_max_new_tokens
    assert parse_area(ego.tokenizer.decode(wordy["input_ids"]), 100.0) == (35.0, True)


def test_concept_names_match_whole_words_only():
    from ego_ros.engine.ego import named_in

    names = ["Al", "Rex", "my mug", "R2-D2!"]
    assert named_in("Always look at Rex's bowl", names) == ["Rex"]
    assert named_in("Where is al?", names) == ["Al"]
    assert named_in("Is my mug near R2-D2!?", names) == ["my mug", "R2-D2!"]
    assert named_in("Is my muggle here?", names) == []


def test_streaming_decodes_each_token_once_and_the_pieces_join_to_the_answer(ego, make_view):
    pieces, so_far, decoded = [], [], []
    real_decode = ego.tokenizer.decode

    def counting_decode(ids, *args, **kwargs):  # the real decode; only the lengths asked for are recorded
        decoded.append(len(ids))
        return real_decode(ids, *args, **kwargs)

    ego.tokenizer.decode = counting_decode
    try:
        answer = ego.ask("Describe it.", make_view(1), max_new_tokens=40,
                         on_new_text=lambda text, tokens: pieces.append(text), on_text=so_far.append)
    finally:
        del ego.tokenizer.decode
    assert answer.new_tokens <= len(pieces) == len(so_far) <= answer.new_tokens + 1  # + a held-back rest
    assert "".join(pieces) == so_far[-1]
    assert so_far[-1].strip() == answer.text
    streamed = decoded[:-1]  # the last decode is ask()'s own, of the whole answer
    assert max(streamed) <= 8, streamed  # a few tokens at a time, never the whole answer again
