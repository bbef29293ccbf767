# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: one tiny model per family and test session, built offline and loaded with from_pretrained."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

from ego_ros.testing.tiny_model import build

# Small images keep the suite fast: 224x224 gives 64 visual tokens on the tiny model.
TEST_MAX_PIXELS = 224 * 224
_CALIBRATION_DIR = tempfile.mkdtemp(prefix="ego-ros-test-calibration-")


def pytest_configure(config):
    # A layer calibration saved in the user's data folder for the tiny model (seeded weights: the same fingerprint
    # on every machine) would change the layers the tests expect. Before collection, so child processes inherit it.
    os.environ["EGO_ROS_CALIBRATION_DIR"] = _CALIBRATION_DIR


def pytest_unconfigure(config):
    shutil.rmtree(_CALIBRATION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build("qwen2_5_vl", tmp_path_factory.mktemp("tiny-qwen2_5_vl"))


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory):
    """A tiny Qwen3-VL (DeepStack, q/k norms, 32 px visual tokens), built like the Qwen2.5-VL one."""
    return build("qwen3_vl", tmp_path_factory.mktemp("tiny-qwen3_vl"))


@pytest.fixture
def qwen3_ego(tiny_qwen3_vl_dir, tmp_path):
    from ego_ros.engine import Ego

    return Ego.load(str(tiny_qwen3_vl_dir), memory_dir=tmp_path / "memory", max_image_pixels=TEST_MAX_PIXELS)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """The same architecture with other weights: memories of one must not load into the other."""
    return build("qwen2_5_vl", tmp_path_factory.mktemp("tiny-qwen2_5_vl-seed1"), seed=1)


@pytest.fixture
def ego(tiny_model_dir, tmp_path):
    from ego_ros.engine import Ego

    return Ego.load(str(tiny_model_dir), memory_dir=tmp_path / "memory", max_image_pixels=TEST_MAX_PIXELS)


def random_view(seed: int, height: int = 224, width: int = 224) -> np.ndarray:
    """A structured RGB uint8 image: a coloured disc on a textured background, different per seed."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    cy, cx, r = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4), height // 5
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(120, 255, 3, dtype=np.uint8)
    return image


@pytest.fixture(scope="session")
def make_view():
    return random_view


@pytest.fixture(scope="session")
def toy_model_dir():
    """The trained toy model: $EGO_ROS_TOY_MODEL (trained there first if missing or stale), else the committed one,
    which must match the recipe as it is (test_toy_world checks that on its own too)."""
    import os
    from pathlib import Path

    from ego_ros.toy import model_dir

    chosen = os.environ.get("EGO_ROS_TOY_MODEL")
    return model_dir(Path(chosen) if chosen else None)
