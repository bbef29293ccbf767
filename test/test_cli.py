# SPDX-License-Identifier: Apache-2.0
"""The ``ego-ros`` command, run for real (``python -m ego_ros.cli`` in a child process) on a tiny random Qwen2.5-VL
and real PNG files. Commands that do not depend on each other run at the same time, to keep the file fast."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from ego_ros.engine.memory import MemoryStore
from ego_ros.engine import figure
from ego_ros.engine.memory import ConceptMemory, ViewRecord

REPO = Path(__file__).resolve().parents[1]
PIXELS = "50176"  # 224x224: a few dozen visual tokens per image
ENV = {k: v for k, v in os.environ.items() if k not in ("EGO_ROS_MODEL", "EGO_ROS_MEMORY_DIR")}
# One thread each: the tiny model gains nothing from more, and several children run at once.
ENV.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ego_ros.cli", *map(str, args)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, three reference photos, a text file posing as an image, and an empty memory folder."""
    from ego_ros.testing.tiny_model import build

    root = tmp_path_factory.mktemp("cli")
    model = build("qwen2_5_vl", root / "tiny")
    photos = {}
    for name, size, background, subject in (
        ("mug", (320, 240), (60, 120, 200), (230, 80, 40)),
        ("mug2", (300, 260), (70, 110, 190), (220, 90, 50)),
        ("rex", (240, 320), (40, 160, 80), (240, 220, 200)),
    ):
        image = Image.new("RGB", size, background)
        ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4), fill=subject)
        image.save(root / f"{name}.png")
        photos[name] = root / f"{name}.png"
    (root / "notes.png").write_text("not an image")
    return dict(model=model, memory=root / "memory", notes=root / "notes.png", **photos)


def model_args(files) -> list:
    return ["--model", files["model"], "--memory-dir", files["memory"], "--max-image-pixels", PIXELS]


@pytest.fixture(scope="module")
def registered(files):
    """'my mug' from two views and 'Rex' from one, registered by two commands running side by side."""
    mug = start("register", "my mug", files["mug"], files["mug2"], "--area", "20", *model_args(files))
    rex = start("register", "Rex", files["rex"], "--area", "30", *model_args(files))
    return ok(finish(mug)), ok(finish(rex))


def test_register_reports_each_view_and_saves_it(files, registered):
    mug, rex = registered
    assert "registered 'my mug': 2 views" in mug.stdout
    assert "view 1: kept" in mug.stdout and "view 2: kept" in mug.stdout
    assert "registered 'Rex': 1 view" in rex.stdout
    assert "loading " in mug.stderr and " on cpu (float32)..." in mug.stderr
    views = figure.load_views(files["memory"], "my mug")
    assert len(views) == 2 and all(v is not None and v.width * v.height <= int(PIXELS) for v in views)


ERRORS = {
    # case: (arguments, with the model options?, words the message must contain)
    "unknown concept": (["ask", "Where?", "--image", "{mug}", "--concept", "nobody"], True, "no concept named"),
    "missing image file": (["register", "cup", "{memory}/nothing.png"], True, "no image file"),
    "existing name": (["register", "my mug", "{mug}"], True, "already exists"),
    "hostile name": (["register", "../x", "{mug}"], True, "invalid concept name"),
    "not an image": (["register", "cup", "{notes}"], True, "cannot read"),
    "missing --model": (["register", "cup", "{mug}", "--memory-dir", "{memory}"], False, "--model"),
    "bad --area": (["register", "cup", "{mug}", "--area", "150"], True, "percentage"),
    "empty --box": (["register", "cup", "{mug}", "--box", "50,50,10,80"], True, "X1 > X0"),
    "--box outside the view": (["register", "cup", "{mug}", "--box", "400,0,500,50"], True, "outside the 320x240"),
}


@pytest.fixture(scope="module")
def runs(files, registered, tmp_path_factory):
    """Every command that only reads the memory, and forget on a copy of it, started together."""
    copy = tmp_path_factory.mktemp("forget") / "memory"
    shutil.copytree(files["memory"], copy)
    copy_with_model = tmp_path_factory.mktemp("forget-model") / "memory"
    shutil.copytree(files["memory"], copy_with_model)
    shown_with_model = tmp_path_factory.mktemp("show-model") / "mug.png"
    figure_path = tmp_path_factory.mktemp("show") / "mug.png"
    processes = {
        "list": start("list", "--memory-dir", files["memory"]),
        "ask": start("ask", "Where is my mug?", "--image", files["mug"], "--image", files["rex"],
                     "--concept", "my mug", "--max-new-tokens", "6", *model_args(files)),
        "recognize": start("recognize", files["rex"], *model_args(files)),
        "show": start("show", "my mug", "--out", figure_path, "--memory-dir", files["memory"]),
        "forget": start("forget", "Rex", "--memory-dir", copy),
        # The same flags as register and ask: --model is accepted by the memory commands (show and forget never
        # load it, so a model that does not exist shows it is not loaded; list --model loads it for its layers).
        "forget --model": start("forget", "my mug", "--model", "/no/such/model", "--memory-dir", copy_with_model),
        "show --model": start("show", "my mug", "--out", shown_with_model, "--model", "/no/such/model",
                              "--memory-dir", files["memory"]),
        "list --model": start("list", *model_args(files), "--layers", "1,2"),
        **{case: start(*[a.format(**files) for a in args], *(model_args(files) if with_model else []))
           for case, (args, with_model, _) in ERRORS.items()},
    }
    results = {"forget": finish(processes.pop("forget"))}
    processes["list after forget"] = start("list", "--memory-dir", copy)
    results.update((name, finish(process)) for name, process in processes.items())
    return dict(results, figure=figure_path, forgotten=copy, forgotten_with_model=copy_with_model,
                figure_with_model=shown_with_model)


def test_list_shows_both_concepts(runs):
    lines = ok(runs["list"]).stdout.splitlines()
    assert lines[0].split()[:6] == ["NAME", "VIEWS", "TOKENS", "AREA", "KEYWORDS", "UPDATED"]
    rows = {line.split("  ")[0].strip(): line for line in lines[1:]}
    assert set(rows) == {"my mug", "Rex"}
    assert rows["my mug"].split()[2] == "2" and rows["Rex"].split()[1] == "1"  # views


def test_ask_streams_an_answer(runs):
    result = ok(runs["ask"])
    assert result.stdout.strip()
    assert "concepts in context: 'my mug'" in result.stderr


def test_recognize_prints_one_probability_per_concept(runs):
    scores = dict(line.rsplit(None, 1) for line in ok(runs["recognize"]).stdout.splitlines())
    assert set(scores) == {"my mug", "Rex"}
    probabilities = [float(p) for p in scores.values()]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)


def test_show_outlines_the_kept_cells(files, runs):
    ok(runs["show"])
    memory = MemoryStore(files["memory"], fingerprint=None).get("my mug")
    shown = Image.open(runs["figure"]).convert("RGB")

    # The layout: views side by side, each in a panel at least MIN_PANEL_WIDTH wide, text under the tallest.
    sizes = [(v.grid_thw[2] * 14, v.grid_thw[1] * 14) for v in memory.views]
    panels = [max(w, figure.MIN_PANEL_WIDTH) for w, _ in sizes]
    assert shown.size == (
        figure.MARGIN + sum(p + figure.MARGIN for p in panels),
        figure.MARGIN + figure.HEADER_HEIGHT + max(h for _, h in sizes) + figure.TEXT_GAP
        + figure.TEXT_LINES * figure.LINE_HEIGHT + figure.MARGIN,
    )

    # View 0: a kept cell is outlined and at full brightness, a dropped one is not outlined and dimmed.
    view = memory.views[0]
    (width, height), cols = sizes[0], view.grid_thw[2] // 2
    left = figure.MARGIN + (panels[0] - width) // 2
    top = figure.MARGIN + figure.HEADER_HEIGHT
    seen = figure.load_views(files["memory"], "my mug")[0].resize((width, height), Image.Resampling.BICUBIC)
    kept = view.indices[len(view.indices) // 2]
    dropped = next(i for i in range(view.num_visual_tokens) if i not in view.indices)
    assert 0 < len(view.indices) < view.num_visual_tokens
    for index, is_kept in ((kept, True), (dropped, False)):
        row, col = divmod(index, cols)
        x, y = col * 28, row * 28
        corner = shown.getpixel((left + x, top + y))
        centre, original = shown.getpixel((left + x + 14, top + y + 14)), seen.getpixel((x + 14, y + 14))
        assert (corner == figure.OUTLINE) == is_kept, (index, corner)
        expected = original if is_kept else tuple(round(c * figure.DIM) for c in original)
        assert all(abs(a - b) <= 2 for a, b in zip(centre, expected)), (index, centre, expected)


def test_forget_removes_the_concept_and_its_views(runs):
    assert "forgot 'Rex'" in ok(runs["forget"]).stdout
    listed = ok(runs["list after forget"]).stdout
    assert "my mug" in listed and "Rex" not in listed
    assert not figure.views_dir(runs["forgotten"], "Rex").exists()
    assert len(figure.load_views(runs["forgotten"], "my mug")) == 2


def test_memory_commands_accept_model_like_the_others(files, runs):
    assert "forgot 'my mug'" in ok(runs["forget --model"]).stdout
    assert "loading" not in runs["forget --model"].stderr
    assert "my mug" not in MemoryStore(runs["forgotten_with_model"], fingerprint=None).names()
    assert ok(runs["show --model"]).stdout.startswith(f"wrote {runs['figure_with_model']} (")
    assert Image.open(runs["figure_with_model"]).size == Image.open(runs["figure"]).size
    listed = ok(runs["list --model"])
    assert "loading " in listed.stderr  # list --model loads the model, to say which layers it uses
    assert listed.stdout.splitlines()[-1] == "layers 1,2; set explicitly"
    assert {line.split("  ")[0] for line in listed.stdout.splitlines()[1:3]} == {"my mug", "Rex"}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_are_one_line(runs, case):
    result = runs[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ego-ros: error: "), result.stderr
    assert ERRORS[case][2] in lines[0]


def test_register_from_a_box_in_the_users_words(files, tmp_path):
    args = ["--model", files["model"], "--memory-dir", tmp_path / "memory", "--max-image-pixels", PIXELS]
    result = ok(finish(start("register", "boxed mug", files["mug"], "--box", "0,0,160,120",  # a quarter of 320x240
                             "--description", "the red mug", *args)))
    assert "area 25%" in result.stdout and "the red mug" in result.stdout, result.stdout


# --- the figure and the saved views, in process -----------------------------------------------------------------


def test_saved_views_are_numbered_in_memory_order(tmp_path):
    colours = [Image.new("RGB", (56, 28), (i * 40, 0, 0)) for i in range(4)]
    figure.save_views(tmp_path, "cup", colours[:2], start=0)
    figure.save_views(tmp_path, "cup", colours[2:3], start=2)  # --append
    assert [v.getpixel((0, 0))[0] for v in figure.load_views(tmp_path, "cup")] == [0, 40, 80]
    figure.save_views(tmp_path, "cup", colours[3:], start=0)  # a new concept of the same name: old views go
    assert [v.getpixel((0, 0))[0] for v in figure.load_views(tmp_path, "cup", 2)[:1]] == [120]
    assert figure.load_views(tmp_path, "cup", 2)[1] is None


def test_a_view_without_image_is_drawn_as_its_grid_on_grey():
    import torch

    view = ViewRecord((1, 4, 6), [0, 4], ["cup"], 20.0, True, 6)  # 3 x 2 merged cells
    memory = ConceptMemory("cup", torch.zeros(2, 8), [view], [1], 4, "tiny", "fp", 0.0, 0.0)
    drawn = figure.concept_figure(memory, [None])
    assert drawn.size == figure.figure_size(memory)
    left = figure.MARGIN + (figure.MIN_PANEL_WIDTH - 6 * 14) // 2
    top = figure.MARGIN + figure.HEADER_HEIGHT
    assert drawn.getpixel((left + 28 + 14, top + 28 + 14)) == figure.CANVAS_KEPT  # token 4: row 1, col 1
    assert drawn.getpixel((left + 28 + 14, top + 14)) == figure.CANVAS  # token 1: dropped
    assert drawn.getpixel((left, top)) == figure.OUTLINE  # token 0
    # The note under the title is drawn in its own colour.
    note = drawn.crop((0, figure.MARGIN + 32 + figure.LINE_HEIGHT, drawn.width, top))
    assert figure.NOTE in {colour for _, colour in note.getcolors(1 << 16)}


# --- where the command lives --------------------------------------------------------------------------------------


def _imports(path: Path, module: str) -> set:
    """The ego_ros modules ``path`` imports anywhere (module level or inside functions, or by importlib)."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # from package import module
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            found.add(node.args[0].value)
    return {name for name in found if name.split(".")[0] == "ego_ros"}


def test_the_command_has_one_home_without_an_import_circle():
    """ego_ros.cli is the command's one package, its offline and live halves side by side; no module of ego_ros
    imports one that (directly or not) imports it back."""
    root = REPO / "ego_ros"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    # An edge to one's own package is not counted: Python imports a package before any of its modules, by design.
    graph = {name: {m for m in _imports(path, name) if m in modules and not (name + ".").startswith(m + ".")}
             for name, path in modules.items()}
    assert "ego_ros.ros.cli" not in modules, "the command lives in ego_ros.cli only"
    assert {"ego_ros.cli.offline", "ego_ros.cli.live", "ego_ros.cli.commands"} <= set(modules)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    circles = sorted(f"{a} -> {b}" for a in graph if a.startswith(("ego_ros.cli", "ego_ros.ros"))
                     for b in graph[a] if reaches(b, a))
    assert not circles, f"import circles: {circles}"
    # The halves do not lean on each other: each only on what they share.
    assert not {m for m in graph["ego_ros.cli.offline"] if m.startswith("ego_ros.cli.live")}
    assert not {m for m in graph["ego_ros.cli.live"] if m.startswith("ego_ros.cli.offline")}
    assert not any(m.startswith("ego_ros.cli") for name in graph if name.startswith("ego_ros.ros")
                   for m in graph[name]), "the ROS side does not import the command"
