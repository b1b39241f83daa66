"""The durable side of the rule book: what a store keeps and how it is asked.

The gateway keeps the hot state (every line) in memory and uses the store
as its durable log: each batch of decisions is written in one transaction
before any reply of the batch is sent. The tool writes licenses and
tenants, and leaves a row in ``changes`` so a running gateway re-reads
that tenant within a second.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from policy.admission import Event, Place
from policy.licenses import License, State


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    tz: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RouterRow:
    """A router as the store last recorded it: in line (seated or not) or out."""

    tenant: str
    router: str
    epoch: int
    session: str | None
    arrival: int | None
    seated: bool
    first_seen: datetime
    changed_at: datetime

    @property
    def state(self) -> str:
        if self.arrival is None:
            return "offline"
        return "online" if self.seated else "waiting"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: datetime
    tenant: str
    subject: str
    subject_id: str
    event: str
    detail: dict[str, Any]
    actor: str


@dataclass(frozen=True, slots=True)
class TenantData:
    """Everything stored of one tenant, to move it to another store.

    Rows are plain tuples in the column order of the PostgreSQL tables:
    licenses ``(id, kind, capacity, term_months, issued_at, imported_at,
    activation_at, state, code)``, routers ``(router, epoch, session,
    arrival, seated, first_seen, changed_at)``, audit ``(at, subject,
    subject_id, event, detail, actor)``, instants as datetimes.
    """

    tenant: Tenant
    licenses: list[tuple[Any, ...]]
    routers: list[tuple[Any, ...]]
    audit: list[tuple[Any, ...]]


class Store(Protocol):
    """Everything the gateway and the tool ask of durable storage."""

    async def close(self) -> None: ...

    async def add_tenant(self, tenant: str, tz: str, now: datetime) -> None: ...

    async def tenant(self, tenant: str) -> Tenant | None: ...

    async def tenants(self) -> list[Tenant]: ...

    async def licenses(self, tenant: str) -> list[License]: ...

    async def license_states(self, tenant: str) -> dict[str, State]: ...

    async def owners(self, license_ids: Collection[str]) -> dict[str, str]: ...

    async def add_licenses(
        self,
        tenant: str,
        items: Sequence[tuple[License, str]],
        now: datetime,
        actor: str,
    ) -> None: ...

    async def save_activations(
        self,
        tenant: str,
        licenses: Sequence[License],
        states: dict[str, State],
        now: datetime,
        actor: str,
    ) -> None: ...

    async def register_routers(
        self, tenant: str, routers: Sequence[str], now: datetime, actor: str
    ) -> list[str]: ...

    async def routers(self, tenant: str) -> list[RouterRow]: ...

    async def places(self) -> list[Place]: ...

    async def epochs(self) -> dict[tuple[str, str], int]: ...

    async def apply(self, events: Sequence[Event], now: datetime) -> None: ...

    async def audit(
        self,
        tenant: str,
        subject: str | None = None,
        subject_id: str | None = None,
        limit: int = 200,
    ) -> list[AuditEntry]: ...

    async def changes_after(self, seq: int) -> tuple[int, set[str]]: ...

    async def poll_version(self) -> int: ...
