# SPDX-License-Identifier: Apache-2.0
"""The sightings memory, measured: its visits against the toy camera's truth, and what recording costs.

``pan``: the toy camera's pan (``--seconds``, default 2 minutes) is recognised frame by frame at the node's
recognition rate (``--rate``, 2 Hz) as the node does it (the engine's scores and boxes, the presence tracker at
``--threshold`` with no hysteresis, as scripts/run.sh runs the node), and every present concept is recorded in a
real :class:`~ego_ros.sightings.SightingsStore`. Registered: the camera's instances from their reference views,
and one instance the strip never shows (from another seed's camera; checked against every frame). Each instance's
visits are then matched with the camera's truth: the spans where at least 60% of it is in view. Per true span:
found or not, and how far the first and last seen are from the span's (one recognition period is 1 / rate).
Visits that match no span are false ones.

``cost``: an hour of 2 Hz recognition on three cameras, simulated (each camera sees a few of six concepts, in
visits of 5-60 s with gaps of 5-120 s): milliseconds per recorded sighting (a JPEG crop of a 640x480 frame
included when it is the visit's best) and the database's size at the end.

    python bench/sightings.py pan
    python bench/sightings.py cost
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ego_ros.ros.hysteresis import PresenceTracker  # noqa: E402
from ego_ros.sightings import SightingsStore, crop_jpeg  # noqa: E402
from ego_ros.toy.tally import IN_VIEW, Tally  # noqa: E402

START = 1_790_000_000.0  # cost: the simulated hour's stamps start here (any fixed time)


@dataclass
class Span:
    first: float
    last: float


def true_spans(shown: list[tuple[float, float]]) -> list[Span]:
    """Runs of frames showing >= IN_VIEW of an instance; frames showing a part of it (in between) neither end nor
    start a run, and a run of frames showing none of it does. ``shown``: (t, share in view) per frame."""
    spans, current = [], None
    for t, share in shown:
        if share >= IN_VIEW:
            if current is None:
                current = Span(t, t)
            current.last = t
        elif share == 0.0 and current is not None:
            spans.append(current)
            current = None
    if current is not None:
        spans.append(current)
    return spans


def match(spans: list[Span], visits, slack: float) -> tuple[list, list]:
    """Each true span with the visits overlapping it (within ``slack`` seconds), and the visits matching none."""
    matched, used = [], set()
    for span in spans:
        mine = [v for v in visits if v.first_seen <= span.last + slack and v.last_seen >= span.first - slack]
        used.update(id(v) for v in mine)
        matched.append((span, mine))
    return matched, [v for v in visits if id(v) not in used]


def pan(args) -> int:
    from ego_ros import toy
    from ego_ros.engine import Ego
    from ego_ros.toy.camera import ToyCamera

    camera = ToyCamera(args.instances, seed=args.seed)
    stranger_camera = ToyCamera(1, seed=args.seed + 1000)
    stranger = stranger_camera.names["Rex"]
    work = Path(tempfile.mkdtemp(prefix="ego-sightings-"))
    ego = Ego.load(str(args.model or toy.model_dir()), memory_dir=work / "memory", calibration_dir=work / "calibration")
    for name in camera.names:
        ego.register(name, camera.reference_views(name, args.views))
    ego.register("Stranger", stranger_camera.reference_views("Rex", args.views))
    store = SightingsStore(work / "sightings.db")
    tracker = PresenceTracker(args.threshold, args.threshold, min_on_frames=args.on_frames, min_off_frames=1)
    period = 1.0 / args.rate
    times = np.arange(0.0, args.seconds, period)
    shares: dict[str, list[tuple[float, float]]] = {name: [] for name in camera.names}
    stranger_seen = 0
    record_ms = []
    tally = Tally(camera)  # the events themselves, frame by frame, as ego-ros camera toy --grade grades them
    for t in tqdm(times, desc="frames", unit="frame"):
        frame = camera.frame_at(float(t))
        for name, instance in camera.names.items():
            shares[name].append((float(t), frame.share(instance)))
        stranger_seen += frame.share(stranger) > 0
        found = ego.recognize(frame.image, boxes=True)
        present = tracker.update({n: p for n, (p, _) in found.items()}).present
        tally.add(frame, set(present))
        for name in present:
            score, box = found[name]
            started = time.perf_counter()
            store.record(name, camera="toy", frame_id="toy", stamp=float(t), score=score, box=box,
                         crop=lambda b=box: crop_jpeg(frame.image, b), pose_note="no pose_topic")
            record_ms.append(1000 * (time.perf_counter() - started))
    if stranger_seen:
        print(f"warning: the stranger was in {stranger_seen} frames after all", file=sys.stderr)

    print(f"\n### Sightings of the toy camera's pan, seed {args.seed}: {args.seconds:.0f} s at {args.rate:g} Hz "
          f"(one recognition period {period:g} s), threshold {args.threshold:g}, present after {args.on_frames} "
          f"frame(s) above it, {args.views} reference view(s)\n")
    print("| instance | spans in view | found | first seen, s off (median, max) | last seen, s off (median, max) | "
          "within one period | false visits |")
    print("|---|---|---|---|---|---|---|")
    total = {"spans": 0, "found": 0, "within": 0, "ends": 0, "false": 0}
    for name in camera.names:
        visits = sorted(store.last_seen(name, limit=10_000), key=lambda v: v.first_seen)
        matched, false = match(true_spans(shares[name]), visits, slack=period)
        firsts = [min(v.first_seen for v in mine) - span.first for span, mine in matched if mine]
        lasts = [max(v.last_seen for v in mine) - span.last for span, mine in matched if mine]
        ends = [abs(d) for d in firsts + lasts]
        within = sum(d <= period + 1e-6 for d in ends)
        found = sum(bool(mine) for _, mine in matched)
        print(f"| {name} | {len(matched)} | {found} | {_spread(firsts)} | {_spread(lasts)} | {within}/{len(ends)} | "
              f"{len(false)} |")
        for key, value in (("spans", len(matched)), ("found", found), ("within", within), ("ends", len(ends)),
                           ("false", len(false))):
            total[key] += value
    strangers = store.last_seen("Stranger", limit=10_000)
    print(f"| Stranger (never shown) | 0 | - | - | - | - | {len(strangers)} |")
    print(f"\nfound {total['found']}/{total['spans']} spans; {total['within']}/{total['ends']} first/last seen "
          f"within one period; {total['false']} false visits of shown instances, {len(strangers)} of the stranger")
    print(f"the events frame by frame: macro F1 {100 * tally.macro_f1:.1f}")
    if record_ms:
        print(f"recording: {len(record_ms)} sightings, {np.mean(record_ms):.2f} ms mean, "
              f"{np.percentile(record_ms, 95):.2f} ms p95 each (crop included when it was the visit's best)")
    return 0


def _spread(offsets: list[float]) -> str:
    if not offsets:
        return "-"
    return f"{np.median(offsets):+.1f}, {max(offsets, key=abs):+.1f}"


def cost(args) -> int:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # noise: the crop's worst case for JPEG size
    concepts = ["my mug", "Rex", "Anna", "keys", "backpack", "Milo"]
    cameras = ["/head/image_raw", "/left/image_raw", "/right/image_raw"]
    work = Path(tempfile.mkdtemp(prefix="ego-sightings-cost-"))
    store = SightingsStore(work / "sightings.db")
    # Per camera and concept: when the next visit starts and ends.
    plan = {(c, n): [float(rng.uniform(0, 120)), 0.0] for c in cameras for n in concepts}
    for key, (start, _) in plan.items():
        plan[key][1] = start + rng.uniform(5, 60)
    period, steps = 1.0 / args.rate, int(args.hours * 3600 * args.rate)
    record_ms, crop_ms = [], []
    for step in tqdm(range(steps), desc="simulated seconds", unit="frame", unit_scale=period, mininterval=1.0):
        t = step * period
        for camera in cameras:
            for name in concepts:
                visit = plan[(camera, name)]
                if t > visit[1]:  # this visit is over: the next one after a gap
                    visit[0] = visit[1] + rng.uniform(5, 120)
                    visit[1] = visit[0] + rng.uniform(5, 60)
                if not visit[0] <= t <= visit[1]:
                    continue
                x, y = int(rng.integers(0, 480)), int(rng.integers(0, 320))
                box = (x, y, x + 160, y + 160)

                def crop(b=box):
                    started = time.perf_counter()
                    jpeg = crop_jpeg(frame, b)
                    crop_ms.append(1000 * (time.perf_counter() - started))
                    return jpeg
                started = time.perf_counter()
                store.record(name, camera=camera, frame_id=camera.split("/")[1], stamp=START + t,
                             score=float(rng.uniform(0.5, 1.0)), box=box, crop=crop, pose_note="no pose_topic")
                record_ms.append(1000 * (time.perf_counter() - started))
    visits = store.count()
    store.close()
    size = sum(p.stat().st_size for p in work.glob("sightings.db*"))
    print(f"\n### Recording sightings: {args.hours:g} h of {args.rate:g} Hz recognition on {len(cameras)} cameras, "
          f"{len(concepts)} concepts (simulated)\n")
    print(f"- {len(record_ms)} sightings recorded into {visits} visits")
    print(f"- per sighting: {np.mean(record_ms):.3f} ms mean, {np.percentile(record_ms, 50):.3f} ms median, "
          f"{np.percentile(record_ms, 95):.3f} ms p95, {np.percentile(record_ms, 99):.3f} ms p99")
    print(f"- of which a crop, when the sighting was its visit's best ({len(crop_ms)} times): "
          f"{np.mean(crop_ms):.3f} ms mean")
    print(f"- the database after it: {size / 1e6:.2f} MB (sightings.db and its WAL), {size / max(visits, 1) / 1e3:.1f} "
          "kB per visit")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pan_parser = commands.add_parser("pan", help="visits of the toy camera's pan against its truth")
    pan_parser.add_argument("--model", type=Path, default=None, help="toy model folder (default: the committed one)")
    pan_parser.add_argument("--seed", type=int, default=0)
    pan_parser.add_argument("--instances", type=int, default=3)
    pan_parser.add_argument("--views", type=int, default=3)
    pan_parser.add_argument("--seconds", type=float, default=120.0)
    pan_parser.add_argument("--rate", type=float, default=2.0, help="recognitions per second (the node's default)")
    pan_parser.add_argument("--threshold", type=float, default=0.5, help="as scripts/run.sh runs the node")
    pan_parser.add_argument("--on-frames", type=int, default=1,
                            help="recognitions in a row above the threshold before a concept is present")
    cost_parser = commands.add_parser("cost", help="ms per recorded sighting, database size after an hour")
    cost_parser.add_argument("--hours", type=float, default=1.0)
    cost_parser.add_argument("--rate", type=float, default=2.0)
    args = parser.parse_args(argv)
    return pan(args) if args.command == "pan" else cost(args)


if __name__ == "__main__":
    sys.exit(main())
