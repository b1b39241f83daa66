"""The core's side of several gateways: taking a line as another writer left it.

A gateway of a cluster decides on its copy of a tenant's line after
adopting what other gateways stored; these are the rules that copy keeps.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from policy.admission import Admission, Cause, Joined, Left, Place, SeatChanged
from policy.licenses import Capacity, Tier

T8 = "T8"
T0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
LEASE = timedelta(minutes=10)
TWO = Capacity(2, Tier.FULL)


def place(router: str, arrival: int, *, seated: bool, epoch: int = 1) -> Place:
    return Place(T8, router, f"s-{router}-{epoch}", epoch, arrival, seated, T0 + LEASE)


def adopted(*places: Place) -> Admission:
    admission = Admission(LEASE, timedelta(seconds=10))
    stored = [(p.router, p.epoch, p, None) for p in places]
    admission.adopt(T8, TWO, stored, reset=True)
    return admission


def test_adopted_seats_are_kept_and_new_arrivals_join_after_the_stored_ones() -> None:
    admission = adopted(place("R01", 40, seated=True), place("R02", 41, seated=True))

    outcome = admission.hello(T8, "R03", "s", T0)

    assert outcome.verdict is not None
    assert (outcome.verdict.accepted, outcome.verdict.position) == (False, 1)
    joined = outcome.events[0]
    assert isinstance(joined, Joined)
    assert joined.place.arrival == 42


def test_a_router_another_writer_removed_leaves_without_events_and_keeps_its_epoch(
) -> None:  # fmt: skip
    admission = adopted(place("R01", 1, seated=True, epoch=3))

    admission.adopt(T8, TWO, [("R01", 3, None, None)])
    outcome = admission.hello(T8, "R01", "new", T0)

    assert outcome.verdict is not None
    assert outcome.verdict.epoch == 4
    assert [p.router for p in admission.lines[T8].in_order()] == ["R01"]


def test_a_freed_seat_goes_to_the_first_adopted_waiting_router() -> None:
    admission = adopted(
        place("R01", 1, seated=True),
        place("R02", 2, seated=True),
        place("R03", 3, seated=False),
    )

    outcome = admission.goodbye(T8, "R01", "s-R01-1", False, T0)

    assert isinstance(outcome.events[0], Left)
    promoted = outcome.events[1]
    assert isinstance(promoted, SeatChanged)
    assert (promoted.verdict.router, promoted.cause) == ("R03", Cause.SEAT_FREED)


def test_an_adopted_last_will_keeps_its_grace_when_leases_are_renewed() -> None:
    admission = Admission(LEASE, timedelta(seconds=10))
    willed = place("R02", 2, seated=True)
    willed.lease_until = T0 + timedelta(seconds=5)
    admission.adopt(
        T8,
        TWO,
        [("R01", 1, place("R01", 1, seated=True), None),
         ("R02", 1, willed, willed.session)],
    )  # fmt: skip

    renewed = admission.renew_leases(T8, T0 + 2 * LEASE)

    assert [p.router for p in renewed] == ["R01"]
    assert admission.lease_of(T8, "R02") == (T0 + timedelta(seconds=5), "s-R02-1")
    left = admission.advance(T0 + timedelta(seconds=6)).events
    assert [(e.router, e.cause) for e in left if isinstance(e, Left)] == [
        ("R02", Cause.WILL)
    ]


def test_due_tenants_names_what_advance_would_change_and_changes_nothing() -> None:
    admission = adopted(place("R01", 1, seated=True))
    later = T0 + LEASE

    assert admission.due_tenants(later - timedelta(microseconds=1)) == set()
    assert admission.due_tenants(later) == {T8}
    assert admission.due_tenants(later) == {T8}
    assert [type(e) for e in admission.advance(later).events] == [Left]


def test_compacting_stale_lease_entries_keeps_every_place_watched() -> None:
    admission = adopted(place("R01", 1, seated=True))
    for _ in range(1500):
        admission.adopt(T8, TWO, [("R01", 1, place("R01", 1, seated=True), None)])

    admission.compact()

    assert admission.due_tenants(T0 + LEASE) == {T8}
    assert [type(e) for e in admission.advance(T0 + LEASE).events] == [Left]
