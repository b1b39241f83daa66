"""First come, first served: who holds a seat, decided hello by hello.

How it works. Each tenant has one *line*: the routers that have an open
session, ordered by the arrival number of the hello that opened it. The
seats are always the line's prefix: with ``c`` seats, the first ``c``
routers in the line hold them and every later one waits, at position
``index - c + 1``. Every rule of admission follows from keeping that one
invariant:

- a new router joins at the end, and is seated if the prefix reaches it;
- a router already in the line keeps its place whatever it re-sends (a
  duplicate hello, a new session after a reconnect or a takeover);
- a router that leaves frees its place, so the first waiting router moves
  into the prefix;
- capacity that shrinks cuts the prefix from its end (the last arrivals
  lose their seats first) and capacity that grows extends it in arrival
  order.

Sessions. A router names each session it opens (``session``, chosen by
the router and also put in its last will). The core counts them per
router (``epoch``) so presence can be ordered. A goodbye or will that
names any session but the current one is stale and changes nothing. A
last will does not free the seat at once: it shortens the lease to a short
grace, because on a reconnect the broker may deliver the old session's
will just before the new session's hello.

Leases. Each place has a lease, renewed by hellos and heartbeats; a place
whose lease runs out leaves the line. After a restart every lease starts
afresh, since heartbeats could not be heard while the gateway was down.

Nothing here reads a clock or does I/O: every call is handed ``now`` and
returns what the router is told and the events that make it durable.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from sortedcontainers import SortedKeyList

from policy.licenses import (
    NO_CAPACITY,
    Capacity,
    License,
    State,
    Tier,
    capacity_at,
    next_change_after,
    paid_since,
    state_at,
    transitions,
)


class Reason(StrEnum):
    """Machine-readable reasons carried by every reply."""

    LICENSED = "licensed"
    CAPACITY_EXCEEDED = "capacity_exceeded"
    NO_VALID_LICENSE = "no_valid_license"
    UNKNOWN_TENANT = "unknown_tenant"
    MALFORMED_HELLO = "malformed_hello"
    TOPIC_MISMATCH = "topic_mismatch"
    SESSION_UNKNOWN = "session_unknown"
    RATE_LIMITED = "rate_limited"


class Cause(StrEnum):
    """Why a router's seat or place changed."""

    HELLO = "hello"
    GOODBYE = "goodbye"
    WILL = "will"
    LEASE = "lease"
    CAPACITY = "capacity"
    SEAT_FREED = "seat_freed"
    RESTORE = "restore"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one router is told: accepted or not, why, and where it stands."""

    tenant: str
    router: str
    session: str
    epoch: int
    accepted: bool
    reason: Reason
    tier: Tier | None
    position: int | None = None


@dataclass(slots=True)
class Place:
    """One router's place in its tenant's line."""

    tenant: str
    router: str
    session: str
    epoch: int
    arrival: int
    seated: bool
    lease_until: datetime
    watched_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Joined:
    """A router opened a place in the line, or resumed it with a new session."""

    place: Place
    resumed: bool


@dataclass(frozen=True, slots=True)
class SeatChanged:
    """A router gained or lost its seat (or its tier changed) without asking."""

    verdict: Verdict
    cause: Cause


@dataclass(frozen=True, slots=True)
class Left:
    """A router's place is gone; it was seated if ``was_seated``."""

    tenant: str
    router: str
    session: str
    epoch: int
    was_seated: bool
    cause: Cause


@dataclass(frozen=True, slots=True)
class LicenseChanged:
    """A license passed from one state to another at ``at`` by a time rule."""

    tenant: str
    license_id: str
    before: State
    after: State
    at: datetime


@dataclass(frozen=True, slots=True)
class CapacityChanged:
    tenant: str
    before: Capacity
    after: Capacity


Event = Joined | SeatChanged | Left | LicenseChanged | CapacityChanged


@dataclass(slots=True)
class Outcome:
    """The result of one call: the reply owed to the caller, and events."""

    verdict: Verdict | None = None
    events: list[Event] = field(default_factory=list)
    stale: bool = False


_Due = TypeVar("_Due", tuple[datetime, str], tuple[datetime, str, str])


def _arrival(place: Place) -> int:
    return place.arrival


class Line:
    """One tenant's line of routers; the seats are its prefix."""

    def __init__(self, tenant: str, capacity: Capacity) -> None:
        self.tenant = tenant
        self.capacity = capacity
        self.places: dict[str, Place] = {}
        self._order: SortedKeyList = SortedKeyList(key=_arrival)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def seated(self) -> int:
        return min(self.capacity.seats, len(self._order))

    def index(self, place: Place) -> int:
        return int(self._order.bisect_key_left(place.arrival))

    def verdict(self, place: Place) -> Verdict:
        """What ``place`` is told now, from its index and the capacity."""
        seats = self.capacity.seats
        if place.seated:
            reason, position = Reason.LICENSED, None
        else:
            reason = Reason.CAPACITY_EXCEEDED if seats else Reason.NO_VALID_LICENSE
            position = self.index(place) - seats + 1
        return Verdict(
            self.tenant,
            place.router,
            place.session,
            place.epoch,
            place.seated,
            reason,
            self.capacity.tier,
            position,
        )

    def add(self, place: Place, *, decide: bool = True) -> None:
        """Put ``place`` in the line at its arrival.

        With ``decide`` its seat follows the prefix; without, it keeps the
        flag it was stored with, for :meth:`reseat` to check.
        """
        self.places[place.router] = place
        self._order.add(place)
        if decide:
            place.seated = self.index(place) < self.capacity.seats

    def remove(self, place: Place, cause: Cause) -> list[Event]:
        """Take ``place`` out; the first waiting router moves into the prefix."""
        promoted = None
        if place.seated and len(self._order) > self.capacity.seats:
            promoted = self._order[self.capacity.seats]
        self._order.remove(place)
        del self.places[place.router]
        events: list[Event] = [
            Left(
                self.tenant,
                place.router,
                place.session,
                place.epoch,
                place.seated,
                cause,
            )
        ]
        if promoted is not None:
            promoted.seated = True
            events.append(SeatChanged(self.verdict(promoted), Cause.SEAT_FREED))
        return events

    def resize(self, capacity: Capacity) -> list[Event]:
        """Move the prefix's end; tell every router whose seat or tier changed."""
        before, self.capacity = self.capacity, capacity
        old, new = min(before.seats, len(self)), min(capacity.seats, len(self))
        events: list[Event] = []
        if capacity != before:
            events.append(CapacityChanged(self.tenant, before, capacity))
        changed = range(min(old, new), max(old, new))
        if before.tier != capacity.tier:
            changed = range(0, max(old, new))
        places = self._order.islice(changed.start, changed.stop)
        for i, place in enumerate(places, start=changed.start):
            place.seated = i < capacity.seats
            events.append(SeatChanged(self.verdict(place), Cause.CAPACITY))
        return events

    def reseat(self) -> list[Event]:
        """Make every stored seat flag agree with the prefix (after a restore)."""
        events: list[Event] = []
        for i, place in enumerate(self._order):
            if place.seated != (i < self.capacity.seats):
                place.seated = not place.seated
                events.append(SeatChanged(self.verdict(place), Cause.RESTORE))
        return events

    def in_order(self) -> list[Place]:
        return list(self._order)

    def discard(self, router: str) -> None:
        """Drop a router's place without deciding anything (another writer did)."""
        place = self.places.pop(router, None)
        if place is not None:
            self._order.remove(place)


class Admission:
    """Every tenant's line, the leases, and the license timetable.

    ``lease`` is how long a place lasts without a hello or heartbeat;
    ``grace`` is how long a last will leaves the seat held for a reconnect.
    """

    def __init__(self, lease: timedelta, grace: timedelta, next_arrival: int = 1):
        self.lease = lease
        self.grace = grace
        self.next_arrival = next_arrival
        self.lines: dict[str, Line] = {}
        self.licenses: dict[str, list[License]] = {}
        self.known_states: dict[str, State] = {}
        self._epochs: dict[tuple[str, str], int] = {}
        self._leases: list[tuple[datetime, str, str]] = []
        self._timetable: list[tuple[datetime, str]] = []
        self._next_change: dict[str, datetime] = {}
        # (tenant, router) -> the session whose last will shortened the
        # lease, so that the place leaves with cause ``will``, not ``lease``.
        self._wills: dict[tuple[str, str], str] = {}

    # -- tenants and licenses -------------------------------------------

    def load_tenant(
        self,
        tenant: str,
        licenses: Sequence[License],
        known_states: dict[str, State],
        now: datetime,
    ) -> Outcome:
        """Add or refresh a tenant's licenses and re-decide its seats at ``now``."""
        self.licenses[tenant] = list(licenses)
        self.known_states.update(known_states)
        line = self.lines.get(tenant)
        if line is None:
            line = self.lines[tenant] = Line(tenant, NO_CAPACITY)
        outcome = Outcome(events=self._license_transitions(tenant, now))
        outcome.events += line.resize(capacity_at(licenses, now))
        self._schedule(tenant, now)
        return outcome

    def restore(self, places: Iterable[Place], now: datetime) -> Outcome:
        """Put stored places back in their lines, with fresh leases."""
        outcome = Outcome()
        touched = set()
        for place in places:
            line = self.lines.get(place.tenant)
            if line is None:
                continue
            place.lease_until = now + self.lease
            line.add(place, decide=False)
            key = (place.tenant, place.router)
            self._epochs[key] = max(self._epochs.get(key, 0), place.epoch)
            self.next_arrival = max(self.next_arrival, place.arrival + 1)
            self._watch(place)
            touched.add(place.tenant)
        for tenant in sorted(touched):
            outcome.events += self.lines[tenant].reseat()
        return outcome

    def next_change(self, tenant: str) -> datetime | None:
        """When the tenant's loaded licenses next change its capacity or state."""
        return self._next_change.get(tenant)

    def epoch(self, tenant: str, router: str) -> int:
        """The last epoch the router had (0 for one never seen)."""
        return self._epochs.get((tenant, router), 0)

    def note_epoch(self, tenant: str, router: str, epoch: int) -> None:
        """Remember the last epoch a router had, so epochs never go back."""
        key = (tenant, router)
        self._epochs[key] = max(self._epochs.get(key, 0), epoch)

    def _license_transitions(self, tenant: str, now: datetime) -> list[Event]:
        licenses = self.licenses[tenant]
        paid_from = paid_since(licenses)
        events: list[Event] = []
        for lic in licenses:
            known = self.known_states.get(lic.id)
            if known is not None:
                for before, after, at in transitions(lic, known, now, paid_from):
                    events.append(LicenseChanged(tenant, lic.id, before, after, at))
            self.known_states[lic.id] = state_at(lic, now, paid_from)
        return events

    def _schedule(self, tenant: str, now: datetime) -> None:
        upcoming = next_change_after(self.licenses[tenant], now)
        if upcoming is None:
            self._next_change.pop(tenant, None)
        elif self._next_change.get(tenant) != upcoming:
            self._next_change[tenant] = upcoming
            heapq.heappush(self._timetable, (upcoming, tenant))

    # -- routers ---------------------------------------------------------

    def hello(self, tenant: str, router: str, session: str, now: datetime) -> Outcome:
        """Decide one hello; unknown tenants are the caller's to refuse."""
        line = self.lines[tenant]
        place = line.places.get(router)
        if place is not None:
            place.lease_until = now + self.lease
            if place.session == session:
                return Outcome(line.verdict(place))
            place.session = session
            place.epoch = self._next_epoch(tenant, router)
            return Outcome(line.verdict(place), [Joined(replace(place), resumed=True)])
        place = Place(
            tenant,
            router,
            session,
            self._next_epoch(tenant, router),
            self.next_arrival,
            False,
            now + self.lease,
        )
        self.next_arrival += 1
        line.add(place)
        self._watch(place)
        return Outcome(line.verdict(place), [Joined(replace(place), resumed=False)])

    def heartbeat(
        self, tenant: str, router: str, session: str, now: datetime
    ) -> Outcome:
        """Renew a lease; a heartbeat of a session not in line is stale."""
        place = self.lines[tenant].places.get(router)
        if place is None or place.session != session:
            return Outcome(stale=True)
        place.lease_until = now + self.lease
        return Outcome()

    def goodbye(
        self, tenant: str, router: str, session: str, will: bool, now: datetime
    ) -> Outcome:
        """A router leaves; a last will only shortens its lease to the grace."""
        line = self.lines[tenant]
        place = line.places.get(router)
        if place is None or place.session != session:
            return Outcome(stale=True)
        if will:
            place.lease_until = min(place.lease_until, now + self.grace)
            self._wills[(tenant, router)] = session
            self._watch(place)
            return Outcome()
        self._wills.pop((tenant, router), None)
        return Outcome(events=line.remove(place, Cause.GOODBYE))

    def _next_epoch(self, tenant: str, router: str) -> int:
        key = (tenant, router)
        epoch = self._epochs.get(key, 0) + 1
        self._epochs[key] = epoch
        return epoch

    def _watch(self, place: Place) -> None:
        # One live heap entry per place: an entry whose instant is not the
        # place's ``watched_at`` is stale and skipped when it comes up, so
        # renewing a lease costs nothing until the old deadline is reached.
        place.watched_at = place.lease_until
        heapq.heappush(self._leases, (place.lease_until, place.tenant, place.router))

    # -- time --------------------------------------------------------------

    def next_deadline(self) -> datetime | None:
        """The earliest instant at which :meth:`advance` has work to do."""
        heads = [h[0][0] for h in (self._leases, self._timetable) if h]
        return min(heads, default=None)

    def advance(self, now: datetime) -> Outcome:
        """Apply every lease run-out and license change due at ``now``."""
        outcome = Outcome()
        while self._timetable and self._timetable[0][0] <= now:
            at, tenant = heapq.heappop(self._timetable)
            if self._next_change.get(tenant) == at:
                del self._next_change[tenant]
                outcome.events += self.load_tenant(
                    tenant, self.licenses[tenant], {}, now
                ).events
        while self._leases and self._leases[0][0] <= now:
            at, tenant, router = heapq.heappop(self._leases)
            line = self.lines.get(tenant)
            place = line.places.get(router) if line is not None else None
            if line is None or place is None or place.watched_at != at:
                continue
            if place.lease_until > now:
                self._watch(place)
                continue
            will = self._wills.pop((tenant, router), None) == place.session
            outcome.events += line.remove(place, Cause.WILL if will else Cause.LEASE)
        return outcome

    # -- several writers ---------------------------------------------------

    def adopt(
        self,
        tenant: str,
        capacity: Capacity,
        routers: Iterable[tuple[str, int, Place | None, str | None]],
        *,
        reset: bool = False,
    ) -> None:
        """Take the line as another writer left it, deciding nothing.

        ``routers`` are ``(router, epoch, place or None, will_session)`` as
        stored; the seat flags and ``capacity`` are taken as they are, since
        the writer that stored them decided them. With ``reset`` the line is
        rebuilt from ``routers`` alone.
        """
        line = self.lines.get(tenant)
        if line is None or reset:
            line = self.lines[tenant] = Line(tenant, capacity)
        line.capacity = capacity
        for router, epoch, place, will in routers:
            line.discard(router)
            self.note_epoch(tenant, router, epoch)
            self._wills.pop((tenant, router), None)
            if place is None:
                continue
            line.add(place, decide=False)
            self.next_arrival = max(self.next_arrival, place.arrival + 1)
            if will is not None and will == place.session:
                self._wills[(tenant, router)] = will
            self._watch(place)

    def renew_leases(self, tenant: str, until: datetime) -> list[Place]:
        """Make every place of a tenant's line last at least until ``until``.

        A place whose last will was heard keeps its short grace.
        """
        renewed = []
        for place in self.lines[tenant].places.values():
            if place.lease_until < until and (tenant, place.router) not in self._wills:
                place.lease_until = until
                self._watch(place)
                renewed.append(place)
        return renewed

    def lease_of(self, tenant: str, router: str) -> tuple[datetime, str | None] | None:
        """A place's lease end and the session whose will cut it, if in line."""
        line = self.lines.get(tenant)
        place = line.places.get(router) if line is not None else None
        if place is None:
            return None
        return place.lease_until, self._wills.get((tenant, router))

    def compact(self) -> None:
        """Drop stale lease and timetable entries once they outnumber the
        places (tenants) twice over.

        A gateway that adopts other writers' lines pushes an entry per change
        and, not leading, never pops them.
        """
        if len(self._timetable) > 2 * len(self._next_change) + 1000:
            self._timetable = [(at, t) for t, at in self._next_change.items()]
            heapq.heapify(self._timetable)
        places = sum(len(line) for line in self.lines.values())
        if len(self._leases) > 2 * places + 1000:
            self._leases = [
                (p.lease_until, p.tenant, p.router)
                for line in self.lines.values()
                for p in line.places.values()
            ]
            heapq.heapify(self._leases)
            for line in self.lines.values():
                for place in line.places.values():
                    place.watched_at = place.lease_until

    def due_tenants(self, now: datetime) -> set[str]:
        """Tenants that :meth:`advance` at ``now`` may change."""
        due = {tenant for _, tenant in _peek(self._timetable, now)}
        due.update(tenant for _, tenant, _ in _peek(self._leases, now))
        return due


def _peek(heap: list[_Due], now: datetime) -> list[_Due]:
    """The heap's entries due by ``now``, leaving the heap as it was."""
    taken = []
    while heap and heap[0][0] <= now:
        taken.append(heapq.heappop(heap))
    for entry in taken:
        heapq.heappush(heap, entry)
    return taken
