# SPDX-License-Identifier: Apache-2.0
"""The ROS 2 distro path, as far as it can be checked without a distro:

- package.xml is valid (catkin_pkg, what rosdep and colcon read) and declares a rosdep key for every ROS package and
  system Python module the code imports; what has no key is in requirements.txt (the documented pip step).
- The pip step (scripts/distro_venv.sh) in a venv that sees "the distro's" packages keeps the distro's numpy 1.x.
  Emulated: Python 3.12 (Ubuntu 24.04's) with numpy 1.26.4 (its python3-numpy) on the system path; the resolution is
  real (pip against the registry, --dry-run), the install is not (torch's wheels are gigabytes).
- The engine, the tiny model and our ROS messages work with numpy 1.26.4 (this venv's packages with numpy 1.x in
  front of its own 2.x).

Not checked here (no distro on this machine): rosdep resolving the keys, apt's packages themselves, colcon build
against /opt/ros; test/test_colcon_build.py builds with colcon against the venv's ROS wheels instead.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Python module -> the package.xml key that brings it (a ROS package or a rosdep key).
ROSDEP = {"rclpy": "rclpy", "rcl_interfaces": "rcl_interfaces", "launch": "launch", "launch_ros": "launch_ros",
          "sensor_msgs": "sensor_msgs", "std_msgs": "std_msgs", "diagnostic_msgs": "diagnostic_msgs",
          "lifecycle_msgs": "lifecycle_msgs", "action_msgs": "action_msgs", "builtin_interfaces": "builtin_interfaces",
          "std_srvs": "std_srvs", "geometry_msgs": "geometry_msgs", "nav_msgs": "nav_msgs",
          "py_trees": "py_trees", "numpy": "python3-numpy", "PIL": "python3-pil",
          "yaml": "python3-yaml", "cv_bridge": "cv_bridge", "cv2": "python3-opencv", "aiohttp": "python3-aiohttp"}
# Python module -> its distribution in requirements.txt (the pip step), for modules with no rosdep key.
PIP = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
       "tqdm": "tqdm", "matplotlib": "matplotlib", "pycocotools": "pycocotools", "cv2": "opencv-python-headless",
       "huggingface_hub": "transformers", "aiohttp": "aiohttp"}  # huggingface_hub comes with transformers


def imported_modules() -> dict[str, set]:
    """Top-level non-stdlib modules imported by the installed code (ego_ros/, launch/), with where."""
    found: dict[str, set] = {}
    for path in [*REPO.glob("ego_ros/**/*.py"), *REPO.glob("launch/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "ego_ros":
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def test_package_xml_declares_every_imported_ros_package_and_system_module():
    from catkin_pkg.package import parse_package

    package = parse_package(str(REPO / "package.xml"))
    package.validate()
    runtime = {d.name for d in package.build_depends + package.exec_depends + package.build_export_depends}
    requirements = (REPO / "requirements.txt").read_text()
    for module, where in sorted(imported_modules().items()):
        assert module in ROSDEP or module in PIP, \
            f"{module} (imported by {sorted(where)}): add its rosdep key or pip requirement"
        if module in ROSDEP:  # cv2 is both: python3-opencv on a distro, the PyPI wheel in the venv
            assert ROSDEP[module] in runtime, f"{module} (imported by {sorted(where)}) needs " \
                                              f"<exec_depend>{ROSDEP[module]}</exec_depend> in package.xml"
        if module in PIP:
            assert f"\n{PIP[module]}==" in "\n" + requirements or PIP[module] == "torch", \
                f"{module}: {PIP[module]} is not pinned in requirements.txt"
    tests = {d.name for d in package.test_depends}
    assert {"ament_cmake_flake8", "ament_cmake_pep257", "launch_testing_ament_cmake", "python3-pytest"} <= tests


def test_the_pip_requirements_allow_a_distro_numpy_1():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    (numpy,) = [line for line in lines if line.startswith("numpy")]
    assert numpy == "numpy>=1.26,<3"
    assert "numpy<2" in (REPO / "constraints-distro.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def distro_numpy(tmp_path_factory):
    """Install numpy 1.26.4 (Ubuntu 24.04's python3-numpy) into a folder, for a given Python (3.11 or 3.12)."""
    def install(python: str, folder: Path) -> Path:
        done = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--target", str(folder), "numpy==1.26.4"], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return folder

    return install, tmp_path_factory.mktemp("distro")


def python312() -> str | None:
    """A working Python 3.12 (a pyenv shim of a version that is not selected exits 127: not that)."""
    candidates = [shutil.which("python3.12"), "/usr/bin/python3.12",
                  *sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    for candidate in filter(None, candidates):
        try:
            if subprocess.run([candidate, "-c", "import venv"], capture_output=True, timeout=30).returncode == 0:
                return candidate
        except OSError:
            continue
    return None


def test_distro_pip_step_keeps_the_distro_numpy(distro_numpy):
    python = python312()
    if python is None:
        pytest.skip("python3.12 (Ubuntu 24.04's Python) is not installed here, so the distro's pip step is not "
                    "resolved")
    install, root = distro_numpy
    venv = root / "venv"
    subprocess.run([python, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    # The distro's dist-packages, seen through the system site: numpy 1.26.4 as apt installs it.
    dist_packages = install(str(venv / "bin" / "python"), root / "dist-packages")
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "distro_dist_packages.pth").write_text(f"{dist_packages}\n")
    done = subprocess.run(["bash", str(REPO / "scripts" / "distro_venv.sh"), str(venv), "--dry-run"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, EGO_ROS_PYTHON=python))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "numpy seen by" in out and ": 1.26.4" in out
    assert "would install torch==2.13.0" in out and "would install transformers==5.24.0" in out
    assert "would install numpy" not in out
    assert "ok (dry run): the distro's numpy (1.26.4) stays" in out
    assert "would install opencv-python-headless==" in out  # no OpenCV on this distro yet: the wheel comes

    # With the distro's OpenCV (python3-opencv, what cv_bridge links) the wheel is left out: one cv2, the distro's.
    # Its stand-in is a cv2 package in the distro's dist-packages, as apt lays it out.
    (dist_packages / "cv2").mkdir()
    (dist_packages / "cv2" / "__init__.py").write_text('__version__ = "4.6.0"\n')
    done = subprocess.run(["bash", str(REPO / "scripts" / "distro_venv.sh"), str(venv), "--dry-run"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, EGO_ROS_PYTHON=python))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "keeping the distro's OpenCV (4.6.0)" in done.stdout
    assert "would install opencv" not in done.stdout and "would install transformers==5.24.0" in done.stdout


def test_distro_pip_step_refuses_a_venv_that_does_not_see_the_distro(tmp_path):
    venv = tmp_path / "isolated"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    done = subprocess.run(["bash", str(REPO / "scripts" / "distro_venv.sh"), str(venv), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "does not see the system's packages" in done.stderr


SMOKE = """
import tempfile
from pathlib import Path

import numpy as np
assert np.__version__ == "1.26.4", np.__version__

from ego_ros.engine import Ego
from ego_ros.testing.tiny_model import build

root = Path(tempfile.mkdtemp())
ego = Ego.load(str(build("qwen2_5_vl", root / "tiny")), memory_dir=root / "memory", max_image_pixels=224 * 224)
view = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
ego.register("mug", [view])
answer = ego.ask("Where is mug?", view, max_new_tokens=3)
scores = ego.recognize(view)
assert answer.text and 0.0 <= scores["mug"] <= 1.0

from sensor_msgs.msg import Image
from ego_ros.msg import ConceptDetection, RecognitionEvent
from ego_ros.ros.image_msgs import image_from_msg, image_to_msg
msg = image_to_msg(view, Image)
assert (image_from_msg(msg) == view).all()
RecognitionEvent(detections=[ConceptDetection(name="mug", score=float(scores["mug"]))])
print("numpy", np.__version__, "ok")
"""


def test_engine_and_messages_work_with_the_distro_numpy(distro_numpy):
    install, root = distro_numpy
    numpy1 = install(sys.executable, root / "numpy1-here")
    env = dict(os.environ, PYTHONPATH=f"{numpy1}{os.pathsep}{REPO}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", SMOKE], capture_output=True, text=True, timeout=600, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "numpy 1.26.4 ok" in done.stdout
