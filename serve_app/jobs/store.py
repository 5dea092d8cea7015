"""Durable job records, results and stored files, behind one small interface.

`JobStore` is the contract the job manager relies on; `SqliteJobStore` is the default: one SQLite
file for records plus a folder for result and file bytes, both surviving restarts of the process
that owns them. On a multi-node cluster, replace it with a store on shared infrastructure (e.g.
PostgreSQL + an object store) that keeps the same contract:

- `create` persists a new queued job; `get`/`list_jobs` read it back; `unfinished(kind)` lists
  the queued and running jobs of a kind, `count_unfinished(owner)` counts an owner's.
- `claim_next` atomically moves the oldest queued job to running, counting an attempt: no job is
  ever handed out twice.
- `update` changes fields, optionally only while the status is one of `only_if` (so a cancel is
  never overwritten by a late success); `requeue_running` (at manager start) turns jobs left running by a dead
  manager back into queued ones, or fails those out of attempts: nothing stays `running` forever.
- `save_result`/`read_result` keep one result (bytes + media type + file name) per job until it
  expires; `put_file`/`get_file` keep standalone files (OpenAI `url` responses) until they expire.
- `delete_expired` removes expired results and files and returns how many.
All methods are synchronous and thread-safe; callers run them off their event loop.

Everything the store writes is private (folders 0700, files 0600) and plain data: records are
columns and JSON, the payload is the job's versioned JSON (`serve_app/jobs/payload.py`).
"""

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from configs.paths import private_dir, touch_private, write_private

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class JobRecord:
    """One job: what to run (`payload`, JSON-able and opaque to the store) and how it went."""

    id: str
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    kind: str = "txt2img"
    owner: Optional[str] = None
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    attempts: int = 0
    max_attempts: int = 1
    images: int = 1
    progress_step: int = 0
    progress_total: int = 0
    progress_percent: float = 0.0
    error: Optional[dict[str, Any]] = None
    webhook_url: Optional[str] = None
    seeds: list[int] = field(default_factory=list)
    result_media_type: Optional[str] = None
    result_name: Optional[str] = None
    expires_at: Optional[float] = None
    payload: Optional[dict[str, Any]] = None
    #: A training job's latest loss, ETA and whether it is paused (None for image jobs).
    training: Optional[dict[str, Any]] = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class JobStore(Protocol):
    def create(self, job: JobRecord) -> None: ...
    def get(self, job_id: str) -> Optional[JobRecord]: ...
    def list_jobs(self, limit: int, owner: Optional[str] = None) -> list[JobRecord]: ...
    def count(self, status: str) -> int: ...
    def unfinished(self, kind: str) -> list[JobRecord]: ...
    def count_unfinished(self, owner: Optional[str]) -> int: ...
    def claim_next(self) -> Optional[JobRecord]: ...
    def update(self, job_id: str, only_if: Optional[tuple[str, ...]] = None, **fields: Any) -> Optional[JobRecord]: ...
    def requeue_running(self) -> tuple[int, int]: ...
    def save_result(self, job_id: str, data: bytes, media_type: str, name: str, expires_at: float) -> None: ...
    def read_result(self, job_id: str) -> Optional[tuple[bytes, str, str]]: ...
    def put_file(self, data: bytes, media_type: str, expires_at: float) -> str: ...
    def get_file(self, file_id: str) -> Optional[tuple[bytes, str]]: ...
    def delete_expired(self, now: float) -> int: ...


#: Columns stored as JSON text.
_JSON_FIELDS = ("error", "seeds", "payload", "training")
_COLUMNS = [name for name in JobRecord.__dataclass_fields__]

#: `PRAGMA user_version` of the layout this code writes. 0: payloads were pickles (before
#: 2026-12-01); such rows are not read back (see `_migrate`). 2 added the `training` column.
_SCHEMA_VERSION = 2


class SqliteJobStore:
    """SQLite records + a results folder. One process owns it (the job manager replica)."""

    def __init__(self, db_path: str, results_dir: str):
        self._results = private_dir(Path(results_dir))
        private_dir(Path(db_path).parent)
        touch_private(Path(db_path))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        types = {"id": "TEXT PRIMARY KEY"}
        columns = ", ".join(f"{name} {types.get(name, '')}".strip() for name in _COLUMNS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({columns})")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, media_type TEXT, expires_at REAL)"
        )
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database written by an older version to `_SCHEMA_VERSION`. Version 0 stored
        payloads as pickles, which this code never loads: their unfinished jobs fail with a
        message asking to submit them again; finished ones keep their records and results."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            error = json.dumps(
                {"message": "the job was stored by an older version of the server; submit it again",
                 "type": "server_error", "code": "stale_job"}
            )
            self._db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? "
                "WHERE typeof(payload) = 'blob' AND status IN ('queued', 'running')",
                (time.time(), error),
            )
            self._db.execute("UPDATE jobs SET payload = NULL WHERE typeof(payload) = 'blob'")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name in _COLUMNS:  # columns added since the file was made (all nullable)
            if name not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name}")
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    # -- records -------------------------------------------------------------------------------

    def create(self, job: JobRecord) -> None:
        row = self._to_row({name: getattr(job, name) for name in _COLUMNS})
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})", [row[c] for c in _COLUMNS])

    def get(self, job_id: str) -> Optional[JobRecord]:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._from_row(row)

    def list_jobs(self, limit: int, owner: Optional[str] = None) -> list[JobRecord]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: list[Any] = []
        if owner is not None:
            query += " WHERE owner = ?"
            args.append(owner)
        query += " ORDER BY created_at DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, [*args, limit]).fetchall()
        return [self._from_row(row) for row in rows]

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def unfinished(self, kind: str) -> list[JobRecord]:
        """The queued and running jobs of `kind`."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE kind = ? AND status IN ('queued', 'running')", (kind,)
            ).fetchall()
        return [self._from_row(row) for row in rows]

    def count_unfinished(self, owner: Optional[str]) -> int:
        """The queued and running jobs of `owner`."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE owner IS ? AND status IN ('queued', 'running')", (owner,)
            ).fetchone()[0]

    def claim_next(self) -> Optional[JobRecord]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at LIMIT 1"
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ? WHERE id = ?",
                        (time.time(), row[0]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(row[0])

    def update(self, job_id: str, only_if: Optional[tuple[str, ...]] = None, **fields: Any) -> Optional[JobRecord]:
        """Set fields; with `only_if`, only while the job's status is one of those (else None)."""
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        row = self._to_row(fields)
        query = f"UPDATE jobs SET {', '.join(f'{name} = ?' for name in row)} WHERE id = ?"
        args = [*row.values(), job_id]
        if only_if:
            query += f" AND status IN ({', '.join('?' for _ in only_if)})"
            args.extend(only_if)
        with self._lock:
            changed = self._db.execute(query, args).rowcount
        return self.get(job_id) if changed else None

    def requeue_running(self) -> tuple[int, int]:
        """Jobs a dead manager left running: queued again, or failed when out of attempts."""
        error = json.dumps(
            {"message": "the job was interrupted too many times", "type": "server_error", "code": "interrupted"}
        )
        with self._lock:
            failed = self._db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? "
                "WHERE status = 'running' AND attempts >= max_attempts",
                (time.time(), error),
            ).rowcount
            requeued = self._db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'").rowcount
        return requeued, failed

    # -- results and files ---------------------------------------------------------------------

    def save_result(self, job_id: str, data: bytes, media_type: str, name: str, expires_at: float) -> None:
        write_private(self._results / f"job-{job_id}", data)
        self.update(job_id, result_media_type=media_type, result_name=name, expires_at=expires_at)

    def read_result(self, job_id: str) -> Optional[tuple[bytes, str, str]]:
        job = self.get(job_id)
        path = self._results / f"job-{job_id}"
        if job is None or job.result_media_type is None or not path.exists():
            return None
        return path.read_bytes(), job.result_media_type, job.result_name or job_id

    def put_file(self, data: bytes, media_type: str, expires_at: float) -> str:
        file_id = "file-" + uuid.uuid4().hex
        write_private(self._results / file_id, data)
        with self._lock:
            self._db.execute("INSERT INTO files VALUES (?, ?, ?)", (file_id, media_type, expires_at))
        return file_id

    def get_file(self, file_id: str) -> Optional[tuple[bytes, str]]:
        with self._lock:
            row = self._db.execute(
                "SELECT media_type, expires_at FROM files WHERE id = ?", (file_id,)
            ).fetchone()
        path = self._results / file_id
        if row is None or row[1] < time.time() or not path.exists():
            return None
        return path.read_bytes(), row[0]

    def delete_expired(self, now: float) -> int:
        with self._lock:
            jobs = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at < ? AND result_media_type IS NOT NULL",
                (now,),
            )]
            files = [r[0] for r in self._db.execute("SELECT id FROM files WHERE expires_at < ?", (now,))]
            self._db.executemany(
                "UPDATE jobs SET result_media_type = NULL, payload = NULL WHERE id = ?", [(j,) for j in jobs]
            )
            self._db.executemany("DELETE FROM files WHERE id = ?", [(f,) for f in files])
        for name in [f"job-{j}" for j in jobs] + files:
            (self._results / name).unlink(missing_ok=True)
        return len(jobs) + len(files)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _to_row(values: dict[str, Any]) -> dict[str, Any]:
        row = dict(values)
        for name in _JSON_FIELDS:
            if name in row:
                row[name] = None if row[name] is None else json.dumps(row[name])
        return row

    @staticmethod
    def _from_row(row: tuple) -> JobRecord:
        values = dict(zip(_COLUMNS, row))
        for name in _JSON_FIELDS:
            if values[name] is not None:
                values[name] = json.loads(values[name])
        values["seeds"] = values["seeds"] or []
        return JobRecord(**values)
