"""First come, first served, scenario by scenario, on a virtual clock.

The clock is a plain datetime that each test moves with ``World.advance``,
which hands the new instant to :meth:`Admission.advance` the way the
gateway's timer loop does. Routers R01 to R10 belong to tenant T8.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from policy.admission import (
    Admission,
    CapacityChanged,
    Cause,
    Event,
    Joined,
    Left,
    LicenseChanged,
    Outcome,
    Place,
    Reason,
    SeatChanged,
    Verdict,
)
from policy.licenses import Capacity, Kind, License, State, Tier

T8 = "T8"
T0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
US = timedelta(microseconds=1)
LEASE = timedelta(minutes=10)
GRACE = timedelta(seconds=10)
SOON = T0 + timedelta(minutes=1)  # a license instant inside every lease
ROUTERS = [f"R{n:02}" for n in range(1, 11)]


def licenses(
    count: int,
    activation: datetime | None,
    *,
    term: int = 12,
    kind: Kind = Kind.BASIC_1,
    capacity: int = 1,
    prefix: str = "L",
) -> list[License]:
    return [
        License(
            id=f"{prefix}{n}",
            tenant=T8,
            kind=kind,
            capacity=capacity,
            term_months=term,
            issued_at=datetime(2024, 1, 1, tzinfo=UTC),
            imported_at=datetime(2024, 2, 1, tzinfo=UTC),
            activation_at=activation,
        )
        for n in range(1, count + 1)
    ]


ACTIVE_8 = licenses(8, datetime(2025, 5, 1, tzinfo=UTC))
EXPIRED_2 = licenses(2, datetime(2024, 5, 1, tzinfo=UTC), prefix="X")
# Two licenses whose one-month term ends at SOON.
ENDING_2 = licenses(2, datetime(2025, 5, 1, 12, 1, tzinfo=UTC), term=1, prefix="E")
STARTING_2 = licenses(2, SOON, prefix="S")


@dataclass
class World:
    """An Admission with one tenant and a clock moved by hand."""

    gate: Admission
    now: datetime

    @classmethod
    def of(cls, licenses: list[License], now: datetime = T0) -> World:
        gate = Admission(LEASE, GRACE)
        gate.load_tenant(T8, licenses, {}, now)
        return cls(gate, now)

    def advance(self, to: datetime) -> list[Event]:
        assert to >= self.now
        self.now = to
        return self.gate.advance(to).events

    def hello(self, router: str, session: str = "s1") -> Outcome:
        return self.gate.hello(T8, router, session, self.now)

    def heartbeat(self, router: str, session: str = "s1") -> Outcome:
        return self.gate.heartbeat(T8, router, session, self.now)

    def goodbye(self, router: str, session: str = "s1", *, will: bool) -> Outcome:
        return self.gate.goodbye(T8, router, session, will, self.now)

    def ask(self, router: str, session: str = "s1") -> Verdict:
        """A hello whose verdict the test needs."""
        verdict = self.hello(router, session).verdict
        assert verdict is not None
        return verdict

    def hello_all(self, routers: list[str] = ROUTERS) -> list[Verdict]:
        return [self.ask(r) for r in routers]

    def place(self, router: str) -> Place:
        return self.gate.lines[T8].places[router]

    def seated(self) -> list[str]:
        return [p.router for p in self.gate.lines[T8].in_order() if p.seated]

    def waiting(self) -> list[str]:
        return [p.router for p in self.gate.lines[T8].in_order() if not p.seated]

    def told(self, router: str) -> Verdict:
        return self.gate.lines[T8].verdict(self.place(router))


def answer(v: Verdict) -> tuple[bool, Reason, Tier | None, int | None]:
    return v.accepted, v.reason, v.tier, v.position


def seat_news(events: list[Event]) -> list[tuple[str, bool, Reason, int | None, Cause]]:
    return [
        (
            e.verdict.router,
            e.verdict.accepted,
            e.verdict.reason,
            e.verdict.position,
            e.cause,
        )
        for e in events
        if isinstance(e, SeatChanged)
    ]


def departures(events: list[Event]) -> list[tuple[str, bool, Cause]]:
    return [(e.router, e.was_seated, e.cause) for e in events if isinstance(e, Left)]


SEATED = (True, Reason.LICENSED, Tier.FULL, None)


def full_house() -> World:
    """8 valid licenses (and 2 expired ones), R01 to R10 said hello in order."""
    world = World.of(ACTIVE_8 + EXPIRED_2)
    world.hello_all()
    return world


# -- first come, first served ---------------------------------------------------


def test_first_eight_of_ten_are_seated_when_two_of_ten_licenses_expired() -> None:
    world = World.of(ACTIVE_8 + EXPIRED_2)

    verdicts = world.hello_all()

    assert [answer(v) for v in verdicts] == [SEATED] * 8 + [
        (False, Reason.CAPACITY_EXCEEDED, Tier.FULL, 1),
        (False, Reason.CAPACITY_EXCEEDED, Tier.FULL, 2),
    ]
    assert world.seated() == ROUTERS[:8]


def test_first_hello_opens_a_place_at_the_end_of_the_line() -> None:
    world = World.of(ACTIVE_8)

    first, second = world.hello("R01"), world.hello("R02")

    assert first.events == [Joined(world.place("R01"), resumed=False)]
    assert world.place("R01").arrival < world.place("R02").arrival
    assert second.verdict == Verdict(
        T8, "R02", "s1", 1, True, Reason.LICENSED, Tier.FULL
    )


@pytest.mark.parametrize("router", ["R05", "R10"], ids=["seated", "waiting"])
def test_repeated_hello_of_same_session_gives_same_answer_and_no_event_f05(
    router: str,
) -> None:
    world = full_house()
    first = world.told(router)

    again = [world.hello(router) for _ in range(3)]

    assert [o.verdict for o in again] == [first] * 3
    assert [o.events for o in again] == [[], [], []]
    assert [p.router for p in world.gate.lines[T8].in_order()] == ROUTERS
    assert world.seated() == ROUTERS[:8]


@pytest.mark.parametrize(
    ("router", "expected"),
    [
        ("R05", SEATED),
        ("R09", (False, Reason.CAPACITY_EXCEEDED, Tier.FULL, 1)),
    ],
    ids=["seated-keeps-seat", "waiting-keeps-position"],
)
def test_new_session_keeps_place_and_gets_higher_epoch(
    router: str, expected: tuple[bool, Reason, Tier | None, int | None]
) -> None:
    world = full_house()
    arrival = world.place(router).arrival

    outcome = world.hello(router, "s2")

    assert outcome.verdict is not None
    assert answer(outcome.verdict) == expected
    assert (outcome.verdict.session, outcome.verdict.epoch) == ("s2", 2)
    assert outcome.events == [Joined(world.place(router), resumed=True)]
    assert world.place(router).arrival == arrival
    assert world.seated() == ROUTERS[:8]


# -- leaving ---------------------------------------------------------------------


@pytest.mark.parametrize("will", [False, True], ids=["goodbye", "will"])
def test_goodbye_of_an_older_session_is_stale_and_changes_nothing_f02(
    will: bool,
) -> None:
    world = full_house()
    world.hello("R03", "s2")

    outcome = world.goodbye("R03", "s1", will=will)
    later = world.advance(T0 + GRACE + timedelta(seconds=1))

    assert outcome.stale
    assert outcome.events == []
    assert later == []
    assert world.seated() == ROUTERS[:8]
    assert world.told("R03").epoch == 2


@pytest.mark.parametrize("will", [False, True], ids=["goodbye", "will"])
def test_goodbye_of_a_router_without_a_place_is_stale(will: bool) -> None:
    world = full_house()

    outcome = world.goodbye("R99", will=will)

    assert outcome.stale
    assert outcome.events == []


def test_goodbye_frees_the_seat_for_the_first_waiting_router() -> None:
    world = full_house()

    outcome = world.goodbye("R03", will=False)

    assert outcome.events == [
        Left(T8, "R03", "s1", 1, was_seated=True, cause=Cause.GOODBYE),
        SeatChanged(
            Verdict(T8, "R09", "s1", 1, True, Reason.LICENSED, Tier.FULL),
            Cause.SEAT_FREED,
        ),
    ]
    assert world.seated() == ["R01", "R02", *ROUTERS[3:9]]
    assert answer(world.ask("R10")) == (False, Reason.CAPACITY_EXCEEDED, Tier.FULL, 1)


def test_goodbye_of_a_waiting_router_moves_later_ones_up_without_a_seat() -> None:
    world = full_house()

    outcome = world.goodbye("R09", will=False)

    assert outcome.events == [Left(T8, "R09", "s1", 1, False, Cause.GOODBYE)]
    assert world.seated() == ROUTERS[:8]
    assert world.told("R10").position == 1


def test_last_will_holds_the_seat_until_the_grace_runs_out() -> None:
    world = full_house()

    outcome = world.goodbye("R03", will=True)
    during = world.advance(T0 + GRACE - US)
    seated_during = world.seated()
    after = world.advance(T0 + GRACE)

    assert (outcome.stale, outcome.events) == (False, [])
    assert during == []
    assert seated_during == ROUTERS[:8]
    assert departures(after) == [("R03", True, Cause.WILL)]
    assert seat_news(after) == [("R09", True, Reason.LICENSED, None, Cause.SEAT_FREED)]


def test_new_session_within_the_grace_keeps_seat_and_place_without_leaving() -> None:
    world = full_house()
    world.goodbye("R03", will=True)
    world.advance(T0 + GRACE - US)

    resumed = world.ask("R03", "s2")
    events = world.advance(T0 + GRACE) + world.advance(T0 + LEASE - US)

    assert answer(resumed) == SEATED
    assert resumed.epoch == 2
    assert events == []
    assert world.seated() == ROUTERS[:8]


def test_place_left_after_a_will_then_a_new_session_leaves_by_lease() -> None:
    # The will named s1; s2's lease running out is a plain lease run-out.
    world = World.of(ACTIVE_8)
    world.hello("R01")
    world.goodbye("R01", will=True)
    world.hello("R01", "s2")

    events = world.advance(T0 + LEASE)

    assert departures(events) == [("R01", True, Cause.LEASE)]


# -- leases ----------------------------------------------------------------------


def test_silent_router_loses_its_seat_when_the_lease_runs_out_f01() -> None:
    world = full_house()
    world.advance(T0 + LEASE / 2)
    for router in ROUTERS[1:]:
        assert not world.heartbeat(router).stale

    before = world.advance(T0 + LEASE - US)
    at_run_out = world.advance(T0 + LEASE)

    assert before == []
    assert departures(at_run_out) == [("R01", True, Cause.LEASE)]
    assert seat_news(at_run_out) == [
        ("R09", True, Reason.LICENSED, None, Cause.SEAT_FREED)
    ]
    assert "R01" not in world.gate.lines[T8].places


def test_heartbeats_renew_the_lease() -> None:
    world = World.of(ACTIVE_8)
    world.hello("R01")
    world.advance(T0 + timedelta(minutes=4))
    world.heartbeat("R01")

    at_old_run_out = world.advance(T0 + LEASE)
    before_new = world.advance(T0 + timedelta(minutes=4) + LEASE - US)
    at_new = world.advance(T0 + timedelta(minutes=4) + LEASE)

    assert (at_old_run_out, before_new) == ([], [])
    assert departures(at_new) == [("R01", True, Cause.LEASE)]


def test_hello_renews_the_lease() -> None:
    world = World.of(ACTIVE_8)
    world.hello("R01")
    world.advance(T0 + timedelta(minutes=4))
    world.hello("R01")

    assert world.advance(T0 + LEASE) == []
    assert world.place("R01").lease_until == T0 + timedelta(minutes=4) + LEASE


@pytest.mark.parametrize(
    ("router", "session"),
    [("R01", "s0"), ("R99", "s1")],
    ids=["older-session", "no-place"],
)
def test_heartbeat_of_an_unknown_session_is_stale_and_renews_nothing(
    router: str, session: str
) -> None:
    world = World.of(ACTIVE_8)
    world.hello("R01")
    world.advance(T0 + timedelta(minutes=4))

    outcome = world.heartbeat(router, session)

    assert outcome.stale
    assert departures(world.advance(T0 + LEASE)) == [("R01", True, Cause.LEASE)]


# -- capacity over time ------------------------------------------------------------


def test_expiry_evicts_the_last_arrivals_at_its_instant_in_order() -> None:
    world = World.of(ACTIVE_8 + ENDING_2)
    world.hello_all()

    before = world.advance(SOON - US)
    events = world.advance(SOON)

    assert before == []
    assert seat_news(events) == [
        ("R09", False, Reason.CAPACITY_EXCEEDED, 1, Cause.CAPACITY),
        ("R10", False, Reason.CAPACITY_EXCEEDED, 2, Cause.CAPACITY),
    ]
    assert (
        CapacityChanged(T8, Capacity(10, Tier.FULL), Capacity(8, Tier.FULL)) in events
    )
    assert [e for e in events if isinstance(e, LicenseChanged)] == [
        LicenseChanged(T8, lic.id, State.ACTIVE, State.EXPIRED, SOON)
        for lic in ENDING_2
    ]
    assert world.seated() == ROUTERS[:8]


def test_scheduled_activation_admits_waiting_routers_in_arrival_order() -> None:
    world = World.of(ACTIVE_8 + STARTING_2)
    world.hello_all()

    before = world.advance(SOON - US)
    events = world.advance(SOON)

    assert before == []
    assert seat_news(events) == [
        ("R09", True, Reason.LICENSED, None, Cause.CAPACITY),
        ("R10", True, Reason.LICENSED, None, Cause.CAPACITY),
    ]
    assert [e for e in events if isinstance(e, LicenseChanged)] == [
        LicenseChanged(T8, lic.id, State.SCHEDULED, State.ACTIVE, SOON)
        for lic in STARTING_2
    ]
    assert world.seated() == ROUTERS


def test_license_loaded_while_running_admits_the_first_waiting_router() -> None:
    world = full_house()
    world.advance(T0 + timedelta(seconds=5))

    outcome = world.gate.load_tenant(
        T8, ACTIVE_8 + licenses(1, world.now, prefix="N"), {}, world.now
    )

    assert seat_news(outcome.events) == [
        ("R09", True, Reason.LICENSED, None, Cause.CAPACITY)
    ]
    assert world.told("R10").position == 1


def test_license_loaded_while_running_takes_effect_before_a_later_change() -> None:
    later = licenses(1, T0 + timedelta(minutes=5), prefix="S")
    world = World.of(ACTIVE_8 + later)
    world.hello_all()

    world.gate.load_tenant(T8, ACTIVE_8 + later + STARTING_2, {}, world.now)
    events = world.advance(SOON)

    assert seat_news(events) == [
        ("R09", True, Reason.LICENSED, None, Cause.CAPACITY),
        ("R10", True, Reason.LICENSED, None, Cause.CAPACITY),
    ]


FREE_5 = licenses(1, datetime(2025, 5, 1, tzinfo=UTC), kind=Kind.FREE, capacity=5)


@pytest.mark.parametrize(
    ("paid", "expected"),
    [
        pytest.param(
            licenses(1, SOON, kind=Kind.BASIC_25, capacity=25, prefix="P"),
            [
                ("R01", True, Reason.LICENSED, None),
                ("R02", True, Reason.LICENSED, None),
                ("R03", True, Reason.LICENSED, None),
            ],
            id="more-paid-seats",
        ),
        pytest.param(
            licenses(1, SOON, prefix="P"),
            [
                ("R01", True, Reason.LICENSED, None),
                ("R02", False, Reason.CAPACITY_EXCEEDED, 1),
                ("R03", False, Reason.CAPACITY_EXCEEDED, 2),
            ],
            id="fewer-paid-seats",
        ),
    ],
)
def test_paid_activation_tells_every_seated_router_its_new_tier(
    paid: list[License], expected: list[tuple[str, bool, Reason, int | None]]
) -> None:
    world = World.of(FREE_5 + paid)
    verdicts = world.hello_all(ROUTERS[:3])

    events = world.advance(SOON)
    told = [e.verdict for e in events if isinstance(e, SeatChanged)]

    assert {v.tier for v in verdicts} == {Tier.FREE}
    assert [(v.router, v.accepted, v.reason, v.position) for v in told] == expected
    assert {v.tier for v in told} == {Tier.FULL}
    assert LicenseChanged(T8, "L1", State.ACTIVE, State.INVALIDATED, SOON) in events


@pytest.mark.parametrize(
    "held",
    [[], EXPIRED_2, licenses(1, None)],
    ids=["no-license", "all-expired", "only-available"],
)
def test_hello_without_a_valid_license_is_rejected_saying_so(
    held: list[License],
) -> None:
    world = World.of(held)

    assert answer(world.ask("R01")) == (False, Reason.NO_VALID_LICENSE, None, 1)


def test_last_license_expiring_rejects_seated_routers_with_no_valid_license() -> None:
    world = World.of(ENDING_2)
    world.hello_all(ROUTERS[:3])

    events = world.advance(SOON)

    assert seat_news(events) == [
        ("R01", False, Reason.NO_VALID_LICENSE, 1, Cause.CAPACITY),
        ("R02", False, Reason.NO_VALID_LICENSE, 2, Cause.CAPACITY),
    ]
    assert world.seated() == []


# -- restart -----------------------------------------------------------------------


def restart(world: World, held: list[License], at: datetime) -> tuple[World, Outcome]:
    """A new Admission fed the places the old one would have stored."""
    stored = [replace(p) for p in world.gate.lines[T8].in_order()]
    fresh = World.of(held, at)
    return fresh, fresh.gate.restore(stored, at)


def test_restore_gives_the_same_seats_to_the_same_routers_with_fresh_leases() -> None:
    world = full_house()
    back_at = T0 + LEASE - timedelta(seconds=1)

    fresh, outcome = restart(world, ACTIVE_8 + EXPIRED_2, back_at)

    assert outcome.events == []
    assert fresh.seated() == ROUTERS[:8]
    assert [fresh.told(r).position for r in ("R09", "R10")] == [1, 2]
    assert fresh.advance(T0 + LEASE) == []
    assert fresh.advance(back_at + LEASE - US) == []
    assert len(departures(fresh.advance(back_at + LEASE))) == 10


def test_new_router_after_restore_queues_behind_the_restored_ones() -> None:
    world = full_house()
    fresh, _ = restart(world, ACTIVE_8 + EXPIRED_2, T0 + timedelta(seconds=30))

    assert fresh.ask("R11").position == 3


@pytest.mark.parametrize(
    ("held", "expected"),
    [
        pytest.param(
            ACTIVE_8 + ENDING_2,
            [
                ("R09", False, Reason.CAPACITY_EXCEEDED, 1, Cause.RESTORE),
                ("R10", False, Reason.CAPACITY_EXCEEDED, 2, Cause.RESTORE),
            ],
            id="license-expired-while-down",
        ),
        pytest.param(
            ACTIVE_8 + STARTING_2,
            [
                ("R09", True, Reason.LICENSED, None, Cause.RESTORE),
                ("R10", True, Reason.LICENSED, None, Cause.RESTORE),
            ],
            id="license-activated-while-down",
        ),
    ],
)
def test_restore_reseats_only_routers_whose_stored_seat_disagrees(
    held: list[License],
    expected: list[tuple[str, bool, Reason, int | None, Cause]],
) -> None:
    world = World.of(held)
    world.hello_all()

    _, outcome = restart(world, held, SOON + timedelta(seconds=30))

    assert seat_news(outcome.events) == expected
    assert len(outcome.events) == 2


# -- epochs --------------------------------------------------------------------------


def test_epoch_grows_when_a_router_leaves_and_comes_back() -> None:
    world = full_house()
    world.goodbye("R01", will=False)

    verdict = world.ask("R01", "s2")

    assert verdict.epoch == 2
    assert verdict.position == 2  # at the end of the line, behind R10


@pytest.mark.parametrize(
    ("noted", "expected"),
    [([5], 6), ([7, 3], 8), ([], 1)],
    ids=["noted", "lower-note-ignored", "never-seen"],
)
def test_noted_epoch_keeps_epochs_growing_across_a_restart(
    noted: list[int], expected: int
) -> None:
    world = World.of(ACTIVE_8)
    for epoch in noted:
        world.gate.note_epoch(T8, "R01", epoch)

    assert world.ask("R01").epoch == expected


@pytest.mark.parametrize(
    ("noted", "expected"), [(2, 5), (9, 10)], ids=["place-newer", "note-newer"]
)
def test_restored_place_resumes_above_its_stored_and_noted_epoch(
    noted: int, expected: int
) -> None:
    world = World.of(ACTIVE_8)
    world.gate.note_epoch(T8, "R01", noted)
    stored = Place(T8, "R01", "s4", 4, arrival=1, seated=True, lease_until=T0)
    world.gate.restore([stored], T0)

    verdict = world.ask("R01", "s5")

    assert (verdict.accepted, verdict.epoch) == (True, expected)
