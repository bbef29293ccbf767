# SPDX-License-Identifier: Apache-2.0
"""Layer calibration (paper §3.4): per-layer eq. 3, the overlap measure, both rules, persistence, data sources and
``ego-ros calibrate``, on the tiny random Qwen2.5-VL and real files.

The measure and the rules are checked on small arrays worked out by hand; the per-layer scores against eager
attention of an independent load of the model; the rest end to end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText

from ego_ros.engine import Ego
from ego_ros.engine import calibration as calib
from ego_ros.engine.calibration import InvalidCalibration
from ego_ros.engine.calibration_data import coco_samples, folder_samples
from ego_ros.engine.figure import token_cell
from ego_ros.engine.images import to_rgb
from ego_ros.engine.scoring import score_visual_tokens, score_visual_tokens_per_layer
from conftest import TEST_MAX_PIXELS, random_view

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def engine(tiny_model_dir, tmp_path):
    """The tiny model with its own empty calibration folder."""
    return Ego.load(str(tiny_model_dir), memory_dir=tmp_path / "memory", calibration_dir=tmp_path / "calibration",
                    max_image_pixels=TEST_MAX_PIXELS)


def disc_sample(seed: int, size: int = 224, radius: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A random view and the mask of a disc painted on it (the subject)."""
    image = random_view(seed, size, size)
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - size // 2) ** 2 + (xx - size // 2 + seed * 7) ** 2 < radius * radius
    image[mask] = (230, 80, 40)
    return image, mask


# --- per-layer eq. 3 --------------------------------------------------------------------------------------------


def test_per_layer_scores_match_eager_attention_and_average_to_eq3(engine, tiny_model_dir):
    eager = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), attn_implementation="eager").eval()
    (image,) = engine.backend.encode([to_rgb(random_view(1), TEST_MAX_PIXELS)])
    keyword_ids, _ = engine._describe(image, ask_area=False)
    keyword_ids, word_rows, _ = engine._keyword_rows(keyword_ids)
    batch, rows, cols = engine._teacher_forced(image, keyword_ids, word_rows)
    every = list(range(engine.num_layers))
    per_layer = score_visual_tokens_per_layer(engine.model, engine.backend, batch, rows, cols, every)
    assert per_layer.shape == (engine.num_layers, image.num_tokens)

    # Each row is that layer's keyword->image attention, from output_attentions of an independent eager load.
    with torch.no_grad():
        out = eager(**batch.model_inputs(), pixel_values=batch.pixel_values, output_attentions=True, use_cache=False)
    for layer in every:
        expected = out.attentions[layer][0][:, rows][:, :, cols].mean(dim=(0, 1))
        torch.testing.assert_close(per_layer[layer], expected, atol=1e-6, rtol=0)
    # The layers really differ: a row read from the wrong layer would be caught.
    assert min((per_layer[a] - per_layer[b]).abs().max() for a in every for b in every if a < b) > 1e-4

    # Eq. 3 over any subset is exactly the mean of its rows (one pass answers for every choice of layers).
    for subset in ([1, 2], [0, 3], [2], every):
        scores = score_visual_tokens(engine.model, engine.backend, batch, rows, cols, subset)
        assert torch.equal(scores, per_layer[subset].mean(dim=0)), subset
    # And calibration scores an image exactly so.
    assert torch.equal(engine.layer_scores(image), per_layer)


# --- ground truth and the measure, by hand ----------------------------------------------------------------------


def test_subject_tokens_are_cells_at_least_half_mask():
    grid = (1, 4, 6)  # processed image 84 x 56 px: 3 x 2 cells of 28 px
    mask = np.zeros((56, 84), dtype=bool)
    mask[:28, :28] = True  # cell 0: all of it
    mask[:14, 28:56] = True  # cell 1: exactly half
    mask[28:56, 56:84][:13, :] = True  # cell 5: 13 of 28 rows, under half
    mask[28:56, :28][:, :15] = True  # cell 3: 15 of 28 columns, over half
    expected = [True, True, False, True, False, False]
    assert calib.subject_tokens(mask, grid).tolist() == expected
    # The cells are figure.token_cell's: the share of each cell's box, computed directly, agrees.
    for index in range(6):
        left, top, right, bottom = token_cell(grid, index)
        assert (mask[top:bottom, left:right].mean() >= 0.5) == expected[index]
    # A mask of the original (larger) image is resized to the processed image first.
    big = np.kron(mask, np.ones((3, 3), dtype=bool))
    assert calib.subject_tokens(big, grid).tolist() == expected


def test_overlap_is_r_precision_averaged_over_images():
    # Image A: K = 2 subject tokens; the two highest scores are tokens 0 (subject) and 2 (not): 1/2.
    assert calib.r_precision([0.9, 0.1, 0.8, 0.3, 0.5], [True, False, False, True, False]) == 0.5
    # Ties go to the lower index: tokens 1 and 2 tie for the 2nd place, token 1 (subject) is taken.
    assert calib.r_precision([1.0, 0.5, 0.5, 0.0], [False, True, False, False]) == 0.0
    assert calib.r_precision([0.4, 0.5, 0.5, 0.0], [False, True, True, False]) == 1.0
    with pytest.raises(ValueError):
        calib.r_precision([1.0, 2.0], [False, False])

    a = np.array([[0.9, 0.1, 0.8, 0.3, 0.5],   # layer 0: 1/2
                  [0.1, 0.2, 0.3, 0.9, 0.8]])  # layer 1: top 2 = tokens 3 (subject), 4 -> 1/2
    b = np.array([[0.0, 1.0, 0.0],             # layer 0: K = 1, token 1 (subject): 1
                  [1.0, 0.0, 0.0]])            # layer 1: token 0: 0
    subjects = [np.array([True, False, False, True, False]), np.array([False, True, False])]
    means, stds = calib.layer_overlaps([a, b], subjects)
    np.testing.assert_allclose(means, [(0.5 + 1) / 2, (0.5 + 0) / 2])
    np.testing.assert_allclose(stds, [0.25, 0.25])
    # Together: A's mean row [.5, .15, .55, .6, .65] -> tokens 4, 3: 1/2; B's [.5, .5, 0] -> tokens 0: 0.
    assert calib.combined_overlap([a, b], subjects, [0, 1]) == pytest.approx(0.25)
    assert calib.chance_overlap(subjects) == pytest.approx((2 / 5 + 1 / 3) / 2)


# Six tokens, the first three the subject (K = 3). Layers 0 and 1 are good and identical (2/3 each); layer 2 is
# poor alone (1/3) but lifts the one subject token the others miss; layer 3 finds nothing.
SUBJECT = np.array([True, True, True, False, False, False])
LAYERS = np.array([
    [3, 3, 0, 2, 0, 0],  # top 3: tokens 0, 1, 3 -> 2/3
    [3, 3, 0, 2, 0, 0],
    [0, 0, 5, 0, 1, 1],  # top 3: tokens 2, 4, 5 -> 1/3
    [0, 0, 0, 3, 3, 3],  # 0
], dtype=float)


def test_the_papers_rule_takes_the_best_single_layers():
    means, _ = calib.layer_overlaps([LAYERS], [SUBJECT])
    np.testing.assert_allclose(means, [2 / 3, 2 / 3, 1 / 3, 0])
    assert calib.top_layers(means.tolist(), 2) == [0, 1]
    assert calib.top_layers(means.tolist(), 1) == [0]  # a tie goes to the lower layer
    assert calib.top_layers([0.1, 0.9, 0.5, 0.7], 2) == [1, 3]  # ascending, whatever the ranking
    assert calib.top_layers([0.1, 0.9], 5) == [0, 1]


def test_greedy_adds_the_layer_that_helps_the_combination_and_stops_when_none_does():
    # From layer 0: + layer 1 changes nothing, + layer 2 makes all three subject tokens the top 3 (mean row
    # [1.5, 1.5, 2.5, 1, .5, .5]), + layer 3 does not help. Then no third layer raises 1.0.
    assert calib.combined_overlap([LAYERS], [SUBJECT], [0, 1]) == pytest.approx(2 / 3)
    assert calib.combined_overlap([LAYERS], [SUBJECT], [0, 2]) == 1.0
    assert calib.greedy_layers([LAYERS], [SUBJECT], 2) == [0, 2]
    assert calib.greedy_layers([LAYERS], [SUBJECT], 4) == [0, 2]
    assert calib.greedy_layers([LAYERS], [SUBJECT], 1) == [0]


def test_the_better_rule_on_the_data_is_kept_and_both_are_recorded():
    result = calib.summarise([LAYERS], [SUBJECT], max_layers=2, model="m", fingerprint="f", source="hand")
    assert (result.top_layers, result.top_overlap) == ([0, 1], pytest.approx(2 / 3))
    assert (result.greedy_layers, result.greedy_overlap) == ([0, 2], 1.0)
    assert (result.rule, result.layers, result.overlap) == ("greedy", [0, 2], 1.0)
    # Baselines: the middle half of 4 layers is [1, 2] (its mean row ranks tokens 2, 0, 1 first); chance K/N.
    assert (result.default_layers, result.default_overlap) == ([1, 2], 1.0)
    assert result.chance_overlap == 0.5
    assert result.num_images == 1 and result.max_layers == 2 and result.measure == calib.MEASURE
    # When the rules agree the paper's is named (here the middle half, layers 1 and 2, finds nothing).
    single = calib.summarise([LAYERS[[0, 3, 3, 1]]], [SUBJECT], max_layers=1, model="m", fingerprint="f")
    assert (single.rule, single.layers, single.default_overlap) == ("top", [0], 0.0)


def test_the_middle_half_is_kept_when_it_beats_what_the_rules_may_choose():
    """Calibrating never localises worse than not calibrating, on its own images: allowed one layer (2/3 at best),
    the rules lose to the middle half, whose two layers together find the whole subject (1.0)."""
    result = calib.summarise([LAYERS], [SUBJECT], max_layers=1, model="m", fingerprint="f")
    assert (result.top_layers, result.greedy_layers) == ([0], [0])
    assert (result.rule, result.layers, result.overlap) == ("middle", [1, 2], 1.0)
    assert calib.Calibration.from_json(result.to_json()) == result  # a saved choice of the middle half reads back


def test_default_max_layers_is_a_quarter_of_the_decoder():
    assert [calib.default_max_layers(n) for n in (1, 4, 7, 28, 36)] == [1, 1, 1, 7, 9]


# --- calibrate on the model -------------------------------------------------------------------------------------


def test_calibrate_measures_every_layer_on_each_image(engine):
    samples = [disc_sample(seed) for seed in (1, 2, 3)]
    progress = []
    result = engine.calibrate(samples, max_layers=2, source="discs",
                              on_sample=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert engine.layers == [1, 2] and "no calibration" in engine.layers_source  # not saved: nothing changes
    assert not (engine.calibration_dir / f"{engine.fingerprint}.json").exists()

    # The same figures, recomputed from each image's per-layer scores and its subject tokens.
    per_image, subjects = [], []
    for image, mask in samples:
        (encoded,) = engine.backend.encode([to_rgb(image, TEST_MAX_PIXELS)])
        per_image.append(engine.layer_scores(encoded).numpy())
        subjects.append(calib.subject_tokens(mask, encoded.grid_thw))
    means, stds = calib.layer_overlaps(per_image, subjects)
    assert result.per_layer_overlap == pytest.approx(means.tolist())
    assert result.per_layer_std == pytest.approx(stds.tolist())
    assert result.chance_overlap == pytest.approx(np.mean([s.mean() for s in subjects]))
    assert result.top_layers == calib.top_layers(result.per_layer_overlap, 2)
    assert result.greedy_layers == calib.greedy_layers(per_image, subjects, 2)
    assert result.overlap == pytest.approx(calib.combined_overlap(per_image, subjects, result.layers))
    assert result.overlap == max(result.top_overlap, result.greedy_overlap)
    assert (result.num_images, result.num_skipped, result.source) == (3, 0, "discs")
    assert (result.model, result.fingerprint, result.num_layers) == (engine.model_name, engine.fingerprint, 4)
    assert 0 < result.chance_overlap < 1 and len(set(result.per_layer_overlap)) > 1


def test_masks_covering_no_token_or_every_token_are_skipped_and_counted(engine):
    image, mask = disc_sample(1)
    speck = np.zeros_like(mask)
    speck[100:108, 100:108] = True  # under half of any 28 px cell
    result = engine.calibrate([(image, speck), (image, mask), (image, np.ones_like(mask))], max_layers=1)
    assert (result.num_images, result.num_skipped) == (1, 2)
    with pytest.raises(InvalidCalibration, match="no usable calibration sample.*2 samples"):
        engine.calibrate([(image, speck), (image, np.ones_like(mask))])


@pytest.mark.parametrize("mask, message", [
    (np.zeros((224, 224), dtype=bool), "sample 0: the mask is empty"),
    (np.ones((224, 224), dtype=np.uint8), "sample 0: the mask must be a boolean"),
    (np.ones((200, 224), dtype=bool), "sample 0: the mask is 224x200 but the image is 224x224"),
    (np.ones((224, 224, 3), dtype=bool), "sample 0: the mask must be 2-D"),
    (Image.new("L", (224, 224), 0), "sample 0: the mask is empty"),
])
def test_bad_masks_are_refused_naming_the_sample(engine, mask, message):
    with pytest.raises(InvalidCalibration, match=message):
        engine.calibrate([(random_view(1), mask)])


def test_max_layers_must_be_positive(engine):
    with pytest.raises(ValueError, match="max_layers must be a positive integer"):
        engine.calibrate([disc_sample(1)], max_layers=0)


def test_a_pil_mask_and_an_image_file_work_like_arrays(engine, tmp_path):
    image, mask = disc_sample(2)
    Image.fromarray(image).save(tmp_path / "view.png")
    from_files = engine.calibrate([(tmp_path / "view.png", Image.fromarray(mask))], max_layers=1)
    from_arrays = engine.calibrate([(image, mask)], max_layers=1)
    assert from_files.per_layer_overlap == from_arrays.per_layer_overlap


# --- persistence ------------------------------------------------------------------------------------------------


def made_up(engine, **changes) -> calib.Calibration:
    """A calibration of ``engine``'s model from the hand-made arrays (no model run needed)."""
    result = calib.summarise([LAYERS], [SUBJECT], max_layers=2, model=engine.model_name,
                             fingerprint=engine.fingerprint, source="hand")
    for key, value in changes.items():
        setattr(result, key, value)
    return result


def test_saved_calibration_is_used_by_later_loads_of_the_same_model_only(
        engine, tiny_model_dir, other_model_dir, tmp_path):
    result = made_up(engine)
    path = engine.save_calibration(result)
    assert path == tmp_path / "calibration" / f"{engine.fingerprint}.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert engine.layers == [0, 2] and engine.layers_source.startswith("calibrated on 1 image (hand) ")

    record = json.loads(path.read_text())
    for key in ("model", "fingerprint", "layers", "rule", "per_layer_overlap", "per_layer_std", "top_overlap",
                "greedy_overlap", "default_overlap", "chance_overlap", "measure", "num_images", "source", "created"):
        assert key in record, key
    assert (record["layers"], record["rule"], record["measure"]) == ([0, 2], "greedy", calib.MEASURE)

    kwargs = dict(memory_dir=tmp_path / "memory", calibration_dir=tmp_path / "calibration",
                  max_image_pixels=TEST_MAX_PIXELS)
    again = Ego.load(str(tiny_model_dir), **kwargs)
    assert again.layers == [0, 2] and again.layers_source == engine.layers_source
    assert again.calibration == result
    # An explicit choice wins over the calibration.
    explicit = Ego.load(str(tiny_model_dir), layers=[3], **kwargs)
    assert (explicit.layers, explicit.layers_source, explicit.calibration) == ([3], "set explicitly", None)
    # Another model's weights: another key, so the default.
    other = Ego.load(str(other_model_dir), **kwargs)
    assert other.layers == [1, 2] and other.layers_source.endswith("(this model has no calibration)")
    with pytest.raises(ValueError, match="not of this one"):
        other.save_calibration(result)


def test_calibrate_with_save_makes_it_current(engine):
    result = engine.calibrate([disc_sample(1)], max_layers=1, source="one disc", save=True)
    assert engine.layers == result.layers and engine.calibration == result
    saved = calib.load_calibration(engine.calibration_dir, engine.fingerprint, engine.num_layers)
    assert saved == result


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"format": "something else"}),
    "CHANGED",  # a valid record whose layers are out of the model's range
    "OTHER",  # a valid record of another model, under this model's name
])
def test_an_unusable_calibration_file_falls_back_with_a_warning_and_is_kept(engine, tiny_model_dir, tmp_path,
                                                                            caplog, content):
    path = tmp_path / "calibration" / f"{engine.fingerprint}.json"
    path.parent.mkdir(parents=True)
    if content in ("CHANGED", "OTHER"):
        record = made_up(engine).to_json()
        if content == "CHANGED":
            record["layers"] = [2, 9]
        else:
            record["fingerprint"] = "0123456789abcdef"
        content = json.dumps(record)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="ego_ros.calibration"):
        reloaded = Ego.load(str(tiny_model_dir), memory_dir=tmp_path / "memory",
                            calibration_dir=tmp_path / "calibration", max_image_pixels=TEST_MAX_PIXELS)
    assert reloaded.layers == [1, 2] and reloaded.calibration is None
    assert "calibration file is unusable" in reloaded.layers_source
    assert any("ignoring the calibration file" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records)
    assert path.read_text() == content  # never deleted or rewritten


def test_default_calibration_dir(monkeypatch, tmp_path):
    from ego_ros.engine.config import default_calibration_dir

    monkeypatch.setenv("EGO_ROS_CALIBRATION_DIR", str(tmp_path / "here"))
    assert default_calibration_dir() == tmp_path / "here"
    monkeypatch.delenv("EGO_ROS_CALIBRATION_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_calibration_dir() == tmp_path / "data" / "ego_ros" / "calibration"


# --- data sources -----------------------------------------------------------------------------------------------


def write_pairs(folder: Path, count: int, size=(224, 168)) -> Path:
    """``count`` image/mask pairs: an ellipse (the subject) on a plain background, its mask white."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = Image.new("RGB", size, (40 + 30 * i, 120, 200)), Image.new("L", size, 0)
        box = (30 + 12 * i, 25, 140 + 12 * i, 130)
        ImageDraw.Draw(image).ellipse(box, fill=(230, 80, 40))
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        image.save(folder / f"view{i}.png")
        mask.save(folder / f"view{i}.mask.png")
    return folder


def test_folder_pairs_are_read_in_name_order(tmp_path):
    folder = write_pairs(tmp_path / "pairs", 3)
    Image.open(folder / "view1.png").convert("RGB").save(folder / "view1.jpg")  # same stem: one image is taken
    (folder / "view1.png").unlink()
    samples = folder_samples(folder)
    assert len(samples) == 3 and samples.description == "folder pairs"
    pairs = list(samples)
    assert [image.size for image, _ in pairs] == [(224, 168)] * 3
    assert all(mask.dtype == bool and mask.shape == (168, 224) for _, mask in pairs)
    assert pairs[0][1][75, 85] and not pairs[0][1][5, 5]  # inside and outside the first ellipse
    assert len(folder_samples(folder, count=2)) == 2


@pytest.mark.parametrize("case, message", [
    ("no folder", "no folder at"),
    ("empty", "found 0 files, none of them an image or mask"),
    ("no masks", "found 2 images and 0 masks (images without a mask: view0.png, view1.png)"),
    ("orphan mask", "masks without an image: view2.mask.png"),
    ("empty mask", "sample 1: the mask is empty"),
    ("mask size", "sample 0: the mask is 100x100 but the image is 224x168"),
])
def test_folder_layout_errors_say_what_was_expected(tmp_path, case, message):
    folder = tmp_path / "data"
    if case != "no folder":
        folder.mkdir()
    if case in ("no masks", "orphan mask", "empty mask", "mask size"):
        write_pairs(folder, 2)
    if case == "no masks":
        for mask in folder.glob("*.mask.png"):
            mask.unlink()
    elif case == "orphan mask":
        Image.new("L", (10, 10), 255).save(folder / "view2.mask.png")
    elif case == "empty mask":
        Image.new("L", (224, 168), 0).save(folder / "view1.mask.png")
    elif case == "mask size":
        Image.new("L", (100, 100), 255).save(folder / "view0.mask.png")
    with pytest.raises(InvalidCalibration) as error:
        folder_samples(folder)
    assert message in str(error.value)
    if case not in ("empty mask", "mask size"):
        assert "NAME.mask.png" in str(error.value)  # the layout is named


def write_coco(root: Path) -> tuple[Path, Path]:
    """A COCO instances file of 5 images; only image 1 qualifies (one non-crowd instance, its file present)."""
    images = root / "images"
    images.mkdir(parents=True)
    square = [[40.0, 30.0, 160.0, 30.0, 160.0, 130.0, 40.0, 130.0]]  # a polygon: x from 40 to 160, y 30 to 130
    records, annotations = [], []
    for image_id, kind in enumerate(["one", "two", "crowd", "missing file", "none"], start=1):
        name = f"{image_id:012d}.jpg"
        records.append({"id": image_id, "file_name": name, "width": 224, "height": 168})
        if kind != "missing file":
            Image.new("RGB", (224, 168), (20 * image_id, 90, 140)).save(images / name)
        count = {"one": 1, "two": 2, "crowd": 1, "missing file": 1, "none": 0}[kind]
        for _ in range(count):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": square, "area": 12000.0, "bbox": [40, 30, 120, 100], "iscrowd": 0})
        if kind == "crowd":
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": {"counts": [0, 224 * 168], "size": [168, 224]}, "area": 0.0,
                                "bbox": [0, 0, 1, 1], "iscrowd": 1})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": [{"id": 1, "name": "mug", "supercategory": "kitchen"}]}))
    return path, images


def test_coco_keeps_images_of_exactly_one_instance(tmp_path, engine):
    annotations, images = write_coco(tmp_path)
    samples = coco_samples(annotations, images)
    assert len(samples) == 1
    assert samples.description == "COCO instances.json, single-instance images, 1 missing file skipped"
    ((image, mask),) = list(samples)
    assert image.size == (224, 168) and mask.shape == (168, 224) and mask.dtype == bool
    assert mask[80, 100] and not mask[10, 10] and not mask[80, 200]  # the polygon, rasterised
    assert 100 * 80 <= mask.sum() <= 122 * 102
    result = engine.calibrate(samples, max_layers=1, source=samples.description)
    assert result.num_images == 1


def test_coco_files_without_usable_images_are_refused(tmp_path):
    annotations, images = write_coco(tmp_path)
    with pytest.raises(InvalidCalibration, match="none of its 2 single-instance images is in .*000000000001.jpg"):
        coco_samples(annotations, tmp_path)  # the wrong image folder
    record = json.loads(annotations.read_text())
    record["annotations"] = [a for a in record["annotations"] if a["image_id"] == 2]  # two instances only
    annotations.write_text(json.dumps(record))
    with pytest.raises(InvalidCalibration, match="none of its 5 images shows exactly one instance of one category"):
        coco_samples(annotations, images)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(InvalidCalibration, match="is not a COCO instances file"):
        coco_samples(tmp_path / "list.json", images)
    with pytest.raises(InvalidCalibration, match="no COCO annotation file"):
        coco_samples(tmp_path / "nothing.json", images)


# --- the command ------------------------------------------------------------------------------------------------

PIXELS = str(TEST_MAX_PIXELS)
ENV = {k: v for k, v in os.environ.items() if k not in ("EGO_ROS_MODEL", "EGO_ROS_MEMORY_DIR")}
ENV.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ego_ros.cli", *map(str, args)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


CLI_ERRORS = {
    # case: (arguments after "calibrate", exit status, words of the one error line)
    "no masks": (["{no_masks}"], 1, "images without a mask"),
    "coco without images": (["--coco", "{pairs}/view0.png"], 2, "needs both --coco"),
    "no data": ([], 2, "no calibration data"),
    "explicit layers": (["{pairs}", "--layers", "1,2"], 2, "--layers sets them by hand"),
    "bad plot name": (["{pairs}", "--out", "{root}/plot.xyz"], 1, "use a .png file name"),
    "bad coco file": (["--coco", "{pairs}/view0.png", "--images", "{pairs}"], 1, "not a COCO instances file"),
}


def test_calibrate_command_end_to_end(tiny_model_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs", 3)
    no_masks = tmp_path / "no_masks"
    no_masks.mkdir()
    Image.new("RGB", (64, 64)).save(no_masks / "a.png")
    calibration_dir, plot = tmp_path / "calibration", tmp_path / "layers.png"
    model = ["--model", tiny_model_dir, "--calibration-dir", calibration_dir, "--max-image-pixels", PIXELS]
    paths = dict(pairs=pairs, no_masks=no_masks, root=tmp_path)
    processes = {"run": start("calibrate", pairs, *model, "--max-layers", "2", "--out", plot),
                 "dry": start("calibrate", pairs, "--count", "1", "--no-save", "--model", tiny_model_dir,
                              "--calibration-dir", tmp_path / "unused", "--max-image-pixels", PIXELS)}
    processes.update({case: start("calibrate", *[str(a).format(**paths) for a in args], *model)
                      for case, (args, _, _) in CLI_ERRORS.items()})
    results = {name: finish(process) for name, process in processes.items()}

    run = results["run"]
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "3 images (folder pairs)"
    assert lines[1].split() == ["LAYER", "OVERLAP", "STD"]
    table = [line.split() for line in lines[2:6]]
    assert [int(row[0]) for row in table] == [0, 1, 2, 3]
    saved = calib.Calibration.from_json(json.loads(next(calibration_dir.glob("*.json")).read_text()))
    assert [float(row[1]) for row in table] == pytest.approx(saved.per_layer_overlap, abs=5e-4)
    assert [int(row[0]) for row in table if row[-1] == "*"] == saved.layers
    layers = ",".join(map(str, saved.layers))
    assert f"* chosen: layers {layers} ({saved.rule} rule), overlap together {saved.overlap:.3f}" in run.stdout
    for figure in ("top rule", f"-> {saved.top_overlap:.3f}", "greedy rule", f"-> {saved.greedy_overlap:.3f}",
                   f"middle half (the default without calibration): 1,2 -> {saved.default_overlap:.3f}",
                   f"random tokens (K/N): {saved.chance_overlap:.3f}", "R-precision"):
        assert figure in run.stdout, figure
    assert "calibrating" in run.stderr  # the progress bar
    with Image.open(plot) as drawn:
        assert drawn.format == "PNG" and drawn.width > 300 and drawn.height > 200

    # The next load of this model uses the calibrated layers; list --model says so.
    ego = Ego.load(str(tiny_model_dir), memory_dir=tmp_path / "memory", calibration_dir=calibration_dir)
    assert f"saved {calibration_dir / (ego.fingerprint + '.json')}" in run.stdout
    assert ego.layers == saved.layers and ego.layers_source.startswith("calibrated on 3 images (folder pairs) ")
    listed = finish(start("list", "--model", tiny_model_dir, "--calibration-dir", calibration_dir,
                          "--memory-dir", tmp_path / "memory"))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == f"layers {layers}; {ego.layers_source}"

    dry = results["dry"]
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("1 image (folder pairs)")
    assert "not saved (--no-save): this model keeps layers 1,2; default: middle half" in dry.stdout
    assert not (tmp_path / "unused").exists()

    for case, (_, status, words) in CLI_ERRORS.items():
        result = results[case]
        assert result.returncode == status, (case, result.stderr)
        error_lines = result.stderr.strip().splitlines()
        assert len(error_lines) == 1 and error_lines[0].startswith("ego-ros: error: "), (case, result.stderr)
        assert words in error_lines[0], (case, error_lines[0])
        assert "loading" not in result.stderr  # refused before the model was loaded
