"""A real PostgreSQL for the tests: a fresh database per test.

The server is, in this order: the one ``IRM_TEST_POSTGRES`` names (a
``postgresql://`` URL), the machine's own on 127.0.0.1:5432 if it answers, or a
throwaway cluster made with initdb in a temporary directory (run as the
``postgres`` user when the tests run as root, since initdb refuses root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tools.broker import free_port

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"
BINARIES = [
    Path("/usr/lib/postgresql/15/bin"),
    *Path("/usr/lib/postgresql").glob("*/bin"),
]


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _binary(name: str) -> str:
    for folder in BINARIES:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: apt-get install postgresql")
    return found


class Cluster:
    """A PostgreSQL cluster of our own in a temporary directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="irm-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str) -> None:
        # Output to a file, not a pipe: the server pg_ctl starts would hold a
        # pipe open, and waiting for its end would never return.
        with (self.dir / "commands.log").open("ab") as out:
            subprocess.run(
                [*self.as_user, *command], check=True, stdout=out, stderr=out,
                timeout=120,
            )  # fmt: skip

    def start(self) -> str:
        data = str(self.dir / "data")
        self._run(_binary("initdb"), "-D", data, "-U", "postgres", "-A", "trust")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        log = str(self.dir / "server.log")
        self._run(
            _binary("pg_ctl"), "-D", data, "-o", options, "-l", log, "-w", "start"
        )
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                  "stop")  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server's maintenance database."""
    wanted = os.environ.get("IRM_TEST_POSTGRES")
    if wanted:
        yield wanted
    elif _answers(LOCAL):
        yield LOCAL
    else:
        cluster = Cluster()
        try:
            yield cluster.start()
        finally:
            cluster.stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database of its own for one test, dropped afterwards."""
    name = f"irm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    yield _with_database(postgres_server, name)
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def _with_database(url: str, name: str) -> str:
    """``url`` with its path (the database) replaced by ``name``."""
    head, _, tail = url.partition("://")
    authority = tail.split("/", 1)[0]
    query = tail.split("?", 1)[1] if "?" in tail else ""
    return f"{head}://{authority}/{name}" + (f"?{query}" if query else "")
