# SPDX-License-Identifier: Apache-2.0
"""Tests of the node's pure helpers (no ROS graph): frame buffer, inference worker, presence hysteresis, image messages.

Messages are ``types.SimpleNamespace`` stand-ins carrying the fields of sensor_msgs/Image and CompressedImage: the
conversions only read those fields. Pixel bytes are built by hand here, never with the module under test.
"""

from __future__ import annotations

import array
import io
import math
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ego_ros.engine.images import InvalidImage
from ego_ros.ros import image_msgs
from ego_ros.ros.frame_buffer import FrameBuffer
from ego_ros.ros.hysteresis import PresenceTracker
from ego_ros.ros.image_msgs import (
    compressed_from_msg,
    compressed_to_msg,
    image_from_msg,
    image_to_msg,
    is_compressed_topic,
    rgb_from_msg,
)
from ego_ros.ros.worker import InferenceWorker, Priority, WorkerStopped

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """Wall clock for the buffer's rate statistics, moved by hand in step with the stamps."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed(buffer: FrameBuffer, clock: FakeClock, hz: float, seconds: float, start: float = 0.0, shape=(48, 64)):
    """Offer frames at `hz` for `seconds`; return (accepted stamps, number of decoder calls)."""
    calls = []
    accepted = []
    for i in range(round(hz * seconds)):
        stamp = start + i / hz
        clock.now = 1000.0 + stamp
        value = i % 256

        def decode(value=value):
            calls.append(value)
            return np.full(shape + (3,), value, dtype=np.uint8)

        if buffer.offer(stamp, decode):
            accepted.append(stamp)
    return accepted, len(calls)


# ---------------------------------------------------------------------------------------------------------------
# FrameBuffer
# ---------------------------------------------------------------------------------------------------------------


def test_15hz_input_lands_at_2fps_and_refused_frames_are_never_decoded():
    clock = FakeClock()
    buffer = FrameBuffer(seconds=30, fps=2, max_pixels=64 * 48, clock=clock)
    accepted, decoded = feed(buffer, clock, hz=15, seconds=10)
    assert len(accepted) == 20  # exactly buffer_fps on average, not every 8th frame (1.875 fps)
    assert decoded == len(accepted)  # the 130 refused frames cost no decode
    gaps = np.diff(accepted)
    assert gaps.min() > 0.4 and gaps.max() < 0.6
    stats = buffer.stats()
    assert stats["frames"] == 20
    assert stats["input_rate_hz"] == pytest.approx(15, rel=0.05)
    assert stats["accepted_rate_hz"] == pytest.approx(2, rel=0.2)


def test_decimation_holds_the_rate_under_stamp_jitter():
    clock = FakeClock()
    buffer = FrameBuffer(seconds=60, fps=2, max_pixels=100, clock=clock)
    rng = np.random.default_rng(0)
    stamps = np.arange(600) / 30 + rng.uniform(-0.004, 0.004, 600)  # 30 Hz camera, +-4 ms jitter, 20 s
    accepted = sum(buffer.offer(float(s), np.zeros((4, 4, 3), np.uint8)) for s in stamps)
    assert abs(accepted - 40) <= 1


def test_input_rate_decays_to_zero_when_the_camera_stops():
    clock = FakeClock()
    buffer = FrameBuffer(seconds=5, fps=2, max_pixels=100, clock=clock)
    feed(buffer, clock, hz=15, seconds=3, shape=(4, 4))
    assert buffer.stats()["input_rate_hz"] == pytest.approx(15, rel=0.05)
    clock.now += 1.0
    assert 0 < buffer.stats()["input_rate_hz"] < 10  # no frozen last value
    clock.now += 5.0
    assert buffer.stats()["input_rate_hz"] == 0.0
    assert buffer.stats()["frames"] > 0  # frames are kept (aged by stamps, not the wall clock)


def test_memory_is_bounded_by_count_bytes_and_time():
    clock = FakeClock()
    max_pixels = 320 * 240
    buffer = FrameBuffer(seconds=3, fps=5, max_pixels=max_pixels, clock=clock)
    assert buffer.capacity == 16
    accepted, _ = feed(buffer, clock, hz=30, seconds=10, shape=(720, 1280))
    assert len(accepted) == 50
    stats = buffer.stats()
    assert stats["frames"] <= buffer.capacity
    assert stats["capacity_bytes"] == 16 * max_pixels * 3
    assert 0 < stats["bytes"] <= stats["capacity_bytes"]
    assert stats["span_sec"] <= 3.0 + 1e-9
    frame = buffer.latest()
    assert frame.image.dtype == np.uint8 and frame.image.ndim == 3 and frame.image.shape[2] == 3
    assert frame.image.shape[0] * frame.image.shape[1] <= max_pixels  # downscaled on arrival
    assert frame.image.shape[1] / frame.image.shape[0] == pytest.approx(1280 / 720, rel=0.02)
    assert not frame.image.flags.writeable  # shared with readers on other threads
    # A forward gap in time ages everything else out.
    clock.now += 100
    assert buffer.offer(100.0, np.zeros((8, 8, 3), np.uint8))
    assert [f.stamp_sec for f in buffer.window(1000, 1000)] == [100.0]


def test_small_frames_are_stored_unchanged_and_headers_kept():
    buffer = FrameBuffer(seconds=1, fps=10, max_pixels=10_000)
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    header = SimpleNamespace(frame_id="cam", stamp=SimpleNamespace(sec=5, nanosec=0))
    assert buffer.offer(5.0, image, header=header)
    frame = buffer.latest()
    np.testing.assert_array_equal(frame.image, image)
    assert frame.header is header and frame.stamp_sec == 5.0
    assert not np.shares_memory(frame.image, image)  # the caller's buffer may be reused


def test_window_is_oldest_first_thinned_evenly_and_ends_at_the_newest():
    buffer = FrameBuffer(seconds=10, fps=10, max_pixels=100)
    for i in range(50):  # 0.0 .. 4.9 s, all accepted at 10 Hz into 10 fps
        assert buffer.offer(i / 10, np.full((4, 4, 3), i, np.uint8))
    stamps = lambda frames: [round(f.stamp_sec, 3) for f in frames]  # noqa: E731
    assert stamps(buffer.window(2.0, 100)) == [round(2.9 + i / 10, 3) for i in range(21)]
    assert stamps(buffer.window(2.0, 5)) == [2.9, 3.4, 3.9, 4.4, 4.9]
    assert stamps(buffer.window(2.0, 2)) == [2.9, 4.9]
    assert stamps(buffer.window(2.0, 1)) == [4.9]
    assert stamps(buffer.window(0.0, 3)) == [4.9]
    thinned = stamps(buffer.window(100.0, 7))
    assert len(thinned) == 7 and thinned[0] == 0.0 and thinned[-1] == 4.9 and thinned == sorted(thinned)
    # images travel with their stamps
    assert [int(f.image[0, 0, 0]) for f in buffer.window(0.3, 10)] == [46, 47, 48, 49]


def test_sample_spreads_views_over_the_window():
    buffer = FrameBuffer(seconds=10, fps=10, max_pixels=100)
    for i in range(50):
        buffer.offer(i / 10, np.zeros((4, 4, 3), np.uint8))
    views = buffer.sample(4, window_sec=3.0)
    assert [round(f.stamp_sec, 3) for f in views] == [1.9, 2.9, 3.9, 4.9]
    assert len(buffer.sample(100, window_sec=1.0)) == 11  # fewer frames than asked: all of them
    with pytest.raises(ValueError, match="n must be"):
        buffer.sample(0, 1.0)
    with pytest.raises(ValueError, match="max_frames"):
        buffer.window(1.0, 0)
    with pytest.raises(ValueError, match="seconds"):
        buffer.window(-1.0, 3)


def test_empty_buffer_reads():
    buffer = FrameBuffer(seconds=2, fps=2, max_pixels=100)
    assert buffer.latest() is None and buffer.window(2, 4) == [] and buffer.sample(3, 2) == []
    stats = buffer.stats()
    assert stats["frames"] == 0 and stats["bytes"] == 0 and stats["span_sec"] == 0.0
    assert stats["input_rate_hz"] == 0.0


def test_old_and_out_of_order_stamps_are_refused():
    buffer = FrameBuffer(seconds=5, fps=2, max_pixels=100)
    assert buffer.offer(10.0, np.zeros((2, 2, 3), np.uint8))
    never = lambda: pytest.fail("decoded a refused frame")  # noqa: E731
    assert not buffer.offer(10.0, never)  # duplicate
    assert not buffer.offer(9.5, never)  # late message, less than a second old
    assert not buffer.offer(float("nan"), never)
    assert [f.stamp_sec for f in buffer.window(100, 100)] == [10.0]


def test_a_jump_back_in_time_clears_the_buffer():
    jumps = []
    buffer = FrameBuffer(seconds=5, fps=2, max_pixels=100,
                         on_jump_back=lambda back, dropped: jumps.append((back, dropped)))
    for i in range(10):
        buffer.offer(100 + i * 0.5, np.zeros((2, 2, 3), np.uint8))
    assert buffer.stats()["frames"] == 10
    assert not buffer.offer(104.0, np.ones((2, 2, 3), np.uint8)) and jumps == []  # a late frame is not a jump
    assert buffer.offer(3.0, np.ones((2, 2, 3), np.uint8))  # bag loop / simulator reset
    assert jumps == [(pytest.approx(101.5), 10)]  # said once, with what the frames from "the future" were
    assert [f.stamp_sec for f in buffer.window(100, 100)] == [3.0]
    assert not buffer.offer(3.2, np.zeros((2, 2, 3), np.uint8))  # the schedule restarted from 3.0
    assert buffer.offer(3.5, np.zeros((2, 2, 3), np.uint8))
    buffer.clear()
    assert buffer.latest() is None
    assert buffer.offer(3.6, np.zeros((2, 2, 3), np.uint8))  # clear() resets the schedule too


def test_a_failing_decoder_does_not_use_up_the_slot():
    buffer = FrameBuffer(seconds=5, fps=2, max_pixels=100)

    def broken():
        raise InvalidImage("bad frame")

    with pytest.raises(InvalidImage, match="bad frame"):
        buffer.offer(1.0, broken)
    assert buffer.latest() is None
    assert buffer.offer(1.01, np.zeros((2, 2, 3), np.uint8))  # not refused as "too soon after 1.0"


def test_readers_are_not_blocked_by_a_decode_and_a_clear_during_decode_drops_the_frame():
    buffer = FrameBuffer(seconds=5, fps=2, max_pixels=100)
    buffer.offer(0.0, np.zeros((2, 2, 3), np.uint8))
    inside, release = threading.Event(), threading.Event()

    def slow_decode():
        inside.set()
        release.wait(5)
        return np.ones((2, 2, 3), np.uint8)

    result = []
    writer = threading.Thread(target=lambda: result.append(buffer.offer(1.0, slow_decode)))
    writer.start()
    assert inside.wait(5)
    start = time.perf_counter()
    assert buffer.latest().stamp_sec == 0.0 and buffer.stats()["frames"] == 1
    assert time.perf_counter() - start < 0.5  # the lock is not held while decoding
    buffer.clear()
    release.set()
    writer.join(5)
    assert result == [False] and buffer.latest() is None


def test_concurrent_insert_and_read():
    buffer = FrameBuffer(seconds=1, fps=50, max_pixels=16 * 16)
    done = threading.Event()
    errors = []

    def produce():
        try:
            for i in range(3000):
                buffer.offer(i * 0.01, lambda i=i: np.full((16, 16, 3), i % 256, np.uint8))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            done.set()

    def consume():
        reads = 0
        try:
            while not done.is_set() or reads < 10:
                frames = buffer.window(1.0, 8)
                stamps = [f.stamp_sec for f in frames]
                assert stamps == sorted(stamps) and len(stamps) <= 8
                stats = buffer.stats()
                assert stats["frames"] <= buffer.capacity and stats["bytes"] <= stats["capacity_bytes"]
                latest = buffer.latest()
                assert latest is None or latest.image.shape == (16, 16, 3)
                reads += 1
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert buffer.latest().stamp_sec == pytest.approx(29.98)
    assert buffer.stats()["frames"] == 51  # 1 s at 50 fps, both ends included: the capacity


@pytest.mark.parametrize("kwargs, field", [
    (dict(seconds=0, fps=2, max_pixels=10), "seconds"),
    (dict(seconds=2, fps=-1, max_pixels=10), "fps"),
    (dict(seconds=2, fps=float("inf"), max_pixels=10), "fps"),
    (dict(seconds=2, fps=2, max_pixels=0), "max_pixels"),
    (dict(seconds=2, fps=2, max_pixels=10.5), "max_pixels"),
])
def test_frame_buffer_validates_its_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FrameBuffer(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# InferenceWorker
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def worker():
    worker = InferenceWorker()
    yield worker
    worker.stop(timeout=5)


def block(worker: InferenceWorker):
    """Occupy the worker until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def gate():
        started.set()
        release.wait(10)

    worker.submit(gate, label="gate")
    assert started.wait(5)
    return release


def test_user_jobs_run_before_periodic_ones_fifo_within_each(worker):
    order = []
    release = block(worker)
    futures = [
        worker.submit(lambda: order.append("p1"), priority=Priority.PERIODIC),
        worker.submit_periodic("cam_a", lambda: order.append("p2")),
        worker.submit(lambda: order.append("u1"), priority=Priority.USER),
        worker.submit_periodic("cam_b", lambda: order.append("p3")),
        worker.submit(lambda: order.append("u2")),  # USER is the default
    ]
    assert worker.queue_length() == 5 and worker.busy
    release.set()
    for future in futures:
        future.result(5)
    assert order == ["u1", "u2", "p1", "p2", "p3"]


def test_periodic_jobs_coalesce_per_key(worker):
    ran = []
    release = block(worker)
    stale = worker.submit_periodic("cam_a", lambda: ran.append("a1"))
    other = worker.submit_periodic("cam_b", lambda: ran.append("b1"))
    fresh = worker.submit_periodic("cam_a", lambda: ran.append("a2"))
    assert stale.cancelled()  # replaced before it ran: no backlog of stale frames
    assert worker.queue_length() == 2
    release.set()
    assert fresh.result(5) is None and other.result(5) is None
    assert ran == ["a2", "b1"]  # the replacement keeps cam_a's place in line


def test_a_failing_job_sets_its_future_and_the_worker_survives(worker):
    def boom():
        raise RuntimeError("model exploded")

    failed = worker.submit(boom, label="boom")
    with pytest.raises(RuntimeError, match="model exploded"):
        failed.result(5)
    assert worker.last_job == "boom"
    assert worker.submit(lambda: 42).result(5) == 42
    assert worker.alive


def test_jobs_run_on_one_thread_and_report_latency(worker):
    threads = {worker.submit(threading.get_ident).result(5) for _ in range(5)}
    assert len(threads) == 1 and threading.get_ident() not in threads
    worker.submit(lambda: time.sleep(0.05), label="sleepy").result(5)
    assert worker.last_job == "sleepy" and worker.last_latency_sec >= 0.04
    assert not worker.busy and worker.queue_length() == 0


def test_a_job_cancelled_by_its_caller_never_runs(worker):
    ran = []
    release = block(worker)
    future = worker.submit(lambda: ran.append("x"))
    assert future.cancel()
    assert worker.queue_length() == 0
    release.set()
    worker.submit(lambda: None).result(5)
    assert ran == []


def test_stop_cancels_pending_jobs_and_refuses_new_ones():
    worker = InferenceWorker()
    release = block(worker)
    pending = [worker.submit(lambda: None), worker.submit_periodic("cam", lambda: None)]
    assert worker.stop(timeout=0.1) is False  # the running job is let finish
    assert all(f.cancelled() for f in pending)
    with pytest.raises(WorkerStopped):
        worker.submit(lambda: None)
    release.set()
    assert worker.stop(timeout=5) is True and not worker.alive


def test_stop_with_drain_runs_pending_jobs_first():
    worker = InferenceWorker()
    release = block(worker)
    futures = [worker.submit(lambda i=i: i) for i in range(3)]
    release.set()
    assert worker.stop(timeout=5, drain=True)
    assert [f.result(0) for f in futures] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# PresenceTracker
# ---------------------------------------------------------------------------------------------------------------


def run(tracker: PresenceTracker, sequence: list[dict]) -> list[tuple[list, list]]:
    return [tracker.update(scores)[1:] for scores in sequence]


def test_a_flickering_score_gives_one_appear_and_one_disappear():
    tracker = PresenceTracker(on_threshold=0.5)  # off = 0.4, two low frames to disappear
    scores = [0.1, 0.55, 0.45, 0.56, 0.44, 0.58, 0.49, 0.51, 0.3, 0.2, 0.1]
    events = run(tracker, [{"mug": s} for s in scores])
    appeared = [i for i, (a, _) in enumerate(events) if a]
    disappeared = [i for i, (_, d) in enumerate(events) if d]
    assert appeared == [1] and disappeared == [9]


def test_single_low_frames_do_not_make_a_concept_disappear():
    tracker = PresenceTracker(on_threshold=0.5, min_off_frames=2)
    events = run(tracker, [{"rex": s} for s in [0.9, 0.1, 0.9, 0.1, 0.9, 0.1]])
    assert sum(len(a) for a, _ in events) == 1 and sum(len(d) for _, d in events) == 0


def test_min_on_frames_needs_consecutive_high_scores():
    tracker = PresenceTracker(on_threshold=0.6, min_on_frames=3)
    events = run(tracker, [{"cup": s} for s in [0.7, 0.7, 0.2, 0.7, 0.7, 0.7, 0.7]])
    assert [bool(a) for a, _ in events] == [False, False, False, False, False, True, False]


def test_present_scores_concepts_independent_and_forgetting_disappears():
    tracker = PresenceTracker(on_threshold=0.5, off_threshold=0.3, min_off_frames=1)
    present, appeared, disappeared = tracker.update({"mug": 0.9, "rex": 0.2})
    assert present == {"mug": 0.9} and appeared == ["mug"] and disappeared == []
    present, appeared, disappeared = tracker.update({"mug": 0.35, "rex": 0.8})
    assert present == {"mug": 0.35, "rex": 0.8} and appeared == ["rex"] and disappeared == []
    present, appeared, disappeared = tracker.update({"rex": 0.8})  # "mug" was forgotten
    assert present == {"rex": 0.8} and appeared == [] and disappeared == ["mug"]
    assert tracker.present == ["rex"]
    _, _, disappeared = tracker.update({"rex": float("nan")})  # NaN counts as not seen
    assert disappeared == ["rex"]
    tracker.update({"mug": 0.9})
    tracker.reset()
    assert tracker.update({"mug": 0.9}).appeared == ["mug"]


def test_default_off_threshold_is_clamped_at_zero():
    assert PresenceTracker(0.5).off_threshold == pytest.approx(0.4)
    assert PresenceTracker(0.05).off_threshold == 0.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(on_threshold=1.5), "on_threshold"),
    (dict(on_threshold=float("nan")), "on_threshold"),
    (dict(on_threshold=0.5, off_threshold=0.6), "off_threshold"),
    (dict(on_threshold=0.5, off_threshold=-0.1), "off_threshold"),
    (dict(on_threshold=0.5, min_on_frames=0), "min_on_frames"),
    (dict(on_threshold=0.5, min_off_frames=1.5), "min_off_frames"),
])
def test_presence_tracker_validates_its_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PresenceTracker(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# sensor_msgs/Image <-> RGB
# ---------------------------------------------------------------------------------------------------------------

# A 2x4 pattern of distinct colours (primaries, white, black, greys) to check channel order pixel by pixel.
RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
                [[0, 0, 0], [10, 20, 30], [200, 100, 50], [1, 2, 3]]], dtype=np.uint8)
GRAY = np.array([[0, 17, 128, 255], [1, 2, 3, 254]], dtype=np.uint8)
GRAY16 = np.array([[0x0000, 0x12FF, 0x8001, 0xFFFF], [0x0100, 0x7F00, 0xABCD, 0x00FF]], dtype=np.uint16)


def msg(encoding, height, width, data, step=None, is_bigendian=0, bpp=3):
    return SimpleNamespace(encoding=encoding, height=height, width=width, is_bigendian=is_bigendian,
                           step=width * bpp if step is None else step, data=data)


def with_alpha(pixels):
    return np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 77, np.uint8)], axis=2)


# encoding -> (raw bytes, bytes per pixel, expected RGB)
CASES = {
    "rgb8": (RGB.tobytes(), 3, RGB),
    "bgr8": (RGB[..., ::-1].tobytes(), 3, RGB),
    "8UC3": (RGB[..., ::-1].tobytes(), 3, RGB),
    "rgba8": (with_alpha(RGB).tobytes(), 4, RGB),
    "bgra8": (with_alpha(RGB[..., ::-1]).tobytes(), 4, RGB),
    "mono8": (GRAY.tobytes(), 1, np.repeat(GRAY[..., None], 3, axis=2)),
    "8UC1": (GRAY.tobytes(), 1, np.repeat(GRAY[..., None], 3, axis=2)),
    "mono16": (GRAY16.astype("<u2").tobytes(), 2, np.repeat((GRAY16 >> 8).astype(np.uint8)[..., None], 3, axis=2)),
    "16UC1": (GRAY16.astype("<u2").tobytes(), 2, np.repeat((GRAY16 >> 8).astype(np.uint8)[..., None], 3, axis=2)),
}


@pytest.mark.parametrize("encoding", list(CASES))
def test_each_encoding_converts_to_the_right_rgb(encoding):
    data, bpp, expected = CASES[encoding]
    out = image_from_msg(msg(encoding, 2, 4, data, bpp=bpp))
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


# BT.601 limited range (what OpenCV/cv_bridge use): (Y, U, V) -> RGB of reference colours.
YUV_PIXELS = [((235, 128, 128), (255, 255, 255)), ((16, 128, 128), (0, 0, 0)), ((81, 90, 240), (255, 0, 0)),
              ((145, 54, 34), (0, 255, 0)), ((41, 240, 110), (0, 0, 255)), ((126, 128, 128), (128, 128, 128))]


@pytest.mark.parametrize("encoding, order", [("yuv422", "UYVY"), ("uyvy", "UYVY"), ("yuv422_yuy2", "YUYV"),
                                             ("yuyv", "YUYV")])
def test_yuv422_encodings(encoding, order):
    data = bytearray()
    expected = []
    for (y, u, v), rgb in YUV_PIXELS:  # each colour as a pair of equal pixels (they share U and V)
        sample = {"Y": y, "U": u, "V": v}
        data += bytes(sample[c] for c in order)
        expected += [rgb, rgb]
    out = image_from_msg(msg(encoding, 1, 2 * len(YUV_PIXELS), bytes(data), bpp=2))
    assert out.shape == (1, 12, 3)
    np.testing.assert_allclose(out[0].astype(int), np.array(expected), atol=3)


def test_yuv_pixels_in_a_pair_keep_their_own_luma():
    # UYVY: one chroma pair, two lumas (dark, bright grey)
    out = image_from_msg(msg("yuv422", 1, 2, bytes([128, 16, 128, 235]), bpp=2))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [255, 255, 255]])


@pytest.mark.parametrize("wrap", [bytes, bytearray, lambda b: array.array("B", b), memoryview, list,
                                  lambda b: np.frombuffer(b, np.uint8)],
                         ids=["bytes", "bytearray", "array", "memoryview", "list", "ndarray"])
def test_every_kind_of_data_container(wrap):
    out = image_from_msg(msg("bgr8", 2, 4, wrap(RGB[..., ::-1].tobytes())))
    np.testing.assert_array_equal(out, RGB)


def test_decoding_is_zero_copy_and_read_only():
    data = array.array("B", RGB.tobytes())  # what rclpy hands out
    out = image_from_msg(msg("rgb8", 2, 4, data))
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))
    assert not out.flags.writeable


def test_row_padding_in_step_is_skipped():
    padded = b"".join(row.tobytes() + b"\xee" * 5 for row in RGB)  # 12 pixel bytes + 5 padding per row
    np.testing.assert_array_equal(image_from_msg(msg("rgb8", 2, 4, padded, step=17)), RGB)
    padded16 = b"".join(row.astype("<u2").tobytes() + b"\xee" * 3 for row in GRAY16)
    out = image_from_msg(msg("mono16", 2, 4, padded16, step=11, bpp=2))  # odd step: rows not 2-byte aligned
    np.testing.assert_array_equal(out[..., 0], GRAY16 >> 8)


def test_big_endian_mono16():
    big = GRAY16.astype(">u2").tobytes()
    np.testing.assert_array_equal(image_from_msg(msg("mono16", 2, 4, big, is_bigendian=1, bpp=2))[..., 1],
                                  GRAY16 >> 8)
    # the same bytes read as little-endian give the low bytes: the flag is honoured, not ignored
    np.testing.assert_array_equal(image_from_msg(msg("mono16", 2, 4, big, is_bigendian=0, bpp=2))[..., 1],
                                  GRAY16 & 0xFF)


@pytest.mark.parametrize("bad, message", [
    (dict(encoding="bayer_rggb8"), r"unsupported image encoding 'bayer_rggb8'; supported: rgb8, bgr8.*yuv422"),
    (dict(encoding="32FC1"), "supported: "),
    (dict(height=0, data=b""), r"empty image \(4x0\)"),
    (dict(width=0, step=0, data=b""), r"empty image \(0x2\)"),
    (dict(step=11), r"step 11 is smaller than width 4 x 3 bytes per pixel \(rgb8\) = 12"),
    (dict(data=RGB.tobytes()[:-1]), r"image data has 23 bytes, but step x height = 24 bytes were expected"),
    (dict(data=RGB.tobytes() + b"x"), r"has 25 bytes, but step x height = 24"),
    (dict(height=-1), "height must be a non-negative integer"),
    (dict(width=None), "width must be a non-negative integer"),
    (dict(step=12.0), "step must be a non-negative integer"),
    (dict(data="not bytes"), "image data must be bytes"),
    (dict(data=[300] * 24), "not a sequence of bytes"),
    (dict(encoding="yuv422", width=3, step=6, height=1, data=b"\0" * 6), "width must be even, got 3"),
])
def test_malformed_images_raise_a_clear_error(bad, message):
    fields = dict(encoding="rgb8", height=2, width=4, is_bigendian=0, step=12, data=RGB.tobytes())
    fields.update(bad)
    with pytest.raises(InvalidImage, match=message):
        image_from_msg(SimpleNamespace(**fields))


@pytest.mark.parametrize("height, width, step, message", [
    (100_000, 100_000, 300_000, "claims 100000x100000 = 10000000000 pixels"),
    (4000, 4000, 12_000, "has 10 bytes, but step x height = 48000000"),  # a plausible size, lying about data
    (2, 4, 10**12, r"has 10 bytes, but step x height = 2000000000000"),  # absurd step
])
def test_absurd_claims_fail_fast_without_allocating(height, width, step, message):
    claim = msg("rgb8", height, width, b"0123456789", step=step)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidImage, match=message):
            image_from_msg(claim)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 0.5
    assert peak < 1_000_000


def test_image_to_msg_fields_and_round_trip():
    header = SimpleNamespace(frame_id="camera")
    built = image_to_msg(RGB, SimpleNamespace, header=header)
    assert (built.height, built.width, built.encoding, built.step, built.is_bigendian) == (2, 4, "rgb8", 12, 0)
    assert built.header is header
    assert isinstance(built.data, array.array) and built.data.typecode == "B"
    assert bytes(built.data) == RGB.tobytes()
    bgr = image_to_msg(RGB, SimpleNamespace, encoding="bgr8")
    assert bytes(bgr.data) == RGB[..., ::-1].tobytes()
    np.testing.assert_array_equal(image_from_msg(bgr), RGB)
    mono = image_to_msg(GRAY, SimpleNamespace, encoding="mono8")
    assert mono.step == 4 and bytes(mono.data) == GRAY.tobytes()
    assert not hasattr(image_to_msg(RGB, SimpleNamespace), "header")


@pytest.mark.parametrize("array_, encoding, message", [
    (RGB.astype(np.float32), "rgb8", "needs uint8"),
    (GRAY, "rgb8", r"needs an \(H, W, 3\)"),
    (RGB, "mono8", r"needs an \(H, W\) array"),
    (RGB, "yuv422", "builds rgb8, bgr8 or mono8"),
])
def test_image_to_msg_refuses_what_it_cannot_build(array_, encoding, message):
    with pytest.raises(InvalidImage, match=message):
        image_to_msg(array_, SimpleNamespace, encoding=encoding)


# ---------------------------------------------------------------------------------------------------------------
# sensor_msgs/CompressedImage -> RGB
# ---------------------------------------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def smooth_image(height=120, width=160) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], axis=2).astype(np.uint8)


def test_png_decodes_exactly_and_any_png_mode_becomes_rgb():
    png = SimpleNamespace(format="png", data=array.array("B", encoded(Image.fromarray(RGB), "PNG")))
    np.testing.assert_array_equal(compressed_from_msg(png), RGB)
    gray = SimpleNamespace(format="png", data=encoded(Image.fromarray(GRAY), "PNG"))
    np.testing.assert_array_equal(compressed_from_msg(gray), np.repeat(GRAY[..., None], 3, axis=2))
    rgba = SimpleNamespace(format="png", data=encoded(Image.fromarray(with_alpha(RGB)), "PNG"))
    assert compressed_from_msg(rgba).shape == (2, 4, 3)


def test_jpeg_decodes_close_to_the_original_and_downscales():
    image = smooth_image()
    jpeg = compressed_to_msg(image, SimpleNamespace, fmt="jpeg", quality=95)
    assert jpeg.format == "jpeg" and isinstance(jpeg.data, array.array)
    out = compressed_from_msg(jpeg)
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).mean() < 3
    small = compressed_from_msg(jpeg, max_pixels=4000)
    assert small.shape[0] * small.shape[1] <= 4000 and small.shape[1] > small.shape[0]


def test_jpeg_draft_decodes_an_oversized_jpeg_at_reduced_scale():
    jpeg = SimpleNamespace(format="jpeg", data=encoded(Image.fromarray(smooth_image(1500, 2000)), "JPEG"))
    with pytest.raises(InvalidImage, match="claims 2000x1500 pixels, more than the 1000000 accepted"):
        compressed_from_msg(jpeg, limit_pixels=1_000_000)
    out = compressed_from_msg(jpeg, max_pixels=200_000, limit_pixels=1_000_000)  # draft: 1/2 scale, then resize
    assert out.shape[0] * out.shape[1] <= 200_000


def test_a_frame_is_shrunk_to_the_size_and_look_of_the_engines_own_downscale():
    from ego_ros.engine.images import to_rgb

    image = smooth_image(720, 1280)
    engine = np.asarray(to_rgb(image, 640 * 480))
    shrunk = image_msgs.shrink(image, 640 * 480)
    assert shrunk.shape == engine.shape and 640 * 480 - 739 < shrunk.shape[0] * shrunk.shape[1] <= 640 * 480
    assert np.abs(shrunk.astype(int) - engine).mean() < 2  # area averaging vs PIL's antialiased bilinear
    assert image_msgs.shrink(image, 2_000_000) is image  # never enlarged, never copied when small enough


def test_a_big_jpeg_is_decoded_at_the_reduced_scale_that_still_gives_the_pixels_wanted():
    image = smooth_image(1440, 2560)
    jpeg = compressed_to_msg(image, SimpleNamespace, fmt="jpeg", quality=95)
    # 1/4 scale (640x360 = 230400 px) still covers 200000 px, 1/8 would not: decoded at 1/4, then shrunk.
    out = compressed_from_msg(jpeg, max_pixels=200_000)
    expected = image_msgs.shrink(image, 200_000)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).mean() < 3


@pytest.mark.skipif(image_msgs.CvBridge is None, reason="cv_bridge is a ROS 2 distro package (apt), not on PyPI: "
                    "this venv converts with image_msgs' own converter; on a distro this checks both agree")
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8"])
def test_cv_bridge_and_the_own_converter_agree(encoding):
    from sensor_msgs.msg import Image as ImageMsg

    pixels = RGB if encoding != "mono8" else GRAY
    msg = image_to_msg(pixels, ImageMsg, encoding=encoding)
    bridged = image_msgs.image_from_msg(msg)
    own = image_msgs.image_from_msg(SimpleNamespace(**{f: getattr(msg, f) for f in
                                                       ("height", "width", "encoding", "is_bigendian", "step",
                                                        "data")}))
    np.testing.assert_array_equal(bridged, own)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR) claiming width x height RGB, followed by a tiny IDAT and IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(9000, 9000), (100_000, 100_000)])
def test_a_png_claiming_a_huge_size_is_refused_before_decoding(size):
    bomb = SimpleNamespace(format="png", data=png_claiming(*size))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidImage, match=f"{size[0]}x{size[1]}|exceeds limit"):
            compressed_from_msg(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 0.5 and peak < 1_000_000


@pytest.mark.parametrize("fmt, data, message", [
    ("jpeg", b"", "CompressedImage has no data"),
    ("jpeg", b"definitely not an image", r"cannot decode CompressedImage \(format 'jpeg', 23 bytes\)"),
    ("jpeg", None, "(?i)cannot decode.*truncated"),  # filled in below: a JPEG cut in half
    ("bmp", None, "cannot decode"),  # filled in below: a BMP is not accepted even though PIL could read it
    ("16UC1; compressedDepth png", b"\0" * 12 + b"png", r"\(compressedDepth\) is not supported; send JPEG or PNG"),
])
def test_undecodable_compressed_images(fmt, data, message):
    if data is None and fmt == "jpeg":
        data = encoded(Image.fromarray(smooth_image()), "JPEG")[:300]
    elif data is None:
        data = encoded(Image.fromarray(RGB), "BMP")
    with pytest.raises(InvalidImage, match=message):
        compressed_from_msg(SimpleNamespace(format=fmt, data=data))


def test_rgb_from_msg_dispatches_on_the_message_type_and_bounds_pixels():
    raw = image_to_msg(smooth_image(), SimpleNamespace)
    packed = compressed_to_msg(smooth_image(), SimpleNamespace, fmt="png")
    np.testing.assert_array_equal(rgb_from_msg(raw), smooth_image())
    np.testing.assert_array_equal(rgb_from_msg(packed), smooth_image())
    for message in (raw, packed):
        out = rgb_from_msg(message, max_pixels=3000)
        assert out.shape[0] * out.shape[1] <= 3000 and out.shape[2] == 3


def test_compressed_topic_convention():
    assert is_compressed_topic("/camera/image_raw/compressed")
    assert is_compressed_topic("camera/compressed/")
    assert not is_compressed_topic("/camera/image_raw")
    assert not is_compressed_topic("/camera/uncompressed")


def test_frame_buffer_with_a_message_decoder_end_to_end():
    buffer = FrameBuffer(seconds=2, fps=2, max_pixels=40 * 30)
    decoded = []
    for i in range(30):  # 15 Hz of 160x120 JPEG messages for 2 s
        message = compressed_to_msg(smooth_image(), SimpleNamespace)

        def decode(message=message):
            decoded.append(1)
            return rgb_from_msg(message, max_pixels=buffer.max_pixels)

        buffer.offer(i / 15, decode, header=SimpleNamespace(seq=i))
    assert len(decoded) == 4 == buffer.stats()["frames"]
    assert buffer.latest().image.shape[0] * buffer.latest().image.shape[1] <= 40 * 30


def test_helpers_import_without_rclpy():
    code = ("import sys; import ego_ros.ros, ego_ros.ros.frame_buffer, ego_ros.ros.worker, "
            "ego_ros.ros.hysteresis, ego_ros.ros.image_msgs; assert 'rclpy' not in sys.modules, 'rclpy imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_supported_encodings_are_all_tested():
    tested = set(CASES) | {"yuv422", "uyvy", "yuv422_yuy2", "yuyv"}
    assert set(image_msgs.SUPPORTED_ENCODINGS) == tested
    assert math.isfinite(image_msgs.MAX_MESSAGE_PIXELS)


# ---------------------------------------------------------------------------------------------------------------
# What a request may ask for; frames the model cannot take; stale frames; live thresholds
# ---------------------------------------------------------------------------------------------------------------


def test_the_node_limit_refuses_a_png_claiming_8000x8000_before_decoding():
    from ego_ros.ros.requests import MAX_REQUEST_PIXELS

    bomb = SimpleNamespace(format="png", data=png_claiming(8000, 8000))  # 62 KB that would decode to 192 MB
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImage, match="8000x8000"):
            rgb_from_msg(bomb, 224 * 224, limit_pixels=MAX_REQUEST_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_a_frame_the_model_cannot_take_is_refused_with_the_reason():
    from ego_ros.ros.requests import RequestError, check_model_can_take

    with pytest.raises(RequestError, match="3x100000 image is more elongated"):
        check_model_can_take(np.zeros((100_000, 3, 3), np.uint8))
    check_model_can_take(np.zeros((10, 1000, 3), np.uint8))  # 1:100 is fine


def test_request_bounds_and_bounded_quotes():
    from ego_ros.ros.requests import RequestError, check_request, message_of, shown

    check_request(SimpleNamespace(question="Where?", max_new_tokens=8192, concepts=["a"] * 64))
    for fields, message in [(dict(question="x" * 4001), "4001 characters"),
                            (dict(max_new_tokens=2**32 - 1), "max_new_tokens 4294967295"),
                            (dict(views=[None] * 17), "17 views"), (dict(num_views=17), "num_views 17"),
                            (dict(concepts=["a"] * 65), "65 concepts")]:
        with pytest.raises(RequestError, match=message):
            check_request(SimpleNamespace(**fields))
    assert shown("abc") == "'abc'"
    quoted = shown("x" * 10_000)
    assert len(quoted) < 100 and "10000 characters" in quoted
    assert len(message_of(ValueError("y" * 10_000))) <= 600


def test_frames_older_than_max_age_are_not_the_latest():
    now = [100.0]
    buffer = FrameBuffer(10.0, 2.0, 64 * 64, clock=lambda: now[0])
    for i in range(4):
        buffer.offer(i * 0.5, np.zeros((8, 8, 3), np.uint8))
    assert buffer.latest(max_age=5.0).stamp_sec == 1.5 and len(buffer.window(10.0, 8, max_age=5.0)) == 4
    now[0] += 6.0  # the camera stopped six seconds ago
    assert buffer.latest(max_age=5.0) is None and buffer.window(10.0, 8, max_age=5.0) == []
    assert buffer.sample(2, 10.0, max_age=5.0) == [] and buffer.age() == pytest.approx(6.0)
    assert buffer.latest().stamp_sec == 1.5  # without an age limit, as before


def test_thresholds_change_live_and_presence_is_kept():
    tracker = PresenceTracker(0.5)
    assert tracker.update({"mug": 0.6}).appeared == ["mug"]
    tracker.set_thresholds(0.9, 0.8)
    update = tracker.update({"mug": 0.85})  # above the new off threshold: still present, no event
    assert update.present == {"mug": 0.85} and update.disappeared == []
    assert tracker.update({"mug": 0.7}).disappeared == [] and tracker.update({"mug": 0.7}).disappeared == ["mug"]
    with pytest.raises(ValueError, match="off_threshold"):
        tracker.set_thresholds(0.5, 0.6)
    assert tracker.update({"mug": 0.95}).appeared == ["mug"]
    tracker.set_thresholds(0.9, 0.9, min_off_frames=1)  # no hysteresis: one check below is gone
    assert tracker.update({"mug": 0.89}).disappeared == ["mug"]
    with pytest.raises(ValueError, match="min_off_frames"):
        tracker.set_thresholds(0.9, 0.9, min_off_frames=0)
    assert tracker.min_off_frames == 1
    tracker.set_thresholds(0.9, 0.9, min_on_frames=2)  # a single check above is not yet present
    assert tracker.update({"mug": 0.95}).appeared == [] and tracker.update({"mug": 0.1}).present == {}
    assert tracker.update({"mug": 0.95}).appeared == [] and tracker.update({"mug": 0.95}).appeared == ["mug"]


def test_clients_refuse_a_name_with_a_nul_and_an_empty_box_before_sending():
    from ego_ros.ros.client import register_request, region_msg, sendable_name

    # A ROS string ends at its first NUL: "nul\x00../x" would reach the node as "nul", another concept.
    with pytest.raises(ValueError, match="NUL"):
        register_request("nul\x00../x")
    with pytest.raises(ValueError, match="NUL"):
        sendable_name("a\x00")
    assert sendable_name("my mug") == "my mug"
    # A zero-sized region means "the whole image" on the wire: an empty box must not silently become that.
    with pytest.raises(ValueError, match="empty"):
        region_msg((10, 10, 10, 40))
    roi = region_msg((-5.2, 3.6, 100.4, 50))
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height) == (0, 4, 100, 46)
    request = register_request("mug", regions=[(0, 0, 20, 10)], description="the red one")
    assert request.regions[0].width == 20 and request.description == "the red one"


def test_a_box_on_a_buffered_frame_goes_back_to_the_cameras_pixels():
    buffer = FrameBuffer(seconds=5.0, fps=10.0, max_pixels=224 * 224)
    assert buffer.offer(1.0, np.zeros((720, 1280, 3), np.uint8))
    frame = buffer.latest()
    assert frame.size == (1280, 720) and frame.image.shape[1] < 1280  # shrunk in the buffer, size as sent
    height, width = frame.image.shape[:2]
    assert frame.to_sent((0, 0, width, height)) == (0, 0, 1280, 720)
    assert frame.to_sent((width / 2, height / 4, width, height / 2)) == (640, 180, 1280, 360)


def test_the_debug_image_outlines_each_detection_and_labels_it():
    from ego_ros.ros.debug_image import COLOURS, annotated

    image = np.full((120, 160, 3), 30, np.uint8)
    out = annotated(image, [("Rex", 0.87, (10, 30, 60, 90)), ("my mug", 0.61, (100, 50, 150, 100))])
    assert out.shape == image.shape and (image == 30).all()  # a copy: the buffer's frame is not drawn on
    for x, y in ((10, 30), (59, 89), (10, 60), (35, 89)):  # Rex's outline, in the first colour
        assert tuple(out[y, x]) == COLOURS[0]
    assert tuple(out[60, 35]) == (30, 30, 30)  # inside the box: the frame
    assert tuple(out[99, 149]) == COLOURS[1]  # the second detection, in the second colour
    assert (out[15:29, 10:40] != 30).any()  # the label "Rex 0.87", above the box


def test_node_settings_carry_the_engine_settings_and_refuse_an_unknown_recognition_order():
    import rclpy
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from ego_ros.ros.parameters import Settings

    context = rclpy.Context()
    rclpy.init(context=context)
    node = Node("settings_check", context=context, automatically_declare_parameters_from_overrides=True,
                parameter_overrides=[Parameter("model", value="/models/m"),
                                     Parameter("recognition_order", value="image_first"),
                                     Parameter("static_cache", value=True)])
    try:
        settings = Settings.from_node(node)
        assert settings.recognition_order == "image_first" and settings.static_cache is True
        node.set_parameters([Parameter("recognition_order", value="sideways")])
        with pytest.raises(ValueError, match="recognition_order must be concept_first or image_first"):
            Settings.from_node(node)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
