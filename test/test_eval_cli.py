# SPDX-License-Identifier: Apache-2.0
"""`ego-ros eval`: the dataset layouts, the figures by hand, and whole runs on the trained toy model (real files,
real model, the command run as a child process), stopped and continued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ego_ros.evaluation import datasets, toy_layouts
from ego_ros.evaluation.report import summarise
from ego_ros.evaluation.runner import runs_for
from ego_ros.evaluation.tasks import chosen_option, keyword_judge

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("EGO_ROS_MODEL", "EGO_ROS_MEMORY_DIR")}
ENV.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def ego_ros(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ego_ros.cli", *map(str, args)], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def figures(summary: dict) -> dict:
    """The results without their timings."""
    return {name: {task: ({k: v for k, v in value.items() if k != "seconds_per_sample"} if isinstance(value, dict)
                          else value) for task, value in entry.items()} for name, entry in summary["results"].items()}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the figures, by hand ---------------------------------------------------------------------------------------


def sample(method, views, task, concept, correct, **fields):
    return {"method": method, "views": views, "task": task, "concept": concept, "correct": correct,
            "seconds": 0.5, **fields}


def test_the_figures_of_each_task_by_hand():
    yes = lambda concept, said, present: sample("ego", 1, "recognition", concept, said == present,  # noqa: E731
                                                said_yes=said, expected="yes" if present else "no")
    recognition = (
        # Rex: 2 yes of which 1 right (P 1/2); present twice, found once (R 1/2)
        [yes("Rex", True, True), yes("Rex", True, False), yes("Rex", False, True), yes("Rex", False, False)]
        # Anna: 1 yes, right (P 1); present twice, found once (R 1/2)
        + [yes("Anna", True, True), yes("Anna", False, True), yes("Anna", False, False), yes("Anna", False, False)]
    )
    others = [sample("ego", 1, "vqa", "Rex", c) for c in (True, True, False)]
    others += [sample("ego", 1, "captioning", "Rex", c) for c in (True, False, False, False)]
    others += [sample("ego", 1, "multi", "Rex+Anna", c) for c in (True, False)]
    others += [sample("none", 0, "vqa", "Rex", False), sample("ego", 5, "vqa", "Rex", True)]  # other runs
    result = summarise(recognition + others, [("ego", 1), ("none", 0)],
                       ["recognition", "vqa", "captioning", "multi"])
    rec = result["ego/1"]["recognition"]
    assert rec["precision"] == pytest.approx((1 / 2 + 1) / 2)  # 0.75
    assert rec["recall"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # 0.5
    assert rec["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)  # 0.6, from the averages
    assert rec["accuracy"] == pytest.approx(5 / 8)
    assert rec["per_concept"]["Rex"] == {"precision": 0.5, "recall": 0.5, "tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert result["ego/1"]["vqa"]["accuracy"] == pytest.approx(2 / 3)
    assert result["ego/1"]["captioning"]["recall"] == pytest.approx(1 / 4)
    assert result["ego/1"]["multi"]["accuracy"] == pytest.approx(1 / 2)
    assert result["none/0"]["vqa"] == {"n": 1, "seconds_per_sample": 0.5, "accuracy": 0.0}
    assert "ego/5" not in result  # not a run of this selection


def test_answers_are_matched_to_options_and_names():
    options = {"A": "red", "B": "blue"}
    assert [chosen_option(a, options) for a in ("B", "(a)", "A. red", "Answer: B", "a blue ball", "A red mug")] \
        == ["B", "A", "A", "B", "B", "A"]
    assert chosen_option("red or blue", options) is None and chosen_option("purple", options) is None
    assert keyword_judge("Rex and anna on a table.", ["Rex", "Anna"])
    assert not keyword_judge("Rexy on a table.", ["Rex"])  # whole words only
    assert runs_for(["ego", "none", "random"], [5, 1]) == [
        ("ego", 1), ("ego", 5), ("none", 0), ("random", 1), ("random", 5)]


def test_the_command_offers_what_the_harness_has():
    from ego_ros.cli import evaluate as cli
    from ego_ros.evaluation.methods import METHODS
    from ego_ros.evaluation.tasks import TASKS

    # kept apart so that `ego-ros --help` does not import torch; they must not drift
    assert (cli.KINDS, cli.METHOD_NAMES, cli.TASK_NAMES) == (datasets.KINDS, tuple(METHODS), tuple(TASKS))


# --- the layouts ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    for kind in datasets.KINDS:
        toy_layouts.write(kind, root / kind, concepts=2, views=2, positives=2, negatives=1, pairs=1, seed=5)
    return root


def test_each_public_layout_parses_into_fixed_splits(layouts):
    myvlm = datasets.load_dataset("myvlm", layouts / "myvlm", seed=1)
    assert set(myvlm.concepts) == {"Rex", "Anna"} and all(len(c.references) == 5 for c in myvlm.concepts.values())
    assert len(myvlm.recognition) == 4 and myvlm.tasks() == ["recognition", "captioning"]
    assert datasets.load_dataset("myvlm", layouts / "myvlm", seed=1).split() == myvlm.split()  # fixed
    assert datasets.load_dataset("myvlm", layouts / "myvlm", seed=2).split() != myvlm.split()  # seeded

    yollava = datasets.load_dataset("yollava", layouts / "yollava")
    assert [p.name for p in yollava.concepts["Rex"].references] == ["0.png", "1.png"]
    assert len(yollava.recognition) == 4 and len(yollava.vqa) == 4
    question = yollava.vqa[0]
    assert question.question == f"What colour is {question.concept}?" and question.image.is_file()
    assert question.answer in "AB" and set(question.options) == {"A", "B"}

    mine = datasets.load_dataset("thisismy", layouts / "thisismy")
    assert mine.single == ["Anna", "Rex"] and {n for n, c in mine.concepts.items() if c.group == "multi"} == {
        "Milo", "Kiki"}
    groups = [t.group for t in mine.recognition]
    assert groups.count("Positive") == 4 and groups.count("Negative (Hard)") == 2 and groups.count("Fake") == 2
    assert all(bool(t.present) == (t.group == "Positive") for t in mine.recognition)
    assert [set(t.present) for t in mine.multi] == [{"Milo", "Kiki"}] and len(mine.vqa) == 1
    assert mine.tasks() == ["recognition", "vqa", "captioning", "multi"] and mine.skipped == []


def test_a_folder_in_another_layout_is_one_error_naming_both(layouts):
    with pytest.raises(datasets.LayoutError) as error:
        datasets.load_dataset("thisismy", layouts / "yollava")
    message = str(error.value)
    assert "Single-concept/{train,test}" in message and "found: test/, train/, yollava-visual-qa.json" in message
    with pytest.raises(datasets.LayoutError, match="does not exist"):
        datasets.load_dataset("toy", layouts / "nowhere")


def test_bad_files_are_named_and_left_out(layouts, tmp_path):
    import shutil

    root = tmp_path / "yollava"
    shutil.copytree(layouts / "yollava", root)
    (root / "test" / "Rex" / "broken.png").write_bytes(b"not a png")
    (root / "more-qa.json").write_text("{not json")
    (root / "train" / "Ghost").mkdir()  # a concept without reference views
    data = datasets.load_dataset("yollava", root)
    reasons = dict(data.skipped)
    assert "image does not decode" in reasons["test/Rex/broken.png"]
    assert "VQA file does not parse" in reasons["more-qa.json"]
    assert "'Ghost' has no reference views" in reasons["train/Ghost"]
    assert set(data.concepts) == {"Rex", "Anna"} and len(data.recognition) == 4 and len(data.vqa) == 4


# --- whole runs on the trained toy model ------------------------------------------------------------------------


def test_eval_runs_the_methods_and_continues_where_it_stopped(toy_model_dir, layouts, tmp_path, capsys):
    out = tmp_path / "results"
    command = ["eval", "--model", toy_model_dir, "--dataset", "thisismy", layouts / "thisismy", "--views", "1", "2",
               "--methods", "ego", "none", "--out", out, "--quiet"]
    first = ego_ros(*command)
    assert first.returncode == 0, first.stderr
    assert "| Ego | 1 |" in first.stdout and "| Ego | 2 |" in first.stdout and "| no memory (name only) | – |" \
        in first.stdout and "random" not in first.stdout
    samples = lines(out / "samples.jsonl")
    runs = 3  # ego at 1 and 2 views, and none once
    # recognition: 10 test images x 2 concepts; vqa: 1; captioning: 4 positives + 1 pair; multi: 1 pair
    assert len(samples) == runs * (10 * 2 + 1 + 5 + 1)
    assert {s["task"] for s in samples} == {"recognition", "vqa", "captioning", "multi"}
    summary = json.loads((out / "summary.json").read_text())
    for name, entry in summary["results"].items():  # the summary is the samples' arithmetic
        method, views = name.split("/")
        mine = [s for s in samples if s["method"] == method and s["views"] == int(views)]
        vqa = [s["correct"] for s in mine if s["task"] == "vqa"]
        assert entry["vqa"]["accuracy"] == sum(vqa) / len(vqa)
        rec = [s for s in mine if s["task"] == "recognition"]
        assert entry["recognition"]["n"] == 20
        assert entry["recognition"]["accuracy"] == pytest.approx(sum(s["correct"] for s in rec) / 20)
    assert summary["timings"]["introduction_seconds_per_concept"] > 0 and summary["skipped"] == []
    run = json.loads((out / "run.json").read_text())
    assert run["split"]["references"]["Rex"] == ["Single-concept/train/Rex/0.png", "Single-concept/train/Rex/1.png"]
    assert "| concept | ego/1 |" in (out / "summary.md").read_text()
    assert Image.open(out / "summary.png").size[0] > 300

    # Stopped half way: the rest is asked, nothing twice, the concepts are not introduced again.
    memory_files = {p: p.stat().st_mtime_ns for p in (out / "memory").iterdir()}
    text = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(text[: len(text) // 2]) + text[len(text) // 2][:20])
    again = ego_ros(*command)
    assert again.returncode == 0, again.stderr
    resumed = lines(out / "samples.jsonl")[len(text) // 2:]
    assert len(resumed) == len(text) - len(text) // 2
    by_key = {s["key"]: s for s in samples}
    for line in resumed:  # the same answers as the first time
        assert {k: v for k, v in line.items() if k != "seconds"} == {
            k: v for k, v in by_key[line["key"]].items() if k != "seconds"}
    assert {p: p.stat().st_mtime_ns for p in (out / "memory").iterdir()} == memory_files
    assert figures(json.loads((out / "summary.json").read_text())) == figures(summary)

    from ego_ros.cli import main  # refused before the model loads: in this process

    assert main([*map(str, command), "--seed", "7"]) == 1
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "another seed" in error


def test_the_harness_asks_what_the_engine_asks(toy_model_dir, layouts, tmp_path):
    """In-process on the Yo'LLaVA layout: Ego's P(yes) is recognize's with the stored memory; a judge is used."""
    from ego_ros.engine import Ego
    from ego_ros.evaluation.runner import evaluate

    out = tmp_path / "results"
    judged = []

    def strict_judge(answer, names):
        judged.append(answer)
        return False

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children of the other tests: faster on a busy machine
    try:
        summary = evaluate(str(toy_model_dir), "yollava", layouts / "yollava", out, views=(2,),
                           judge=strict_judge, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary["tasks"] == ["recognition", "vqa", "captioning"]
    assert list(summary["results"]) == ["ego/2", "none/0", "keywords/2", "full/2", "random/2"]
    assert summary["results"]["ego/2"]["captioning"]["recall"] == 0.0 and len(judged) == 4 * 5
    assert "strict_judge" in (out / "summary.md").read_text()
    ego = Ego.load(str(toy_model_dir), memory_dir=out / "memory")
    for line in [s for s in lines(out / "samples.jsonl") if s["task"] == "recognition" and s["method"] == "ego"]:
        expected = ego.recognize(layouts / "yollava" / line["image"], [line["concept"]])[line["concept"]]
        assert line["p_yes"] == pytest.approx(expected, abs=1e-5)
    assert torch.is_tensor(ego.store.get("Rex").vectors)


def test_a_wrong_layout_is_one_line_before_the_model_loads(layouts, tmp_path, capsys):
    from ego_ros.cli import main

    assert main(["eval", "--model", str(tmp_path / "no-model"), "--dataset", "myvlm", str(layouts / "yollava")]) == 1
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "is not a myvlm dataset" in error
    assert "expected MyVLM: one folder per concept" in error and "found: test/, train/, yollava-visual-qa.json" in error
