"""API keys, per-key rate limits and the throttle on failed authentications.

Keys come from a file (one per line, ``name:key`` or a bare ``key``; blank lines and ``#``
comments skipped) and/or the environment variable ``TUNEFORGE_API_KEYS`` (the same entries,
comma-separated). Only the sha256 of each key is kept in memory; a request's key is hashed and
looked up. A key's *id* (its name, or ``key-`` and the first 8 hex digits of its hash) is what
logs and rate limits see, never the key. Failed authentications are counted per client address
in a bucket of their own: past its burst, every request from that address gets 429 (its key not
even looked at) until the bucket refills, which bounds key guessing without slowing others.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import ConfigError

ENV_VAR = "TUNEFORGE_API_KEYS"
ANONYMOUS = "anonymous"  # the key id of every request when auth is off
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_KEY_LENGTH = 8


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """sha256(key) -> key id. Empty means nobody gets in (auth off is a separate choice)."""

    def __init__(self, entries: list[tuple[str | None, str, str]] = ()) -> None:
        """``entries``: (name or None, key, where it came from) triples; checked here."""
        self._ids: dict[str, str] = {}
        problems = []
        for name, key, where in entries:
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
                problems.append(f"{where}: a key must be at least {MIN_KEY_LENGTH} characters "
                                "with no spaces")
                continue
            if name is not None and not _NAME.match(name):
                problems.append(f"{where}: key name {name!r} may hold only letters, digits "
                                "and _.@- (at most 64)")
                continue
            digest = hash_key(key)
            key_id = name or f"key-{digest[:8]}"
            if digest in self._ids or key_id in self._ids.values():
                problems.append(f"{where}: duplicate key or key name {key_id!r}")
                continue
            self._ids[digest] = key_id
        if problems:
            raise ConfigError("API keys:\n  " + "\n  ".join(problems))

    def __len__(self) -> int:
        return len(self._ids)

    def identify(self, key: str) -> str | None:
        """The key id of ``key``, or None if it is not one of ours."""
        return self._ids.get(hash_key(key))


def parse_entry(text: str) -> tuple[str | None, str]:
    """``name:key`` or ``key`` -> (name or None, key). A key holding ':' needs a name first."""
    name, sep, key = text.partition(":")
    return (name.strip(), key.strip()) if sep else (None, text.strip())


def load_keys(path: str | Path | None, env: dict[str, str] | None = None) -> KeyStore:
    """Keys from ``path`` (if given) and ``$TUNEFORGE_API_KEYS``; ConfigError names file:line."""
    env = os.environ if env is None else env
    entries: list[tuple[str | None, str, str]] = []
    if path is not None:
        path = Path(path)
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ConfigError(f"--api-keys {path}: cannot read ({err.strerror})") from err
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((*parse_entry(line), f"{path}:{number}"))
    for i, item in enumerate(env.get(ENV_VAR, "").split(","), 1):
        if item.strip():
            entries.append((*parse_entry(item), f"${ENV_VAR} entry {i}"))
    return KeyStore(entries)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header, else None."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Token bucket per name (a key id, or a client address for failed authentications):
    ``per_minute`` events a minute on average, bursts of up to ``burst``. ``per_minute <= 0``
    means no limit. Thread-safe. Once ``max_buckets`` are held, the buckets that have refilled
    are forgotten, so memory follows the names active lately, not every name ever seen."""

    per_minute: float
    burst: int
    clock: object = time.monotonic
    max_buckets: int = 10_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, name: str) -> float:
        """Take one token from ``name``'s bucket: 0.0 if there was one, else the seconds to
        wait until there is (for ``Retry-After``)."""
        return self._take(name, take=True)

    def wait(self, name: str) -> float:
        """Seconds until ``name``'s bucket holds a token (0.0: it holds one now); takes none."""
        return self._take(name, take=False)

    def _take(self, name: str, *, take: bool) -> float:
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60.0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None:
                if not take:
                    return 0.0
                if len(self._buckets) >= self.max_buckets:
                    self._forget_full(now, rate)
                bucket = self._buckets[name] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0 if take else 0.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def _forget_full(self, now: float, rate: float) -> None:
        # A full bucket is the same as no bucket: dropping it changes no answer.
        self._buckets = {name: b for name, b in self._buckets.items()
                         if b.tokens + (now - b.updated) * rate < self.burst}


def retry_after_seconds(seconds: float) -> int:
    """The wait as ``Retry-After`` gives it: whole seconds, rounded up (a client that waits
    that long gets in), at least 1. Messages quote the same number."""
    return max(1, math.ceil(seconds))
