# SPDX-License-Identifier: Apache-2.0
"""The sightings store: real SQLite files under tmp_path, real child processes for crashes and readers."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ego_ros.sightings import CROP_SIDE, Pose, SightingsStore, crop_jpeg

REPO = Path(__file__).resolve().parents[1]
FRAME = np.zeros((120, 160, 3), np.uint8)
FRAME[20:60, 30:90] = (200, 30, 30)  # a red block where the boxes below are


def see(store, concept="Rex", camera="/cam", stamp=100.0, score=0.8, box=(30, 20, 90, 60), **extra):
    store.record(concept, camera=camera, frame_id="cam", stamp=stamp, score=score, box=box,
                 crop=lambda: crop_jpeg(FRAME, box), **extra)


def test_consecutive_sightings_are_one_visit_and_a_gap_starts_another(tmp_path):
    store = SightingsStore(tmp_path / "sightings.db", merge_gap_sec=5.0)
    for t, score in ((100.0, 0.7), (101.0, 0.9), (103.5, 0.6)):  # one visit: gaps of at most 5 s
        see(store, stamp=t, score=score)
    see(store, stamp=120.0, score=0.75)  # 16.5 s later: a new visit
    see(store, camera="/other", stamp=121.0)  # another camera: a visit of its own
    newest, older = store.last_seen("Rex", camera="/cam")
    assert (older.first_seen, older.last_seen, older.sightings) == (100.0, 103.5, 3)
    assert (older.best_score, older.best_stamp) == (pytest.approx(0.9), 101.0)  # the best sighting's details
    assert (newest.first_seen, newest.last_seen, newest.sightings) == (120.0, 120.0, 1)
    assert [v.camera for v in store.last_seen("Rex")] == ["/other", "/cam", "/cam"]  # newest first
    assert [v.last_seen for v in store.last_seen("Rex", since=110.0)] == [121.0, 120.0]
    assert len(store.last_seen("Rex", limit=1)) == 1 and store.last_seen("Anna") == []
    crop = Image.open(io.BytesIO(older.crop))
    assert crop.format == "JPEG" and max(crop.size) <= CROP_SIDE
    assert np.abs(np.asarray(crop.convert("RGB"), float).mean(axis=(0, 1)) - (200, 30, 30)).max() < 25  # the box
    assert older.box == (30, 20, 90, 60) and older.pose is None


def test_a_pose_is_kept_with_its_age_or_the_reason_there_is_none(tmp_path):
    store = SightingsStore(tmp_path / "sightings.db")
    pose = Pose("map", (1.0, 2.0, 0.0), (0.0, 0.0, 0.0, 1.0))
    see(store, "Rex", pose=pose, pose_age_sec=0.04)
    see(store, "Anna", pose_note="no message on /odom yet")
    (rex,), (anna,) = store.last_seen("Rex"), store.last_seen("Anna")
    assert rex.pose == pose and rex.pose_age_sec == pytest.approx(0.04) and rex.pose_note == ""
    assert anna.pose is None and anna.pose_note == "no message on /odom yet"


def test_old_visits_and_those_beyond_the_row_bound_are_pruned(tmp_path):
    store = SightingsStore(tmp_path / "sightings.db", merge_gap_sec=1.0, max_age_sec=1000.0, max_rows=5)
    for k in range(8):
        see(store, stamp=100.0 + 10 * k)
    assert store.count() == 5 and store.last_seen("Rex", limit=10)[-1].first_seen == 130.0
    see(store, stamp=5000.0)  # every earlier visit is now older than max_age
    assert [v.first_seen for v in store.last_seen("Rex", limit=10)] == [5000.0]


def test_forgetting_a_concept_forgets_its_visits_and_a_restart_keeps_the_others(tmp_path):
    path = tmp_path / "sightings.db"
    store = SightingsStore(path)
    see(store, "Rex")
    see(store, "Anna")
    assert store.forget("Rex") == 1 and store.concepts() == ["Anna"]
    store.close()
    again = SightingsStore(path)
    assert again.concepts() == ["Anna"] and again.last_seen("Anna")[0].sightings == 1


CRASH_CHILD = """
import sys, time
import numpy as np
from ego_ros.sightings import SightingsStore, crop_jpeg
store = SightingsStore(sys.argv[1])
for k in range(100000):
    store.record("Rex", camera="/cam", frame_id="cam", stamp=100.0 + 10 * k, score=0.8, box=None,
                 crop=lambda: crop_jpeg(np.zeros((8, 8, 3), np.uint8), None))
    if k == 20:
        print("written", flush=True)
"""


def test_kill_9_while_recording_loses_at_most_the_visit_being_written(tmp_path):
    path = tmp_path / "sightings.db"
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "written"
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    visits = SightingsStore(path).last_seen("Rex", limit=100000)
    stamps = sorted(v.first_seen for v in visits)
    assert len(stamps) >= 21 and stamps == [100.0 + 10 * k for k in range(len(stamps))]  # a prefix, none torn


@pytest.mark.parametrize("content", [b"not a database at all" * 100, "foreign"])
def test_a_corrupt_or_foreign_database_is_moved_aside_and_a_new_one_started(tmp_path, content, caplog):
    path = tmp_path / "sightings.db"
    if content == "foreign":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE things (x)")
            db.execute("INSERT INTO things VALUES (42)")
        original = path.read_bytes()
    else:
        path.write_bytes(content)
        original = content
    store = SightingsStore(path)
    (aside,) = tmp_path.glob("sightings.db.unreadable-*")
    assert aside.read_bytes() == original  # kept, never deleted
    assert "moved aside" in caplog.text and str(aside) in caplog.text
    see(store, "Rex")
    assert store.concepts() == ["Rex"]


def test_a_reader_sees_what_the_writer_committed_and_cannot_write(tmp_path):
    path = tmp_path / "sightings.db"
    writer = SightingsStore(path)
    see(writer, "Rex", stamp=100.0)
    reader = SightingsStore(path, readonly=True)
    assert [v.last_seen for v in reader.last_seen("Rex")] == [100.0]
    see(writer, "Rex", stamp=102.0)
    assert [v.last_seen for v in reader.last_seen("Rex")] == [102.0]
    with pytest.raises(ValueError, match="read-only"):
        see(reader, "Rex")
    assert SightingsStore(tmp_path / "none.db", readonly=True).last_seen("Rex") == []
    assert not (tmp_path / "none.db").exists()


def test_bad_settings_are_refused():
    for kwargs, says in (({"merge_gap_sec": 0}, "merge_gap_sec"), ({"max_age_sec": float("nan")}, "max_age_sec"),
                         ({"max_rows": 0}, "max_rows")):
        with pytest.raises(ValueError, match=says):
            SightingsStore("/nonexistent/x.db", **kwargs)
