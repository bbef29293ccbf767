# SPDX-License-Identifier: Apache-2.0
"""What the node costs per camera frame, and how fast its executor answers while the model is generating.

1. Per 1280x720 frame: rclpy deserialisation, then the image callback's work (decode, downscale to
   max_image_pixels, insert) for a frame the buffer keeps, and for one decimation drops — for sensor_msgs/Image
   rgb8 and for a JPEG sensor_msgs/CompressedImage; the callback's decode and downscale with OpenCV (the node's)
   and with PIL (its path before OpenCV, kept here as the reference).
2. ``~/list_concepts`` round trips from a client process: with the node idle, while ``~/answer`` is generating a
   long answer on the tiny model (which keeps this machine's CPU busy), and while another process sends bursts of
   requests with large images (``Recognize`` with 7680x4320 rgb8, ``RegisterConcept`` with 8000x6000 rgb8, which
   is refused as too large, and small ``Ask`` calls). Every process uses config/fastdds_large_frames.xml: with
   Fast DDS's default transports such requests do not arrive at all.

Examples::

    python bench/node_costs.py
    python bench/node_costs.py --frames 200 --calls 100
    python bench/node_costs.py --frames-only
    python bench/node_costs.py --list-only --burst-seconds 90
    python bench/node_costs.py --list-only --probe      # and what slow list_concepts calls waited for
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROFILE = REPO / "config" / "fastdds_large_frames.xml"

# Another process: bursts of requests with large images, until the given number of seconds has passed. Each burst
# is sent at once and waited for (every request is answered: served, refused as busy or refused as too large).
BURSTER = """
import sys, time
import numpy as np
from sensor_msgs.msg import Image
from ego_ros.ros.image_msgs import image_to_msg
from ego_ros.ros.node import REQUEST_QOS
from ego_ros.srv import Ask, Recognize, RegisterConcept
from ego_ros.testing.rosgraph import Client, wait_for
domain, seconds = int(sys.argv[1]), float(sys.argv[2])
client = Client(domain, name="burster")
make = lambda srv, name: client.node.create_client(srv, name, qos_profile=REQUEST_QOS)
recognize, register = make(Recognize, "/ego/recognize"), make(RegisterConcept, "/ego/register_concept")
ask = make(Ask, "/ego/ask")
for c in (recognize, register, ask):
    assert c.wait_for_service(timeout_sec=60)
big = image_to_msg(np.full((4320, 7680, 3), 90, np.uint8), Image)  # 100 MB: accepted (MAX_REQUEST_PIXELS)
huge = image_to_msg(np.full((6000, 8000, 3), 90, np.uint8), Image)  # 144 MB: refused as too large, once taken
print("READY", flush=True)
deadline, bursts, answered = time.monotonic() + seconds, 0, 0
while time.monotonic() < deadline:
    futures = [recognize.call_async(Recognize.Request(image=big)) for _ in range(2)]
    futures += [register.call_async(RegisterConcept.Request(name="huge", views=[huge])) for _ in range(2)]
    futures += [ask.call_async(Ask.Request(question="What is here?", camera="/cam/image_raw", max_new_tokens=4))
                for _ in range(4)]
    wait_for(lambda: all(f.done() for f in futures), 300, "the burst's answers")
    bursts, answered = bursts + 1, answered + len(futures)
print("BURSTS", bursts, answered, flush=True)
client.close()
"""


def pil_rgb_from_msg(msg, max_pixels: int):
    """The callback's decode and downscale as they were before OpenCV: PIL's JPEG decoder (draft at a reduced
    scale) and its antialiased bilinear resize (the engine's own ``to_rgb``)."""
    import io
    import math

    from PIL import Image

    from ego_ros.engine.images import to_rgb
    from ego_ros.ros.image_msgs import image_from_msg

    if hasattr(msg, "format"):
        image = Image.open(io.BytesIO(bytes(msg.data)), formats=["JPEG", "PNG"])
        if image.width * image.height > max_pixels:
            scale = math.sqrt(max_pixels / (image.width * image.height))
            image.draft("RGB", (int(image.width * scale), int(image.height * scale)))
        return np.asarray(to_rgb(image, max_pixels))
    return np.asarray(to_rgb(image_from_msg(msg), max_pixels))


def per_frame_costs(frames: int, max_pixels: int) -> list[tuple[str, float, float, float]]:
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from ego_ros.ros.frame_buffer import FrameBuffer
    from ego_ros.ros.image_msgs import compressed_to_msg, image_to_msg, rgb_from_msg

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    image[200:500, 400:900] = (40, 90, 200)  # some structure, so that JPEG is not all noise
    rows = []
    for label, msg in (("Image rgb8", image_to_msg(image, Image)),
                       ("CompressedImage jpeg", compressed_to_msg(image, CompressedImage, quality=90))):
        wire = serialize_message(msg)
        start = time.perf_counter()
        for _ in range(frames):
            received = deserialize_message(wire, type(msg))
        deserialise_ms = (time.perf_counter() - start) / frames * 1e3

        for library, decode in (("OpenCV", rgb_from_msg), ("PIL, before", pil_rgb_from_msg)):
            buffer = FrameBuffer(seconds=10.0, fps=2.0, max_pixels=max_pixels)
            kept_times, dropped_times = [], []
            for i in range(frames):
                stamp = i * 0.5  # one frame per buffer period: every one is kept
                start = time.perf_counter()
                buffer.offer(stamp, lambda: decode(received, max_pixels))
                kept_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                buffer.offer(stamp + 0.01, lambda: decode(received, max_pixels))  # too soon: decimated
                dropped_times.append(time.perf_counter() - start)
            rows.append((f"{label} ({len(wire) / 1e6:.2f} MB on the wire), {library}", deserialise_ms,
                         statistics.median(kept_times) * 1e3, statistics.median(dropped_times) * 1e3))
    return rows


def list_latency(calls: int, burst_seconds: float, probe: bool = False) -> tuple[dict[str, list[float]], str]:
    from ego_ros.action import Answer
    from ego_ros.srv import ListConcepts, RegisterConcept
    from ego_ros.testing.rosgraph import CameraPublisher, Client, NodeProcess, free_domain, ros_env, wait_for
    from ego_ros.testing.tiny_model import build

    with tempfile.TemporaryDirectory() as scratch:
        model = build("qwen2_5_vl", Path(scratch) / "tiny")
        domain = free_domain()
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)  # this process's client, and the node's
        probe_file = Path(scratch) / "probe.json"
        command = [sys.executable, str(REPO / "bench" / "node_probe.py"), str(probe_file)] if probe else None
        node = NodeProcess(domain, Path(scratch) / "node.log", model=str(model), memory_dir=f"{scratch}/memory",
                           camera_topics=["/cam/image_raw"], max_image_pixels=224 * 224, autostart=True,
                           command=command).start()
        client = Client(domain)
        camera = CameraPublisher(client, "/cam/image_raw", 15.0).start()
        try:
            request = ListConcepts.Request()
            client.call(ListConcepts, "/ego/list_concepts", request, wait=120.0)
            wait_for(lambda: client.call(RegisterConcept, "/ego/register_concept",
                                         RegisterConcept.Request(name="mug", camera="/cam/image_raw")).success,
                     30, "a registered concept")

            def timed_calls_for(n: int) -> list[float]:
                times = []
                for _ in range(n):
                    start = time.perf_counter()
                    client.call(ListConcepts, "/ego/list_concepts", request)
                    times.append((time.perf_counter() - start) * 1e3)
                return times

            def timed_calls() -> list[float]:
                return timed_calls_for(calls)

            idle = timed_calls()
            action = client.action_client(Answer, "/ego/answer")
            action.wait_for_server(timeout_sec=30)
            feedback = []
            goal = Answer.Goal(question="Tell a long story.", camera="/cam/image_raw", max_new_tokens=8000)
            sent = action.send_goal_async(goal, feedback_callback=feedback.append)
            handle = wait_for(lambda: sent.result() if sent.done() else None, 30, "goal acceptance")
            wait_for(lambda: feedback, 60, "generation to start")
            during = timed_calls()
            tokens = len(feedback)
            cancel = handle.cancel_goal_async()
            wait_for(cancel.done, 30, "cancel")
            ended = handle.get_result_async()
            wait_for(ended.done, 60, "the cancelled goal's end")

            burster = subprocess.Popen([sys.executable, "-c", BURSTER, str(domain), str(burst_seconds)],
                                       env=ros_env(domain), cwd=REPO, stdout=subprocess.PIPE, text=True)
            try:
                assert burster.stdout.readline().strip() == "READY", "the burster did not start"
                bursting = []
                while burster.poll() is None:
                    bursting += timed_calls_for(1)
                report = burster.stdout.read().split()
            finally:
                if burster.poll() is None:
                    burster.kill()
            label = f"bursts of large-image requests ({report[1]} bursts, {report[2]} requests answered)"
            conditions = {"idle": idle, f"generating an answer ({tokens} tokens streamed meanwhile)": during,
                          label: bursting}
        finally:
            camera.stop()
            client.close()
            node.stop()
        if probe:  # written by the node as it exited
            from node_probe import summary

            return conditions, summary(probe_file)
        return conditions, ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100, help="frames timed per message kind")
    parser.add_argument("--calls", type=int, default=50, help="list_concepts calls timed per condition")
    parser.add_argument("--max-pixels", type=int, default=640 * 480, help="the node's max_image_pixels")
    parser.add_argument("--burst-seconds", type=float, default=60.0, help="how long the large-image bursts last")
    parser.add_argument("--frames-only", action="store_true", help="only the per-frame table")
    parser.add_argument("--list-only", action="store_true", help="only the list_concepts table")
    parser.add_argument("--probe", action="store_true",
                        help="run the node with bench/node_probe.py and say what slow list_concepts calls waited for")
    args = parser.parse_args(argv)

    if not args.list_only:
        frame_table(args)
    if args.frames_only:
        return 0
    conditions, probed = list_latency(args.calls, args.burst_seconds, args.probe)
    print("\n~/list_concepts round trip from another process (ms); back-to-back calls, "
          f"{args.calls} per condition, for {args.burst_seconds:g} s during the bursts\n")
    print("| node | calls | median | p95 | p99 | max |")
    print("|---|---|---|---|---|---|")
    for label, times in conditions.items():
        cut = statistics.quantiles(times, n=100, method="inclusive")
        print(f"| {label} | {len(times)} | {statistics.median(times):.1f} | {cut[94]:.1f} | {cut[98]:.1f} | "
              f"{max(times):.1f} |")
    if probed:
        print(f"\nIn the node (all conditions): {probed}")
    return 0


def frame_table(args) -> None:
    print(f"\nPer 1280x720 frame (median over {args.frames}; max_image_pixels {args.max_pixels}; buffer_fps 2)\n")
    print("| message | deserialise ms | callback, frame kept ms | callback, frame decimated ms |")
    print("|---|---|---|---|")
    for label, deserialise, kept, dropped in per_frame_costs(args.frames, args.max_pixels):
        print(f"| {label} | {deserialise:.2f} | {kept:.2f} | {dropped:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
