# SPDX-License-Identifier: Apache-2.0
"""Where and when each concept was seen: a record of its recognitions, searchable, in SQLite.

Recognition events vanish once published, and the camera buffers hold seconds. This keeps every recognition of a
concept above the threshold as a *visit*: consecutive sightings of one concept by one camera, no more than
``merge_gap_sec`` apart, are one visit (first and last seen, how many sightings, the best score with its box and a
small JPEG crop of it, and the robot's pose nearest in time when the node has a pose topic). A later sighting after
a longer gap starts a new visit.

    store = SightingsStore(memory_dir / "sightings.db")
    store.record("Rex", camera="/head/image_raw", frame_id="head", stamp=t, score=0.91, box=(10, 20, 90, 120),
                 image=frame)                                    # merged into Rex's current visit on that camera
    store.last_seen("Rex", limit=3)                              # [Visit], newest first
    store.forget("Rex")                                          # with the concept

The database lives beside the concept memories, in WAL mode (readers never wait for the writer; a crash loses at
most the sighting being written). It is bounded: visits older than ``max_age_sec``, and the oldest beyond
``max_rows``, are pruned as new ones come. A database that is not one of ours (corrupt, foreign, a newer format) is
moved aside with a warning (``sightings.db.unreadable-TIME``, never deleted) and a new one started. Timestamps
are the frames' stamps (seconds), not the time of writing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

logger = logging.getLogger("ego_ros.sightings")

FILE_NAME = "sightings.db"
FORMAT = 1  # PRAGMA user_version of our databases
CROP_SIDE = 96  # crops are at most this many pixels on their longer side
CROP_QUALITY = 80
DEFAULT_MERGE_GAP_SEC = 5.0
DEFAULT_MAX_AGE_SEC = 30 * 86400.0
DEFAULT_MAX_ROWS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS visits (
    id INTEGER PRIMARY KEY,
    concept TEXT NOT NULL,
    camera TEXT NOT NULL,
    frame_id TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    sightings INTEGER NOT NULL,
    best_score REAL NOT NULL,
    best_stamp REAL NOT NULL,
    box TEXT,
    crop BLOB,
    pose TEXT,
    pose_age_sec REAL,
    pose_note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS visits_by_concept ON visits (concept, last_seen);
CREATE INDEX IF NOT EXISTS visits_by_time ON visits (last_seen);
"""


@dataclass(frozen=True)
class Pose:
    """The robot's pose nearest in time to a sighting: position (m) and orientation (quaternion) in ``frame_id``."""

    frame_id: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float]  # x, y, z, w


@dataclass(frozen=True)
class Visit:
    """Consecutive sightings of one concept by one camera."""

    concept: str
    camera: str
    frame_id: str
    first_seen: float  # the first sighting's frame stamp, seconds
    last_seen: float
    sightings: int
    best_score: float
    best_stamp: float  # when the best sighting was
    box: tuple[int, int, int, int] | None  # of the best sighting, in the frame's pixels as the camera sent it
    crop: bytes | None  # JPEG of the best sighting's box (the whole frame when there is no box)
    pose: Pose | None  # nearest in time to the best sighting; None without a pose topic or a recent pose
    pose_age_sec: float | None  # how far the pose was from the sighting in time
    pose_note: str  # why there is no pose, when there is none


class SightingsStore:
    """The visits of every concept, in one SQLite file (module docstring). Thread-safe."""

    def __init__(self, path: Path | str, *, merge_gap_sec: float = DEFAULT_MERGE_GAP_SEC,
                 max_age_sec: float = DEFAULT_MAX_AGE_SEC, max_rows: int = DEFAULT_MAX_ROWS, readonly: bool = False):
        for field, value in (("merge_gap_sec", merge_gap_sec), ("max_age_sec", max_age_sec)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{field} must be a positive number of seconds, got {value!r}")
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        self.path = Path(path)
        self.merge_gap_sec, self.max_age_sec, self.max_rows = float(merge_gap_sec), float(max_age_sec), max_rows
        self.readonly = readonly
        self._lock = threading.Lock()
        self._db = self._open()

    # -- opening

    def _open(self) -> sqlite3.Connection | None:
        if self.readonly:
            if not self.path.exists():
                return None
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._check(db)
            return db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            self._check(db)
        except sqlite3.DatabaseError as error:
            db.close()
            aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            logger.warning("the sightings database %s is not one this node can use (%s): moved aside to %s, and a "
                           "new one started", self.path, error, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):  # the journal of the file moved aside belongs with it
                journal = self.path.with_name(self.path.name + suffix)
                if journal.exists():
                    os.replace(journal, aside.with_name(aside.name + suffix))
            db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last transactions, never corrupts
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={FORMAT}")
        db.commit()
        return db

    @staticmethod
    def _check(db: sqlite3.Connection) -> None:
        """Raise sqlite3.DatabaseError unless ``db`` is empty or one of ours, readable."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version not in (0, FORMAT) or (tables and "visits" not in tables) or (version == 0 and tables):
            raise sqlite3.DatabaseError(f"format {version}, tables {sorted(tables)}; expected format {FORMAT}")
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("its integrity check failed")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- writing

    def record(self, concept: str, *, camera: str, frame_id: str, stamp: float, score: float,
               box: tuple[int, int, int, int] | None, crop: Callable[[], bytes] | None = None,
               pose: Pose | None = None, pose_age_sec: float | None = None, pose_note: str = "") -> None:
        """One sighting: merged into the concept's visit on ``camera`` if its last sighting was at most
        ``merge_gap_sec`` before ``stamp`` (and not after it), else the start of a new visit. ``crop()`` (a JPEG:
        :func:`crop_jpeg`) is called only when this is the visit's best sighting so far."""
        if self.readonly:
            raise ValueError("this sightings store is read-only")
        stamp, score = float(stamp), float(score)
        with self._lock:
            db = self._db
            row = db.execute("SELECT id, first_seen, last_seen, best_score FROM visits WHERE concept = ? AND "
                             "camera = ? ORDER BY last_seen DESC LIMIT 1", (concept, camera)).fetchone()
            merge = row is not None and row[1] <= stamp <= row[2] + self.merge_gap_sec
            best = not merge or score > row[3]
            details = {}
            if best:
                details = {"best_score": score, "best_stamp": stamp, "frame_id": frame_id,
                           "box": json.dumps(list(box)) if box is not None else None,
                           "crop": crop() if crop is not None else None,
                           "pose": json.dumps(_pose_fields(pose)) if pose is not None else None,
                           "pose_age_sec": pose_age_sec, "pose_note": pose_note}
            if merge:
                assignments = ", ".join(f"{field} = ?" for field in details)
                db.execute(f"UPDATE visits SET last_seen = MAX(last_seen, ?), sightings = sightings + 1"
                           f"{', ' + assignments if assignments else ''} WHERE id = ?",
                           (stamp, *details.values(), row[0]))
            else:
                db.execute("INSERT INTO visits (concept, camera, first_seen, last_seen, sightings, "
                           + ", ".join(details) + ") VALUES (?, ?, ?, ?, 1, " + ", ".join("?" * len(details)) + ")",
                           (concept, camera, stamp, stamp, *details.values()))
                self._prune(db, stamp)
            db.commit()

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM visits WHERE last_seen < ?", (now - self.max_age_sec,))
        db.execute("DELETE FROM visits WHERE id IN (SELECT id FROM visits ORDER BY last_seen DESC LIMIT -1 "
                   "OFFSET ?)", (self.max_rows,))

    def forget(self, concept: str) -> int:
        """Delete every visit of ``concept``; returns how many there were."""
        with self._lock:
            deleted = self._db.execute("DELETE FROM visits WHERE concept = ?", (concept,)).rowcount
            self._db.commit()
            return deleted

    # -- reading

    def last_seen(self, concept: str, *, since: float | None = None, camera: str | None = None,
                  limit: int = 5) -> list[Visit]:
        """The concept's visits, newest first: at most ``limit``, ending at or after ``since`` (a stamp), on
        ``camera`` if given."""
        query, arguments = "SELECT * FROM visits WHERE concept = ?", [concept]
        if since is not None:
            query, arguments = query + " AND last_seen >= ?", arguments + [float(since)]
        if camera:
            query, arguments = query + " AND camera = ?", arguments + [camera]
        with self._lock:
            if self._db is None:
                return []
            cursor = self._db.execute(query + " ORDER BY last_seen DESC LIMIT ?", (*arguments, int(limit)))
            columns = [c[0] for c in cursor.description]
            return [_visit(dict(zip(columns, row))) for row in cursor.fetchall()]

    def concepts(self) -> list[str]:
        """Every concept with at least one visit, by name."""
        with self._lock:
            if self._db is None:
                return []
            return [row[0] for row in self._db.execute("SELECT DISTINCT concept FROM visits ORDER BY concept")]

    def count(self) -> int:
        with self._lock:
            return 0 if self._db is None else self._db.execute("SELECT COUNT(*) FROM visits").fetchone()[0]


def crop_jpeg(image: np.ndarray, box: tuple[int, int, int, int] | None) -> bytes:
    """A small JPEG of ``image`` (RGB uint8) inside ``box`` (the whole image without one), at most CROP_SIDE px."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if box is not None:
        x0, y0, x1, y1 = box
        x0, y0 = max(0, min(int(x0), picture.width - 1)), max(0, min(int(y0), picture.height - 1))
        picture = picture.crop((x0, y0, max(x0 + 1, min(int(x1), picture.width)),
                                max(y0 + 1, min(int(y1), picture.height))))
    picture.thumbnail((CROP_SIDE, CROP_SIDE))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=CROP_QUALITY)
    return out.getvalue()


def _pose_fields(pose: Pose) -> dict:
    return {"frame_id": pose.frame_id, "position": list(pose.position), "orientation": list(pose.orientation)}


def _visit(row: dict) -> Visit:
    pose = json.loads(row["pose"]) if row["pose"] else None
    return Visit(
        concept=row["concept"], camera=row["camera"], frame_id=row["frame_id"], first_seen=row["first_seen"],
        last_seen=row["last_seen"], sightings=row["sightings"], best_score=row["best_score"],
        best_stamp=row["best_stamp"], box=tuple(json.loads(row["box"])) if row["box"] else None, crop=row["crop"],
        pose=Pose(pose["frame_id"], tuple(pose["position"]), tuple(pose["orientation"])) if pose else None,
        pose_age_sec=row["pose_age_sec"], pose_note=row["pose_note"])
