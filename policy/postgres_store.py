"""The shared store: PostgreSQL, written by several gateways and the tool.

Beside everything :class:`policy.store.Store` asks, it gives the gateways
of a cluster what keeps first come, first served exact across them
(:meth:`PostgresStore.locked`): a batch locks its tenants' rows in one
order, reads what other gateways changed since it last looked (each
tenant row carries a ``version``, each router row the version that last
wrote it), decides, and writes with the version bumped, all in one
transaction. Arrival numbers are taken from the tenant row under its lock,
so a tenant's line is in the order PostgreSQL recorded the arrivals.

Instants are ``timestamptz``; the connection speaks UTC.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from policy.admission import (
    CapacityChanged,
    Event,
    Joined,
    Left,
    LicenseChanged,
    Place,
    SeatChanged,
)
from policy.codes import fingerprint
from policy.errors import RuleViolation, StoreError
from policy.licenses import Capacity, Kind, License, State, Tier
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
from policy.timeutil import to_text as _text

MIGRATIONS = [
    # 1: the tables of the embedded store, and what several gateways share.
    """
    CREATE TABLE tenants (
        tenant        text PRIMARY KEY,
        tz            text NOT NULL,
        created_at    timestamptz NOT NULL,
        version       bigint NOT NULL DEFAULT 0,  -- bumped by every line write
        next_arrival  bigint NOT NULL DEFAULT 1,  -- taken under the row lock
        seats         integer NOT NULL DEFAULT 0, -- capacity the line has now
        tier          text
    );
    CREATE TABLE licenses (
        id             text PRIMARY KEY,          -- redeemed once, anywhere
        tenant         text NOT NULL REFERENCES tenants(tenant),
        kind           text NOT NULL,
        capacity       integer NOT NULL,
        term_months    integer NOT NULL,
        issued_at      timestamptz NOT NULL,
        imported_at    timestamptz NOT NULL,
        activation_at  timestamptz,
        state          text NOT NULL,
        code           text NOT NULL
    );
    CREATE INDEX licenses_by_tenant ON licenses(tenant);
    CREATE TABLE routers (
        tenant        text NOT NULL REFERENCES tenants(tenant),
        router        text NOT NULL,
        epoch         bigint NOT NULL DEFAULT 0,
        session       text,
        arrival       bigint,                     -- NULL: not in line
        seated        boolean NOT NULL DEFAULT false,
        lease_until   timestamptz,
        will_session  text,                       -- whose last will cut the lease
        version       bigint NOT NULL DEFAULT 0,  -- the tenant version that wrote it
        first_seen    timestamptz NOT NULL,
        changed_at    timestamptz NOT NULL,
        PRIMARY KEY (tenant, router)
    );
    CREATE INDEX routers_by_version ON routers(tenant, version);
    CREATE INDEX routers_by_lease ON routers(lease_until) WHERE arrival IS NOT NULL;
    CREATE TABLE audit (
        seq         bigserial PRIMARY KEY,
        at          timestamptz NOT NULL,
        tenant      text NOT NULL,
        subject     text NOT NULL,
        subject_id  text NOT NULL,
        event       text NOT NULL,
        detail      jsonb NOT NULL,
        actor       text NOT NULL
    );
    CREATE INDEX audit_by_subject ON audit(tenant, subject, subject_id);
    CREATE TABLE changes (
        seq     bigserial PRIMARY KEY,
        tenant  text NOT NULL,
        at      timestamptz NOT NULL
    );
    """,
    # 2: expiry reminders: each tenant's contacts, and every mail claimed.
    """
    CREATE TABLE contacts (
        tenant    text NOT NULL REFERENCES tenants(tenant),
        address   text NOT NULL,
        added_at  timestamptz NOT NULL,
        PRIMARY KEY (tenant, address)
    );
    CREATE TABLE reminder_mails (
        mail             text PRIMARY KEY,        -- policy.reminders.mail_key
        tenant           text NOT NULL REFERENCES tenants(tenant),
        state            text NOT NULL
            CHECK (state IN ('waiting', 'sending', 'sent', 'dropped')),
        recipients       text[] NOT NULL,
        message          bytea NOT NULL,          -- as composed: a resend is the same
        claimed_at       timestamptz NOT NULL,
        claimed_by       text NOT NULL,
        attempts         integer NOT NULL DEFAULT 0,
        next_attempt_at  timestamptz NOT NULL,
        sent_at          timestamptz,
        last_error       text
    );
    CREATE INDEX reminder_mails_open ON reminder_mails(state)
        WHERE state IN ('waiting', 'sending');
    CREATE TABLE reminders (
        license     text NOT NULL,
        days        integer NOT NULL,
        tenant      text NOT NULL,
        mail        text NOT NULL REFERENCES reminder_mails(mail),
        due_at      timestamptz NOT NULL,
        expires_at  timestamptz NOT NULL,
        PRIMARY KEY (license, days)               -- one claim per license and step
    );
    CREATE INDEX reminders_by_tenant ON reminders(tenant);
    CREATE INDEX reminders_by_mail ON reminders(mail);
    """,
    # 3: a secret of the cluster's own, in the name of its MQTT shared
    # subscription: Mosquitto grants any client's SUBSCRIBE and checks read
    # rights only as it delivers, so a router that joined a known group
    # would take its turn at every hello and drop it.
    """
    CREATE TABLE cluster (
        key    text PRIMARY KEY,
        value  text NOT NULL
    );
    INSERT INTO cluster
        VALUES ('share_secret', replace(gen_random_uuid()::text, '-', ''));
    """,
    # 4: the instant at which a gateway last applied a change to the
    # tenant's licenses. Another gateway whose clock reads earlier (read
    # before it waited for the lock, or lagging) applies them at this instant
    # instead, so that it never takes back an expiry or activation applied.
    """
    ALTER TABLE tenants ADD COLUMN licenses_at timestamptz;
    """,
]

GATEWAY = "gateway"
MIGRATION_LOCK = 0x49524D01
"""Advisory lock held while migrating, so two gateways starting do it once."""
REMINDER_LOCK = 0x49524D02
"""Class of the advisory locks, one per license, that a reminder claim holds."""
BYTES = 'COLLATE "C"'
"""Text sorted by its bytes, as SQLite sorts it, whatever the database's locale."""


@dataclass(slots=True)
class TenantRow:
    """A locked tenant's shared counters, as the last writer left them."""

    version: int
    next_arrival: int
    capacity: Capacity
    licenses_at: datetime | None = None
    """The instant a gateway last applied a change to the tenant's licenses."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A place's lease as the deciding gateway holds it, to share with others."""

    tenant: str
    router: str
    until: datetime
    will_session: str | None


Conn = psycopg.AsyncConnection[TupleRow]

Changed = tuple[str, int, Place | None, str | None]
"""A router as another writer left it: (router, epoch, place, will_session)."""


class PostgresStore:
    """:class:`policy.store.Store` on PostgreSQL, for several gateways."""

    def __init__(self, conn: Conn, url: str) -> None:
        self._conn = conn
        self.url = url

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect to ``url`` and bring its schema up to date."""
        conn = await connect(url)
        store = cls(conn, url)
        try:
            await store._migrate()
        except BaseException:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        await self._conn.close()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Conn]:
        try:
            async with self._conn.transaction():
                yield self._conn
        except psycopg.errors.UniqueViolation as exc:
            raise RuleViolation(f"already stored, nothing was written: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL refused, nothing was written: {exc}") from exc

    async def _migrate(self) -> None:
        async with self._tx() as db:
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
            )
            row = await _one(db, "SELECT max(version) FROM schema_version")
            version = row[0] or 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database schema {version} is newer than this program "
                    f"({len(MIGRATIONS)}): upgrade irm-gateway"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                await db.execute(script.encode())
                await db.execute("INSERT INTO schema_version VALUES (%s)", (number,))

    # -- tenants -------------------------------------------------------------

    async def add_tenant(self, tenant: str, tz: str, now: datetime) -> None:
        async with self._tx() as db:
            row = await _one(db, "SELECT tz FROM tenants WHERE tenant = %s", (tenant,))
            if row is not None:
                if row[0] != tz:
                    raise RuleViolation(
                        f"tenant {tenant} exists with time zone {row[0]}, not {tz}"
                    )
                return
            await db.execute(
                "INSERT INTO tenants (tenant, tz, created_at) VALUES (%s, %s, %s)",
                (tenant, tz, now),
            )
            await _audit(db, [(now, tenant, "tenant", tenant, "created", {"tz": tz})])
            await _changed(db, tenant, now)

    async def tenant(self, tenant: str) -> Tenant | None:
        row = await _one(
            self._conn,
            "SELECT tenant, tz, created_at FROM tenants WHERE tenant = %s",
            (tenant,),
        )
        return Tenant(row[0], row[1], _utc(row[2])) if row else None

    async def tenants(self) -> list[Tenant]:
        rows = await _all(
            self._conn, "SELECT tenant, tz, created_at FROM tenants ORDER BY tenant"
        )
        return [Tenant(r[0], r[1], _utc(r[2])) for r in rows]

    # -- licenses ------------------------------------------------------------

    async def licenses(self, tenant: str) -> list[License]:
        return await _licenses(self._conn, tenant)

    async def license_states(self, tenant: str) -> dict[str, State]:
        rows = await _all(
            self._conn, "SELECT id, state FROM licenses WHERE tenant = %s", (tenant,)
        )
        return {r[0]: State(r[1]) for r in rows}

    async def owners(self, license_ids: Collection[str]) -> dict[str, str]:
        rows = await _all(
            self._conn,
            "SELECT id, tenant FROM licenses WHERE id = ANY(%s)",
            (list(license_ids),),
        )
        return {r[0]: r[1] for r in rows}

    async def add_licenses(
        self,
        tenant: str,
        items: Sequence[tuple[License, str]],
        now: datetime,
        actor: str,
    ) -> None:
        """All or nothing in one transaction: readers never wait on it (MVCC)."""
        async with self._tx() as db:
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO licenses VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
                    " %s, %s)",
                    [
                        _license_params(lic, State.AVAILABLE, code)
                        for lic, code in items
                    ],
                )
            detail = {"state": State.AVAILABLE.value}
            await _audit(
                db,
                [
                    (
                        now,
                        tenant,
                        "license",
                        lic.id,
                        "imported",
                        {"kind": lic.kind.value, **detail},
                    )
                    for lic, _ in items
                ],
                actor,
            )
            await _changed(db, tenant, now)

    async def save_activations(
        self,
        tenant: str,
        licenses: Sequence[License],
        states: dict[str, State],
        now: datetime,
        actor: str,
    ) -> None:
        async with self._tx() as db:
            await _lock_tenant(db, tenant)
            rows = []
            for lic in licenses:
                row = await _one(
                    db,
                    "SELECT state, activation_at FROM licenses"
                    " WHERE id = %s AND tenant = %s FOR UPDATE",
                    (lic.id, tenant),
                )
                if row is None or row[1] is not None:
                    raise RuleViolation(
                        f"license {lic.id} changed meanwhile; nothing was activated"
                    )
                await db.execute(
                    "UPDATE licenses SET activation_at = %s, state = %s WHERE id = %s",
                    (lic.activation_at, states[lic.id].value, lic.id),
                )
                detail = {
                    "from": row[0],
                    "to": states[lic.id].value,
                    "activation_at": _text(lic.activation_at),
                    "expires_at": _text(lic.expires_at),
                }
                rows.append((now, tenant, "license", lic.id, "activated", detail))
            await _audit(db, rows, actor)
            await _changed(db, tenant, now)

    async def cancel_activations(
        self, tenant: str, licenses: Sequence[License], now: datetime, actor: str
    ) -> None:
        async with self._tx() as db:
            await _lock_tenant(db, tenant)
            rows = []
            for lic in licenses:
                row = await _one(
                    db,
                    "SELECT state, activation_at FROM licenses"
                    " WHERE id = %s AND tenant = %s FOR UPDATE",
                    (lic.id, tenant),
                )
                check_cancellable(lic, None if row is None else (row[0], row[1]))
                await db.execute(
                    "UPDATE licenses SET activation_at = NULL, state = %s"
                    " WHERE id = %s",
                    (State.AVAILABLE.value, lic.id),
                )
                detail = {
                    "from": State.SCHEDULED.value,
                    "to": State.AVAILABLE.value,
                    "activation_at": _text(lic.activation_at),
                }
                rows.append(
                    (now, tenant, "license", lic.id, "activation_cancelled", detail)
                )
            await _audit(db, rows, actor)
            await _changed(db, tenant, now)

    # -- routers ---------------------------------------------------------------

    async def register_routers(
        self, tenant: str, routers: Sequence[str], now: datetime, actor: str
    ) -> list[str]:
        async with self._tx() as db:
            known = {
                r[0]
                for r in await _all(
                    db, "SELECT router FROM routers WHERE tenant = %s", (tenant,)
                )
            }
            new = [r for r in dict.fromkeys(routers) if r not in known]
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO routers (tenant, router, first_seen, changed_at)"
                    " VALUES (%s, %s, %s, %s)",
                    [(tenant, r, now, now) for r in new],
                )
            await _audit(
                db, [(now, tenant, "router", r, "registered", {}) for r in new], actor
            )
        return new

    async def routers(self, tenant: str) -> list[RouterRow]:
        rows = await _all(
            self._conn,
            "SELECT tenant, router, epoch, session, arrival, seated, first_seen,"
            " changed_at FROM routers WHERE tenant = %s"
            " ORDER BY arrival IS NULL, arrival, router",
            (tenant,),
        )
        return [
            RouterRow(r[0], r[1], r[2], r[3], r[4], r[5], _utc(r[6]), _utc(r[7]))
            for r in rows
        ]

    async def places(self) -> list[Place]:
        rows = await _all(
            self._conn,
            "SELECT tenant, router, session, epoch, arrival, seated FROM routers"
            " WHERE arrival IS NOT NULL ORDER BY arrival",
        )
        now = datetime.min
        return [Place(r[0], r[1], r[2], r[3], r[4], r[5], now) for r in rows]

    async def epochs(self) -> dict[tuple[str, str], int]:
        rows = await _all(
            self._conn, "SELECT tenant, router, epoch FROM routers WHERE epoch > 0"
        )
        return {(r[0], r[1]): r[2] for r in rows}

    async def apply(self, events: Sequence[Event], now: datetime) -> None:
        """Write one batch of the core's events, under its tenants' locks."""
        if not events:
            return
        tenants = {_tenant_of(e) for e in events}
        async with self.locked(tenants) as batch:
            rows = batch.rows
            arrival = max((r.next_arrival for r in rows.values()), default=1)
            for event in events:
                if isinstance(event, Joined):
                    arrival = max(arrival, event.place.arrival + 1)
            capacities = {t: r.capacity for t, r in rows.items()}
            for event in events:
                if isinstance(event, CapacityChanged):
                    capacities[event.tenant] = event.after
            await batch.write(events, [], now, arrival, capacities)

    # -- several gateways ----------------------------------------------------------

    @asynccontextmanager
    async def locked(self, tenants: Collection[str]) -> AsyncIterator[LockedBatch]:
        """One transaction holding the row locks of ``tenants`` (those that exist).

        Rows are locked in tenant order, so two gateways locking overlapping
        sets never deadlock.
        """
        async with self._tx() as db:
            rows = await _all(
                db,
                "SELECT tenant, version, next_arrival, seats, tier, licenses_at"
                " FROM tenants WHERE tenant = ANY(%s) ORDER BY tenant FOR UPDATE",
                (sorted(tenants),),
            )
            found = {
                r[0]: TenantRow(
                    r[1],
                    r[2],
                    Capacity(r[3], Tier(r[4]) if r[4] else None),
                    None if r[5] is None else _utc(r[5]),
                )
                for r in rows
            }
            yield LockedBatch(db, found)

    async def share_secret(self) -> str:
        """The cluster's secret, the same for every gateway on this database."""
        row = await _one(self._conn, "SELECT value FROM cluster WHERE key = %s",
                         ("share_secret",))  # fmt: skip
        return str(row[0])

    async def tenant_versions(self) -> dict[str, int]:
        rows = await _all(self._conn, "SELECT tenant, version FROM tenants")
        return {r[0]: r[1] for r in rows}

    async def due_leases(self, now: datetime) -> list[str]:
        """Tenants with a place whose lease ran out by ``now``."""
        rows = await _all(
            self._conn,
            "SELECT DISTINCT tenant FROM routers"
            " WHERE arrival IS NOT NULL AND lease_until <= %s",
            (now,),
        )
        return sorted(r[0] for r in rows)

    async def import_tenant(
        self, data: TenantData, capacity: Capacity, now: datetime, actor: str
    ) -> None:
        """Store a moved tenant whole, or nothing if it exists here already."""
        tenant = data.tenant
        async with self._tx() as db:
            if await _one(db, "SELECT 1 FROM tenants WHERE tenant = %s", (tenant.id,)):
                raise RuleViolation(
                    f"tenant {tenant.id} exists at the destination; nothing was moved"
                )
            arrivals = [r[3] for r in data.routers if r[3] is not None]
            await db.execute(
                "INSERT INTO tenants VALUES (%s, %s, %s, 1, %s, %s, %s)",
                (tenant.id, tenant.tz, tenant.created_at, max(arrivals, default=0) + 1,
                 capacity.seats, _tier(capacity)),
            )  # fmt: skip
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO licenses (id, tenant, kind, capacity, term_months,"
                    " issued_at, imported_at, activation_at, state, code)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [(r[0], tenant.id, *r[1:]) for r in data.licenses],
                )
                await cur.executemany(
                    "INSERT INTO routers (tenant, router, epoch, session, arrival,"
                    " seated, version, first_seen, changed_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, 1, %s, %s)",
                    [(tenant.id, *r) for r in data.routers],
                )
                await cur.executemany(
                    "INSERT INTO audit (at, tenant, subject, subject_id, event,"
                    " detail, actor) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [(r[0], tenant.id, *r[1:4], json.dumps(r[4]), r[5])
                     for r in data.audit],
                )  # fmt: skip
                await cur.executemany(
                    "INSERT INTO contacts (tenant, address, added_at)"
                    " VALUES (%s, %s, %s)",
                    [(tenant.id, address, now) for address in data.contacts],
                )
            for mail in data.reminders:
                await _insert_claim(db, mail)
                await db.execute(
                    "UPDATE reminder_mails SET state = %s, attempts = %s,"
                    " sent_at = %s, last_error = %s WHERE mail = %s",
                    (mail.state, mail.attempts, mail.sent_at, mail.last_error,
                     mail.mail),
                )  # fmt: skip
            detail = {"licenses": len(data.licenses), "routers": len(data.routers)}
            await _audit(
                db, [(now, tenant.id, "tenant", tenant.id, "moved", detail)], actor
            )
            await _changed(db, tenant.id, now)

    # -- audit and changes -------------------------------------------------------

    async def audit(
        self,
        tenant: str,
        subject: str | None = None,
        subject_id: str | None = None,
        limit: int = 200,
    ) -> list[AuditEntry]:
        rows = await _all(
            self._conn,
            "SELECT seq, at, tenant, subject, subject_id, event, detail, actor"
            " FROM audit WHERE tenant = %s"
            " AND (%s::text IS NULL OR subject = %s)"
            " AND (%s::text IS NULL OR subject_id = %s)"
            " ORDER BY seq DESC LIMIT %s",
            (tenant, subject, subject, subject_id, subject_id, limit),
        )
        return [
            AuditEntry(r[0], _utc(r[1]), r[2], r[3], r[4], r[5], r[6], r[7])
            for r in reversed(rows)
        ]

    async def changes_after(self, seq: int) -> tuple[int, set[str]]:
        rows = await _all(
            self._conn,
            "SELECT seq, tenant FROM changes WHERE seq > %s ORDER BY seq",
            (seq,),
        )
        if not rows:
            return seq, set()
        return rows[-1][0], {r[1] for r in rows}

    async def poll_version(self) -> int:
        """The last change's number: moves whenever the tool changed a tenant."""
        row = await _one(self._conn, "SELECT coalesce(max(seq), 0) FROM changes")
        return int(row[0])

    # -- contacts and reminders ------------------------------------------------

    async def add_contacts(
        self, tenant: str, addresses: Sequence[str], now: datetime, actor: str
    ) -> list[str]:
        """The addresses that were new, in the order given; the rest stay as are.

        ``ON CONFLICT`` rather than a read first: two admins adding the same
        address at once both succeed, and it is added (and audited) once.
        """
        wanted = list(dict.fromkeys(addresses))
        async with self._tx() as db:
            rows = await _all(
                db,
                "INSERT INTO contacts (tenant, address, added_at)"
                " SELECT %s, a, %s FROM unnest(%s::text[]) AS a"
                " ON CONFLICT DO NOTHING RETURNING address",
                (tenant, now, wanted),
            )
            added = {r[0] for r in rows}
            new = [a for a in wanted if a in added]
            await _audit(
                db,
                [(now, tenant, "tenant", tenant, "contact_added", {"address": a})
                 for a in new],
                actor,
            )  # fmt: skip
        return new

    async def remove_contacts(
        self, tenant: str, addresses: Sequence[str], now: datetime, actor: str
    ) -> list[str]:
        """The addresses that were contacts and are removed, in the order given."""
        wanted = list(dict.fromkeys(addresses))
        async with self._tx() as db:
            rows = await _all(
                db,
                "DELETE FROM contacts WHERE tenant = %s AND address = ANY(%s)"
                " RETURNING address",
                (tenant, wanted),
            )
            removed = {r[0] for r in rows}
            gone = [a for a in wanted if a in removed]
            await _audit(
                db,
                [(now, tenant, "tenant", tenant, "contact_removed", {"address": a})
                 for a in gone],
                actor,
            )  # fmt: skip
        return gone

    async def contacts(self, tenant: str) -> list[str]:
        rows = await _all(
            self._conn,
            f"SELECT address FROM contacts WHERE tenant = %s ORDER BY address {BYTES}",
            (tenant,),
        )
        return [r[0] for r in rows]

    async def reminder_steps(self, tenant: str) -> dict[str, int]:
        """Per license, the fewest days before expiry of any claimed reminder."""
        rows = await _all(
            self._conn,
            "SELECT license, min(days) FROM reminders WHERE tenant = %s"
            " GROUP BY license",
            (tenant,),
        )
        return {r[0]: r[1] for r in rows}

    async def claim_reminder(self, claim: ReminderMail) -> bool:
        """Record a mail and its steps, unless any step (or a later one) is
        claimed already: then nothing is written and the answer is False.

        Several gateways claim at once, and PostgreSQL does not serialise
        their transactions as SQLite's one writer does: so the claim first
        takes an advisory lock per license (in one order, so two claims
        never deadlock), and only then reads what is claimed. Of two senders
        racing for a license, the second reads the first's committed claim.
        Should a writer ever get past that, the primary key of ``reminders``
        refuses its step, and the claim is refused whole.
        """
        licenses = sorted({s.license for s in claim.steps})
        try:
            async with self._tx() as db:
                await db.execute(
                    "SELECT pg_advisory_xact_lock(%s::integer, hashtext(l))"
                    " FROM unnest(%s::text[]) AS l ORDER BY hashtext(l)",
                    (REMINDER_LOCK, licenses),
                )
                if await _overlaps(db, claim.steps, licenses):
                    return False
                await _insert_claim(db, claim)
        except RuleViolation:
            return False
        return True

    async def take_reminder(
        self, mail: str, now: datetime, until: datetime, owner: str, *, force: bool
    ) -> ReminderMail | None:
        """Start an attempt at ``mail`` if it is due (or ``force``), else None.

        Due means waiting with its retry time come, or sending with its
        holder's time run out (that sender died). ``force`` skips a retry's
        wait, never another sender's hold. The attempt holds the mail until
        ``until``. The mail's row is locked while it is read: of two senders
        taking it at once, the second reads the first's hold and gets None.
        """
        async with self._tx() as db:
            found = await _mails(db, "mail = %s", (mail,), lock=True)
            if not found or not _ready(found[0], now, force):
                return None
            await db.execute(
                "UPDATE reminder_mails SET state = 'sending', claimed_by = %s,"
                " attempts = attempts + 1, next_attempt_at = %s WHERE mail = %s",
                (owner, until, mail),
            )
        held = found[0]
        return replace(
            held,
            state="sending",
            claimed_by=owner,
            attempts=held.attempts + 1,
            next_attempt_at=_utc(until),
        )

    async def reminder_sent(self, mail: str, now: datetime) -> None:
        async with self._tx() as db:
            found = await _mails(db, "mail = %s", (mail,), lock=True)
            await db.execute(
                "UPDATE reminder_mails SET state = 'sent', sent_at = %s,"
                " last_error = NULL WHERE mail = %s",
                (now, mail),
            )
            for m in found:
                await _audit(
                    db,
                    [(now, m.tenant, "license", s.license, "reminder_sent",
                      {"days": s.days, "mail": mail, "to": list(m.recipients)})
                     for s in m.steps],
                    m.claimed_by,
                )  # fmt: skip

    async def reminder_failed(
        self, mail: str, now: datetime, retry_at: datetime, error: str
    ) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE reminder_mails SET state = 'waiting', next_attempt_at = %s,"
                " last_error = %s WHERE mail = %s AND state != 'sent'",
                (retry_at, error, mail),
            )

    async def reminder_dropped(self, mail: str, now: datetime, why: str) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE reminder_mails SET state = 'dropped', last_error = %s,"
                " next_attempt_at = %s WHERE mail = %s AND state != 'sent'",
                (why, now, mail),
            )

    async def reminder_mails(
        self, tenant: str | None = None, *, open_only: bool = False
    ) -> list[ReminderMail]:
        where, params = ("tenant = %s", (tenant,)) if tenant else ("true", ())
        if open_only:
            where += " AND state IN ('waiting', 'sending')"
        return await _mails(self._conn, where, params)

    async def fingerprints(self, license_ids: Collection[str]) -> dict[str, str]:
        """Each license's code as :func:`policy.codes.fingerprint` names it."""
        rows = await _all(
            self._conn,
            "SELECT id, code FROM licenses WHERE id = ANY(%s)",
            (list(license_ids),),
        )
        codes = {r[0]: r[1] for r in rows}
        return {lid: fingerprint(codes[lid]) for lid in license_ids if lid in codes}


async def _lock_tenant(db: Conn, tenant: str) -> None:
    """Take the tenant's row lock, as a deciding gateway does: a gateway
    reads a tenant's licenses and writes their states under it, so a change
    by the tool never lands between its read and its write."""
    await db.execute("SELECT 1 FROM tenants WHERE tenant = %s FOR UPDATE", (tenant,))


async def _licenses(db: Conn, tenant: str) -> list[License]:
    rows = await _all(
        db,
        "SELECT id, l.tenant, kind, capacity, term_months, issued_at,"
        " imported_at, activation_at, tz FROM licenses l JOIN tenants t"
        " ON t.tenant = l.tenant WHERE l.tenant = %s ORDER BY imported_at, id",
        (tenant,),
    )
    return [_license(r) for r in rows]


class LockedBatch:
    """The tenants a batch holds locked, and the writes that bump them."""

    def __init__(self, db: Conn, rows: dict[str, TenantRow]) -> None:
        self.db = db
        self.rows = rows

    async def changed_places(
        self, since: Mapping[str, int], fresh: datetime
    ) -> dict[str, list[Changed]]:
        """Per tenant, the routers another writer changed after ``since[tenant]``.

        Each is ``(router, epoch, place, will_session)``, ``place`` None when
        the router is not in line. A place with no stored lease (moved in
        by the tool) gets one until ``fresh``. One query for all tenants.
        """
        tenants = sorted(since)
        rows = await _all(
            self.db,
            "SELECT r.tenant, router, epoch, session, arrival, seated, lease_until,"
            " will_session FROM routers r JOIN unnest(%s::text[], %s::bigint[])"
            " AS s(tenant, since) ON r.tenant = s.tenant WHERE r.version > s.since",
            (tenants, [since[t] for t in tenants]),
        )
        found: dict[str, list[Changed]] = {t: [] for t in tenants}
        for tenant, router, epoch, session, arrival, seated, lease, will in rows:
            place = None
            if arrival is not None:
                until = _utc(lease) if lease is not None else fresh
                place = Place(tenant, router, session, epoch, arrival, seated, until)
            found[tenant].append((router, epoch, place, will))
        return found

    async def licenses(self, tenant: str) -> list[License]:
        return await _licenses(self.db, tenant)

    async def license_states(self, tenant: str) -> dict[str, State]:
        rows = await _all(
            self.db, "SELECT id, state FROM licenses WHERE tenant = %s", (tenant,)
        )
        return {r[0]: State(r[1]) for r in rows}

    async def write(
        self,
        events: Sequence[Event],
        leases: Sequence[Lease],
        now: datetime,
        next_arrival: int,
        capacities: Mapping[str, Capacity],
        licenses_at: Mapping[str, datetime] | None = None,
    ) -> dict[str, int]:
        """Write the batch and bump every tenant it touched; their new versions.

        ``licenses_at``: for each locked tenant whose licenses this batch
        applied with some change, the instant it applied them at (stored
        without a new version where the batch wrote nothing else).
        """
        applied = licenses_at or {}
        touched = sorted(
            ({_tenant_of(e) for e in events} | {lease.tenant for lease in leases})
            & set(self.rows)
        )
        versions = {t: self.rows[t].version + 1 for t in touched}
        writes = _Writes(now, versions)
        for event in events:
            writes.add(event)
        for lease in leases:
            writes.lease(lease)
        await writes.run(self.db)
        async with self.db.cursor() as cur:
            await cur.executemany(
                "UPDATE tenants SET version = %s, next_arrival = greatest("
                "next_arrival, %s), seats = %s, tier = %s WHERE tenant = %s",
                [
                    (
                        versions[t],
                        next_arrival,
                        capacities[t].seats,
                        _tier(capacities[t]),
                        t,
                    )
                    for t in touched
                ],
            )
            await cur.executemany(
                "UPDATE tenants SET licenses_at = %s WHERE tenant = %s",
                [(at, t) for t, at in sorted(applied.items()) if t in self.rows],
            )
        for tenant, version in versions.items():
            self.rows[tenant].version = version
        return versions


class _Writes:
    """One batch of events, grouped into a few ``executemany`` calls."""

    def __init__(self, now: datetime, versions: Mapping[str, int]) -> None:
        self.now = now
        self.versions = versions
        self.rows: list[Event] = []
        self.leases: list[tuple[Any, ...]] = []
        self.states: list[tuple[Any, ...]] = []
        self.audit: list[tuple[Any, ...]] = []

    def add(self, event: Event) -> None:
        detail: dict[str, Any]
        if isinstance(event, Joined | SeatChanged | Left):
            self.rows.append(event)
        if isinstance(event, Joined):
            p = event.place
            what = "resumed" if event.resumed else "joined"
            detail = {"epoch": p.epoch, "arrival": p.arrival, "seated": p.seated}
            self.audit.append((self.now, p.tenant, "router", p.router, what, detail))
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
            self.audit.append((self.now, v.tenant, "router", v.router, what, detail))
        elif isinstance(event, Left):
            detail = {
                "cause": event.cause.value,
                "was_seated": event.was_seated,
                "epoch": event.epoch,
            }
            self.audit.append(
                (self.now, event.tenant, "router", event.router, "left", detail)
            )
        elif isinstance(event, LicenseChanged):
            change = (event.after.value, event.license_id, event.before.value)
            self.states.append((*change, len(self.audit)))
            detail = {
                "from": event.before.value,
                "to": event.after.value,
                "at": _text(event.at),
            }
            self.audit.append(
                (event.at, event.tenant, "license", event.license_id,
                 event.after.value, detail)
            )  # fmt: skip
        else:
            detail = {
                "seats": event.after.seats,
                "tier": event.after.tier,
                "before": event.before.seats,
            }
            self.audit.append(
                (self.now, event.tenant, "tenant", event.tenant, "capacity", detail)
            )

    def lease(self, lease: Lease) -> None:
        version = self.versions[lease.tenant]
        self.leases.append(
            (lease.until, lease.will_session, version, lease.tenant, lease.router)
        )

    async def run(self, db: Conn) -> None:
        upserts: list[tuple[Any, ...]] = []
        seats: list[tuple[Any, ...]] = []
        leaves: list[tuple[Any, ...]] = []
        for (tenant, router), w in router_writes(self.rows).items():
            version = self.versions[tenant]
            if w.place is not None:
                p, gone = w.place, w.left
                upserts.append(
                    (tenant, router, p.epoch, None if gone else p.session,
                     None if gone else p.arrival, w.seated,
                     None if gone else p.lease_until, version, self.now, self.now)
                )  # fmt: skip
            elif w.left:
                leaves.append((w.seated, version, self.now, tenant, router))
            else:
                seats.append((w.seated, version, self.now, tenant, router))
        async with db.cursor() as cur:
            await cur.executemany(
                "INSERT INTO routers (tenant, router, epoch, session, arrival,"
                " seated, lease_until, version, first_seen, changed_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (tenant, router) DO UPDATE SET epoch = excluded.epoch,"
                " session = excluded.session, arrival = excluded.arrival,"
                " seated = excluded.seated, lease_until = excluded.lease_until,"
                " will_session = NULL, version = excluded.version,"
                " changed_at = excluded.changed_at",
                upserts,
            )
            await cur.executemany(
                "UPDATE routers SET seated = %s, version = %s, changed_at = %s"
                " WHERE tenant = %s AND router = %s",
                seats,
            )
            await cur.executemany(
                "UPDATE routers SET session = NULL, arrival = NULL, seated = %s,"
                " lease_until = NULL, will_session = NULL, version = %s,"
                " changed_at = %s WHERE tenant = %s AND router = %s",
                leaves,
            )
            await cur.executemany(
                "UPDATE routers SET lease_until = %s, will_session = %s, version = %s"
                " WHERE tenant = %s AND router = %s AND arrival IS NOT NULL",
                self.leases,
            )
            # Only from the state the gateway saw: see the SQLite store.
            stale = set()
            for after, license_id, before, audit_row in self.states:
                await cur.execute(
                    "UPDATE licenses SET state = %s WHERE id = %s AND state = %s",
                    (after, license_id, before),
                )
                if cur.rowcount != 1:
                    stale.add(audit_row)
        await _audit(db, [r for i, r in enumerate(self.audit) if i not in stale])


async def connect(url: str, *, autocommit: bool = True) -> Conn:
    """A connection that speaks UTC; errors name the server, not a trace."""
    _check_url(url)
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=autocommit, options="-c timezone=UTC"
        )
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL at {_safe(url)}: {exc}"
        ) from exc


def _check_url(url: str) -> None:
    """Refuse a URL libpq cannot read, without repeating it: its text (and
    psycopg's message about it) may hold the password."""
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise StoreError(
            "the PostgreSQL URL cannot be read (not shown: it may hold the "
            "password): percent-encode '%', '@', ':', '/' and spaces in the "
            "user name and password, e.g. '%25' for '%'"
        ) from None


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    host, db = info.get("host", "localhost"), info.get("dbname", "")
    return f"{host}:{info.get('port', 5432)}/{db}"


async def _one(db: Conn, query: str, params: Sequence[Any] = ()) -> TupleRow:
    cursor = await db.execute(query.encode(), params)
    # Every query given here returns a row (an aggregate, or checked by caller).
    return await cursor.fetchone()  # type: ignore[return-value]


async def _all(db: Conn, query: str, params: Sequence[Any] = ()) -> list[TupleRow]:
    cursor = await db.execute(query.encode(), params)
    return await cursor.fetchall()


async def _changed(db: Conn, tenant: str, now: datetime) -> None:
    await db.execute("INSERT INTO changes (tenant, at) VALUES (%s, %s)", (tenant, now))


async def _audit(
    db: Conn, rows: Sequence[tuple[Any, ...]], actor: str = GATEWAY
) -> None:
    if not rows:
        return
    async with db.cursor() as cur:
        await cur.executemany(
            "INSERT INTO audit (at, tenant, subject, subject_id, event, detail,"
            " actor) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(*row[:5], json.dumps(row[5]), actor) for row in rows],
        )


async def _overlaps(
    db: Conn, steps: Sequence[ReminderStep], licenses: list[str]
) -> bool:
    """Whether any step, or a later one of its license, is claimed already."""
    rows = await _all(
        db,
        "SELECT license, min(days) FROM reminders WHERE license = ANY(%s)"
        " GROUP BY license",
        (licenses,),
    )
    recorded = {r[0]: r[1] for r in rows}
    return any(s.license in recorded and recorded[s.license] <= s.days for s in steps)


async def _insert_claim(db: Conn, claim: ReminderMail) -> None:
    await db.execute(
        "INSERT INTO reminder_mails (mail, tenant, state, recipients, message,"
        " claimed_at, claimed_by, next_attempt_at)"
        " VALUES (%s, %s, 'waiting', %s, %s, %s, %s, %s)",
        (claim.mail, claim.tenant, list(claim.recipients), claim.message,
         claim.claimed_at, claim.claimed_by, claim.next_attempt_at),
    )  # fmt: skip
    async with db.cursor() as cur:
        await cur.executemany(
            "INSERT INTO reminders VALUES (%s, %s, %s, %s, %s, %s)",
            [(s.license, s.days, claim.tenant, claim.mail, s.due_at, s.expires_at)
             for s in claim.steps],
        )  # fmt: skip


async def _mails(
    db: Conn, where: str, params: Sequence[Any], *, lock: bool = False
) -> list[ReminderMail]:
    """The mails ``where`` picks, oldest claim first, each with its steps."""
    rows = await _all(
        db,
        "SELECT mail, tenant, state, recipients, message, claimed_at, claimed_by,"
        " attempts, next_attempt_at, sent_at, last_error FROM reminder_mails"
        f" WHERE {where} ORDER BY claimed_at, mail {BYTES}"
        + (" FOR UPDATE" if lock else ""),
        params,
    )
    if not rows:
        return []
    steps: dict[str, list[ReminderStep]] = {r[0]: [] for r in rows}
    for s in await _all(
        db,
        "SELECT mail, license, days, due_at, expires_at FROM reminders"
        f" WHERE mail = ANY(%s) ORDER BY expires_at, license {BYTES}",
        (list(steps),),
    ):
        steps[s[0]].append(ReminderStep(s[1], s[2], _utc(s[3]), _utc(s[4])))
    return [_mail(r, steps[r[0]]) for r in rows]


def _mail(row: Sequence[Any], steps: Sequence[ReminderStep]) -> ReminderMail:
    return ReminderMail(
        mail=row[0],
        tenant=row[1],
        state=row[2],
        recipients=tuple(row[3]),
        message=bytes(row[4]),
        claimed_at=_utc(row[5]),
        claimed_by=row[6],
        attempts=row[7],
        next_attempt_at=_utc(row[8]),
        sent_at=_utc(row[9]) if row[9] is not None else None,
        last_error=row[10],
        steps=tuple(steps),
    )


def _ready(mail: ReminderMail, now: datetime, force: bool) -> bool:
    """Waiting and due (or forced), or sending with its holder's time run out."""
    if mail.state == "waiting":
        return force or mail.next_attempt_at <= now
    return mail.state == "sending" and mail.next_attempt_at <= now


def _tenant_of(event: Event) -> str:
    if isinstance(event, Joined):
        return event.place.tenant
    if isinstance(event, SeatChanged):
        return event.verdict.tenant
    return event.tenant


def _tier(capacity: Capacity) -> str | None:
    return capacity.tier.value if capacity.tier is not None else None


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _license(row: Sequence[Any]) -> License:
    return License(
        id=row[0],
        tenant=row[1],
        kind=Kind(row[2]),
        capacity=row[3],
        term_months=row[4],
        issued_at=_utc(row[5]),
        imported_at=_utc(row[6]),
        activation_at=_utc(row[7]) if row[7] is not None else None,
        tz=row[8],
    )


def _license_params(lic: License, state: State, code: str) -> tuple[Any, ...]:
    return (
        lic.id,
        lic.tenant,
        lic.kind.value,
        lic.capacity,
        lic.term_months,
        lic.issued_at,
        lic.imported_at,
        lic.activation_at,
        state.value,
        code,
    )
