# SPDX-License-Identifier: Apache-2.0
"""A fleet on one server: N robots asking at once, served by vLLM, against the transformers worker.

Each robot is an engine of its own (what one node is) with the same concepts, asking about its own frames in a
loop. Two ways, in one run, on the trained toy model:

* **transformers**: what one node does today: one engine, one inference thread; the N askers' requests queue
  behind it (a second node would be a second model in memory, each with its own queue);
* **vllm**: N engines (N nodes) with ``generation: vllm``, one vLLM server (``scripts/serve_vllm.sh``, started
  here from ``.venv-vllm``) that batches their requests (continuous batching).

Reported per way: aggregate answers per second, and the latency of an answer (from the request to the full
answer) at the median and the 95th percentile. Then, for one asker, what a frame costs sent as the embeddings the
engine computed (what ``generation: vllm`` does) or as a PNG that the server encodes: request size, time per
answer, and whether the answers are the same. On a CPU the server and the askers share the same cores, so only
the ratio says something; on a GPU the server has the GPU to itself.

    python bench/fleet.py                  # 8 askers, 12 questions each, no concept in context
    python bench/fleet.py --concepts 3     # 3 memories in every prompt (the toy model then answers in a word)
    python bench/fleet.py --askers 16 --questions 6 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ego_ros import toy as toy_world  # noqa: E402
from ego_ros.engine import Ego  # noqa: E402
from ego_ros.engine.images import to_rgb  # noqa: E402
from ego_ros.evaluation import toy  # noqa: E402
from ego_ros.testing import vllm_server as local_vllm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Describe this image."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--askers", type=int, default=8, help="robots asking at once")
    parser.add_argument("--questions", type=int, default=12, help="questions per asker")
    parser.add_argument("--concepts", type=int, default=0, help="concepts in context of every question")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    model = str(toy_world.model_dir())
    data = toy.recognition_set(max(args.concepts, 1), seed=3, views=1, positives=4, look_alikes=0)
    frames = [scene.image for scene in data.tests]
    work = Path(tempfile.mkdtemp(prefix="ego-fleet-"))
    results = {"askers": args.askers, "questions": args.questions, "concepts": args.concepts,
               "max_new_tokens": args.max_new_tokens}

    local = Ego.load(model, memory_dir=work / "memory", memory_layout="image")
    for name, views in list(data.references.items())[: args.concepts]:
        local.register(name, views)
    names = local.store.names()
    results["transformers"] = run_fleet(args, frames, names, one_worker(local, args))
    server = local_vllm.start(model, args.port, work / "server.log")
    try:
        url = f"http://127.0.0.1:{args.port}"
        robots = [Ego.load(model, memory_dir=work / "memory", memory_layout="image", generation="vllm", vllm_url=url)
                  for _ in range(args.askers)]
        results["vllm"] = run_fleet(args, frames, names, lambda robot, frame: robots[robot].ask(
            QUESTION, frame, concepts=names, max_new_tokens=args.max_new_tokens))
        results["frames"] = frame_transport(robots[0], frames, args)
    finally:
        local_vllm.stop(server)
    print(f"\n### {args.askers} askers, {args.questions} questions each, {args.concepts} concepts in context, "
          f"answers of at most {args.max_new_tokens} tokens (toy model, this machine)\n")
    print("| generation | answers/s | latency median | latency p95 | tokens/s |\n|---|---|---|---|---|")
    for way in ("transformers", "vllm"):
        r = results[way]
        print(f"| {way} | {r['answers_per_sec']:.2f} | {r['latency_median']:.3f} s | {r['latency_p95']:.3f} s | "
              f"{r['tokens_per_sec']:.1f} |")
    ratio = results["vllm"]["answers_per_sec"] / results["transformers"]["answers_per_sec"]
    print(f"\nvLLM / transformers: {ratio:.2f}x the answers per second")
    print("\n### A frame sent as the engine's embeddings or as a PNG that vLLM encodes (one asker, "
          f"{len(frames)} frames, {results['frames']['repeats']} rounds; median per answer)\n")
    print("| frame sent as | request size | answer (encode + server) | same answer as the embeddings |"
          "\n|---|---|---|---|")
    for way, r in results["frames"]["ways"].items():
        print(f"| {way} | {r['request_kb']:.0f} kB | {1000 * r['seconds']:.1f} ms | {r['same']}/{len(frames)} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def one_worker(ego: Ego, args):
    """Answers through one inference thread, as a node's worker: requests queue behind each other."""
    jobs: queue.Queue = queue.Queue()

    def serve():
        while (job := jobs.get()) is not None:
            frame, done = job
            done.append(ego.ask(QUESTION, frame, concepts=ego.store.names(), max_new_tokens=args.max_new_tokens))

    threading.Thread(target=serve, daemon=True).start()

    def ask(robot, frame):
        done: list = []
        jobs.put((frame, done))
        while not done:
            time.sleep(0.001)
        return done[0]

    return ask


def frame_transport(ego: Ego, frames, args, repeats: int = 5) -> dict:
    """One question about each frame, the frame sent as the engine's embeddings (encoded here, what
    ``generation: vllm`` does) or as a PNG of the frame as the engine sees it (encoded by the server)."""
    server = ego.server
    ways: dict = {"embeddings": {"seconds": [], "bytes": [], "answers": []},
                  "PNG image": {"seconds": [], "bytes": [], "answers": []}}
    for round_ in range(repeats + 1):  # round 0 warms up, not counted
        for frame in frames:
            rgb = to_rgb(frame, ego.config.max_image_pixels)
            for way, record in ways.items():
                started = time.perf_counter()
                if way == "embeddings":
                    (encoded,) = ego.backend.encode([rgb])
                    content = server._content(encoded)
                else:
                    buffer = io.BytesIO()
                    rgb.save(buffer, format="PNG")
                    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
                    content = {"type": "image_url", "image_url": {"url": url}}
                body = server._body([QUESTION], max_tokens=args.max_new_tokens)
                body["messages"][0]["content"].insert(0, content)
                reply = server._request("POST", "/v1/chat/completions", body)
                if round_:
                    record["seconds"].append(time.perf_counter() - started)
                    record["bytes"].append(len(json.dumps(body)))
                    record["answers"].append(reply["choices"][0]["message"]["content"])
    reference = ways["embeddings"]["answers"]
    return {"repeats": repeats, "ways": {
        way: {"seconds": statistics.median(r["seconds"]), "request_kb": statistics.median(r["bytes"]) / 1024,
              "same": sum(a == b for a, b in zip(r["answers"], reference)) // repeats}
        for way, r in ways.items()}}


def run_fleet(args, frames, names, ask) -> dict:
    latencies, tokens, errors = [], [], []

    def robot(index: int):
        for q in range(args.questions):
            frame = frames[(index + q) % len(frames)]
            started = time.perf_counter()
            try:
                answer = ask(index, frame)
            except Exception as error:  # counted, not hidden
                errors.append(str(error))
                continue
            latencies.append(time.perf_counter() - started)
            tokens.append(answer.new_tokens)

    ask(0, frames[0])  # warm-up, not counted
    started = time.perf_counter()
    threads = [threading.Thread(target=robot, args=(i,)) for i in range(args.askers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {"answers_per_sec": len(latencies) / wall, "tokens_per_sec": sum(tokens) / wall, "seconds": wall,
            "latency_median": statistics.median(latencies), "errors": len(errors),
            "latency_p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


if __name__ == "__main__":
    sys.exit(main())
