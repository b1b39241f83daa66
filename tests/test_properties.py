"""Admission invariants under any sequence of hellos, departures and time.

A hypothesis state machine drives one :class:`Admission` with routers of
two tenants, licenses that start, end and get activated, restarts and a
virtual clock. After every step the lines are checked against the rule
book, and against what each router was told: a router's last answer must
always be the truth, since seats change without the router asking.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from policy.admission import (
    Admission,
    Cause,
    Event,
    Joined,
    Left,
    LicenseChanged,
    Outcome,
    SeatChanged,
    Verdict,
)
from policy.errors import RuleViolation
from policy.licenses import (
    Kind,
    License,
    State,
    Tier,
    activate,
    capacity_at,
    next_change_after,
    paid_since,
    state_at,
)

TENANTS = ("A", "B")
ROUTERS = ("r1", "r2", "r3", "r4", "r5")
START = datetime(2025, 6, 1, 12, tzinfo=UTC)
US = timedelta(microseconds=1)
# Leases long enough for lines to live through license changes, which
# come days apart; short clock steps still reach the grace and the lease.
LEASE = timedelta(days=2)
GRACE = timedelta(hours=1)

tenants = st.sampled_from(TENANTS)
routers = st.sampled_from(ROUTERS)
steps = st.sampled_from(
    [
        US,
        timedelta(seconds=1),
        GRACE,
        LEASE - US,
        LEASE,
        timedelta(days=1),
        timedelta(days=20),
        timedelta(days=200),
    ]
)
kinds = st.sampled_from([Kind.BASIC_1, Kind.BASIC_1, Kind.BASIC_25, Kind.FREE])
starts = st.sampled_from(
    [
        None,
        -timedelta(days=40),
        -timedelta(days=1),
        timedelta(0),
        US,
        timedelta(hours=1),
        timedelta(days=1),
        timedelta(days=35),
    ]
)
ages = st.sampled_from([timedelta(0), timedelta(days=300), timedelta(days=725)])


class AdmissionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.gate = Admission(LEASE, GRACE)
        self.held: dict[str, list[License]] = {t: [] for t in TENANTS}
        self.issued = 0
        self.sessions = 0
        # Every session each router has opened, the current one last.
        self.opened: dict[tuple[str, str], list[str]] = {}
        self.epochs: dict[tuple[str, str], int] = {}
        # What each router in a line was last told: (accepted, tier).
        self.told: dict[tuple[str, str], tuple[bool, Tier | None]] = {}
        for tenant in TENANTS:
            self.gate.load_tenant(tenant, [], {}, self.now)

    # -- what the routers see --------------------------------------------------

    def see(self, tenant: str, router: str, epoch: int) -> None:
        key = (tenant, router)
        assert epoch >= self.epochs.get(key, 0), f"{key} saw epoch go back"
        self.epochs[key] = epoch

    def hear(self, verdict: Verdict) -> None:
        self.see(verdict.tenant, verdict.router, verdict.epoch)
        self.told[(verdict.tenant, verdict.router)] = (verdict.accepted, verdict.tier)

    def apply(self, outcome: Outcome) -> None:
        if outcome.verdict is not None:
            self.hear(outcome.verdict)
        for event in outcome.events:
            self.apply_event(event)

    def apply_event(self, event: Event) -> None:
        if isinstance(event, SeatChanged):
            self.hear(event.verdict)
        elif isinstance(event, Left):
            self.see(event.tenant, event.router, event.epoch)
            known = self.told.pop((event.tenant, event.router))
            assert known[0] == event.was_seated
            assert event.router not in self.gate.lines[event.tenant].places
        elif isinstance(event, Joined):
            self.see(event.place.tenant, event.place.router, event.place.epoch)
        elif isinstance(event, LicenseChanged):
            (lic,) = [x for x in self.held[event.tenant] if x.id == event.license_id]
            paid_from = paid_since(self.held[event.tenant])
            assert state_at(lic, event.at, paid_from) is event.after
            assert event.at <= self.now

    def reload(self, tenant: str) -> None:
        self.apply(self.gate.load_tenant(tenant, self.held[tenant], {}, self.now))

    # -- routers ---------------------------------------------------------------

    def session_for(self, tenant: str, router: str, current: bool) -> str:
        """The router's current session, or else its latest older one."""
        place = self.gate.lines[tenant].places.get(router)
        if current and place is not None:
            return place.session
        older = [
            s
            for s in self.opened.get((tenant, router), [])
            if place is None or s != place.session
        ]
        return older[-1] if older else self.fresh_session()

    def fresh_session(self) -> str:
        self.sessions += 1
        return f"s{self.sessions}"

    def say_hello(self, tenant: str, router: str, new: bool) -> None:
        before = self.epochs.get((tenant, router), 0)
        place = self.gate.lines[tenant].places.get(router)
        if new or place is None:
            session = self.fresh_session()
            self.opened.setdefault((tenant, router), []).append(session)
        else:
            session = place.session

        outcome = self.gate.hello(tenant, router, session, self.now)

        assert outcome.verdict is not None
        if new or place is None:
            assert outcome.verdict.epoch > before
            (joined,) = outcome.events
            assert isinstance(joined, Joined)
            assert joined.place.router == router
            assert joined.resumed is (place is not None)
        else:
            assert outcome.events == []
        self.apply(outcome)

    @rule(tenant=tenants, router=routers, new=st.booleans())
    def hello(self, tenant: str, router: str, new: bool) -> None:
        self.say_hello(tenant, router, new)

    @rule(tenant=tenants, new=st.booleans())
    def whole_fleet_says_hello(self, tenant: str, new: bool) -> None:
        for router in ROUTERS:
            self.say_hello(tenant, router, new)

    def say_goodbye(self, tenant: str, router: str, will: bool, current: bool) -> None:
        place = self.gate.lines[tenant].places.get(router)
        session = self.session_for(tenant, router, current)

        outcome = self.gate.goodbye(tenant, router, session, will, self.now)

        assert outcome.stale is (place is None or place.session != session)
        if outcome.stale or will:
            assert outcome.events == []
        if will and place is not None and not outcome.stale:
            assert place.lease_until <= self.now + GRACE
        self.apply(outcome)

    @rule(tenant=tenants, router=routers, will=st.booleans(), current=st.booleans())
    def goodbye(self, tenant: str, router: str, will: bool, current: bool) -> None:
        self.say_goodbye(tenant, router, will, current)

    @rule(tenant=tenants, will=st.booleans(), index=st.integers(0, 4))
    def seated_router_leaves(self, tenant: str, will: bool, index: int) -> None:
        seated = [p.router for p in self.gate.lines[tenant].in_order() if p.seated]
        if seated:
            self.say_goodbye(tenant, seated[index % len(seated)], will, current=True)

    @rule(tenant=tenants)
    def whole_fleet_heartbeats(self, tenant: str) -> None:
        for place in self.gate.lines[tenant].in_order():
            heard = self.gate.heartbeat(tenant, place.router, place.session, self.now)
            assert (heard.stale, heard.events) == (False, [])

    @rule(tenant=tenants, router=routers, current=st.booleans())
    def heartbeat(self, tenant: str, router: str, current: bool) -> None:
        place = self.gate.lines[tenant].places.get(router)
        session = self.session_for(tenant, router, current)

        outcome = self.gate.heartbeat(tenant, router, session, self.now)

        assert outcome.stale is (place is None or place.session != session)
        assert outcome.events == []

    # -- licenses ----------------------------------------------------------------

    # Half the runs start on Cloud Free, so that paid licenses overtake it.
    @initialize(
        tenant=tenants,
        kind=st.sampled_from([Kind.FREE, Kind.BASIC_1]),
        term=st.sampled_from([1, 12]),
    )
    def first_license(self, tenant: str, kind: Kind, term: int) -> None:
        self.add_license(tenant, kind, term, timedelta(0), timedelta(0))

    @rule(
        tenant=tenants,
        kind=kinds,
        term=st.sampled_from([1, 12]),
        start=starts,
        age=ages,
    )
    def add_license(
        self,
        tenant: str,
        kind: Kind,
        term: int,
        start: timedelta | None,
        age: timedelta,
    ) -> None:
        self.issued += 1
        self.held[tenant].append(
            License(
                id=f"{tenant}-{self.issued}",
                tenant=tenant,
                kind=kind,
                capacity={Kind.BASIC_1: 1, Kind.BASIC_25: 25, Kind.FREE: 2}[kind],
                term_months=term,
                issued_at=self.now - age,
                imported_at=self.now,
                activation_at=None if start is None else self.now + start,
            )
        )
        self.reload(tenant)

    @rule(tenant=tenants, pick=st.integers(0, 7), delay=starts)
    def activate_one(self, tenant: str, pick: int, delay: timedelta | None) -> None:
        # Any license, not only available ones: refusals must change nothing.
        held = self.held[tenant]
        if not held:
            return
        at = self.now + abs(delay or timedelta(0))
        with suppress(RuleViolation):
            held[pick % len(held)] = activate(
                held[pick % len(held)], at, self.now, held
            )
        self.reload(tenant)

    # -- time ----------------------------------------------------------------------

    def states(self) -> dict[str, State]:
        found: dict[str, State] = {}
        for licenses in self.held.values():
            paid_from = paid_since(licenses)
            found |= {lic.id: state_at(lic, self.now, paid_from) for lic in licenses}
        return found

    def advance_to(self, moment: datetime) -> None:
        before = self.states()
        self.now = moment

        outcome = self.gate.advance(moment)

        # Every time-driven license change is announced, ending in its state.
        after = self.states()
        announced = {
            e.license_id: e.after
            for e in outcome.events
            if isinstance(e, LicenseChanged)
        }
        assert announced == {k: v for k, v in after.items() if v != before[k]}
        self.apply(outcome)

    @rule(step=steps)
    def advance(self, step: timedelta) -> None:
        self.advance_to(self.now + step)

    @rule(early=st.booleans())
    def advance_to_deadline(self, early: bool) -> None:
        deadline = self.gate.next_deadline()
        if deadline is not None:
            self.advance_to(max(self.now, deadline - US if early else deadline))

    def next_license_change(self) -> timedelta:
        changes = [next_change_after(held, self.now) for held in self.held.values()]
        upcoming = [c for c in changes if c is not None]
        return min(upcoming) - self.now if upcoming else timedelta(0)

    @rule(down=st.sampled_from(["no-time", "20-days", "past-a-license-change"]))
    def restart(self, down: str) -> None:
        down_for = {
            "no-time": timedelta(0),
            "20-days": timedelta(days=20),
            "past-a-license-change": self.next_license_change(),
        }[down]
        stored = [
            replace(place)
            for line in self.gate.lines.values()
            for place in line.in_order()
        ]
        self.now += down_for
        self.gate = Admission(LEASE, GRACE)
        for tenant in TENANTS:
            self.gate.load_tenant(tenant, self.held[tenant], {}, self.now)
        for (tenant, router), epoch in self.epochs.items():
            self.gate.note_epoch(tenant, router, epoch)

        was_seated = [p for p in stored if p.seated]

        outcome = self.gate.restore(stored, self.now)

        assert all(
            isinstance(e, SeatChanged) and e.cause is Cause.RESTORE
            for e in outcome.events
        )
        assert down_for or outcome.events == []
        for place in stored:
            line = self.gate.lines[place.tenant]
            assert line.places[place.router].lease_until == self.now + LEASE
        # Restore tells seat changes only; a tier that changed while the
        # gateway was down is not told by the core, so it is not checked.
        for place in was_seated:
            tier = self.gate.lines[place.tenant].capacity.tier
            self.told[(place.tenant, place.router)] = (True, tier)
        self.apply(outcome)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def no_place_outlives_its_lease(self) -> None:
        for line in self.gate.lines.values():
            for place in line.in_order():
                assert self.now < place.lease_until <= self.now + LEASE

    @invariant()
    def capacity_follows_the_licenses_at_their_instant(self) -> None:
        for tenant, line in self.gate.lines.items():
            assert line.capacity == capacity_at(self.held[tenant], self.now)
            paid_from = paid_since(self.held[tenant])
            for lic in self.held[tenant]:
                expected = state_at(lic, self.now, paid_from)
                assert self.gate.known_states[lic.id] is expected

    @invariant()
    def seats_never_exceed_capacity(self) -> None:
        for tenant, line in self.gate.lines.items():
            seated = sum(p.seated for p in line.in_order())
            assert seated <= capacity_at(self.held[tenant], self.now).seats

    @invariant()
    def each_router_holds_one_place(self) -> None:
        for line in self.gate.lines.values():
            names = [p.router for p in line.in_order()]
            assert len(names) == len(set(names)) == len(line.places)
            assert set(names) == set(line.places)

    @invariant()
    def seats_are_the_earliest_arrivals_that_fit(self) -> None:
        for line in self.gate.lines.values():
            order = line.in_order()
            arrivals = [p.arrival for p in order]
            assert arrivals == sorted(set(arrivals))
            fit = min(line.capacity.seats, len(order))
            assert [p.seated for p in order] == [True] * fit + [False] * (
                len(order) - fit
            )

    @invariant()
    def waiting_positions_count_from_one(self) -> None:
        for line in self.gate.lines.values():
            verdicts = [line.verdict(p) for p in line.in_order()]
            waiting = [v.position for v in verdicts if not v.accepted]
            assert waiting == list(range(1, len(waiting) + 1))
            assert all(v.position is None for v in verdicts if v.accepted)

    @invariant()
    def every_router_was_told_its_current_seat(self) -> None:
        lined = {
            (line.tenant, p.router): p
            for line in self.gate.lines.values()
            for p in line.in_order()
        }
        assert set(self.told) == set(lined)
        for key, place in lined.items():
            accepted, tier = self.told[key]
            assert accepted is place.seated, f"{key} was not told its seat"
            if accepted:
                assert tier is self.gate.lines[key[0]].capacity.tier


TestAdmissionKeepsItsInvariants = AdmissionMachine.TestCase
TestAdmissionKeepsItsInvariants.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
