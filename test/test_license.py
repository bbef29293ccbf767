# SPDX-License-Identifier: Apache-2.0
"""The licence: LICENSE holds the Apache License 2.0 that package.xml and setup.py name, and every source file says
so in an SPDX line near its top."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPDX = "# SPDX-License-Identifier: Apache-2.0"

# Files that do not carry the line yet, each for a reason; the list may only shrink.
NOT_YET: dict[str, str] = {}


def sources() -> list[Path]:
    patterns = ["ego_ros/**/*.py", "test/**/*.py", "bench/*.py", "launch/*.py", "scripts/*", "config/*.yaml",
                "setup.py", "CMakeLists.txt", ".ci/run"]
    return sorted({path for pattern in patterns for path in REPO.glob(pattern) if path.is_file()
                   and "__pycache__" not in path.parts})


def test_license_file_is_the_apache_license_that_the_package_names():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r"<license>\s*Apache-2\.0\s*</license>", (REPO / "package.xml").read_text())
    assert 'license="Apache-2.0"' in (REPO / "setup.py").read_text()


def test_every_source_file_has_an_spdx_line():
    missing = []
    for path in sources():
        relative = path.relative_to(REPO).as_posix()
        head = path.read_text(errors="replace").splitlines()[:3]
        if SPDX not in head and relative not in NOT_YET:
            missing.append(relative)
    assert not missing, f"no '{SPDX}' line in the first 3 lines of: {missing}"
