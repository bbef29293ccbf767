# SPDX-License-Identifier: Apache-2.0
"""One evaluation run: every selected method on the same concepts and images, resumable, with timings.

    from ego_ros.evaluation.runner import evaluate
    summary = evaluate("Qwen/Qwen2.5-VL-7B-Instruct", "yollava", "data/yollava", "results/yollava",
                       views=(1, 5), methods=("ego", "none", "keywords", "full", "random"))

RESULTS_DIR holds:

    run.json            the configuration, the model's fingerprint and the fixed split (dataset.split())
    memory/             the concepts as Ego registered them (from the first max(views) reference views): reused
                        when the run is started again
    introductions.json  seconds each concept's introduction took (kept across restarts)
    samples.jsonl       one line per query, appended as it is answered; a query already there is not asked again
    summary.json, summary.md, summary.png   (report.py)

Every method starts from the one registration of each concept (methods.introduction); "none" does not depend on the
number of views and runs once. The random method's tokens are drawn from (seed, concept index): fixed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ego_ros.engine.images import to_rgb

from . import report
from .datasets import Dataset, load_dataset
from .methods import METHODS, introduction, stored_concept
from .tasks import TASKS, chosen_option, context, keyword_judge, vqa_prompt

SAMPLES = "samples.jsonl"


class RunMismatch(ValueError):
    """RESULTS_DIR holds a run of another model, dataset, seed or split: its samples cannot be continued."""


def runs_for(methods: Sequence[str], views: Sequence[int]) -> list[tuple[str, int]]:
    """(method, views) pairs: "none" once (views 0: it uses none), the others once per number of views."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not views or any(not isinstance(v, int) or v < 1 for v in views):
        raise ValueError(f"views must be positive integers, got {list(views)}")
    runs = []
    for method in dict.fromkeys(methods):
        runs += [("none", 0)] if method == "none" else [(method, v) for v in sorted(set(views))]
    return runs


def evaluate(model: str, kind: str, directory, out, *, views: Sequence[int] = (1, 5),
             methods: Sequence[str] = tuple(METHODS), tasks: Sequence[str] | None = None, seed: int = 0,
             threshold: float = 0.5, max_new_tokens: int = 32, judge=None, device: str = "auto",
             dtype="auto", progress: bool = True, **settings) -> dict:
    """Load ``model`` with its concept memory in ``out``/memory, parse the dataset and :func:`run` it."""
    from ego_ros.engine import Ego

    data = load_dataset(kind, directory, seed=seed)  # a layout error before minutes of loading
    runs_for(methods, views)
    out = Path(out)
    check_resumable(out, {"seed": seed, "threshold": threshold, "max_new_tokens": max_new_tokens,
                          "split": data.split()})
    ego = Ego.load(model, device=device, dtype=dtype, memory_dir=out / "memory", **settings)
    return run(ego, data, out, views=views, methods=methods, tasks=tasks, seed=seed, threshold=threshold,
               max_new_tokens=max_new_tokens, judge=judge, progress=progress)


def run(ego, data: Dataset, out, *, views: Sequence[int] = (1, 5), methods: Sequence[str] = tuple(METHODS),
        tasks: Sequence[str] | None = None, seed: int = 0, threshold: float = 0.5, max_new_tokens: int = 32,
        judge=None, progress: bool = True) -> dict:
    """Evaluate ``ego`` (whose memory folder should be ``out``/memory) on ``data``; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_for(methods, views)
    supported = data.tasks()
    tasks = list(dict.fromkeys(tasks)) if tasks is not None else supported
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    skipped = list(data.skipped)
    for task in [t for t in tasks if t not in supported]:
        skipped.append((task, f"the {data.kind} data in {data.root} has nothing for this task"))
    tasks = [t for t in tasks if t in supported]
    config = {"model": ego.model_name, "fingerprint": ego.fingerprint, "layers": list(ego.layers),
              "max_tokens_per_view": ego.config.max_tokens_per_view, "max_image_pixels": ego.config.max_image_pixels,
              "dtype": str(ego.model.dtype).removeprefix("torch."), "seed": seed, "threshold": threshold,
              "max_new_tokens": max_new_tokens, "views": sorted(set(views)), "methods": list(dict.fromkeys(methods)),
              "runs": [list(r) for r in runs], "tasks": tasks, "judge": getattr(judge, "__name__", "keyword_judge")
              if judge else "keyword_judge", "device": str(ego.device), "split": data.split()}
    check_resumable(out, config)
    (out / "run.json").write_text(json.dumps(config, indent=1) + "\n")
    if ego.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ego.device)

    concepts, intro_seconds = _introduce(ego, data, max(views), out, skipped, progress)
    done = _done(out / SAMPLES)
    session = _Session(ego, data, out, runs, concepts, seed, threshold, max_new_tokens, judge or keyword_judge,
                       done, skipped)
    plan = session.plan(tasks)
    with open(out / SAMPLES, "a") as sink, tqdm(total=sum(len(q) for q in plan.values()), desc="evaluating",
                                                disable=not progress, unit="query") as bar:
        session.sink, session.bar = sink, bar
        for task in tasks:
            getattr(session, task)(plan[task])
    peak = torch.cuda.max_memory_allocated(ego.device) if ego.device.type == "cuda" else None
    return report.write(out, config, runs, tasks, intro_seconds, skipped, peak_cuda_bytes=peak)


def check_resumable(out, config: dict) -> None:
    """Refuse to continue a run in ``out`` whose samples were made otherwise (another model, split, seed...).
    Only the keys ``config`` has are compared: the CLI calls it before loading the model without the model's."""
    out = Path(out)
    previous = out / "run.json"
    if not previous.is_file() or not (out / SAMPLES).is_file():
        return
    try:
        old = json.loads(previous.read_text())
    except ValueError as error:
        raise RunMismatch(f"{previous} does not parse ({error}); use another --out or delete it") from None
    differ = [key for key in ("fingerprint", "dtype", "layers", "max_tokens_per_view", "max_image_pixels", "seed",
                              "threshold", "max_new_tokens", "judge", "split")
              if key in config and old.get(key) != config[key]]
    if differ:
        raise RunMismatch(f"{out} holds a run with another {', '.join(differ)}: its samples would not be "
                          "comparable; use another --out (or delete that folder)")


def _done(path: Path) -> set:
    """The keys of the queries already answered. A last line cut short when a run was stopped is removed."""
    keys = set()
    if path.is_file():
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            with open(path, "r+b") as file:
                file.truncate(raw.rfind(b"\n") + 1)
        for line in path.read_text().splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):  # a line cut short when a run was stopped
                continue
    return keys


def _introduce(ego, data: Dataset, views: int, out: Path, skipped: list, progress: bool):
    """Register every concept from its first ``views`` reference views, or reuse it from the memory folder; then
    the introduction every method starts from (methods.stored_concept). Returns (concepts, seconds per concept)."""
    timings_path = out / "introductions.json"
    seconds = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    concepts = {}
    for name, concept in tqdm(data.concepts.items(), desc="introducing concepts", disable=not progress,
                              unit="concept"):
        references = concept.references[:views]
        try:
            images = [to_rgb(p, ego.config.max_image_pixels) for p in references]
            if name in ego.store and ego.store.get(name).num_views != len(images):
                ego.forget(name)  # registered by a run with another number of views
            if name not in ego.store:
                started = time.perf_counter()
                ego.register(name, images)
                seconds[name] = time.perf_counter() - started
                timings_path.write_text(json.dumps(seconds, indent=1) + "\n")
            memory = ego.store.get(name)
            concepts[name] = stored_concept(memory, ego.backend.encode(images))
        except (ValueError, OSError) as error:
            skipped.append((data.relative(references[0].parent), f"concept {name!r} could not be introduced: "
                            f"{error}"))
            continue
        if len(references) < views:
            skipped.append((data.relative(references[0].parent), f"concept {name!r} has {len(references)} "
                            f"reference views; its runs with more views use these"))
    return concepts, {n: s for n, s in seconds.items() if n in concepts}


class _Session:
    """The queries of one run, asked in order, each written to samples.jsonl as it is answered."""

    def __init__(self, ego, data, out, runs, concepts, seed, threshold, max_new_tokens, judge, done, skipped):
        self.ego, self.data, self.out, self.runs, self.concepts = ego, data, out, runs, concepts
        self.threshold, self.max_new_tokens, self.judge = threshold, max_new_tokens, judge
        self.done, self.skipped = done, skipped
        self.index = {name: i for i, name in enumerate(data.concepts)}
        self.seed = seed
        self._intros: dict = {}
        self.sink = self.bar = None

    def intro(self, run, name) -> list:
        key = (run, name)
        if key not in self._intros:
            method, views = run
            info = self.concepts[name]
            self._intros[key] = introduction(method, info, min(max(views, 1), len(info.traces)),
                                             seed=self.seed * 100_003 + self.index[name])
        return self._intros[key]

    # --- the plan: what is still to ask --------------------------------------------------------------------------

    def plan(self, tasks) -> dict[str, list]:
        rel = self.data.relative
        plan = {}
        single = [n for n in self.data.single if n in self.concepts]
        if "recognition" in tasks:
            plan["recognition"] = [(run, t, name) for t in self.data.recognition for run in self.runs
                                   for name in single
                                   if _key(run, "recognition", name, rel(t.path)) not in self.done]
        if "vqa" in tasks:
            plan["vqa"] = [(run, i, q) for i, q in enumerate(self.data.vqa) for run in self.runs
                           if q.concept in self.concepts
                           and _key(run, "vqa", q.concept, rel(q.image), i) not in self.done]
        if "captioning" in tasks:
            plan["captioning"] = [(run, t) for t in self.data.captions for run in self.runs
                                  if all(n in self.concepts for n in t.present)
                                  and _key(run, "captioning", "+".join(t.present), rel(t.path)) not in self.done]
        if "multi" in tasks:
            plan["multi"] = [(run, t) for t in self.data.multi for run in self.runs
                             if all(n in self.concepts for n in t.present)
                             and _key(run, "multi", "+".join(t.present), rel(t.path)) not in self.done]
        return plan

    # --- the tasks -------------------------------------------------------------------------------------------------

    def recognition(self, queries) -> None:
        by_image: dict = {}
        for run, test, name in queries:
            by_image.setdefault(test.path, (test, {}))[1].setdefault(run, []).append(name)
        for path, (test, per_run) in by_image.items():
            encoded = self._encode(path, sum(len(n) for n in per_run.values()))
            if encoded is None:
                continue
            for run, names in per_run.items():
                started = time.perf_counter()
                p_yes = self.ego.yes_probabilities(encoded, {n: self.intro(run, n) for n in names})
                each = (time.perf_counter() - started) / len(names)
                for name in names:
                    said_yes, present = p_yes[name] > self.threshold, name in test.present
                    self._write(run, "recognition", name, test.path, answer="yes" if said_yes else "no",
                                p_yes=p_yes[name], expected="yes" if present else "no", said_yes=said_yes,
                                correct=said_yes == present, group=test.group, seconds=each)

    def vqa(self, queries) -> None:
        for run, i, q in queries:
            encoded = self._encode(q.image, 1)
            if encoded is None:
                continue
            started = time.perf_counter()
            intro = self.intro(run, q.concept)
            parts = (context({q.concept: intro}) if run[0] != "none" else []) + [encoded,
                                                                                 vqa_prompt(q.question, q.options)]
            answer = self.ego.complete(parts, self.max_new_tokens)
            chosen = chosen_option(answer, q.options)
            self._write(run, "vqa", q.concept, q.image, i, answer=answer, chosen=chosen, expected=q.answer,
                        correct=chosen == q.answer, question=q.question, seconds=time.perf_counter() - started)

    def captioning(self, queries) -> None:
        from ego_ros.engine import prompts

        for run, test in queries:
            encoded = self._encode(test.path, 1)
            if encoded is None:
                continue
            started = time.perf_counter()
            parts = context({n: self.intro(run, n) for n in test.present}) + [encoded, prompts.CAPTION]
            answer = self.ego.complete(parts, self.max_new_tokens)
            self._write(run, "captioning", "+".join(test.present), test.path, answer=answer,
                        expected=list(test.present), correct=bool(self.judge(answer, list(test.present))),
                        seconds=time.perf_counter() - started)

    def multi(self, queries) -> None:
        for run, test in queries:
            encoded = self._encode(test.path, 1)
            if encoded is None:
                continue
            started = time.perf_counter()
            p_yes = self.ego.yes_probabilities(encoded, {n: self.intro(run, n) for n in test.present})
            said = {n: p > self.threshold for n, p in p_yes.items()}
            self._write(run, "multi", "+".join(test.present), test.path,
                        answer=", ".join(n for n, yes in said.items() if yes) or "none", p_yes=p_yes,
                        expected=list(test.present), correct=all(said.values()),
                        seconds=time.perf_counter() - started)

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _encode(self, path, queries: int):
        try:
            (encoded,) = self.ego.backend.encode([to_rgb(path, self.ego.config.max_image_pixels)])
            return encoded
        except (ValueError, OSError) as error:
            self.skipped.append((self.data.relative(path), f"image could not be read: {error}"))
            self.bar.update(queries)
            return None

    def _write(self, run, task, concept, path, index=None, **fields) -> None:
        image = self.data.relative(path)
        line = {"key": _key(run, task, concept, image, index), "method": run[0], "views": run[1], "task": task,
                "concept": concept, "image": image, **fields}
        self.sink.write(json.dumps(line, default=float) + "\n")
        self.sink.flush()
        self.bar.update(1)


def _key(run, task, concept, image, index=None) -> str:
    return "|".join(map(str, (run[0], run[1], task, concept, image) + (() if index is None else (index,))))
