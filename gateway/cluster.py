"""Several gateways on one PostgreSQL: one truth, shared work.

How it works. Every gateway of a cluster subscribes to the hellos through
one MQTT shared subscription, so the broker hands each message to one of
them. A gateway still decides in batches with the pure core, but each
batch runs inside one PostgreSQL transaction that first locks the rows of
the batch's tenants (in tenant order, so gateways never deadlock). Under
those locks the gateway reads what others changed since it last looked
(every write bumps the tenant's ``version``), brings its copy of those
lines up to date, decides, and writes the events with the version bumped.
Arrival numbers are taken from the tenant row under its lock: a tenant's
line is in the order PostgreSQL recorded the arrivals, whichever gateway
received them, so the seats stay the line's prefix across the cluster.

Time-driven work (lease run-outs, license instants, the tool's changes)
is done by one gateway, the leader: the one holding a session-level
advisory lock on a connection of its own. A leader killed outright loses
that connection and with it the lock; another gateway takes it within a
second. Work that must happen once per cluster (e-mail reminders) waits
for :attr:`ClusterGateway.is_leader`.

Mosquitto keeps handing messages to a shared-subscription member whose
persistent session is disconnected, and keeps its unacknowledged ones
there too: a dead gateway would swallow its share of hellos until it came
back. So the leader watches the gateways' retained status; when one says
``offline`` (its last will, on a crash), the leader connects with that
gateway's client id, unsubscribes it, answers what was queued for it and
ends the session, so every hello is answered even if it never returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import structlog

from gateway import protocol
from gateway.config import Settings
from gateway.mqtt import Inbound, Mqtt
from gateway.service import (
    Clock,
    Gateway,
    Work,
    _Batch,
    _Item,
    _Reload,
    _Republish,
    system_clock,
)
from policy.licenses import License, State, passed_in
from policy.postgres_store import Conn, Lease, LockedBatch, PostgresStore, connect

log = structlog.get_logger("gateway.cluster")

LEADER_LOCK = 0x49524D02
"""The advisory lock whose holder is the cluster's leader."""

LEADER_RETRY = 1.0
"""Seconds between a follower's attempts to become leader, and between the
leader's checks that it still holds the lock."""

LEADER_CHECK = 3.0
"""Seconds a check of the leader connection may take: a leader whose check
goes unanswered this long (cut off from PostgreSQL) stops leading."""

LEADER_IDLE_MS = 5000
"""PostgreSQL ends the leader connection's session after this many
milliseconds without a query (``idle_session_timeout``), and so frees the
lock of a leader whose host died or was cut off without closing its
connection. The connection runs a query every :data:`LEADER_RETRY`."""

LEASE_SCAN = 1.0
"""Seconds between the leader's looks for leases that ran out anywhere."""

REPAIR_EVERY = 1.0
"""Seconds between the leader's looks for tenants whose presence to repair."""

QUIET = 1.0
"""A taken-over session is drained once it has been silent this long."""

TAKEOVER_LIMIT = 120.0
"""Seconds a takeover may run before it is given up (and tried again)."""

CLOCK_TOLERANCE = timedelta(seconds=60)
"""How far ahead of our clock another gateway's applied instant is believed."""

_UNSEEN = datetime.min.replace(tzinfo=UTC)
"""The applied instant of a tenant whose licenses we never applied."""


class ClusterGateway(Gateway):
    """A gateway of a cluster sharing one :class:`PostgresStore`."""

    def __init__(
        self, settings: Settings, store: PostgresStore, clock: Clock = system_clock
    ) -> None:
        super().__init__(settings, store, clock)
        self.shared = store
        self.is_leader.clear()  # until the leader lock is ours
        self._versions: dict[str, int] = {}
        self._next_scan = 0.0
        self._old_server_said = False
        self._peers: dict[str, str] = {}
        self._renewing: set[str] = set()
        self._seen: dict[str, int] = {}
        self._repaired: dict[str, int] = {}
        self._next_repair = 0.0
        self._takeovers: dict[str, asyncio.Task[None]] = {}
        self._failed = False
        self._share_secret = ""
        # Routers whose presence we published while some publish was still
        # unacknowledged, and those of them a reconnect left to republish.
        self._unconfirmed: set[tuple[str, str]] = set()
        self._replayed: set[tuple[str, str]] = set()
        # Tenants whose licenses the tool changed since we read them, and the
        # applied instant each tenant had when we last applied its licenses.
        self._licenses_stale: set[str] = set()
        self._licenses_seen: dict[str, datetime | None] = {}

    # -- life cycle ------------------------------------------------------

    async def _load(self) -> None:
        """Know the tenants; their lines are read when first locked."""
        for tenant in await self.store.tenants():
            self._versions[tenant.id] = -1
        self._share_secret = await self.shared.share_secret()
        self._version = await self.store.poll_version()
        self._change_seq, _ = await self.store.changes_after(0)
        log.info("cluster member ready", tenants=len(self._versions))

    def _topics(self) -> list[str]:
        # The group's name holds the cluster's secret (the store's): a
        # router that subscribed to a group it can name would be handed
        # its share of every hello, which the broker then drops as
        # unreadable for it.
        group = f"{self.settings.share_group}-{self._share_secret}"
        return [f"$share/{group}/{topic}" for topic in super()._topics()]

    async def _on_connected(self) -> None:
        assert self._mqtt is not None
        if self._failed:
            return  # leaving: a reconnect must not subscribe or say online
        self._replayed |= self._unconfirmed
        self._unconfirmed = set()
        status = protocol.status_topic(self.settings.prefix, "+")
        self._mqtt.subscribe(status, retained=True)
        await super()._on_connected()

    async def _decide_until(self, stop: asyncio.Event) -> None:
        leading = asyncio.create_task(self._lead(stop), name="lead")
        try:
            await super()._decide_until(stop)
        except Exception:
            # Say so before leaving, so that the leader answers what the broker
            # queues for us while we are gone; and take no more hellos.
            self._failed = True
            offline = protocol.GatewayStatus(
                gateway=self.settings.gateway_id, state="offline"
            )
            topic = protocol.status_topic(
                self.settings.prefix, self.settings.gateway_id
            )
            await self._publish(topic, offline, retain=True)
            raise
        finally:
            leading.cancel()
            for task in [leading, *self._takeovers.values()]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _reload_of(self, tenant: str) -> _Reload:
        """A reload that only names the tenant: its licenses are read under
        its lock (:meth:`_apply_licenses`), as a list read here could be
        older than one another gateway has applied."""
        return _Reload(tenant, [], {})

    def _idle_timeout(self) -> float | None:
        if not self.is_leader.is_set():
            return None
        timeout = super()._idle_timeout()
        return LEASE_SCAN if timeout is None else min(timeout, LEASE_SCAN)

    async def _republish_presence(self) -> None:
        # One gateway republishing is enough, and fewer stale copies race.
        if self.is_leader.is_set():
            self._replayed = set()
            await super()._republish_presence()

    async def _publish_presence(
        self, tenant: str, router: str, state: str, epoch: int, reason: str,
        now: datetime,
    ) -> None:  # fmt: skip
        assert self._mqtt is not None
        if self._mqtt.unacknowledged == 0:
            self._unconfirmed.clear()  # every earlier presence has arrived
        self._unconfirmed.add((tenant, router))
        await super()._publish_presence(tenant, router, state, epoch, reason, now)

    async def _after_connect(self, leader: bool) -> None:
        """The leader republishes every router; a follower what was resent."""
        if leader:
            await self._republish_presence()
        elif self._replayed:
            await self._republish_replayed(self.clock())

    async def _republish_replayed(self, now: datetime) -> None:
        """Publish again, from the store, presence a reconnect sent again.

        A publish whose acknowledgement the lost connection never brought is
        sent again after the reconnect, however old. Meanwhile another
        gateway may have changed the router and published its presence, and
        the leader repaired it: the old copy would stay retained. This runs
        behind that resend (the CONNACK starts it; this waits in the
        decider's queue, then for the tenants' locks). A decision that slips
        in between the read and the publish changes the tenant's version, so
        the leader repairs the tenant again.
        """
        pending, self._replayed = self._replayed, set()
        found: list[tuple[str, str, str, int]] = []
        async with self.shared.locked({tenant for tenant, _ in pending}) as locked:
            await self._sync(locked, now)
            for tenant, router in sorted(pending):
                line = self.admission.lines.get(tenant)
                if tenant not in locked.rows or line is None:
                    continue
                place = line.places.get(router)
                if place is None:
                    epoch = self.admission.epoch(tenant, router)
                    found.append((tenant, router, "offline", epoch))
                else:
                    state = "online" if place.seated else "waiting"
                    found.append((tenant, router, state, place.epoch))
        # Published with no lock held: a publish waits while the broker is
        # out of reach, and the other gateways must go on deciding.
        for tenant, router, state, epoch in found:
            await self._publish_presence(tenant, router, state, epoch, "restart", now)

    # -- leadership ----------------------------------------------------------

    async def _lead(self, stop: asyncio.Event) -> None:
        """Hold the leader lock, or try for it every second."""
        conn = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = await _answered(self._lock_connection())
                if self.is_leader.is_set():
                    await _answered(conn.execute("SELECT 1"))
                else:
                    cursor = await _answered(
                        conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
                    )
                    row = await cursor.fetchone()
                    if row is not None and row[0]:
                        await self._become_leader(PostgresStore(conn, self.shared.url))
                if self.is_leader.is_set():
                    self._take_over_dead_peers()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if self.is_leader.is_set():
                    reason = str(exc) or f"no answer in {LEADER_CHECK} s"
                    log.warning("leadership lost", error=reason)
                self.is_leader.clear()
                if conn is not None:
                    _abandon(conn)
                conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LEADER_RETRY)
        if conn is not None:
            await conn.close()

    async def _lock_connection(self) -> Conn:
        """A connection for the leader lock, whose session PostgreSQL ends
        once it has been idle for :data:`LEADER_IDLE_MS`."""
        conn = await connect(self.shared.url)
        try:
            await conn.execute(f"SET idle_session_timeout = {LEADER_IDLE_MS}")
        except psycopg.errors.UndefinedObject:
            if not self._old_server_said:
                self._old_server_said = True
                log.warning(
                    "leader lock unguarded",
                    error="PostgreSQL before 14 has no idle_session_timeout: a "
                    "leader whose host dies keeps the lock until TCP gives up",
                )
        return conn

    async def _become_leader(self, reader: PostgresStore) -> None:
        """Start leading from what is stored, as a restarted gateway would.

        Every tenant's licenses are re-read (instants may have passed with
        no leader) and its line too, at its next lock. Every place gets a
        fresh lease: if the whole cluster was down, no heartbeat could be
        heard meanwhile. ``reader`` is the leader lock's connection.
        """
        log.info("leading the cluster", gateway=self.settings.gateway_id)
        self._versions = dict.fromkeys(self._versions, -1)
        tenants = [tenant.id for tenant in await reader.tenants()]
        self._renewing = set(tenants)
        self._licenses_stale.update(tenants)
        self._repaired = {}
        self.is_leader.set()
        for tenant in tenants:
            self._queue.put_nowait(await self._reload_of(tenant))

    # -- deciding under the tenants' locks -----------------------------------------

    async def _decide(self, work: list[Work]) -> None:
        leader = self.is_leader.is_set()
        if any(isinstance(entry, _Republish) for entry in work):
            await self._after_connect(leader)
        now = self.clock()
        items = [entry for entry in work if isinstance(entry, _Item)]
        # A reload only names a tenant whose licenses changed: they are read
        # under its lock (see _apply_licenses), by the leader at once.
        changed = {e.tenant for e in work if isinstance(e, _Reload)}
        self._licenses_stale |= changed
        tenants = {item.tenant for item in items}
        if leader:
            tenants |= changed | await self._due(now)
        batch = _Batch()
        repeated: list[_Item] = []
        try:
            async with self.shared.locked(tenants) as locked:
                await self._sync(locked, now)
                applied = await self._apply_licenses(locked, now, batch)
                renewed: list[Lease] = []
                if leader:
                    renewed = self._renew(locked, now)
                    batch.events += self.admission.advance(now).events
                for item in items:
                    before = len(batch.events)
                    self._decide_one(item, now, batch)
                    if len(batch.events) == before and item.kind == "hello":
                        repeated.append(item)
                await self._write(locked, batch, items, renewed, now, applied)
            self.admission.compact()
        except Exception as exc:
            # Our copy of these lines may be ahead of what was stored.
            for tenant in tenants:
                self._versions[tenant] = -1
            self._licenses_stale |= tenants
            for item in items:
                if not item.done.done():
                    item.done.set_exception(exc)
            raise
        await self._answer(batch, items, repeated, now)
        if leader and asyncio.get_running_loop().time() >= self._next_repair:
            self._next_repair = asyncio.get_running_loop().time() + REPAIR_EVERY
            await self._repair_presence(now)

    async def _apply_licenses(
        self, locked: LockedBatch, now: datetime, batch: _Batch
    ) -> dict[str, datetime]:
        """Apply the license changes due in the locked tenants.

        Every gateway does, not only the leader: a hello decided a moment
        after an expiry, before the leader's turn or while no gateway leads,
        must not be decided on the capacity last stored. A tenant's licenses
        are read under its lock when first deciding for it, after the tool
        changed them, after another gateway applied a change to them (the
        tenant's applied instant moved), and whenever one of their instants
        has come; reading them earlier, outside the lock, could apply an
        older list over a newer one another gateway stored. Whoever locks
        the tenant first applies a change; the next finds it stored (a
        license's state moves only from the state read, so none is applied
        or audited twice).

        Returns the instant each tenant's licenses were applied at
        (:meth:`_applying_at`), to be stored with the tenant.
        """
        applied: dict[str, datetime] = {}
        for tenant in sorted(locked.rows):
            stored = locked.rows[tenant].licenses_at
            due = self.admission.next_change(tenant)
            if (
                tenant in self.admission.licenses
                and tenant not in self._licenses_stale
                and (due is None or due > now)
                and self._licenses_seen.get(tenant, _UNSEEN) == stored
            ):
                continue
            licenses = await locked.licenses(tenant)
            states = await locked.license_states(tenant)
            at = self._applying_at(now, stored, licenses, states)
            outcome = self.admission.load_tenant(tenant, licenses, states, at)
            batch.events += outcome.events
            self._licenses_seen[tenant] = stored
            if outcome.events or (stored is not None and stored > at):
                # Changed, or the stored instant is beyond belief: ours is
                # stored for every gateway to apply at no earlier one, and
                # to read the licenses again.
                applied[tenant] = at
                self._licenses_seen[tenant] = at
            if tenant in self._licenses_stale:
                self._licenses_stale.discard(tenant)
                log.info("licenses reloaded", tenant=tenant)
        return applied

    def _applying_at(
        self,
        now: datetime,
        stored: datetime | None,
        licenses: list[License],
        states: dict[str, State],
    ) -> datetime:
        """The instant to apply a tenant's licenses at: our clock, or the
        instant a gateway last applied a change to them at, if later.

        Our ``now`` may have been read before another gateway applied a
        change at its later instant, or lag that gateway's clock: applying
        at the earlier instant would take the change back. A tenant that no
        gateway has applied yet (a database from before the instant was
        kept, or a tenant moved from SQLite) goes by what its stored states
        show has passed. Another clock is believed only up to
        :data:`CLOCK_TOLERANCE` ahead of ours: one reading far ahead once
        must not move every later decision into the future.
        """
        clock = max(now, self.clock())
        if stored is None:
            stored = passed_in(licenses, states)
        if stored is None:
            return clock
        return max(clock, min(stored, clock + CLOCK_TOLERANCE))

    def _renew(self, locked: LockedBatch, now: datetime) -> list[Lease]:
        """A new leader's first lock of a tenant gives its places fresh leases."""
        renewed = []
        until = now + self.admission.lease
        for tenant in sorted(self._renewing & locked.rows.keys()):
            self._renewing.discard(tenant)
            renewed += [
                Lease(tenant, place.router, until, None)
                for place in self.admission.renew_leases(tenant, until)
            ]
        return renewed

    async def _due(self, now: datetime) -> set[str]:
        """Tenants with time-driven work: our timetable, and leases anywhere."""
        due = self.admission.due_tenants(now)
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_scan:
            self._next_scan = loop.time() + LEASE_SCAN
            due.update(await self.shared.due_leases(now))
        return due

    async def _sync(self, locked: LockedBatch, now: datetime) -> None:
        """Bring our copy of the locked tenants' lines up to what is stored."""
        stale = {
            tenant: self._versions.get(tenant, -1)
            if tenant in self.admission.lines
            else -1
            for tenant, row in locked.rows.items()
            if row.version != self._versions.get(tenant, -1)
            or tenant not in self.admission.lines
        }
        if stale:
            fresh = now + self.admission.lease
            changed = await locked.changed_places(stale, fresh)
            for tenant, since in stale.items():
                row = locked.rows[tenant]
                self.admission.adopt(
                    tenant, row.capacity, changed[tenant], reset=since < 0
                )
                self._versions[tenant] = row.version
        for row in locked.rows.values():
            self.admission.next_arrival = max(
                self.admission.next_arrival, row.next_arrival
            )

    async def _write(
        self,
        locked: LockedBatch,
        batch: _Batch,
        items: list[_Item],
        renewed: list[Lease],
        now: datetime,
        applied: dict[str, datetime],
    ) -> None:
        leases = list(renewed)
        for key in dict.fromkeys((i.tenant, i.router) for i in items):
            lease = self.admission.lease_of(*key)
            if lease is not None and key[0] in locked.rows:
                leases.append(Lease(key[0], key[1], lease[0], lease[1]))
        capacities = {
            t: self.admission.lines[t].capacity
            for t in locked.rows
            if t in self.admission.lines
        }
        versions = await locked.write(
            batch.events, leases, now, self.admission.next_arrival, capacities,
            applied,
        )  # fmt: skip
        self._versions.update(versions)

    async def _answer(
        self, batch: _Batch, items: list[_Item], repeated: list[_Item], now: datetime
    ) -> None:
        """Reply, publish, then let the handlers acknowledge the hellos."""
        for topic, payload, correlation in batch.replies:
            await self._send(topic, payload, correlation)
        await self._publish_events(batch.events, now)
        # A hello repeated after its gateway died between commit and publish
        # changes nothing, so its presence is published again here.
        for item in repeated:
            line = self.admission.lines.get(item.tenant)
            place = line.places.get(item.router) if line is not None else None
            if place is not None:
                state = "online" if place.seated else "waiting"
                await self._publish_presence(
                    item.tenant, item.router, state, place.epoch, "hello", now
                )
        for item in items:
            item.done.set_result(None)

    async def _repair_presence(self, now: datetime) -> None:
        """Republish the presence of routers of tenants that went quiet.

        Two gateways publish after their own commits, so two decisions about
        one router in the same few milliseconds can reach the broker in the
        other order. Once a tenant has been unchanged for a second, the
        routers changed since its last repair are read from the store under
        the tenant's lock and published again once it is released (a publish
        waits while the broker is out of reach, and the other gateways must
        go on deciding). A decision that slips in between changes the
        tenant's version, so the tenant is repaired again once quiet.
        """
        versions = await self.shared.tenant_versions()
        quiet = set()
        for tenant, version in versions.items():
            if self._seen.get(tenant) == version != self._repaired.get(tenant):
                quiet.add(tenant)
            self._seen[tenant] = version
        if not quiet:
            return
        found: list[tuple[str, str, str, int]] = []
        async with self.shared.locked(quiet) as locked:
            since = {tenant: self._repaired.get(tenant, -1) for tenant in locked.rows}
            changed = await locked.changed_places(since, now)
            for tenant, row in sorted(locked.rows.items()):
                for router, epoch, place, _ in changed[tenant]:
                    state = "offline"
                    if place is not None:
                        state = "online" if place.seated else "waiting"
                    found.append((tenant, router, state, epoch))
                self._repaired[tenant] = row.version
        for tenant, router, state, epoch in found:
            await self._publish_presence(tenant, router, state, epoch, "repair", now)

    # -- receiving, and the peers' sessions ---------------------------------------

    async def _on_message(self, inbound: Inbound) -> None:
        parts = inbound.topic.split("/")
        if parts[-1] == "status" and parts[-3:-2] == ["_gateway"]:
            self._note_status(inbound)
            return
        await super()._on_message(inbound)

    def _note_status(self, inbound: Inbound) -> None:
        try:
            status = protocol.GatewayStatus.model_validate_json(inbound.payload)
        except ValueError:
            self._bad("status", "-", inbound.topic)
            return
        if status.gateway != self.settings.gateway_id:
            self._peers[status.gateway] = status.state
            if status.state == "online" and status.gateway in self._takeovers:
                self._takeovers.pop(status.gateway).cancel()

    def _take_over_dead_peers(self) -> None:
        for peer, task in list(self._takeovers.items()):
            if task.done():
                del self._takeovers[peer]
                if not task.cancelled() and task.exception() is not None:
                    log.error("takeover failed", peer=peer, exc_info=task.exception())
        for peer, state in self._peers.items():
            if state == "offline" and peer not in self._takeovers:
                task = asyncio.create_task(self._take_over(peer), name=f"take-{peer}")
                self._takeovers[peer] = task

    async def _take_over(self, peer: str) -> None:
        """Answer what the broker queued for a dead peer, then end its session.

        The session counts as drained once it has been ours, with no hello
        being decided, for :data:`QUIET` seconds. A peer still on its way out
        may take its session back for a moment; each reconnect of ours starts
        the quiet time again, so nothing queued is discarded unanswered.
        """
        client_id = f"irm-gateway-{peer}"
        log.warning("taking over a dead gateway's session", peer=peer)
        loop = asyncio.get_running_loop()
        handled = pending = 0
        last = loop.time()

        async def handler(inbound: Inbound) -> None:
            nonlocal handled, pending, last
            pending += 1
            try:
                await self._on_message(inbound)
            finally:
                pending -= 1
                last = loop.time()
            handled += 1

        async def connected() -> None:
            nonlocal last
            last = loop.time()
            session.unsubscribe(*self._topics())

        def drained() -> bool:
            return session.connected and not pending and loop.time() - last >= QUIET

        session = self._peer_session(client_id, handler, connected, persistent=True)
        async with asyncio.timeout(TAKEOVER_LIMIT):
            async with session:
                # Silence has no event to await: look at the clock a few times.
                while not drained():  # noqa: ASYNC110
                    await asyncio.sleep(QUIET / 4)
            # A clean session of that id discards the old one, now empty.
            async with self._peer_session(client_id, handler, _nothing, False):
                pass
        self._peers[peer] = "taken over"
        log.warning("dead gateway's session ended", peer=peer, answered=handled)

    def _peer_session(
        self, client_id: str, handler: object, connected: object, persistent: bool
    ) -> Mqtt:
        credentials = None
        if self.settings.broker_username is not None:
            credentials = (
                self.settings.broker_username,
                self.settings.broker_password or "",
            )
        return Mqtt(
            client_id,
            self.settings.broker_host,
            self.settings.broker_port,
            handler,  # type: ignore[arg-type]
            connected,  # type: ignore[arg-type]
            persistent=persistent,
            credentials=credentials,
            receive_maximum=self.settings.receive_maximum,
            window=self.settings.publish_window,
        )


async def _nothing() -> None:
    return None


T = TypeVar("T")


async def _answered(asked: Coroutine[Any, Any, T]) -> T:
    """``asked``'s result, or TimeoutError once :data:`LEADER_CHECK` passes.

    Unlike ``asyncio.wait_for``, this does not wait for the cancelled query
    to wind down: psycopg then tries to cancel it on the server, over the
    same cut-off network, for many seconds more.
    """
    task = asyncio.ensure_future(asked)
    done, _ = await asyncio.wait({task}, timeout=LEADER_CHECK)
    if not done:
        task.cancel()
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise TimeoutError
    return task.result()


def _abandon(conn: Conn) -> None:
    """Close a connection that stopped answering, without waiting on it."""

    async def close() -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), LEADER_CHECK)

    task = asyncio.ensure_future(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[Any]] = set()
"""Closes in flight (the event loop keeps only weak references to tasks)."""
