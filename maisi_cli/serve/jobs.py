"""The job store of `maisi serve`: one SQLite file under --data (stdlib sqlite3, WAL journal, synchronous FULL), so an
accepted job survives a killed server.

A job moves queued → running → done | failed | cancelled. `claim_next` takes the oldest queued job (one
transaction: two workers never take the same job); `finish` ends only a running job, so each job ends once. On
start, `recover` puts jobs a killed server left running back in the queue (their run folder's complete samples are
skipped when they run again, as `maisi generate` re-runs).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    out TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    starts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT,
    result TEXT,
    error TEXT
)
"""


class QueueFull(Exception):
    """The queue holds its maximum of unfinished jobs (HTTP 429)."""


class JobStore:
    """Jobs in `path` (created with its folder). Safe to share between threads: one connection, one lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an accepted job is on disk before its id is answered
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self, work):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    # --- jobs ---------------------------------------------------------------------------------------------------
    def create(self, payload: dict[str, Any], out: Path, max_unfinished: int, job_id: str | None = None) -> str:
        """A new queued job; QueueFull when `max_unfinished` jobs are queued or running."""
        job_id = job_id or uuid.uuid4().hex

        def insert(db: sqlite3.Connection) -> str:
            unfinished = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
            if unfinished >= max_unfinished:
                raise QueueFull(f"{unfinished} job(s) queued or running, the server's --max-queue")
            db.execute("INSERT INTO jobs (id, state, payload, out, created) VALUES (?, 'queued', ?, ?, ?)",
                       (job_id, json.dumps(payload), str(out), time.time()))
            return job_id

        return self._transaction(insert)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        return [_job(row) for row in rows]

    def claim_next(self) -> dict[str, Any] | None:
        """The oldest queued job, now running (its `starts` counted), or None."""
        def claim(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ?, starts = starts + 1 WHERE id = ?",
                       (time.time(), row["id"]))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

        return self._transaction(claim)

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND state = 'running'",
                             (json.dumps(progress), job_id))

    def finish(self, job_id: str, state: str, result: dict[str, Any] | None = None,
               error: str | None = None) -> bool:
        """End a running job as `state` (done, failed or cancelled); False when it was not running."""
        if state not in FINISHED:
            raise ValueError(state)
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, finished = ?, result = ?, error = ? WHERE id = ? AND state = 'running'",
                (state, time.time(), json.dumps(result) if result is not None else None, error, job_id))
        return cursor.rowcount == 1

    def request_cancel(self, job_id: str) -> dict[str, Any] | None:
        """A queued job is cancelled now; a running one is marked for its worker to stop. The job after, or None."""
        def cancel(db: sqlite3.Connection) -> None:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, cancel_requested = 1 "
                       "WHERE id = ? AND state = 'queued'", (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,))

        self._transaction(cancel)
        return self.get(job_id)

    def recover(self) -> list[str]:
        """At start: jobs a stopped server left running go back to the queue (those it was told to cancel end
        cancelled). Returns the ids requeued."""
        def requeue(db: sqlite3.Connection) -> list[str]:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE state = 'running' AND "
                       "cancel_requested = 1", (time.time(),))
            ids = [row[0] for row in db.execute("SELECT id FROM jobs WHERE state = 'running' ORDER BY seq")]
            db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
            return ids

        return self._transaction(requeue)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {row[0]: row[1] for row in rows}


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job.pop("seq", None)
    for key in ("payload", "progress", "result"):
        job[key] = json.loads(job[key]) if job[key] else None
    job["cancel_requested"] = bool(job["cancel_requested"])
    return job
