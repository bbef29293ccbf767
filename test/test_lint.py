# SPDX-License-Identifier: Apache-2.0
"""What ``colcon test`` runs: CMakeLists.txt's BUILD_TESTING block, configured for real with this venv's ROS wheels
(ament_cmake_flake8 and ament_cmake_pep257 from PyPI), its tests listed and its linters run with ctest, as colcon
would. The launch test it registers needs launch_testing_ament_cmake, which is not on PyPI: here it must say it is
not registered (it runs on a distro)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
PEP257_ARGS = ["--add-ignore", "D205", "D209", "D213", "D400", "D401", "D415"]  # as in CMakeLists.txt


def env() -> dict:
    return dict(os.environ, AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV),
                PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> tuple[Path, str]:
    if not (VENV / "bin" / "ament_flake8").exists() or shutil.which("cmake") is None:
        pytest.fail("ament_flake8 (requirements-test.txt) or cmake is missing: run scripts/setup.sh")
    build = tmp_path_factory.mktemp("colcon-test-build")
    done = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DBUILD_TESTING=ON",
                           f"-DPython3_EXECUTABLE={sys.executable}", f"-DCMAKE_INSTALL_PREFIX={build / 'install'}"],
                          capture_output=True, text=True, timeout=600, env=env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build, done.stdout


def test_build_testing_registers_the_linters_and_says_where_the_launch_test_is(configured):
    build, log = configured
    listed = subprocess.run(["ctest", "-N"], cwd=build, capture_output=True, text=True, timeout=60, env=env())
    tests = {line.split(":", 1)[1].strip() for line in listed.stdout.splitlines() if line.strip().startswith("Test #")}
    assert {"flake8", "pep257"} <= tests, listed.stdout
    launch_testing_here = (VENV / "share" / "launch_testing_ament_cmake").is_dir()
    if launch_testing_here:
        assert "test_ego_launch" in " ".join(tests)
    else:
        assert "launch_testing_ament_cmake not found: test/launch/test_ego_launch.py is not registered" in log


def test_the_linters_pass_as_colcon_test_runs_them(configured):
    build, _ = configured
    done = subprocess.run(["ctest", "-L", "linter", "--output-on-failure"], cwd=build, capture_output=True,
                          text=True, timeout=600, env=env())
    assert done.returncode == 0, done.stdout[-6000:]
    assert "100% tests passed, 0 tests failed out of 2" in done.stdout


def test_the_linters_find_what_they_are_for(tmp_path):
    """With the project's settings, flake8 still refuses an unused import and pep257 a malformed docstring."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    '''Does a thing'''\n    return 1\n")
    flake8 = subprocess.run([str(VENV / "bin" / "ament_flake8"), "--config", str(REPO / ".flake8"), str(bad)],
                            capture_output=True, text=True, timeout=120, env=env())
    assert flake8.returncode != 0 and "F401" in flake8.stdout, flake8.stdout
    pep257 = subprocess.run([str(VENV / "bin" / "ament_pep257"), str(bad), *PEP257_ARGS], capture_output=True,
                            text=True, timeout=120, env=env())
    assert pep257.returncode != 0 and "D300" in pep257.stdout + pep257.stderr, pep257.stdout + pep257.stderr


def test_the_test_uses_cmakes_pep257_settings():
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "--add-ignore " + " ".join(PEP257_ARGS[1:]) in " ".join(cmake.split())
