# SPDX-License-Identifier: Apache-2.0
"""The ego node with a probe: where a callback's wait goes, written as JSON when the node exits.

Two things are recorded in the node's process:

- GIL stalls: a thread sleeps 2 ms in a loop; waking more than 15 ms late means another thread held the GIL (or
  the CPU was taken) that long. Each stall: (start, seconds).
- Executor handlers: for every callback the executor hands to its thread pool, the entity's name (a service's
  name, or its type), the submission time, how long it waited for a pool thread to start it, how long it ran, and
  how many pool threads were busy when it was submitted.

Used by ``bench/node_costs.py --probe``; run by hand as the node itself::

    python bench/node_probe.py OUT.json --ros-args -p model:=... -p autostart:=true
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STALL_SEC = 0.015


def install(out: Path) -> None:
    stalls, handlers, busy = [], [], [0]

    def watch() -> None:
        while True:
            start = time.perf_counter()
            time.sleep(0.002)
            late = time.perf_counter() - start - 0.002
            if late > STALL_SEC:
                stalls.append((start, late))

    threading.Thread(target=watch, name="gil-probe", daemon=True).start()
    submit = ThreadPoolExecutor.submit

    def recorded_submit(pool, fn, *args, **kwargs):
        # rclpy hands the pool a Task wrapping the coroutine handler(entity, ...): its frame names the entity.
        frame = getattr(getattr(fn, "_handler", None), "cr_frame", None)
        entity = frame.f_locals.get("entity") if frame is not None else None
        name = getattr(entity, "srv_name", None) or type(entity).__name__
        submitted, busy_then = time.perf_counter(), busy[0]

        def run():
            started = time.perf_counter()
            busy[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                busy[0] -= 1
                handlers.append((name, submitted, started - submitted, time.perf_counter() - started, busy_then))

        return submit(pool, run)

    ThreadPoolExecutor.submit = recorded_submit
    atexit.register(lambda: out.write_text(json.dumps({"stalls": stalls, "handlers": handlers})))


def summary(path: Path, service: str = "list_concepts", slow_sec: float = 0.05) -> str:
    """What the ``service`` handlers that waited more than ``slow_sec`` for a thread were waiting for."""
    data = json.loads(path.read_text())
    stalls = data["stalls"]
    mine = [h for h in data["handlers"] if h[0].endswith(service)]
    slow = [h for h in mine if h[2] > slow_sec]

    def covered(submitted: float, waited: float) -> float:
        return sum(max(0.0, min(s + d, submitted + waited) - max(s, submitted)) for s, d in stalls)

    waited = sum(h[2] for h in slow)
    share = sum(covered(h[1], h[2]) for h in slow) / waited if waited else 0.0
    longest = sorted(d for _, d in stalls)[-3:]
    return (f"{service}: {len(slow)} of {len(mine)} handlers waited > {slow_sec * 1e3:.0f} ms for a thread; "
            f"the most pool threads busy when one of them was submitted: {max((h[4] for h in slow), default=0)}; "
            f"GIL stalls > {STALL_SEC * 1e3:.0f} ms cover {share:.0%} of their wait. {len(stalls)} stalls, the "
            f"longest {', '.join(f'{d * 1e3:.0f}' for d in longest)} ms; the longest {service} run "
            f"{max((h[3] for h in mine), default=0) * 1e3:.1f} ms")


if __name__ == "__main__":
    install(Path(sys.argv.pop(1)))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ego_ros.ros.node import main

    sys.exit(main())
