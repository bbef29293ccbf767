# SPDX-License-Identifier: Apache-2.0
"""``ego-ros camera`` over real DDS: a real rclpy subscriber in this process, the command as its own process.

The toy source (its frames and their ground truth), a video file and an image folder written here, sources that do
not open, and scripts/run.sh's pairing of the node with the toy camera.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ego_ros.testing.rosgraph import REPO, Client, free_domain, ros_env, wait_for
from ego_ros.toy.camera import ToyCamera
from ego_ros.toy import COLOURS

cv2 = pytest.importorskip("cv2")
Image = pytest.importorskip("sensor_msgs.msg").Image
CompressedImage = pytest.importorskip("sensor_msgs.msg").CompressedImage


def start_camera(domain: int, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ego_ros.cli", "camera", *map(str, args)], cwd=REPO,
                            env=ros_env(domain), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


@pytest.fixture
def client():
    domain = free_domain()
    made = Client(domain, name="camera_test_client")
    made.domain = domain
    yield made
    made.close()


def pixels(msg) -> np.ndarray:
    assert msg.encoding == "rgb8" and msg.is_bigendian == 0 and msg.step == 3 * msg.width
    assert len(msg.data) == msg.step * msg.height
    return np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.width, 3)


def seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# --- the topic ------------------------------------------------------------------------------------------------------


def test_the_camera_publishes_where_the_shipped_config_points_the_node():
    import yaml

    from ego_ros.cli import build_parser
    from ego_ros.ros.camera import DEFAULT_TOPIC

    config = yaml.safe_load((REPO / "config" / "ego.yaml").read_text())
    (node_topic, *_) = config["/**"]["ros__parameters"]["camera_topics"]
    assert build_parser().parse_args(["camera", "toy"]).topic == DEFAULT_TOPIC == node_topic == "camera/image_raw"


# --- the toy world ------------------------------------------------------------------------------------------------


def test_the_toy_camera_publishes_stamped_frames_at_its_rate_its_instances_coming_and_going(client):
    rate, count = 10.0, 75  # 7.5 s of the toy world: Rex in view, panned away, the other shot in view
    raw = client.subscribe(Image, "/camera/image_raw")
    packed = client.subscribe(CompressedImage, "/camera/image_raw/compressed")
    before = time.time()
    status, stderr = finish(start_camera(client.domain, "toy", "--rate", rate, "--count", count, "--compressed",
                                         "--frame-id", "head_camera"))
    assert status == 0, stderr
    assert f"published {count} frames" in stderr and "Traceback" not in stderr
    wait_for(lambda: len(raw) >= count // 2 and len(packed) >= count // 2, 5.0, "the frames to arrive")
    time.sleep(0.5)

    # Headers: this camera's frame_id, stamps of now, increasing at the rate asked for (generous bounds: 2 cores).
    assert {m.header.frame_id for m in raw} == {"head_camera"}
    stamps = [seconds(m.header.stamp) for m in raw]
    assert before - 1 < stamps[0] and stamps[-1] < time.time() + 1
    gaps = np.diff(stamps)
    assert (gaps > 0).all()
    assert 0.7 / rate < float(np.median(gaps)) < 1.5 / rate, gaps
    assert len(raw) >= count // 2, f"only {len(raw)} of {count} frames arrived"

    # Every frame is the toy world's frame of its tick, 224 x 224 rgb8: which one tells its exact ground truth.
    camera = ToyCamera()
    truth = {digest(camera.frame_at(k / rate).image): camera.frame_at(k / rate) for k in range(count)}
    frames = [truth.get(digest(pixels(m))) for m in raw]
    assert all(f is not None for f in frames), "a published frame is not the toy world's"
    assert {(m.width, m.height) for m in raw} == {(224, 224)}
    mine = list(camera.names.values())
    showing = [f for f in frames if any(f.shows(instance) for instance in mine)]
    without = [f for f in frames if not any(s.instance in mine for s in f.visible)]
    assert len(showing) >= 5 and len(without) >= 5, (len(showing), len(without))
    # ... and the ground truth holds in the pixels: where Rex is wholly in view, its box is mostly its colour.
    rex = camera.names["Rex"]
    for frame in showing:
        (seen,) = [s for s in frame.visible if s.instance == rex]
        x0, y0, x1, y1 = seen.box
        patch = frame.image[y0:y1, x0:x1].astype(int)
        near = np.abs(patch - np.array(COLOURS[rex.colour])).sum(axis=-1) < 90
        assert near.mean() > 0.15, near.mean()

    # The compressed twin: same header, a JPEG of the same picture.
    by_stamp = {seconds(m.header.stamp): pixels(m) for m in raw}
    matched = [m for m in packed if seconds(m.header.stamp) in by_stamp]
    assert matched and all("jpeg" in m.format and m.header.frame_id == "head_camera" for m in matched)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(bytes(matched[0].data), np.uint8), cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB)
    original = by_stamp[seconds(matched[0].header.stamp)]
    assert decoded.shape == original.shape and np.abs(decoded.astype(int) - original).mean() < 8


# --- files --------------------------------------------------------------------------------------------------------


def solid(index: int, size=(96, 64)) -> np.ndarray:
    """An RGB frame of its own colour, with its index drawn in."""
    rng = np.random.default_rng(index)
    image = np.zeros((size[1], size[0], 3), np.uint8) + rng.integers(30, 226, 3).astype(np.uint8)
    cv2.putText(image, str(index), (8, 48), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 2)
    return image


def test_an_image_folder_plays_in_name_order_and_over_again(client, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    images = [solid(i) for i in range(5)]
    for i, image in enumerate(images):
        assert cv2.imwrite(str(folder / f"frame_{i:02d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image: ignored")
    received = client.subscribe(Image, "/robot/cam")
    status, stderr = finish(start_camera(client.domain, folder, "--topic", "/robot/cam", "--rate", 20,
                                         "--count", 30))
    assert status == 0, stderr
    wait_for(lambda: len(received) >= 10, 5.0, "the folder's frames")
    time.sleep(0.3)
    order = {digest(image): i for i, image in enumerate(images)}
    indices = [order.get(digest(pixels(m))) for m in received]
    assert None not in indices, "a published frame is none of the folder's images (PNG is lossless)"
    steps = {(b - a) % 5 for a, b in zip(indices, indices[1:])}
    assert steps <= {1, 2}, indices  # in name order (a frame lost on the way at most), around and around
    assert len(set(indices)) == 5
    assert {(m.width, m.height, m.header.frame_id) for m in received} == {(96, 64, "camera")}

    # --once: the folder once, then a clean end.
    status, stderr = finish(start_camera(client.domain, folder, "--once", "--rate", 50))
    assert status == 0 and "published 5 frames" in stderr, stderr


def test_a_video_file_plays_at_its_own_rate(client, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (96, 64))
    assert writer.isOpened()
    frames = [solid(i) for i in range(12)]
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    received = client.subscribe(Image, "/camera/image_raw")
    status, stderr = finish(start_camera(client.domain, video, "--count", 40))
    assert status == 0, stderr
    assert "at 25 Hz" in stderr, stderr  # the file's own rate, as no --rate was given
    wait_for(lambda: len(received) >= 15, 5.0, "the video's frames")
    time.sleep(0.3)
    gaps = np.diff([seconds(m.header.stamp) for m in received])
    assert 0.02 < float(np.median(gaps)) < 0.06, gaps
    # Each frame is the nearest of the written ones (MJPG is lossy), in order and around again.
    colours = np.array([f.reshape(-1, 3).mean(axis=0) for f in frames])
    indices = [int(np.argmin(np.abs(colours - pixels(m).reshape(-1, 3).mean(axis=0)).sum(axis=1))) for m in received]
    assert {(b - a) % 12 for a, b in zip(indices, indices[1:])} <= {1, 2}, indices
    assert len(set(indices)) == 12
    status, stderr = finish(start_camera(client.domain, video, "--once", "--rate", 100))
    assert status == 0 and "published 12 frames" in stderr, stderr


# --- bad input ----------------------------------------------------------------------------------------------------


def test_a_source_that_does_not_open_is_one_error_line_and_nothing_is_published(client, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but no more")
    received = client.subscribe(Image, "/camera/image_raw")
    for source in ("9", "/dev/video9", tmp_path / "missing.mp4", empty, tmp_path / "broken.mp4",
                   tmp_path / "broken.png"):
        status, stderr = finish(start_camera(client.domain, source), timeout=30)
        lines = stderr.strip().splitlines()
        assert status == 1, (source, stderr)
        assert len(lines) == 1 and lines[0].startswith("ego-ros: error: "), (source, stderr)
        assert str(source) in lines[0] or source == "9" and "device 9" in lines[0], lines[0]
    status, stderr = finish(start_camera(client.domain, "toy", "--rate", "0"), timeout=30)
    assert status == 2 and stderr.strip().startswith("ego-ros: error: argument --rate: expected a positive rate")
    assert len(stderr.strip().splitlines()) == 1
    status, stderr = finish(start_camera(client.domain, tmp_path / "broken.png", "--grade", "ego/recognitions"),
                            timeout=30)  # only the toy world knows what its frames show
    assert status == 2 and stderr.strip() == ("ego-ros: error: --grade needs the toy camera (ego-ros camera toy): "
                                              "only the toy world knows what its frames show"), stderr
    assert client.node.count_publishers("/camera/image_raw") == 0
    assert received == []


# --- scripts/run.sh -------------------------------------------------------------------------------------------------


def test_run_sh_without_a_model_serves_the_toy_model_with_the_toy_camera(client, toy_model_dir, tmp_path):
    """scripts/run.sh as a newcomer runs it (no EGO_ROS_MODEL): the node gets the toy camera's frames, knows the
    camera's personal instances, and answers about the live frame; Ctrl-C stops both."""
    env = dict(ros_env(client.domain), EGO_ROS_TOY_MODEL=str(toy_model_dir), EGO_ROS_MEMORY_DIR=str(tmp_path / "mem"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("EGO_ROS_MODEL", None)
    log = open(tmp_path / "run.log", "w")
    started = time.monotonic()
    run = subprocess.Popen(["bash", str(REPO / "scripts" / "run.sh")], cwd=REPO, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from ego_ros.msg import RecognitionEvent

        frames = client.subscribe(Image, "/camera/image_raw")
        events = client.subscribe(RecognitionEvent, "/ego/recognitions")
        wait_for(lambda: events or run.poll() is not None, 240.0, "the node's first recognition event")
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        took = time.monotonic() - started

        def since_subscribed():  # events about frames this client received (not one from before it subscribed)
            return [e for e in events if frames and seconds(e.header.stamp) >= seconds(frames[0].header.stamp)]

        wait_for(lambda: since_subscribed() or run.poll() is not None, 60.0, "an event about a frame seen here")
        ask = subprocess.run([sys.executable, "-m", "ego_ros.cli", "list"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
        assert ask.returncode == 0, ask.stderr
        assert {"Rex", "Anna", "Milo"} <= set(ask.stdout.split()), ask.stdout
        event = since_subscribed()[-1]
        assert event.camera.endswith("camera/image_raw")
        stamps = {seconds(m.header.stamp) for m in frames}
        assert seconds(event.header.stamp) in stamps, "the event is about a frame the camera did not publish"
        print(f"first recognition event {took:.1f} s after run.sh started")
    finally:
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in its terminal
        try:
            run.wait(timeout=60)
        finally:
            log.close()
    with pytest.raises(ProcessLookupError):  # nothing left of run.sh: the node and the camera ended with it
        os.killpg(run.pid, 0)
    said = (tmp_path / "run.log").read_text()
    assert "camera: published" in said  # the camera stopped cleanly
    # ... and printed its tally of the node's events against what their frames showed, the first one among them.
    graded = re.search(r"recognition events against what their frames showed \((\d+) events graded", said)
    assert graded and int(graded.group(1)) >= 1, said[-3000:]
    assert all(re.search(rf"^\| {name} \(.+\) \| \d+/\d+ \| \d+/\d+ \|", said, re.M)
               for name in ("Rex", "Anna", "Milo")), said[-3000:]
    assert "macro F1" in said
