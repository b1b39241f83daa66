"""The embedded store: one SQLite file in WAL mode, written by one gateway.

Every write is one ``BEGIN IMMEDIATE`` transaction, so the tool and the
gateway queue for the write lock instead of failing half way ("database
is locked" is waited out for up to ``busy_timeout``). ``synchronous=FULL``
makes each commit durable before the gateway replies; the gateway commits
decisions in batches, so the cost of the fsync is shared by the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from policy.admission import (
    Event,
    Joined,
    Left,
    LicenseChanged,
    Place,
    SeatChanged,
)
from policy.codes import fingerprint
from policy.errors import RuleViolation, StoreError
from policy.licenses import Kind, License, State
from policy.store import (
    AuditEntry,
    ReminderMail,
    ReminderStep,
    RouterRow,
    Tenant,
    TenantData,
    check_cancellable,
    router_writes,
)
from policy.timeutil import from_text, to_text

SCHEMA = [
    # version 1
    """
    CREATE TABLE tenants (
        tenant      TEXT PRIMARY KEY,
        tz          TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE licenses (
        id             TEXT PRIMARY KEY,  -- unique across tenants: redeemed once
        tenant         TEXT NOT NULL REFERENCES tenants(tenant),
        kind           TEXT NOT NULL,
        capacity       INTEGER NOT NULL,
        term_months    INTEGER NOT NULL,
        issued_at      TEXT NOT NULL,
        imported_at    TEXT NOT NULL,
        activation_at  TEXT,
        state          TEXT NOT NULL,     -- last state recorded in the audit log
        code           TEXT NOT NULL,
        batch          TEXT               -- the import it came in, if a file
    );
    CREATE INDEX licenses_by_tenant ON licenses(tenant);
    CREATE TABLE import_batches (
        batch       TEXT PRIMARY KEY,
        tenant      TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        rows        INTEGER NOT NULL,
        committed   INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE routers (
        tenant      TEXT NOT NULL REFERENCES tenants(tenant),
        router      TEXT NOT NULL,
        epoch       INTEGER NOT NULL DEFAULT 0,
        session     TEXT,
        arrival     INTEGER,              -- NULL: not in line
        seated      INTEGER NOT NULL DEFAULT 0,
        first_seen  TEXT NOT NULL,
        changed_at  TEXT NOT NULL,
        PRIMARY KEY (tenant, router)
    );
    CREATE INDEX routers_in_line ON routers(arrival) WHERE arrival IS NOT NULL;
    CREATE TABLE audit (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        at          TEXT NOT NULL,
        tenant      TEXT NOT NULL,
        subject     TEXT NOT NULL,        -- tenant, license or router
        subject_id  TEXT NOT NULL,
        event       TEXT NOT NULL,
        detail      TEXT NOT NULL,
        actor       TEXT NOT NULL,
        batch       TEXT
    );
    CREATE INDEX audit_by_subject ON audit(tenant, subject, subject_id);
    CREATE TABLE changes (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant  TEXT NOT NULL,
        at      TEXT NOT NULL
    );
    """,
    # version 2: expiry reminders
    """
    CREATE TABLE contacts (
        tenant    TEXT NOT NULL REFERENCES tenants(tenant),
        address   TEXT NOT NULL,
        added_at  TEXT NOT NULL,
        PRIMARY KEY (tenant, address)
    );
    CREATE TABLE reminder_mails (
        mail             TEXT PRIMARY KEY,  -- policy.reminders.mail_key
        tenant           TEXT NOT NULL REFERENCES tenants(tenant),
        state            TEXT NOT NULL,     -- waiting, sending, sent, dropped
        recipients       TEXT NOT NULL,     -- JSON list
        message          BLOB NOT NULL,     -- as composed: a resend is the same
        claimed_at       TEXT NOT NULL,
        claimed_by       TEXT NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        sent_at          TEXT,
        last_error       TEXT
    );
    CREATE INDEX reminder_mails_open ON reminder_mails(state)
        WHERE state IN ('waiting', 'sending');
    CREATE TABLE reminders (
        license     TEXT NOT NULL,
        days        INTEGER NOT NULL,
        tenant      TEXT NOT NULL,
        mail        TEXT NOT NULL REFERENCES reminder_mails(mail),
        due_at      TEXT NOT NULL,
        expires_at  TEXT NOT NULL,
        PRIMARY KEY (license, days)         -- one claim per license and step
    );
    CREATE INDEX reminders_by_tenant ON reminders(tenant);
    """,
]

GATEWAY = "gateway"
IMPORT_CHUNK = 250
"""Rows an import writes per transaction: a few milliseconds of write lock."""
IMPORT_PAUSE = 0.005
"""Seconds an import leaves the write lock free between chunks."""
STALE_IMPORT = timedelta(minutes=10)
"""An import batch left uncommitted this long was abandoned (a crash)."""
VISIBLE = (
    "(batch IS NULL OR batch IN (SELECT batch FROM import_batches WHERE committed))"
)
"""Rows of an import become visible all at once, when its batch commits."""


DATABASE_MODE = 0o640
"""A new database file's mode: it holds every license code in full."""


def _create_private(path: Path) -> None:
    """Create an empty database file that others cannot read.

    SQLite would create it by the umask (often 0644); its WAL and shared
    memory files take the database file's own mode.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DATABASE_MODE))


class SqliteStore:
    """:class:`policy.store.Store` on one SQLite file."""

    def __init__(self, db: aiosqlite.Connection, lock_timeout: float) -> None:
        self._db = db
        self._lock_timeout = lock_timeout

    @classmethod
    async def open(
        cls, path: str | Path, lock_timeout: float = 10.0, *, create: bool = True
    ) -> SqliteStore:
        """Open (and create or migrate) the database at ``path``.

        ``lock_timeout`` is how long a write waits for another process's
        write to finish before it fails. With ``create`` false, a path that
        does not exist is refused rather than made into an empty database.
        """
        path = Path(path)
        if not create and not path.exists():
            raise StoreError(
                f"database {path} does not exist: check the path, or create it "
                "with 'irm-tool tenant add'"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(path)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        store = cls(db, lock_timeout)
        try:
            await db.execute("PRAGMA busy_timeout = 2")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA foreign_keys = ON")
            await store._migrate()
        except (sqlite3.Error, StoreError) as exc:
            # Close, or the connection's worker thread keeps the process alive.
            await db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        return store

    async def close(self) -> None:
        await self._db.close()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        await self._lock()
        try:
            yield self._db
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        try:
            await self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._db.execute("ROLLBACK")
            raise StoreError(f"commit failed, nothing was written: {exc}") from exc

    async def _lock(self) -> None:
        """Take the write lock, polling every millisecond while another has it.

        SQLite's own busy handler sleeps in growing steps of up to 100 ms, so
        a writer that waits behind a run of short transactions (the tool's
        import chunks) could miss every gap between them for hundreds of
        milliseconds. Polling finely gets the gateway in at the next gap.
        """
        deadline = asyncio.get_running_loop().time() + self._lock_timeout
        while True:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreError(f"cannot start a write: {exc}") from exc
                if asyncio.get_running_loop().time() > deadline:
                    raise StoreError(
                        f"the database stayed locked by another writer for "
                        f"{self._lock_timeout:g} s: {exc}"
                    ) from exc
                await asyncio.sleep(0.001)
            else:
                return

    async def _migrate(self) -> None:
        async with self._write() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)"
            )
            row = await _one(db, "SELECT value FROM meta WHERE key = 'schema'")
            version = int(row[0]) if row else 0
            if version > len(SCHEMA):
                raise StoreError(
                    f"database schema {version} is newer than this program "
                    f"({len(SCHEMA)}): upgrade irm-gateway"
                )
            for script in SCHEMA[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        await db.execute(statement)
            await db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(len(SCHEMA)),)
            )

    # -- tenants -------------------------------------------------------------

    async def add_tenant(self, tenant: str, tz: str, now: datetime) -> None:
        async with self._write() as db:
            row = await _one(db, "SELECT tz FROM tenants WHERE tenant = ?", (tenant,))
            if row is not None:
                if row[0] != tz:
                    raise RuleViolation(
                        f"tenant {tenant} exists with time zone {row[0]}, not {tz}"
                    )
                return
            stamp = to_text(now)
            await db.execute(
                "INSERT INTO tenants VALUES (?, ?, ?)", (tenant, tz, stamp)
            )
            await _audit(
                db, stamp, tenant, "tenant", tenant, "created", {"tz": tz}, "admin"
            )
            await db.execute(
                "INSERT INTO changes (tenant, at) VALUES (?, ?)", (tenant, stamp)
            )

    async def tenant(self, tenant: str) -> Tenant | None:
        row = await _one(self._db, "SELECT * FROM tenants WHERE tenant = ?", (tenant,))
        return _tenant(row) if row else None

    async def tenants(self) -> list[Tenant]:
        rows = await self._db.execute_fetchall("SELECT * FROM tenants ORDER BY tenant")
        return [_tenant(r) for r in rows]

    # -- licenses ------------------------------------------------------------

    async def licenses(self, tenant: str) -> list[License]:
        rows = await self._db.execute_fetchall(
            "SELECT id, licenses.tenant, kind, capacity, term_months, issued_at,"
            " imported_at, activation_at, tz FROM licenses JOIN tenants USING (tenant)"
            f" WHERE licenses.tenant = ? AND {VISIBLE} ORDER BY imported_at, id",
            (tenant,),
        )
        # Thousands of rows take tens of milliseconds to convert: in a worker
        # thread, the event loop keeps serving hellos meanwhile.
        return await asyncio.to_thread(_licenses, list(rows))

    async def license_states(self, tenant: str) -> dict[str, State]:
        rows = await self._db.execute_fetchall(
            f"SELECT id, state FROM licenses WHERE tenant = ? AND {VISIBLE}", (tenant,)
        )
        return {r[0]: State(r[1]) for r in rows}

    async def owners(self, license_ids: Collection[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        ids = list(license_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await self._db.execute_fetchall(
                f"SELECT id, tenant FROM licenses WHERE id IN ({marks}) AND {VISIBLE}",
                chunk,
            )
            found.update({r[0]: r[1] for r in rows})
        return found

    async def add_licenses(
        self,
        tenant: str,
        items: Sequence[tuple[License, str]],
        now: datetime,
        actor: str,
    ) -> None:
        """Add licenses all or nothing, without holding the write lock long.

        A large import is written in chunks of :data:`IMPORT_CHUNK`, each its
        own short transaction, into a batch that stays invisible; a last tiny
        transaction commits the batch, and with it every row at once. So the
        gateway's own commits slip in between the chunks instead of waiting
        for one long transaction.
        """
        stamp = to_text(now)
        batch = uuid.uuid4().hex
        await self._forget_abandoned_imports(now)
        async with self._write() as db:
            await db.execute(
                "INSERT INTO import_batches VALUES (?, ?, ?, ?, 0)",
                (batch, tenant, stamp, len(items)),
            )
        try:
            for start in range(0, len(items), IMPORT_CHUNK):
                chunk = items[start : start + IMPORT_CHUNK]
                async with self._write() as db:
                    await _insert_licenses(db, chunk, stamp, actor, batch)
                # A gap for the gateway, which polls for the lock every 1 ms.
                await asyncio.sleep(IMPORT_PAUSE)
        except BaseException:
            await self._drop_batch(batch)
            raise
        async with self._write() as db:
            await db.execute(
                "UPDATE import_batches SET committed = 1 WHERE batch = ?", (batch,)
            )
            await db.execute(
                "INSERT INTO changes (tenant, at) VALUES (?, ?)", (tenant, stamp)
            )

    async def _drop_batch(self, batch: str) -> None:
        async with self._write() as db:
            for table in ("licenses", "audit", "import_batches"):
                await db.execute(f"DELETE FROM {table} WHERE batch = ?", (batch,))

    async def _forget_abandoned_imports(self, now: datetime) -> None:
        rows = await self._db.execute_fetchall(
            "SELECT batch, started_at FROM import_batches WHERE NOT committed"
        )
        for batch, started in rows:
            if now - _instant(started) > STALE_IMPORT:
                await self._drop_batch(batch)

    async def save_activations(
        self,
        tenant: str,
        licenses: Sequence[License],
        states: dict[str, State],
        now: datetime,
        actor: str,
    ) -> None:
        stamp = to_text(now)
        async with self._write() as db:
            for lic in licenses:
                row = await _one(
                    db,
                    "SELECT state, activation_at FROM licenses"
                    " WHERE id = ? AND tenant = ?",
                    (lic.id, tenant),
                )
                if row is None or row[1] is not None:
                    raise RuleViolation(
                        f"license {lic.id} changed meanwhile; nothing was activated"
                    )
                await db.execute(
                    "UPDATE licenses SET activation_at = ?, state = ? WHERE id = ?",
                    (to_text(lic.activation_at), states[lic.id].value, lic.id),
                )
                detail: dict[str, Any] = {
                    "from": row[0],
                    "to": states[lic.id].value,
                    "activation_at": to_text(lic.activation_at),
                    "expires_at": to_text(lic.expires_at),
                }
                await _audit(
                    db, stamp, tenant, "license", lic.id, "activated", detail, actor
                )
            await db.execute(
                "INSERT INTO changes (tenant, at) VALUES (?, ?)", (tenant, stamp)
            )

    async def cancel_activations(
        self, tenant: str, licenses: Sequence[License], now: datetime, actor: str
    ) -> None:
        stamp = to_text(now)
        async with self._write() as db:
            for lic in licenses:
                cancelled = to_text(lic.activation_at)
                row = await _one(
                    db,
                    "SELECT state, activation_at FROM licenses"
                    " WHERE id = ? AND tenant = ?",
                    (lic.id, tenant),
                )
                check_cancellable(
                    lic,
                    None if row is None else (row[0], from_text(row[1])),
                )
                await db.execute(
                    "UPDATE licenses SET activation_at = NULL, state = ? WHERE id = ?",
                    (State.AVAILABLE.value, lic.id),
                )
                detail: dict[str, Any] = {
                    "from": State.SCHEDULED.value,
                    "to": State.AVAILABLE.value,
                    "activation_at": cancelled,
                }
                await _audit(
                    db, stamp, tenant, "license", lic.id, "activation_cancelled",
                    detail, actor,
                )  # fmt: skip
            await db.execute(
                "INSERT INTO changes (tenant, at) VALUES (?, ?)", (tenant, stamp)
            )

    # -- routers ---------------------------------------------------------------

    async def register_routers(
        self, tenant: str, routers: Sequence[str], now: datetime, actor: str
    ) -> list[str]:
        stamp = to_text(now)
        async with self._write() as db:
            rows = await db.execute_fetchall(
                "SELECT router FROM routers WHERE tenant = ?", (tenant,)
            )
            known = {r[0] for r in rows}
            new = [r for r in dict.fromkeys(routers) if r not in known]
            await db.executemany(
                "INSERT INTO routers (tenant, router, first_seen, changed_at)"
                " VALUES (?, ?, ?, ?)",
                [(tenant, r, stamp, stamp) for r in new],
            )
            await _audit_many(
                db,
                [(stamp, tenant, "router", r, "registered", "{}", actor) for r in new],
            )
        return new

    async def routers(self, tenant: str) -> list[RouterRow]:
        rows = await self._db.execute_fetchall(
            "SELECT tenant, router, epoch, session, arrival, seated, first_seen,"
            " changed_at FROM routers WHERE tenant = ?"
            " ORDER BY arrival IS NULL, arrival, router",
            (tenant,),
        )
        return [_router(r) for r in rows]

    async def places(self) -> list[Place]:
        rows = await self._db.execute_fetchall(
            "SELECT tenant, router, session, epoch, arrival, seated FROM routers"
            " WHERE arrival IS NOT NULL ORDER BY arrival"
        )
        now = datetime.min
        return [Place(r[0], r[1], r[2], r[3], r[4], bool(r[5]), now) for r in rows]

    async def epochs(self) -> dict[tuple[str, str], int]:
        rows = await self._db.execute_fetchall(
            "SELECT tenant, router, epoch FROM routers WHERE epoch > 0"
        )
        return {(r[0], r[1]): r[2] for r in rows}

    async def apply(self, events: Sequence[Event], now: datetime) -> None:
        """Write one batch of the core's events in one transaction."""
        if not events:
            return
        writes = _Writes(to_text(now) or "")
        for event in events:
            writes.add(event)
        async with self._write() as db:
            await writes.run(db)

    # -- audit and changes -------------------------------------------------------

    async def audit(
        self,
        tenant: str,
        subject: str | None = None,
        subject_id: str | None = None,
        limit: int = 200,
    ) -> list[AuditEntry]:
        query = (
            "SELECT seq, at, tenant, subject, subject_id, event, detail, actor"
            f" FROM audit WHERE tenant = ? AND {VISIBLE}"
        )
        params: list[Any] = [tenant]
        if subject is not None:
            query += " AND subject = ?"
            params.append(subject)
        if subject_id is not None:
            query += " AND subject_id = ?"
            params.append(subject_id)
        query += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        rows = await self._db.execute_fetchall(query, params)
        return [_entry(r) for r in reversed(list(rows))]

    async def export_tenant(self, tenant: str) -> TenantData | None:
        """All of a tenant's committed rows, or None if there is no such tenant."""
        found = await self.tenant(tenant)
        if found is None:
            return None
        licenses = await self._db.execute_fetchall(
            "SELECT id, kind, capacity, term_months, issued_at, imported_at,"
            f" activation_at, state, code FROM licenses WHERE tenant = ? AND {VISIBLE}"
            " ORDER BY imported_at, id",
            (tenant,),
        )
        routers = await self._db.execute_fetchall(
            "SELECT router, epoch, session, arrival, seated, first_seen, changed_at"
            " FROM routers WHERE tenant = ? ORDER BY router",
            (tenant,),
        )
        audit = await self._db.execute_fetchall(
            "SELECT at, subject, subject_id, event, detail, actor FROM audit"
            f" WHERE tenant = ? AND {VISIBLE} ORDER BY seq",
            (tenant,),
        )
        return TenantData(
            found,
            [(*r[:4], _instant(r[4]), _instant(r[5]), from_text(r[6]), *r[7:])
             for r in licenses],
            [(*r[:4], bool(r[4]), _instant(r[5]), _instant(r[6])) for r in routers],
            [(_instant(r[0]), *r[1:4], json.loads(r[4]), r[5]) for r in audit],
            await self.contacts(tenant),
            await self.reminder_mails(tenant),
        )  # fmt: skip

    async def changes_after(self, seq: int) -> tuple[int, set[str]]:
        rows = list(
            await self._db.execute_fetchall(
                "SELECT seq, tenant FROM changes WHERE seq > ? ORDER BY seq", (seq,)
            )
        )
        if not rows:
            return seq, set()
        return rows[-1][0], {r[1] for r in rows}

    async def poll_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        row = await _one(self._db, "PRAGMA data_version")
        assert row is not None
        return int(row[0])

    # -- contacts and reminders ------------------------------------------------

    async def add_contacts(
        self, tenant: str, addresses: Sequence[str], now: datetime, actor: str
    ) -> list[str]:
        stamp = to_text(now)
        async with self._write() as db:
            known = set(await self._contacts(db, tenant))
            new = [a for a in dict.fromkeys(addresses) if a not in known]
            await db.executemany(
                "INSERT INTO contacts VALUES (?, ?, ?)",
                [(tenant, a, stamp) for a in new],
            )
            await _audit_many(
                db,
                [(stamp, tenant, "tenant", tenant, "contact_added",
                  json.dumps({"address": a}), actor) for a in new],
            )  # fmt: skip
        return new

    async def remove_contacts(
        self, tenant: str, addresses: Sequence[str], now: datetime, actor: str
    ) -> list[str]:
        stamp = to_text(now)
        async with self._write() as db:
            known = set(await self._contacts(db, tenant))
            gone = [a for a in dict.fromkeys(addresses) if a in known]
            await db.executemany(
                "DELETE FROM contacts WHERE tenant = ? AND address = ?",
                [(tenant, a) for a in gone],
            )
            await _audit_many(
                db,
                [(stamp, tenant, "tenant", tenant, "contact_removed",
                  json.dumps({"address": a}), actor) for a in gone],
            )  # fmt: skip
        return gone

    async def contacts(self, tenant: str) -> list[str]:
        return await self._contacts(self._db, tenant)

    @staticmethod
    async def _contacts(db: aiosqlite.Connection, tenant: str) -> list[str]:
        rows = await db.execute_fetchall(
            "SELECT address FROM contacts WHERE tenant = ? ORDER BY address", (tenant,)
        )
        return [r[0] for r in rows]

    async def reminder_steps(self, tenant: str) -> dict[str, int]:
        """Per license, the fewest days before expiry of any claimed reminder."""
        rows = await self._db.execute_fetchall(
            "SELECT license, MIN(days) FROM reminders WHERE tenant = ?"
            " GROUP BY license",
            (tenant,),
        )
        return {r[0]: r[1] for r in rows}

    async def claim_reminder(self, claim: ReminderMail) -> bool:
        """Record a mail and its steps, unless any step (or a later one) is
        claimed already: then nothing is written and the answer is False.

        One write transaction: of two senders racing for the same steps,
        the second sees the first's claim (and the primary key of
        ``reminders`` would refuse it anyway).
        """
        async with self._write() as db:
            for step in claim.steps:
                row = await _one(
                    db, "SELECT MIN(days) FROM reminders WHERE license = ?",
                    (step.license,),
                )  # fmt: skip
                if row is not None and row[0] is not None and row[0] <= step.days:
                    return False
            await db.execute(
                "INSERT INTO reminder_mails (mail, tenant, state, recipients,"
                " message, claimed_at, claimed_by, next_attempt_at)"
                " VALUES (?, ?, 'waiting', ?, ?, ?, ?, ?)",
                (claim.mail, claim.tenant, json.dumps(list(claim.recipients)),
                 claim.message, to_text(claim.claimed_at), claim.claimed_by,
                 to_text(claim.next_attempt_at)),
            )  # fmt: skip
            await db.executemany(
                "INSERT INTO reminders VALUES (?, ?, ?, ?, ?, ?)",
                [(s.license, s.days, claim.tenant, claim.mail, to_text(s.due_at),
                  to_text(s.expires_at)) for s in claim.steps],
            )  # fmt: skip
        return True

    async def take_reminder(
        self, mail: str, now: datetime, until: datetime, owner: str, *, force: bool
    ) -> ReminderMail | None:
        """Start an attempt at ``mail`` if it is due (or ``force``), else None.

        Due means waiting with its retry time come, or sending with its
        holder's time run out (that sender died). ``force`` skips a retry's
        wait, never another sender's hold. The attempt holds the mail until
        ``until``.
        """
        async with self._write() as db:
            found = await self._mails(db, "mail = ?", (mail,))
            if not found or not _ready(found[0], now, force):
                return None
            await db.execute(
                "UPDATE reminder_mails SET state = 'sending', claimed_by = ?,"
                " attempts = attempts + 1, next_attempt_at = ? WHERE mail = ?",
                (owner, to_text(until), mail),
            )
            taken = await self._mails(db, "mail = ?", (mail,))
        return taken[0]

    async def reminder_sent(self, mail: str, now: datetime) -> None:
        stamp = to_text(now)
        async with self._write() as db:
            found = await self._mails(db, "mail = ?", (mail,))
            await db.execute(
                "UPDATE reminder_mails SET state = 'sent', sent_at = ?,"
                " last_error = NULL WHERE mail = ?",
                (stamp, mail),
            )
            await _audit_many(
                db,
                [(stamp, m.tenant, "license", s.license, "reminder_sent",
                  json.dumps({"days": s.days, "mail": mail,
                              "to": list(m.recipients)}), m.claimed_by)
                 for m in found for s in m.steps],
            )  # fmt: skip

    async def reminder_failed(
        self, mail: str, now: datetime, retry_at: datetime, error: str
    ) -> None:
        async with self._write() as db:
            await db.execute(
                "UPDATE reminder_mails SET state = 'waiting', next_attempt_at = ?,"
                " last_error = ? WHERE mail = ? AND state != 'sent'",
                (to_text(retry_at), error, mail),
            )

    async def reminder_dropped(self, mail: str, now: datetime, why: str) -> None:
        async with self._write() as db:
            await db.execute(
                "UPDATE reminder_mails SET state = 'dropped', last_error = ?,"
                " next_attempt_at = ? WHERE mail = ? AND state != 'sent'",
                (why, to_text(now), mail),
            )

    async def reminder_mails(
        self, tenant: str | None = None, *, open_only: bool = False
    ) -> list[ReminderMail]:
        where, params = ("tenant = ?", (tenant,)) if tenant else ("1", ())
        if open_only:
            where += " AND state IN ('waiting', 'sending')"
        return await self._mails(self._db, where, params)

    async def fingerprints(self, license_ids: Collection[str]) -> dict[str, str]:
        """Each license's code as :func:`policy.codes.fingerprint` names it."""
        found: dict[str, str] = {}
        for lid in license_ids:
            row = await _one(self._db, "SELECT code FROM licenses WHERE id = ?", (lid,))
            if row is not None:
                found[lid] = fingerprint(row[0])
        return found

    @staticmethod
    async def _mails(
        db: aiosqlite.Connection, where: str, params: tuple[Any, ...]
    ) -> list[ReminderMail]:
        rows = await db.execute_fetchall(
            "SELECT mail, tenant, state, recipients, message, claimed_at,"
            " claimed_by, attempts, next_attempt_at, sent_at, last_error"
            f" FROM reminder_mails WHERE {where} ORDER BY claimed_at, mail",
            params,
        )
        mails = []
        for row in rows:
            steps = await db.execute_fetchall(
                "SELECT license, days, due_at, expires_at FROM reminders"
                " WHERE mail = ? ORDER BY expires_at, license",
                (row[0],),
            )
            mails.append(_mail(row, steps))
        return mails


def _ready(mail: ReminderMail, now: datetime, force: bool) -> bool:
    if mail.state == "waiting":
        return force or mail.next_attempt_at <= now
    return mail.state == "sending" and mail.next_attempt_at <= now


def _mail(row: Sequence[Any], steps: Iterable[Sequence[Any]]) -> ReminderMail:
    return ReminderMail(
        mail=row[0],
        tenant=row[1],
        state=row[2],
        recipients=tuple(json.loads(row[3])),
        message=bytes(row[4]),
        claimed_at=_instant(row[5]),
        claimed_by=row[6],
        attempts=row[7],
        next_attempt_at=_instant(row[8]),
        sent_at=from_text(row[9]),
        last_error=row[10],
        steps=tuple(
            ReminderStep(s[0], s[1], _instant(s[2]), _instant(s[3])) for s in steps
        ),
    )


class _Writes:
    """One batch of events, grouped into a few ``executemany`` calls."""

    def __init__(self, stamp: str) -> None:
        self.stamp = stamp
        self.rows: list[Event] = []
        self.states: list[tuple[Any, ...]] = []
        self.audit: list[tuple[Any, ...]] = []

    def add(self, event: Event) -> None:
        if isinstance(event, Joined | SeatChanged | Left):
            self.rows.append(event)
        if isinstance(event, Joined):
            self._joined(event)
        elif isinstance(event, SeatChanged):
            v = event.verdict
            what = "seat_granted" if v.accepted else "seat_lost"
            detail = {
                "reason": v.reason.value,
                "cause": event.cause.value,
                "tier": v.tier,
                "position": v.position,
                "epoch": v.epoch,
            }
            self._log(v.tenant, "router", v.router, what, detail)
        elif isinstance(event, Left):
            detail = {
                "cause": event.cause.value,
                "was_seated": event.was_seated,
                "epoch": event.epoch,
            }
            self._log(event.tenant, "router", event.router, "left", detail)
        elif isinstance(event, LicenseChanged):
            self._license(event)
        else:
            detail = {
                "seats": event.after.seats,
                "tier": event.after.tier,
                "before": event.before.seats,
            }
            self._log(event.tenant, "tenant", event.tenant, "capacity", detail)

    def _joined(self, event: Joined) -> None:
        p = event.place
        what = "resumed" if event.resumed else "joined"
        detail = {"epoch": p.epoch, "arrival": p.arrival, "seated": p.seated}
        self._log(p.tenant, "router", p.router, what, detail)

    def _license(self, event: LicenseChanged) -> None:
        change = (event.after.value, event.license_id, event.before.value)
        self.states.append((*change, len(self.audit)))
        detail = {
            "from": event.before.value,
            "to": event.after.value,
            "at": to_text(event.at),
        }
        self._log(
            event.tenant,
            "license",
            event.license_id,
            event.after.value,
            detail,
            at=to_text(event.at),
        )

    def _log(
        self,
        tenant: str,
        subject: str,
        subject_id: str,
        what: str,
        detail: Mapping[str, Any],
        at: str | None = None,
    ) -> None:
        self.audit.append(
            (
                at or self.stamp,
                tenant,
                subject,
                subject_id,
                what,
                json.dumps(detail),
                GATEWAY,
            )
        )

    async def run(self, db: aiosqlite.Connection) -> None:
        upserts: list[tuple[Any, ...]] = []
        seats: list[tuple[Any, ...]] = []
        leaves: list[tuple[Any, ...]] = []
        for (tenant, router), w in router_writes(self.rows).items():
            if w.place is not None:
                p, gone = w.place, w.left
                upserts.append(
                    (tenant, router, p.epoch, None if gone else p.session,
                     None if gone else p.arrival, int(w.seated), self.stamp,
                     self.stamp)
                )  # fmt: skip
            elif w.left:
                leaves.append((int(w.seated), self.stamp, tenant, router))
            else:
                seats.append((int(w.seated), self.stamp, tenant, router))
        await db.executemany(
            "INSERT INTO routers (tenant, router, epoch, session, arrival, seated,"
            " first_seen, changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (tenant, router) DO UPDATE SET epoch = excluded.epoch,"
            " session = excluded.session, arrival = excluded.arrival,"
            " seated = excluded.seated, changed_at = excluded.changed_at",
            upserts,
        )
        await db.executemany(
            "UPDATE routers SET seated = ?, changed_at = ?"
            " WHERE tenant = ? AND router = ?",
            seats,
        )
        await db.executemany(
            "UPDATE routers SET session = NULL, arrival = NULL, seated = ?,"
            " changed_at = ? WHERE tenant = ? AND router = ?",
            leaves,
        )
        # A license's state moves only from the state the gateway saw: if the
        # tool changed it meanwhile (an activation cancelled), the gateway's
        # change is stale and is neither stored nor audited; the tool's
        # change reaches the gateway, which decides again from it.
        stale = set()
        for after, license_id, before, audit_row in self.states:
            async with db.execute(
                "UPDATE licenses SET state = ? WHERE id = ? AND state = ?",
                (after, license_id, before),
            ) as cursor:
                if cursor.rowcount != 1:
                    stale.add(audit_row)
        await _audit_many(db, [r for i, r in enumerate(self.audit) if i not in stale])


async def _insert_licenses(
    db: aiosqlite.Connection,
    items: Sequence[tuple[License, str]],
    stamp: str | None,
    actor: str,
    batch: str,
) -> None:
    try:
        await db.executemany(
            "INSERT INTO licenses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (*_license_params(lic, State.AVAILABLE, code), batch)
                for lic, code in items
            ],
        )
    except sqlite3.IntegrityError as exc:
        ids = [lic.id for lic, _ in items]
        held = await _held_by_unfinished_import(db, ids, batch)
        if held is not None:
            raise RuleViolation(held) from exc
        raise RuleViolation(
            f"a license of this import was redeemed meanwhile ({exc}); nothing "
            "was imported: run the import again to see which"
        ) from exc

    await db.executemany(
        "INSERT INTO audit (at, tenant, subject, subject_id, event, detail, actor,"
        " batch) VALUES (?, ?, 'license', ?, 'imported', ?, ?, ?)",
        [(stamp, lic.tenant, lic.id, _imported(lic), actor, batch) for lic, _ in items],
    )


async def _held_by_unfinished_import(
    db: aiosqlite.Connection, ids: Sequence[str], ours: str
) -> str | None:
    """Why a license cannot be imported while another import holds it."""
    marks = ",".join("?" * len(ids))
    row = await _one(
        db,
        "SELECT l.id, l.tenant, b.started_at FROM licenses l JOIN import_batches b"
        f" USING (batch) WHERE NOT b.committed AND batch != ? AND l.id IN ({marks})"
        " LIMIT 1",
        [ours, *ids],
    )
    if row is None:
        return None
    started = _instant(row[2])
    return (
        f"license {row[0]} is held by an import into tenant {row[1]} that started "
        f"at {to_text(started)} and has not finished; nothing was imported. If "
        "no import is running (one was killed), its rows are forgotten "
        f"{int(STALE_IMPORT.total_seconds() // 60)} minutes after its start, "
        f"from {to_text(started + STALE_IMPORT)}: run the import again then"
    )


def _imported(lic: License) -> str:
    return json.dumps({"kind": lic.kind.value, "state": State.AVAILABLE.value})


async def _one(
    db: aiosqlite.Connection, query: str, params: Iterable[Any] = ()
) -> sqlite3.Row | None:
    async with db.execute(query, tuple(params)) as cursor:
        row: sqlite3.Row | None = await cursor.fetchone()
        return row


async def _audit(
    db: aiosqlite.Connection,
    at: str | None,
    tenant: str,
    subject: str,
    subject_id: str,
    event: str,
    detail: dict[str, Any],
    actor: str,
) -> None:
    await _audit_many(
        db, [(at, tenant, subject, subject_id, event, json.dumps(detail), actor)]
    )


async def _audit_many(
    db: aiosqlite.Connection, rows: Sequence[tuple[Any, ...]]
) -> None:
    if rows:
        await db.executemany(
            "INSERT INTO audit (at, tenant, subject, subject_id, event, detail, actor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def _instant(text: str) -> datetime:
    moment = from_text(text)
    assert moment is not None
    return moment


def _tenant(row: Sequence[Any]) -> Tenant:
    return Tenant(row[0], row[1], _instant(row[2]))


def _license(row: Sequence[Any]) -> License:
    return License(
        id=row[0],
        tenant=row[1],
        kind=Kind(row[2]),
        capacity=row[3],
        term_months=row[4],
        issued_at=_instant(row[5]),
        imported_at=_instant(row[6]),
        activation_at=from_text(row[7]),
        tz=row[8],
    )


def _licenses(rows: list[Any]) -> list[License]:
    return [_license(r) for r in rows]


def _license_params(lic: License, state: State, code: str) -> tuple[Any, ...]:
    return (
        lic.id,
        lic.tenant,
        lic.kind.value,
        lic.capacity,
        lic.term_months,
        to_text(lic.issued_at),
        to_text(lic.imported_at),
        to_text(lic.activation_at),
        state.value,
        code,
    )


def _router(row: Sequence[Any]) -> RouterRow:
    return RouterRow(
        tenant=row[0],
        router=row[1],
        epoch=row[2],
        session=row[3],
        arrival=row[4],
        seated=bool(row[5]),
        first_seen=_instant(row[6]),
        changed_at=_instant(row[7]),
    )


def _entry(row: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        seq=row[0],
        at=_instant(row[1]),
        tenant=row[2],
        subject=row[3],
        subject_id=row[4],
        event=row[5],
        detail=json.loads(row[6]),
        actor=row[7],
    )
