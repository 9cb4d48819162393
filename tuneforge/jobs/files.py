"""Uploaded files, stored content-addressed under ``JOBS_DIR/files/<sha256>``.

An upload streams into a temporary file in the same folder (hashed and size-capped on the way),
is flushed to disk (fsync) and renamed onto its hash with ``os.replace``: a reader sees the
whole file or none, and two uploads of the same bytes share one blob. The database row that
names the blob is written while a lock on the folder is held, so deleting the last row of a
blob and removing the blob cannot race a new upload of the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneforge.data.formats import detect_format, read_records
from tuneforge.errors import DataError

SUFFIXES = (".jsonl", ".jsonlines", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")
"""The file types the data readers know (tuneforge/data/formats.py)."""


class TooLarge(Exception):
    """The upload went past the size limit."""


class FileStore:
    """The ``files`` folder of a jobs folder."""

    def __init__(self, jobs_dir: str | Path) -> None:
        self.root = Path(jobs_dir) / "files"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def begin(self) -> _Upload:
        return _Upload(self.root)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on the folder (between processes too) around a blob's bookkeeping."""
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def remove_if_unused(self, sha256: str, in_use: bool) -> None:
        if not in_use:
            self.path(sha256).unlink(missing_ok=True)


class _Upload:
    """One upload being written: :meth:`write` chunks, then :meth:`commit` or :meth:`discard`."""

    def __init__(self, root: Path) -> None:
        fd, name = tempfile.mkstemp(dir=root, prefix=".upload-")
        self._fh = os.fdopen(fd, "wb")
        self.tmp = Path(name)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes, limit: int) -> None:
        self.size += len(chunk)
        if self.size > limit:
            raise TooLarge
        self.hash.update(chunk)
        self._fh.write(chunk)

    def commit(self) -> tuple[str, Path]:
        """Flush to disk and move onto the content's hash; returns (sha256, path)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = self.hash.hexdigest()
        final = self.tmp.parent / digest
        os.replace(self.tmp, final)
        return digest, final

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


def check_filename(filename: str) -> str:
    """The upload's base name, refused unless its type is one the data readers know."""
    name = Path(filename.replace("\\", "/")).name.strip()
    if not name or Path(name).suffix.lower() not in SUFFIXES:
        raise DataError(f"file {filename!r}: expected a data file ({', '.join(SUFFIXES)}); "
                        "fine-tuning data is usually .jsonl")
    return name


def sniff_format(path: Path, filename: str, sample: int = 200) -> str | None:
    """The data format most of the first ``sample`` records point to, or None (unreadable, or no
    record fits a format: the job's validation then reports each line)."""
    link = path.parent / f".sniff-{secrets.token_hex(8)}{Path(filename).suffix.lower()}"
    try:
        os.symlink(path, link)  # the readers go by the file's extension
        records = read_records(link)[:sample]
    except (OSError, DataError):
        return None
    finally:
        link.unlink(missing_ok=True)
    votes = Counter(detect_format(r) for _, r in records if isinstance(r, dict))
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None
