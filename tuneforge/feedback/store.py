"""The feedback database: sessions, prompts, generated candidates and human judgements, in SQLite.

Nothing here touches a terminal or a model, so the terminal loop (:mod:`.cli`) and a later web
UI share it. Durability is the point: the database runs in WAL mode with ``synchronous=FULL``
and every answer is its own committed transaction, so killing the process (or the machine)
loses at most the answer being typed. Several processes may use one file at once (WAL lets
readers run beside the one writer; writers wait up to ``busy_timeout``).

Tables::

    sessions    name, mode (rate | choose | rank), model, k (candidates per prompt)
    prompts     per session, in order: messages (JSON), the prompt file's other columns,
                a digest so the same prompt is added once, where it came from (file:line)
    candidates  per prompt, K of them: text, model, generation parameters (JSON)
    judgements  per prompt and annotator: kind rating | choice | ranking | skip, value (JSON),
                the candidate rated (ratings only), shown_at / created_at / updated_at

A judgement's ``value`` is a rating (an integer 1-5), the chosen candidate's id, the candidate
ids best first, or null for a skip. An annotator answers each item once (a unique index);
answering again replaces the answer, so a UI can let people correct themselves.

The unit of work is a prompt (choose, rank) or a candidate (rate: one rating per candidate);
:meth:`FeedbackStore.next_prompt` gives the first prompt an annotator still has work on, which
is how a session resumes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

SCHEMA_VERSION = 1
MODES = ("rate", "choose", "rank")
KIND_OF_MODE = {"rate": "rating", "choose": "choice", "rank": "ranking"}
RATING_SCALE = (1, 5)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    mode TEXT NOT NULL CHECK (mode IN ('rate', 'choose', 'rank')),
    model TEXT NOT NULL,
    k INTEGER NOT NULL CHECK (k >= 1),
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL REFERENCES sessions(id),
    position INTEGER NOT NULL,
    messages TEXT NOT NULL,
    columns TEXT NOT NULL DEFAULT '{}',
    digest TEXT NOT NULL,
    source TEXT,
    UNIQUE (session_id, position),
    UNIQUE (session_id, digest)
);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    UNIQUE (prompt_id, position)
);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    candidate_id INTEGER REFERENCES candidates(id),
    kind TEXT NOT NULL CHECK (kind IN ('rating', 'choice', 'ranking', 'skip')),
    value TEXT NOT NULL,
    annotator TEXT NOT NULL,
    shown_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS judgement_once
    ON judgements (prompt_id, IFNULL(candidate_id, 0), annotator);
"""

# A prompt is finished for an annotator once it has a prompt-level judgement (a choice, a
# ranking or a skip) or, in rate mode, once its candidates exist and every one is rated.
_FINISHED = """(
    EXISTS (SELECT 1 FROM judgements j
            WHERE j.prompt_id = p.id AND j.annotator = :annotator AND j.candidate_id IS NULL)
    OR (:mode = 'rate'
        AND EXISTS (SELECT 1 FROM candidates c WHERE c.prompt_id = p.id)
        AND NOT EXISTS (SELECT 1 FROM candidates c WHERE c.prompt_id = p.id AND NOT EXISTS (
            SELECT 1 FROM judgements j WHERE j.candidate_id = c.id AND j.annotator = :annotator)))
)"""


class FeedbackError(TuneforgeError):
    """A problem with the feedback database or an answer given to it."""


@dataclass(frozen=True)
class Session:
    id: int
    name: str
    mode: str
    model: str
    k: int


@dataclass(frozen=True)
class Prompt:
    """A prompt of a session; ``messages`` are ``[{"role", "content"}]`` ending with the user."""

    id: int
    position: int
    messages: list[dict]
    columns: dict
    source: str | None


@dataclass(frozen=True)
class Candidate:
    id: int
    prompt_id: int
    position: int
    text: str
    model: str
    params: dict


@dataclass(frozen=True)
class Judgement:
    """An answer, with what it was about (for exports)."""

    kind: str
    value: Any
    annotator: str
    session: Session
    prompt: Prompt
    candidates: list[Candidate]  # all candidates of the prompt, in position order
    candidate_id: int | None  # the candidate rated, for a rating


def now() -> str:
    """UTC time as ISO 8601 with milliseconds: sorts as text, readable in the database."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def prompt_digest(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


class FeedbackStore:
    """One connection to a feedback database; use one store per thread or process.

    ``create=False`` refuses a missing file (exports and statistics should not make an empty
    database out of a mistyped path).
    """

    def __init__(self, path: str | Path, *, create: bool = True, timeout: float = 10.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise FeedbackError(f"{self.path}: is a directory, expected a SQLite database file")
        if not create and not self.path.is_file():
            raise FeedbackError(f"{self.path}: no such feedback database")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly in _transaction.
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._setup(timeout)
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise FeedbackError(f"{self.path}: not a feedback database ({err})") from err
        except FeedbackError:
            self._db.close()
            raise

    def _setup(self, timeout: float) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        # Before changing anything: someone else's database is left exactly as it was.
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise FeedbackError(f"{self.path}: a SQLite database, but not a feedback database")
        db.execute("PRAGMA journal_mode = WAL")  # readers never block the one writer
        db.execute("PRAGMA synchronous = FULL")  # a committed answer survives a power cut too
        db.execute("PRAGMA foreign_keys = ON")
        # One script, one transaction (executescript would commit an open transaction first).
        db.executescript(
            f"BEGIN IMMEDIATE; {_SCHEMA} INSERT OR IGNORE INTO meta "
            f"VALUES ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
        )
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if version != str(SCHEMA_VERSION):
            raise FeedbackError(
                f"{self.path}: feedback database schema version {version}; this tuneforge "
                f"reads version {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two writers wait
        for each other instead of failing half-way."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---------------------------------------------------------------------------- sessions

    def start_session(self, name: str, mode: str, model: str, k: int) -> Session:
        """The session ``name``, created if new; an existing one must match mode, model and k."""
        if mode not in MODES:
            raise FeedbackError(f"mode {mode!r} unknown; use one of {', '.join(MODES)}")
        if k < (2 if mode != "rate" else 1):
            raise FeedbackError(f"mode {mode} needs at least 2 candidates per prompt, got k={k}")
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO sessions (name, mode, model, k, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, mode, model, k, now()),
            )
        session = self.session(name)
        asked = (mode, model, k)
        if (session.mode, session.model, session.k) != asked:
            raise FeedbackError(
                f"session {name!r} in {self.path} was started with mode {session.mode}, model "
                f"{session.model}, k={session.k}; this asks for mode {mode}, model {model}, "
                f"k={k}. Resume with the same settings, or name a new session (--session)"
            )
        return session

    def session(self, name: str) -> Session:
        row = self._db.execute("SELECT * FROM sessions WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(s.name for s in self.sessions()) or "none"
            raise FeedbackError(f"{self.path}: no session {name!r} (sessions: {known})")
        return _session(row)

    def sessions(self) -> list[Session]:
        return [_session(r) for r in self._db.execute("SELECT * FROM sessions ORDER BY id")]

    # ----------------------------------------------------------------------------- prompts

    def add_prompts(
        self, session: Session, prompts: list[tuple[list[dict], dict, str | None]]
    ) -> int:
        """Append ``(messages, columns, source)`` prompts not already in the session; returns
        how many were new. Adding the same file again is a no-op, adding a longer one extends."""
        added = 0
        with self._transaction() as db:
            (last,) = db.execute(
                "SELECT IFNULL(MAX(position), -1) FROM prompts WHERE session_id = ?", (session.id,)
            ).fetchone()
            for messages, columns, source in prompts:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO prompts "
                    "(session_id, position, messages, columns, digest, source) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        session.id,
                        last + 1 + added,
                        json.dumps(messages),
                        json.dumps(columns),
                        prompt_digest(messages),
                        source,
                    ),
                )
                added += cursor.rowcount
        return added

    def prompts(self, session: Session) -> list[Prompt]:
        rows = self._db.execute(
            "SELECT * FROM prompts WHERE session_id = ? ORDER BY position", (session.id,)
        )
        return [_prompt(r) for r in rows]

    def next_prompt(self, session: Session, annotator: str) -> Prompt | None:
        """The first prompt, in order, that ``annotator`` has not finished; None when done."""
        row = self._db.execute(
            f"SELECT * FROM prompts p WHERE p.session_id = :session AND NOT {_FINISHED} "
            "ORDER BY p.position LIMIT 1",
            {"session": session.id, "annotator": annotator, "mode": session.mode},
        ).fetchone()
        return None if row is None else _prompt(row)

    def progress(self, session: Session, annotator: str) -> tuple[int, int]:
        """``(finished, total)`` prompts of the session for ``annotator``."""
        row = self._db.execute(
            f"SELECT IFNULL(SUM({_FINISHED}), 0), COUNT(*) FROM prompts p "
            "WHERE p.session_id = :session",
            {"session": session.id, "annotator": annotator, "mode": session.mode},
        ).fetchone()
        return int(row[0]), int(row[1])

    # -------------------------------------------------------------------------- candidates

    def candidates(self, prompt_id: int) -> list[Candidate]:
        rows = self._db.execute(
            "SELECT * FROM candidates WHERE prompt_id = ? ORDER BY position", (prompt_id,)
        )
        return [_candidate(r) for r in rows]

    def add_candidates(
        self, prompt_id: int, texts: list[str], *, model: str, params: dict
    ) -> list[Candidate]:
        """Store generated candidates; if another process stored them first, theirs are kept
        (every annotator must judge the same candidates)."""
        with self._transaction() as db:
            for position, text in enumerate(texts):
                db.execute(
                    "INSERT OR IGNORE INTO candidates "
                    "(prompt_id, position, text, model, params, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (prompt_id, position, text, model, json.dumps(params), now()),
                )
        return self.candidates(prompt_id)

    def unrated(self, prompt_id: int, annotator: str) -> list[Candidate]:
        """Candidates of a prompt that ``annotator`` has not rated yet (rate mode)."""
        rows = self._db.execute(
            "SELECT * FROM candidates c WHERE c.prompt_id = ? AND NOT EXISTS (SELECT 1 FROM "
            "judgements j WHERE j.candidate_id = c.id AND j.annotator = ?) ORDER BY c.position",
            (prompt_id, annotator),
        )
        return [_candidate(r) for r in rows]

    # -------------------------------------------------------------------------- judgements

    def rate(
        self, candidate_id: int, rating: int, annotator: str, *, shown_at: str | None = None
    ) -> None:
        """Record a 1-5 rating of one candidate (rate mode); committed before returning."""
        low, high = RATING_SCALE
        if isinstance(rating, bool) or not isinstance(rating, int) or not low <= rating <= high:
            raise FeedbackError(f"a rating is a whole number from {low} to {high}, got {rating!r}")
        row = self._db.execute(
            "SELECT prompt_id FROM candidates WHERE id = ?", (candidate_id,)
        ).fetchone()
        if row is None:
            raise FeedbackError(f"no candidate with id {candidate_id}")
        self._check_mode(row[0], "rating")
        self._record(row[0], candidate_id, "rating", rating, annotator, shown_at)

    def choose(
        self, prompt_id: int, chosen_id: int, annotator: str, *, shown_at: str | None = None
    ) -> None:
        """Record which candidate of a prompt was best (choose mode)."""
        self._check_mode(prompt_id, "choice")
        ids = [c.id for c in self.candidates(prompt_id)]
        if chosen_id not in ids:
            raise FeedbackError(f"candidate {chosen_id} is not one of prompt {prompt_id}'s {ids}")
        self._record(prompt_id, None, "choice", chosen_id, annotator, shown_at)

    def rank(
        self, prompt_id: int, order: list[int], annotator: str, *, shown_at: str | None = None
    ) -> None:
        """Record a ranking: every candidate id of the prompt, best first (rank mode)."""
        self._check_mode(prompt_id, "ranking")
        ids = [c.id for c in self.candidates(prompt_id)]
        if sorted(order) != sorted(ids) or len(ids) < 2:
            raise FeedbackError(
                f"a ranking lists each of prompt {prompt_id}'s candidates {ids} once, got {order}"
            )
        self._record(prompt_id, None, "ranking", list(order), annotator, shown_at)

    def skip(self, prompt_id: int, annotator: str, *, shown_at: str | None = None) -> None:
        """Record that ``annotator`` passed on a prompt: it is finished, and never exported."""
        self._record(prompt_id, None, "skip", None, annotator, shown_at)

    def _check_mode(self, prompt_id: int, kind: str) -> None:
        row = self._db.execute(
            "SELECT s.mode FROM prompts p JOIN sessions s ON s.id = p.session_id WHERE p.id = ?",
            (prompt_id,),
        ).fetchone()
        if row is None:
            raise FeedbackError(f"no prompt with id {prompt_id}")
        if KIND_OF_MODE[row[0]] != kind:
            raise FeedbackError(f"prompt {prompt_id} is in a {row[0]} session; a {kind} is not")

    def _record(
        self,
        prompt_id: int,
        candidate_id: int | None,
        kind: str,
        value: Any,
        annotator: str,
        shown_at: str | None,
    ) -> None:
        if not annotator.strip():
            raise FeedbackError("an annotator name must not be empty")
        stamp = now()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO judgements (prompt_id, candidate_id, kind, value, annotator, "
                "shown_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (prompt_id, IFNULL(candidate_id, 0), annotator) DO UPDATE SET "
                "kind = excluded.kind, value = excluded.value, shown_at = excluded.shown_at, "
                "updated_at = excluded.updated_at",
                (
                    prompt_id,
                    candidate_id,
                    kind,
                    json.dumps(value),
                    annotator,
                    shown_at,
                    stamp,
                    stamp,
                ),
            )

    def judgements(self, session: Session | None = None) -> Iterator[Judgement]:
        """Every answer (skips included), by session, prompt, annotator and candidate."""
        sessions = {s.id: s for s in ([session] if session else self.sessions())}
        rows = self._db.execute(
            "SELECT j.kind, j.value, j.annotator, j.candidate_id, p.* "
            "FROM judgements j JOIN prompts p ON p.id = j.prompt_id "
            "LEFT JOIN candidates c ON c.id = j.candidate_id "
            "WHERE :session IS NULL OR p.session_id = :session "
            "ORDER BY p.session_id, p.position, j.annotator, IFNULL(c.position, -1)",
            {"session": session.id if session else None},
        ).fetchall()
        cached: dict[int, list[Candidate]] = {}
        for row in rows:
            if row["id"] not in cached:
                cached[row["id"]] = self.candidates(row["id"])
            yield Judgement(
                kind=row["kind"],
                value=json.loads(row["value"]),
                annotator=row["annotator"],
                session=sessions[row["session_id"]],
                prompt=_prompt(row),
                candidates=cached[row["id"]],
                candidate_id=row["candidate_id"],
            )

    def stats(self) -> list[dict[str, Any]]:
        """Per session: prompts, candidates, answers by kind, and each annotator's progress."""
        out = []
        for s in self.sessions():
            one = self._db.execute
            (prompts,) = one(
                "SELECT COUNT(*) FROM prompts WHERE session_id = ?", (s.id,)
            ).fetchone()
            (candidates,) = one(
                "SELECT COUNT(*) FROM candidates c JOIN prompts p ON p.id = c.prompt_id "
                "WHERE p.session_id = ?",
                (s.id,),
            ).fetchone()
            rows = one(
                "SELECT j.annotator, j.kind, COUNT(*) FROM judgements j "
                "JOIN prompts p ON p.id = j.prompt_id WHERE p.session_id = ? "
                "GROUP BY j.annotator, j.kind ORDER BY j.annotator",
                (s.id,),
            ).fetchall()
            annotators: dict[str, dict[str, Any]] = {}
            for annotator, kind, count in rows:
                annotators.setdefault(annotator, {})[kind] = count
            for annotator, counts in annotators.items():
                counts["finished_prompts"] = self.progress(s, annotator)[0]
            out.append(
                {
                    "session": s.name,
                    "mode": s.mode,
                    "model": s.model,
                    "k": s.k,
                    "prompts": prompts,
                    "candidates": candidates,
                    "annotators": annotators,
                }
            )
        return out


def _session(row: sqlite3.Row) -> Session:
    return Session(row["id"], row["name"], row["mode"], row["model"], row["k"])


def _prompt(row: sqlite3.Row) -> Prompt:
    return Prompt(
        id=row["id"],
        position=row["position"],
        messages=json.loads(row["messages"]),
        columns=json.loads(row["columns"]),
        source=row["source"],
    )


def _candidate(row: sqlite3.Row) -> Candidate:
    return Candidate(
        id=row["id"],
        prompt_id=row["prompt_id"],
        position=row["position"],
        text=row["text"],
        model=row["model"],
        params=json.loads(row["params"]),
    )
