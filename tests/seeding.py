"""Put tenants and licenses into a store the way the tool would, quickly.

End-to-end tests of presence and faults need a tenant with N seats and no
ceremony; the tool's own commands are tested end to end elsewhere.
Licenses are minted with the demo vendor key and verified like imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from policy import codes
from policy.imports import license_from
from policy.licenses import Kind, License, State, paid_since, state_at
from policy.store import Store
from policy.stores import open_store
from tools.keys import (
    DEMO_PRIVATE_KEY_PATH,
    DEMO_PUBLIC_KEY_PATH,
    load_private_key,
    load_public_key,
)


def mint(kind: Kind, issued: datetime, term: int = 12) -> tuple[License, str]:
    """A verified license of ``kind`` and its code, not yet of any tenant."""
    capacity = {Kind.BASIC_1: 1, Kind.BASIC_25: 25, Kind.FREE: 1000}[kind]
    payload = codes.CodePayload(codes.new_license_id(), kind, capacity, term, issued)
    code = codes.mint(load_private_key(DEMO_PRIVATE_KEY_PATH), payload)
    verified = codes.verify(code, load_public_key(DEMO_PUBLIC_KEY_PATH))
    return license_from(verified, "", issued), code


async def seed_tenant(
    database: Path | str,
    tenant: str,
    *,
    basic1: int = 0,
    basic25: int = 0,
    expired_basic1: int = 0,
    now: datetime | None = None,
) -> list[License]:
    """A tenant with active Basic licenses, and some that expired a month ago."""
    now = now or datetime.now(UTC)
    issued = now - timedelta(days=420)
    store = await open_store(database)
    try:
        await store.add_tenant(tenant, "UTC", now)
        kinds = [Kind.BASIC_1] * (basic1 + expired_basic1) + [Kind.BASIC_25] * basic25
        items = [mint(kind, issued) for kind in kinds]
        items = [(replace(lic, tenant=tenant, imported_at=now), c) for lic, c in items]
        await store.add_licenses(tenant, items, now, "test")
        active = []
        for i, (lic, _) in enumerate(items):
            start = now - timedelta(days=395) if i < expired_basic1 else now
            active.append(replace(lic, activation_at=start))
        paid_from = paid_since(active)
        states = {lic.id: state_at(lic, now, paid_from) for lic in active}
        await store.save_activations(tenant, active, states, now, "test")
        assert sum(s is State.ACTIVE for s in states.values()) == basic1 + basic25
        return active
    finally:
        await store.close()


async def add_available(
    database: Path | str, tenant: str, count: int = 1, kind: Kind = Kind.BASIC_1
) -> list[License]:
    """Licenses imported into ``tenant`` and not activated."""
    now = datetime.now(UTC)
    items = [mint(kind, now - timedelta(days=10)) for _ in range(count)]
    items = [(replace(lic, tenant=tenant), code) for lic, code in items]
    store = await open_store(database)
    try:
        await store.add_licenses(tenant, items, now, "test")
    finally:
        await store.close()
    return [lic for lic, _ in items]


async def seed_licenses(
    store: Store,
    tenant: str,
    starts: Sequence[datetime],
    *,
    kind: Kind = Kind.BASIC_1,
    contacts: Sequence[str] = ("ops@acme.example",),
    routers: int = 0,
) -> list[License]:
    """A tenant with one license of ``kind`` activated at each of ``starts``,
    its reminder ``contacts`` and ``routers`` registered routers."""
    issued = min(starts) - timedelta(days=10)
    items = [mint(kind, issued) for _ in starts]
    items = [(replace(lic, tenant=tenant, imported_at=issued), c) for lic, c in items]
    await store.add_tenant(tenant, "UTC", issued)
    await store.add_licenses(tenant, items, issued, "test")
    pairs = zip(items, starts, strict=True)
    active = [replace(lic, activation_at=at) for (lic, _), at in pairs]
    paid_from = paid_since(active)
    states = {lic.id: state_at(lic, issued, paid_from) for lic in active}
    await store.save_activations(tenant, active, states, issued, "test")
    await store.add_contacts(tenant, contacts, issued, "test")
    names = [f"R{i:02}" for i in range(1, routers + 1)]
    await store.register_routers(tenant, names, issued, "test")
    return [replace(lic, tz="UTC") for lic in active]
