"""Open the store an operator named: a PostgreSQL URL or an SQLite file."""

from __future__ import annotations

from pathlib import Path

from policy.postgres_store import PostgresStore
from policy.sqlite_store import SqliteStore
from policy.store import Store

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(POSTGRES_SCHEMES)


async def open_store(location: str | Path, *, create: bool = True) -> Store:
    """A PostgreSQL store for a ``postgresql://`` URL, else an SQLite file.

    ``create`` only concerns SQLite: a PostgreSQL database is made by its
    administrator, and its schema by the first program that opens it.
    """
    if is_postgres(location):
        return await PostgresStore.open(str(location))
    return await SqliteStore.open(location, create=create)
