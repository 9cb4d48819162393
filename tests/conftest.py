"""Shared fixtures: tiny models built in code and small datasets written to tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


from helpers import chat_records, write_jsonl  # noqa: E402


@pytest.fixture
def one_thread():
    """Torch on one thread: tiny models run fastest so, and threads only fight over shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", chat_records(24))


# ----------------------------------------------------------------------------- PostgreSQL


class PostgresServer:
    """A throwaway PostgreSQL cluster (Debian's binaries) on a free loopback port."""

    def __init__(self) -> None:
        import glob
        import shutil
        import socket
        import subprocess
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.skip("PostgreSQL is not installed: apt-get install postgresql "
                        "(.ci/run installs it)")
        self.bin = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))  # not under a 0700 pytest dir
        as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root: run the server as postgres
            shutil.chown(self.root, "postgres", "postgres")
            as_postgres = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        data, log = self.root / "data", self.root / "server.log"
        self._run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True,
                                                capture_output=True, text=True, timeout=120)
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                  "--no-sync")
        self.pg_ctl = [str(self.bin / "pg_ctl"), "-D", str(data)]
        self._run(*self.pg_ctl, "-l", str(log), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
                  "start")
        self.databases = 0

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        self.databases += 1
        name = f"test_{self.databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        import shutil

        try:
            self._run(*self.pg_ctl, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql_server():
    """One PostgreSQL server for the session (initdb in a temporary folder, pg_ctl on a
    loopback port), stopped at the end; skipped where Debian's postgresql is not installed."""
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (the dev extra has it)")
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgresql(postgresql_server) -> str:
    """The URL of a fresh database on the session's PostgreSQL server."""
    return postgresql_server.create_database()
