"""The jobs database: uploaded files, fine-tuning jobs, their events and checkpoints.

One SQLite file in the jobs folder by default (WAL mode, a busy timeout: one machine, any number
of processes), or a ``postgresql://`` URL when workers on several machines share the queue. The
SQL is plain and the same for both; a thin :class:`_Dialect` swaps placeholders and column types.

Every change of a job's state is one conditional ``UPDATE ... WHERE status = ...`` whose row
count (or ``RETURNING`` row) says whether it happened, never a read followed by a write: two
workers claiming the same queued job, or a cancel racing a worker's success, cannot both win.
A job is *held* by the worker named in its ``worker`` column, which stamps ``heartbeat_at`` every
few seconds; a job whose holder went silent is released by :meth:`JobStore.release_stale` (a
running one is queued again, to resume from its last checkpoint).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError

DB_FILE = "jobs.db"
ACTIVE = ("validating_files", "queued", "running", "paused")
"""Statuses a job can still leave; succeeded, failed and cancelled are final."""
HELD = ("validating_files", "running")
"""Statuses in which a worker holds the job and heartbeats it."""
_JSON_COLUMNS = ("method", "hyperparameters", "adapter", "error", "data", "metrics",
                 "result_files")


@dataclass(frozen=True)
class _Dialect:
    name: str
    serial: str  # an auto-incrementing integer primary key
    real: str
    placeholder: str

    def sql(self, text: str) -> str:
        return text.replace("?", self.placeholder).format(serial=self.serial, real=self.real)


SQLITE = _Dialect("sqlite", "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL", "?")
POSTGRES = _Dialect("postgresql", "BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION", "%s")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS files (
        seq {serial}, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, filename TEXT NOT NULL,
        purpose TEXT NOT NULL, bytes BIGINT NOT NULL, sha256 TEXT NOT NULL,
        format TEXT, created_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        seq {serial}, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, model TEXT NOT NULL,
        training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, seed BIGINT NOT NULL,
        method TEXT NOT NULL, hyperparameters TEXT NOT NULL, adapter TEXT NOT NULL,
        status TEXT NOT NULL, error TEXT, fine_tuned_model TEXT, trained_tokens BIGINT,
        result_files TEXT NOT NULL DEFAULT '[]', created_at BIGINT NOT NULL,
        started_at BIGINT, finished_at BIGINT, worker TEXT, heartbeat_at {real},
        attempts BIGINT NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (status, worker)",
    "CREATE INDEX IF NOT EXISTS jobs_model ON jobs (fine_tuned_model)",
    """CREATE TABLE IF NOT EXISTS events (
        seq {serial}, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL, created_at BIGINT NOT NULL,
        level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT,
        dedup TEXT, UNIQUE (job_id, dedup))""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        seq {serial}, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL, step BIGINT NOT NULL,
        created_at BIGINT NOT NULL, metrics TEXT NOT NULL, model TEXT NOT NULL,
        UNIQUE (job_id, step))""",
)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def default_url(jobs_dir: str | Path) -> str:
    return f"sqlite:///{(Path(jobs_dir) / DB_FILE).resolve()}"


class JobStore:
    """The database at ``url`` (``sqlite:///PATH``, a plain file path, or ``postgresql://...``),
    its tables created on first use. Safe to share between threads: each thread has its own
    connection, in autocommit mode (every statement is its own transaction)."""

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        if self.url.startswith(("postgresql://", "postgres://")):
            self.dialect = POSTGRES
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ConfigError("--db postgresql://... needs psycopg: pip install "
                                  "'tuneforge[postgres]' (or 'psycopg[binary]')") from None
        else:
            self.dialect = SQLITE
            path = Path(self.url.removeprefix("sqlite:///"))
            if not path.parent.is_dir():
                raise ConfigError(f"--db {self.url}: folder {path.parent} does not exist")
            self.path = path
        self._local = threading.local()
        self._create_schema()

    # ------------------------------------------------------------------------- connections

    def _connect(self):
        if self.dialect is POSTGRES:
            import psycopg

            try:
                return psycopg.connect(self.url, autocommit=True)
            except psycopg.Error as err:
                raise ConfigError(f"--db: cannot connect to the database: "
                                  f"{str(err).strip()}") from None
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _create_schema(self) -> None:
        conn = self._conn()
        if self.dialect is POSTGRES:
            # CREATE TABLE IF NOT EXISTS races between two first workers: serialise it
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(726167)")
                for statement in SCHEMA:
                    cur.execute(self.dialect.sql(statement))
        else:
            for statement in SCHEMA:
                conn.execute(self.dialect.sql(statement))

    def _run(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[dict], int]:
        """Run one statement: (rows as dicts, rows affected). A lost PostgreSQL connection is
        opened again once."""
        for attempt in (0, 1):
            conn = self._conn()
            try:
                cur = conn.cursor()
                cur.execute(self.dialect.sql(sql), tuple(params))
                rows = []
                if cur.description is not None:
                    names = [d[0] for d in cur.description]
                    rows = [_decode(dict(zip(names, row))) for row in cur.fetchall()]
                count = cur.rowcount
                cur.close()
                return rows, count
            except Exception as err:
                if attempt or self.dialect is not POSTGRES or not _connection_lost(err):
                    raise
                self._local.conn = None
        raise AssertionError("unreachable")

    def _rows(self, sql: str, *params: Any) -> list[dict]:
        return self._run(sql, params)[0]

    def _one(self, sql: str, *params: Any) -> dict | None:
        rows = self._rows(sql, *params)
        return rows[0] if rows else None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------------- files

    def add_file(self, owner: str, filename: str, purpose: str, nbytes: int, sha256: str,
                 fmt: str | None) -> dict:
        return self._one("INSERT INTO files (id, owner, filename, purpose, bytes, sha256, format, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                         new_id("file-"), owner, filename, purpose, nbytes, sha256, fmt,
                         int(time.time()))

    def get_file(self, file_id: str, owner: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND owner = ?", file_id, owner)

    def list_files(self, owner: str, *, purpose: str | None = None, after: str | None = None,
                   limit: int = 100, order: str = "desc") -> tuple[list[dict], bool]:
        where, params = ["owner = ?"], [owner]
        if purpose:
            where.append("purpose = ?")
            params.append(purpose)
        return self._page("files", where, params, after, limit, order)

    def delete_file(self, file_id: str, owner: str) -> dict | None:
        return self._one("DELETE FROM files WHERE id = ? AND owner = ? RETURNING *", file_id, owner)

    def blob_in_use(self, sha256: str) -> bool:
        return self._one("SELECT COUNT(*) AS n FROM files WHERE sha256 = ?", sha256)["n"] > 0

    # ------------------------------------------------------------------------- jobs

    def create_job(self, owner: str, *, model: str, training_file: str,
                   validation_file: str | None, suffix: str | None, seed: int, method: dict,
                   hyperparameters: dict, adapter: dict) -> dict:
        return self._one(
            "INSERT INTO jobs (id, owner, model, training_file, validation_file, suffix, seed, "
            "method, hyperparameters, adapter, status, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'validating_files', ?) RETURNING *",
            new_id("ftjob-"), owner, model, training_file, validation_file, suffix, seed,
            json.dumps(method), json.dumps(hyperparameters), json.dumps(adapter),
            int(time.time()))

    def get_job(self, job_id: str, owner: str | None = None) -> dict | None:
        if owner is None:
            return self._one("SELECT * FROM jobs WHERE id = ?", job_id)
        return self._one("SELECT * FROM jobs WHERE id = ? AND owner = ?", job_id, owner)

    def list_jobs(self, owner: str, *, after: str | None = None,
                  limit: int = 20) -> tuple[list[dict], bool]:
        return self._page("jobs", ["owner = ?"], [owner], after, limit, "desc")

    def set_status(self, job_id: str, new: str, *, only_from: Iterable[str],
                   owner: str | None = None, held_by: str | None = None,
                   **values: Any) -> dict | None:
        """``status = new`` (and the columns in ``values``) if the job is in one of
        ``only_from`` (and owned by ``owner``, held by the worker ``held_by``, when given): one
        conditional UPDATE; the updated row, or None when the condition did not hold."""
        states = list(only_from)
        sets = ["status = ?"] + [f"{name} = ?" for name in values]
        params: list[Any] = [new, *(_encode(k, v) for k, v in values.items()), job_id, *states]
        where = f"id = ? AND status IN ({', '.join('?' * len(states))})"
        if owner is not None:
            where += " AND owner = ?"
            params.append(owner)
        if held_by is not None:
            where += " AND worker = ?"
            params.append(held_by)
        return self._one(f"UPDATE jobs SET {', '.join(sets)} WHERE {where} RETURNING *", *params)

    def claim(self, worker: str, status: str, new_status: str | None = None) -> dict | None:
        """Take the oldest unheld job in ``status`` (moving it to ``new_status``): one UPDATE, so
        of several workers racing for a job exactly one gets it. None when none is waiting (or
        another worker won this round)."""
        now = time.time()
        return self._one(
            "UPDATE jobs SET status = ?, worker = ?, heartbeat_at = ?, attempts = attempts + ?, "
            "started_at = COALESCE(started_at, ?) "
            "WHERE seq = (SELECT seq FROM jobs WHERE status = ? AND worker IS NULL "
            "ORDER BY seq LIMIT 1) AND status = ? AND worker IS NULL RETURNING *",
            new_status or status, worker, now, 1 if new_status == "running" else 0,
            int(now) if new_status == "running" else None, status, status)

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Stamp the holder's heartbeat; False when the job is no longer this worker's to run
        (cancelled, paused, or taken away as stale)."""
        placeholders = ", ".join("?" * len(HELD))
        return self._run(f"UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND worker = ? AND "
                         f"status IN ({placeholders})",
                         (time.time(), job_id, worker, *HELD))[1] == 1

    def release(self, job_id: str, worker: str) -> None:
        """The worker lets go of the job (its process has stopped)."""
        self._run("UPDATE jobs SET worker = NULL WHERE id = ? AND worker = ?", (job_id, worker))

    def release_stale(self, older_than_s: float) -> list[dict]:
        """Release every job whose holder has not beaten for ``older_than_s`` seconds; a
        running one goes back to the queue. One UPDATE; returns the released jobs."""
        return self._rows(
            "UPDATE jobs SET worker = NULL, "
            "status = CASE WHEN status = 'running' THEN 'queued' ELSE status END "
            "WHERE worker IS NOT NULL AND heartbeat_at < ? RETURNING *",
            time.time() - older_than_s)

    def waiting(self) -> int:
        """Jobs that a worker could take now."""
        return self._one("SELECT COUNT(*) AS n FROM jobs WHERE worker IS NULL AND status IN "
                         "('validating_files', 'queued')")["n"]

    def succeeded_job_for_model(self, model: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded'",
                         model)

    def models_of(self, owner: str) -> list[dict]:
        return self._rows("SELECT * FROM jobs WHERE owner = ? AND status = 'succeeded' "
                          "ORDER BY seq", owner)

    # ------------------------------------------------------------------------- events

    def add_event(self, job_id: str, message: str, *, level: str = "info", kind: str = "message",
                  data: dict | None = None, dedup: str | None = None) -> bool:
        """Append an event; one with a ``dedup`` key already recorded for the job is skipped
        (a resumed run logs its steps past the checkpoint again). True if it was added."""
        return self._run(
            "INSERT INTO events (id, job_id, created_at, level, type, message, data, dedup) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (new_id("ftevent-"), job_id, int(time.time()), level, kind, message,
             None if data is None else json.dumps(data), dedup))[1] == 1

    def list_events(self, job_id: str, *, after: str | None = None,
                    limit: int = 20) -> tuple[list[dict], bool]:
        return self._page("events", ["job_id = ?"], [job_id], after, limit, "desc")

    # ------------------------------------------------------------------------- checkpoints

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, model: str) -> bool:
        return self._run(
            "INSERT INTO checkpoints (id, job_id, step, created_at, metrics, model) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (new_id("ftckpt_"), job_id, step, int(time.time()), json.dumps(metrics),
             model))[1] == 1

    def list_checkpoints(self, job_id: str, *, after: str | None = None,
                         limit: int = 10) -> tuple[list[dict], bool]:
        return self._page("checkpoints", ["job_id = ?"], [job_id], after, limit, "desc")

    # ------------------------------------------------------------------------- pages

    def _page(self, table: str, where: list[str], params: list[Any], after: str | None,
              limit: int, order: str) -> tuple[list[dict], bool]:
        """(up to ``limit`` rows after the row ``after``, whether more follow)."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        if after:
            where = [*where, f"seq {op} (SELECT seq FROM {table} WHERE id = ?)"]
            params = [*params, after]
        rows = self._rows(f"SELECT * FROM {table} WHERE {' AND '.join(where)} "
                          f"ORDER BY seq {direction} LIMIT ?", *params, limit + 1)
        return rows[:limit], len(rows) > limit


def _encode(name: str, value: Any) -> Any:
    return json.dumps(value) if name in _JSON_COLUMNS and value is not None else value


def _decode(row: dict) -> dict:
    for name in _JSON_COLUMNS:
        if isinstance(row.get(name), str):
            row[name] = json.loads(row[name])
    return row


def _connection_lost(err: Exception) -> bool:
    import psycopg

    return isinstance(err, (psycopg.OperationalError, psycopg.InterfaceError))
