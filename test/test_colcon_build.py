# SPDX-License-Identifier: Apache-2.0
"""The distro way: ``colcon build`` of this package against the ROS 2 underlay (here: the venv's wheels), then
the interfaces imported from colcon's install folder, not from the venv. Keeps the colcon path from rotting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_colcon_build_and_import_from_its_install():
    venv = Path(sys.prefix)
    assert (venv / "bin" / "colcon").exists(), "colcon is not installed: run scripts/setup.sh"
    done = subprocess.run(["bash", str(REPO / "scripts" / "colcon_check.sh"), str(venv)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    install = str(REPO / "build" / "colcon-install")
    loaded = [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("colcon_check:    ")]
    assert any(p.endswith("msg/__init__.py") for p in loaded) and any(p.endswith(".so") for p in loaded)
    assert all(p.startswith(install) for p in loaded), loaded
