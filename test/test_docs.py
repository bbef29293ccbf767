# SPDX-License-Identifier: Apache-2.0
"""The README and docs/ say what is true: their links and pictures resolve, the node's parameters table is the
code's own, and every command block marked runnable runs (offline, on the committed toy model).

A block is runnable when the line before its fence is ``<!-- runnable -->``; it runs in bash (``-euo pipefail``)
from the repository root, with this Python's folder first on PATH (``ego-ros``, ``python``), no hub access and no
ROS. Blocks that need a robot, a GPU or a large model are left unmarked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable -->\n```(?:bash|sh)\n(.*?)```", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' comment in a code block is no heading
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, match in enumerate(RUNNABLE.finditer(page.read_text())):
            found.append((f"{page.relative_to(REPO)}#{i + 1}", match.group(1)))
    return found


def test_every_link_and_picture_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in (link or image for link, image in LINK.findall(text)):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_page_that_leads_to_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {Path(link).name for link, _ in LINK.findall(readme) if link.startswith("docs/")}
    pages = {page.name for page in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    for page in (REPO / "docs").glob("*.md"):  # each says first what a reader gets from it
        assert page.read_text().split("\n\n")[1].startswith("What you get here:"), page.name
    # The two commands of the front door, and the test command CI runs.
    assert "bash scripts/run.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_parameters_table_is_the_code_s_own():
    from ego_ros.ros.parameters import markdown_table

    text = (REPO / "docs" / "node.md").read_text()
    shown = text.split("<!-- parameters:begin -->\n", 1)[1].split("<!-- parameters:end -->", 1)[0]
    assert shown == markdown_table(), "docs/node.md's table is stale: paste `python -m ego_ros.ros.parameters` in"


def test_runnable_blocks_are_found():
    assert len(blocks()) >= 3 and any(name.startswith("README.md") for name, _ in blocks())


@pytest.mark.parametrize("name, script", blocks(), ids=[name for name, _ in blocks()])
def test_runnable_block_runs(name, script, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg",
               HOME=str(tmp_path))  # nothing the block writes outside the checkout lands in the real home
    for key in ("EGO_ROS_MODEL", "EGO_ROS_MEMORY_DIR", "EGO_ROS_NODE"):
        env.pop(key, None)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{script}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n" \
                                 f"{done.stderr[-3000:]}"
