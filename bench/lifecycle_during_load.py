# SPDX-License-Identifier: Apache-2.0
"""How fast the node's lifecycle and parameter services answer while it loads its model, with another process
keeping a core busy: what a lifecycle manager polling ``get_state`` (nav2's waits 1-2 s per call) sees.

The node (the committed toy model, or ``--model``) is configured once, then activated and deactivated ``--loads``
times: every activate loads the model anew. A client polls ``~/get_state`` and ``~/get_parameters`` one after the
other, back to back, from the activate request until its answer; each call's round trip is recorded. Another
process spins on one core meanwhile (``--no-busy``: not). With ``--probe`` the node runs under
``bench/node_probe.py``, and the GIL stalls of its process during the loads are reported too (what a slow call
waited for).

Examples::

    python bench/lifecycle_during_load.py
    python bench/lifecycle_during_load.py --loads 10 --probe
    python bench/lifecycle_during_load.py --model /models/Qwen2.5-VL-7B-Instruct --loads 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUSY = "while True: pass"


def measure(model: str, loads: int, busy: bool, probe: bool) -> dict:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.srv import GetParameters

    from ego_ros.testing.rosgraph import Client, NodeProcess, free_domain

    with tempfile.TemporaryDirectory() as scratch:
        domain = free_domain()
        probe_file = Path(scratch) / "probe.json"
        command = [sys.executable, str(REPO / "bench" / "node_probe.py"), str(probe_file)] if probe else None
        node = NodeProcess(domain, Path(scratch) / "node.log", model=model, memory_dir=f"{scratch}/memory",
                           camera_topics=["/cam/image_raw"], command=command).start()
        client = Client(domain)
        spinner = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        change = lambda t: ChangeState.Request(transition=Transition(id=t))  # noqa: E731
        calls = {"get_state": [], "get_parameters": []}
        load_seconds, windows = [], []
        try:
            assert client.call(ChangeState, "/ego/change_state", change(Transition.TRANSITION_CONFIGURE),
                               wait=60).success
            transitions = client.node.create_client(ChangeState, "/ego/change_state")
            for _ in range(loads):
                started = time.perf_counter()
                activating = transitions.call_async(change(Transition.TRANSITION_ACTIVATE))
                while not activating.done():
                    for service, srv_type, request in (
                            ("get_state", GetState, GetState.Request()),
                            ("get_parameters", GetParameters, GetParameters.Request(names=["model"]))):
                        sent = time.perf_counter()
                        client.call(srv_type, f"/ego/{service}", request, timeout=60)
                        calls[service].append((time.perf_counter() - sent) * 1e3)
                assert activating.result().success, node.output()[-2000:]
                load_seconds.append(time.perf_counter() - started)
                windows.append((started, time.perf_counter()))
                assert client.call(ChangeState, "/ego/change_state",
                                   change(Transition.TRANSITION_DEACTIVATE)).success
        finally:
            if spinner is not None:
                spinner.kill()
            client.close()
            node.stop()
        result = {"loads": load_seconds, "calls": calls}
        if probe:  # written by the node as it exited; its clock is perf_counter too (one machine, one boot)
            stalls = json.loads(probe_file.read_text())["stalls"]
            result["stalls"] = [d * 1e3 for s, d in stalls if any(a <= s <= b for a, b in windows)]
            result["where"] = [(i, round(s - a, 3), round(d * 1e3)) for s, d in stalls
                               for i, (a, b) in enumerate(windows) if a <= s <= b]
        return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the committed toy model)")
    parser.add_argument("--loads", type=int, default=5, help="activations (model loads) measured")
    parser.add_argument("--no-busy", dest="busy", action="store_false", help="no other process on a core")
    parser.add_argument("--probe", action="store_true", help="also the node process's GIL stalls")
    args = parser.parse_args(argv)
    from ego_ros import toy

    model = args.model or str(toy.model_dir())
    result = measure(model, args.loads, args.busy, args.probe)
    loads = np.array(result["loads"])
    print(f"\n### Lifecycle and parameter services during {len(loads)} model loads of {Path(model).name} "
          f"({'another process spinning on a core' if args.busy else 'nothing else running'})\n")
    print(f"activate (load) took {np.median(loads):.2f} s median ({loads.min():.2f}-{loads.max():.2f})\n")
    print("| service | calls | median ms | p99 ms | max ms | calls >= 100 ms |")
    print("|---|---|---|---|---|---|")
    for service, times in result["calls"].items():
        t = np.array(times)
        print(f"| {service} | {len(t)} | {np.median(t):.1f} | {np.percentile(t, 99):.1f} | {t.max():.1f} | "
              f"{int((t >= 100).sum())} |")
    if "stalls" in result:
        stalls = sorted(result["stalls"])
        print("stalls (load, s into it, ms):", result["where"])
        print(f"\nGIL stalls > 15 ms in the node's process during the loads: {len(stalls)}, the longest "
              f"{', '.join(f'{d:.0f}' for d in stalls[-5:])} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
