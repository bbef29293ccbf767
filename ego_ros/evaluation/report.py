# SPDX-License-Identifier: Apache-2.0
"""The results of a run, from its samples.jsonl: summary.json, summary.md (the paper's table), summary.png.

Only the samples of the run's (method, views) pairs and tasks count, so a RESULTS_DIR that was continued with fewer
methods reports those. Numbers are percentages in the Markdown table and fractions in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import recognition_score
from .tasks import TASKS, VIDEO_NOTE

LABELS = {"ego": "Ego", "none": "no memory (name only)", "keywords": "keywords as text",
          "full": "full reference views", "random": "random 20% of tokens"}
JUDGE_NOTE = ("open-ended answers (captions) are scored by keyword_judge: a caption counts when it names every "
              "concept shown (whole words, any case); no judge model is used. A/B answers count by the option "
              "chosen (the leading letter, else the one option text named).")
OTHER_JUDGE_NOTE = ("captions are scored by the judge {judge} given to the run (a caption counts when it says "
                    "True). A/B answers count by the option chosen (the leading letter, else the one option text "
                    "named).")
TIMING_NOTE = ("s/sample is the model's time per query (a recognition batch's time shared among its concepts), "
               "the test image's encoding excluded; introduction time is the whole registration of a concept.")


def run_name(run) -> str:
    return f"{run[0]}/{run[1]}"


def summarise(lines: list[dict], runs, tasks) -> dict:
    """Per run (method, views) and task, the paper's figures from the sample lines."""
    wanted = {run_name(r) for r in runs}
    results = {run_name(r): {"method": r[0], "views": r[1], "label": LABELS.get(r[0], r[0])} for r in runs}
    per: dict = {}
    for line in lines:
        name = f"{line['method']}/{line['views']}"
        if name in wanted and line["task"] in tasks:
            per.setdefault((name, line["task"]), []).append(line)
    for (name, task), group in per.items():
        entry = {"n": len(group), "seconds_per_sample": sum(q.get("seconds", 0.0) for q in group) / len(group)}
        if task == "recognition":
            score = recognition_score((q["concept"], q["said_yes"], q["expected"] == "yes") for q in group)
            entry.update(precision=score.precision, recall=score.recall, f1=score.f1, accuracy=score.accuracy,
                         per_concept={c: {"precision": k.precision, "recall": k.recall, "tp": k.true_positives,
                                          "fp": k.false_positives, "fn": k.false_negatives, "tn": k.true_negatives}
                                      for c, k in score.per_concept.items()})
        else:
            share = sum(bool(q["correct"]) for q in group) / len(group)
            entry.update({"recall" if task == "captioning" else "accuracy": share})
        results[name][task] = entry
    return results


def write(out: Path, config: dict, runs, tasks, intro_seconds: dict, skipped, *, peak_cuda_bytes=None) -> dict:
    out = Path(out)
    lines = []
    for text in (out / "samples.jsonl").read_text().splitlines() if (out / "samples.jsonl").is_file() else []:
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    results = summarise(lines, runs, tasks)
    split = config["split"]
    summary = {
        "model": config["model"], "fingerprint": config["fingerprint"], "layers": config["layers"],
        "dataset": {"kind": split["kind"], "root": split["root"], "concepts": len(split["references"]),
                    "recognition_images": len(split["recognition"]), "multi_images": len(split["multi"]),
                    "vqa_questions": split["vqa"]},
        "seed": config["seed"], "threshold": config["threshold"], "tasks": list(tasks),
        "runs": [run_name(r) for r in runs], "results": results,
        "timings": {
            "introduction_seconds_per_concept": (sum(intro_seconds.values()) / len(intro_seconds)
                                                 if intro_seconds else None),
            "introduction_views": max(config["views"]),
            "introduction_seconds": intro_seconds,
            "peak_cuda_memory_bytes": peak_cuda_bytes, "device": config["device"],
        },
        "skipped": [{"file": f, "reason": r} for f, r in skipped],
        "notes": [JUDGE_NOTE if config["judge"] == "keyword_judge" else OTHER_JUDGE_NOTE.format(judge=config["judge"]),
                  VIDEO_NOTE, TIMING_NOTE],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    chart(summary, out / "summary.png")
    return summary


def _pct(entry: dict | None, key: str) -> str:
    return f"{100 * entry[key]:.1f}" if entry and key in entry else "–"


def table(summary: dict) -> str:
    """The paper's layout: one row per method and number of views, recognition P/R/F1 then the other tasks."""
    rows = ["| method | views | precision | recall | F1 | VQA acc. | caption recall | multi-concept acc. "
            "| s/sample |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in summary["results"].values():
        rec = entry.get("recognition")
        samples = [entry[t] for t in TASKS if t in entry]
        seconds = sum(s["seconds_per_sample"] * s["n"] for s in samples) / max(1, sum(s["n"] for s in samples))
        rows.append(f"| {entry['label']} | {entry['views'] or '–'} | {_pct(rec, 'precision')} | "
                    f"{_pct(rec, 'recall')} | {_pct(rec, 'f1')} | {_pct(entry.get('vqa'), 'accuracy')} | "
                    f"{_pct(entry.get('captioning'), 'recall')} | {_pct(entry.get('multi'), 'accuracy')} | "
                    f"{seconds:.3f} |")
    return "\n".join(rows) + "\n"


def markdown(summary: dict) -> str:
    data, timings = summary["dataset"], summary["timings"]
    text = [f"# Evaluation: {data['kind']} ({data['root']})\n",
            f"Model {summary['model']} (fingerprint {summary['fingerprint']}, layers "
            f"{','.join(map(str, summary['layers']))}); {data['concepts']} concepts, {data['recognition_images']} "
            f"recognition images, {data['multi_images']} multi-concept images, {data['vqa_questions']} A/B "
            f"questions; seed {summary['seed']}, yes when P(yes) > {summary['threshold']}. Percentages; recognition "
            "precision and recall are per concept, averaged over concepts, F1 from the two averages.\n",
            table(summary)]
    intro = timings["introduction_seconds_per_concept"]
    text.append(f"Introducing a concept from {timings['introduction_views']} views: "
                + (f"{intro:.2f} s on average" if intro is not None else "no concept was introduced in this run")
                + f" ({timings['device']}). Peak CUDA memory: "
                + (f"{timings['peak_cuda_memory_bytes'] / 2**30:.2f} GiB." if timings['peak_cuda_memory_bytes']
                   else "not measured (not on CUDA).") + "\n")
    per_concept = {name: e["recognition"]["per_concept"] for name, e in summary["results"].items()
                   if "recognition" in e}
    if per_concept:
        names = list(per_concept)
        text.append("## Recognition per concept (precision / recall, %)\n")
        text.append("| concept | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        concepts = dict.fromkeys(c for table in per_concept.values() for c in table)
        for concept in concepts:
            cells = [f"{100 * per_concept[n][concept]['precision']:.0f} / {100 * per_concept[n][concept]['recall']:.0f}"
                     if concept in per_concept[n] else "–" for n in names]
            text.append(f"| {concept} | " + " | ".join(cells) + " |")
        text.append("")
    text.append("## Notes\n")
    text += [f"- {note}" for note in summary["notes"]]
    text.append("\n## Skipped\n")
    text += [f"- {s['file']}: {s['reason']}" for s in summary["skipped"]] or ["- nothing"]
    return "\n".join(text) + "\n"


def chart(summary: dict, path: Path) -> None:
    """Grouped bars: one group per figure (F1, VQA accuracy...), one bar per method and number of views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [("recognition", "f1", "recognition F1"), ("recognition", "precision", "precision"),
               ("recognition", "recall", "recall"), ("vqa", "accuracy", "VQA acc."),
               ("captioning", "recall", "caption recall"), ("multi", "accuracy", "multi-concept acc.")]
    results = summary["results"]
    figures = [f for f in figures if any(f[0] in e for e in results.values())]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(figures) + 2), 4))
    width = 0.8 / max(1, len(results))
    for i, (name, entry) in enumerate(results.items()):
        values = [100 * entry[task][key] if task in entry else 0.0 for task, key, _ in figures]
        label = f"{entry['label']}" + (f" ({entry['views']} view{'s' if entry['views'] != 1 else ''})"
                                       if entry["views"] else "")
        ax.bar([x + i * width for x in range(len(figures))], values, width, label=label)
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(figures))])
    ax.set_xticklabels([label for _, _, label in figures])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{summary['dataset']['kind']}: {Path(str(summary['model'])).name}")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
