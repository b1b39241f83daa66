"""The policy core alone: what one decision costs, and what a router weighs.

No broker, no store and no real clock: an :class:`Admission` is driven on
a virtual clock that moves one microsecond per reading, so no lease runs
out and no license instant comes due unless a figure asks for it. The
figures answer DESIGN.md section 6:

1. decision cost against the routers in one tenant's line (1,000 to
   1,000,000, capacity half the fleet): a new router's hello, a resume
   with a new session, a goodbye that promotes the first waiting router,
   and a heartbeat;
2. the same decisions spread over 10,000 small tenants;
3. time-driven work: a capacity change that admits one waiting router,
   and an ``advance`` with nothing due;
4. memory per router held by the core (tracemalloc, and the process's
   resident size as a cross-check).

Each kind of decision is timed in batches of distinct routers; what a
batch changed is undone outside the timed loop, so every batch meets the
same line. The cyclic garbage collector is off while a batch runs, as in
``timeit``; the pause of one full collection is reported beside.

Run from the repository root: ``python -m bench.core [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import linecache
import os
import platform
import random
import statistics
import subprocess
import sys
import tracemalloc
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from importlib.metadata import version
from itertools import count
from pathlib import Path
from time import perf_counter, perf_counter_ns, thread_time_ns
from typing import Any

from policy.admission import Admission, Outcome, Place, SeatChanged
from policy.licenses import Kind, License

T0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
TICK = timedelta(microseconds=1)
# The gateway's defaults (gateway/config.py); the virtual clock never
# reaches a lease's end, so only their size on the heap matters.
LEASE = timedelta(seconds=90)
GRACE = timedelta(seconds=10)
ISSUED = datetime(2025, 1, 1, tzinfo=UTC)

FLEETS = (1_000, 10_000, 100_000, 1_000_000)
QUICK_FLEETS = FLEETS[:3]
OPS = 20_000
QUICK_OPS = 5_000
BATCH = 50
TENANTS = 10_000
ROUTERS_PER_TENANT = 10
TENANT = "T1"
KINDS = ("hello", "resume", "goodbye", "heartbeat")
TARGET_BYTES = 1024

Key = tuple[str, str]
Args = list[tuple[Any, ...]]


def say(text: str = "") -> None:
    print(text, flush=True)


class Clock:
    """Virtual time: each reading is one microsecond after the last."""

    def __init__(self) -> None:
        self.now = T0

    def read(self) -> datetime:
        self.now += TICK
        return self.now


def licenses_for(tenant: str, seats: int) -> list[License]:
    """Basic 25 licenses and Basic 1 for the rest, active for a year."""
    kinds = [Kind.BASIC_25] * (seats // 25) + [Kind.BASIC_1] * (seats % 25)
    return [license_of(tenant, f"{tenant}-L{i}", kind) for i, kind in enumerate(kinds)]


def license_of(tenant: str, license_id: str, kind: Kind) -> License:
    return License(
        id=license_id,
        tenant=tenant,
        kind=kind,
        capacity=25 if kind is Kind.BASIC_25 else 1,
        term_months=12,
        issued_at=ISSUED,
        imported_at=ISSUED,
        activation_at=T0 - timedelta(days=30),
    )


class Mirror:
    """The harness's own record of every router's session and seat.

    Picking routers by reading the core's places would pull them into the
    CPU cache just before the timed call, and at a million routers hide
    most of what a cold lookup costs; so choices are made from this copy.
    """

    def __init__(self, seats_per_tenant: int) -> None:
        self.seats = seats_per_tenant
        self.sessions: dict[Key, str] = {}
        self.seated: list[Key] = []
        self._slot: dict[Key, int] = {}
        self._waiting: defaultdict[str, deque[Key]] = defaultdict(deque)
        self._count: Counter[str] = Counter()

    def is_seated(self, key: Key) -> bool:
        return key in self._slot

    def join(self, key: Key, session: str) -> None:
        self.sessions[key] = session
        if self._count[key[0]] < self.seats:
            self._seat(key)
        else:
            self._waiting[key[0]].append(key)

    def leave_seated(self, key: Key) -> None:
        """``key`` leaves its seat; the first waiting router of its tenant moves in."""
        slot = self._slot.pop(key)
        last = self.seated.pop()
        if slot < len(self.seated):
            self.seated[slot] = last
            self._slot[last] = slot
        self._count[key[0]] -= 1
        waiting = self._waiting[key[0]]
        if waiting:
            self._seat(waiting.popleft())

    def _seat(self, key: Key) -> None:
        self._slot[key] = len(self.seated)
        self.seated.append(key)
        self._count[key[0]] += 1


@dataclass
class Fleet:
    """An Admission, its routers in arrival order, and the harness's copy."""

    admission: Admission
    clock: Clock
    tenants: list[str]
    members: list[Key]
    mirror: Mirror
    rng: random.Random
    fresh: count[int]
    build: dict[str, Any]

    def session(self) -> str:
        """A new session name, as long as a router's ``token_hex(6)``."""
        return f"{next(self.fresh):012x}"

    def distinct(self, n: int, population: list[Key]) -> list[Key]:
        return self.rng.sample(population, n)

    def check(self, samples: int = 500) -> None:
        """Fail if the core and the harness's copy disagree on any sample."""
        for key in self.rng.sample(self.members, min(samples, len(self.members))):
            place = self.admission.lines[key[0]].places[key[1]]
            seated = self.mirror.is_seated(key)
            if place.session != self.mirror.sessions[key] or place.seated != seated:
                raise RuntimeError(f"core and harness disagree about {key}")


def arrivals(tenants: list[str], per_tenant: int) -> Iterator[Key]:
    """Every router in arrival order, interleaved across tenants as in a
    reconnect storm; router names are made here, as fresh as off the wire."""
    for k in range(per_tenant):
        for tenant in tenants:
            yield tenant, f"icom-{k:07d}"


def stored_places(tenants: list[str], per_tenant: int, seats: int) -> Iterator[Place]:
    for i, (tenant, router) in enumerate(arrivals(tenants, per_tenant)):
        seated = i // len(tenants) < seats
        yield Place(tenant, router, f"{i:012x}", 1, i + 1, seated, T0)


def build_fleet(tenants: list[str], per_tenant: int, traced: bool = False) -> Fleet:
    """Fill every tenant's line, seats for half of it, and copy it for the harness.

    The lines are filled through :meth:`Admission.restore`, the restart path:
    it leaves the same places, order, epochs and lease heap as a hello per
    router in arrival order, at a fraction of the cost (no verdicts or
    events), which keeps a traced million-router fill within minutes.
    """
    admission, clock = Admission(LEASE, GRACE), Clock()
    seats = per_tenant // 2
    gc.collect()
    gc.disable()
    try:
        if traced:
            tracemalloc.start()
        for tenant in tenants:
            admission.load_tenant(tenant, licenses_for(tenant, seats), {}, clock.read())
        build: dict[str, Any] = {"routers": len(tenants) * per_tenant}
        build["license_bytes"] = tracemalloc.get_traced_memory()[0] if traced else 0
        start = perf_counter()
        out = admission.restore(stored_places(tenants, per_tenant, seats), clock.read())
        build["restore_s"] = round(perf_counter() - start, 2)
        if traced:
            build["traced_bytes"] = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
    finally:
        gc.enable()
    if out.events:
        raise RuntimeError("restored seats disagree with the line's prefix")

    members = list(arrivals(tenants, per_tenant))
    mirror = Mirror(seats)
    for i, key in enumerate(members):
        mirror.join(key, f"{i:012x}")
    rng = random.Random(len(members))
    fresh = count(len(members))
    return Fleet(admission, clock, tenants, members, mirror, rng, fresh, build)


# -- the four kinds of decision ---------------------------------------------


@dataclass
class Batch:
    """One timed batch: ``step(*a)`` for each ``a``, then ``undo`` untimed."""

    step: Callable[..., object]
    args: Args
    undo: Callable[[], None] | None = None


def new_hellos(fleet: Fleet, n: int) -> Batch:
    """Routers never seen before: each joins at the end of its line."""
    read, tenants = fleet.clock.read, fleet.tenants
    args: Args = []
    for _ in range(n):
        router, session = f"new-{fleet.session()}", fleet.session()
        args.append((fleet.rng.choice(tenants), router, session, read()))

    def undo() -> None:
        for tenant, router, session, _ in args:
            out = fleet.admission.goodbye(tenant, router, session, False, read())
            if out.stale:
                raise RuntimeError(f"new router {router} was not in line")

    return Batch(fleet.admission.hello, args, undo)


def resumes(fleet: Fleet, n: int) -> Batch:
    """Routers from the middle of the line come back with a new session."""
    middle = fleet.members[len(fleet.members) // 4 : 3 * len(fleet.members) // 4]
    args: Args = []
    for key in fleet.distinct(n, middle):
        session = fleet.session()
        fleet.mirror.sessions[key] = session
        args.append((key[0], key[1], session, fleet.clock.read()))
    return Batch(fleet.admission.hello, args)


def heartbeats(fleet: Fleet, n: int) -> Batch:
    """Routers anywhere in the line renew their lease."""
    sessions, read = fleet.mirror.sessions, fleet.clock.read
    args: Args = [
        (key[0], key[1], sessions[key], read())
        for key in fleet.distinct(n, fleet.members)
    ]
    return Batch(fleet.admission.heartbeat, args)


def goodbyes(fleet: Fleet, n: int) -> Batch:
    """Seated routers leave; each promotes the first waiting router.

    Undone by a hello with a new session, which puts the router back at
    the end of its line, waiting, so the line keeps its length.
    """
    mirror, read = fleet.mirror, fleet.clock.read
    keys = fleet.distinct(n, mirror.seated)
    args: Args = [(k[0], k[1], mirror.sessions[k], False, read()) for k in keys]
    for key in keys:
        mirror.leave_seated(key)

    def undo() -> None:
        for key in keys:
            session = fleet.session()
            out = fleet.admission.hello(key[0], key[1], session, read())
            if out.verdict is None or out.verdict.accepted:
                raise RuntimeError(f"{key} should wait after its goodbye")
            mirror.join(key, session)

    return Batch(fleet.admission.goodbye, args, undo)


PREPARE: dict[str, Callable[[Fleet, int], Batch]] = {
    "hello": new_hellos,
    "resume": resumes,
    "goodbye": goodbyes,
    "heartbeat": heartbeats,
}


@dataclass(frozen=True)
class Timing:
    """Nanoseconds per operation, from batches timed by the wall clock
    (``perf_counter_ns``) and by this thread's CPU time: on a shared machine
    a batch's wall time also holds the slices other processes ran in."""

    mean_ns: float
    p50_ns: float
    p99_ns: float
    cpu_mean_ns: float
    ops: int

    @classmethod
    def of(cls, wall: list[float], cpu: list[float], ops: int) -> Timing:
        cuts = statistics.quantiles(wall, n=100)
        return cls(
            statistics.fmean(wall), cuts[49], cuts[98], statistics.fmean(cpu), ops
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "mean_ns": round(self.mean_ns, 1),
            "p50_ns": round(self.p50_ns, 1),
            "p99_ns": round(self.p99_ns, 1),
            "cpu_mean_ns": round(self.cpu_mean_ns, 1),
            "ops": self.ops,
        }


def timed_batches(batches: Callable[[], Batch], rounds: int) -> Timing:
    """Time ``rounds`` batches; only the loop over a batch's calls is timed."""
    wall: list[float] = []
    cpu: list[float] = []
    ops = 0
    gc.disable()
    try:
        for _ in range(rounds):
            batch = batches()
            step, args = batch.step, batch.args
            # The CPU clock brackets the wall clock, so that its own (slower)
            # reading is outside the wall figure the targets are read from.
            cpu_start = thread_time_ns()
            start = perf_counter_ns()
            for a in args:
                step(*a)
            wall.append((perf_counter_ns() - start) / len(args))
            cpu.append((thread_time_ns() - cpu_start) / len(args))
            ops += len(args)
            if batch.undo is not None:
                batch.undo()
    finally:
        gc.enable()
    return Timing.of(wall, cpu, ops)


def decision_costs(fleet: Fleet, ops: int) -> dict[str, Timing]:
    costs: dict[str, Timing] = {}
    for kind in KINDS:
        prepare = PREPARE[kind]
        costs[kind] = timed_batches(partial(prepare, fleet, BATCH), ops // BATCH)
        fleet.check()
    return costs


def harness_cost(ops: int) -> Timing:
    """The timed loop around a call that does nothing: not subtracted."""

    def nothing(*_: object) -> None:
        return None

    args: Args = [("T", "r", "s", T0)] * BATCH
    return timed_batches(lambda: Batch(nothing, args), ops // BATCH)


# -- time-driven work ---------------------------------------------------------


def capacity_change(fleet: Fleet, budget_s: float = 0.5) -> dict[str, object]:
    """One more Basic 1 license admits one waiting router; taking it back
    sends that router back to wait. Each direction is timed on its own."""
    admission, read = fleet.admission, fleet.clock.read
    tenant = fleet.tenants[0]
    base = admission.licenses[tenant]
    more = [*base, license_of(tenant, f"{tenant}-extra", Kind.BASIC_1)]
    grow: list[float] = []
    shrink: list[float] = []
    spent = 0.0
    while len(grow) < 5 or (spent < budget_s * 1e9 and len(grow) < 50):
        for licenses, record in ((more, grow), (base, shrink)):
            now = read()
            start = perf_counter_ns()
            out = admission.load_tenant(tenant, licenses, {}, now)
            record.append(perf_counter_ns() - start)
            expect_one_seat_change(out)
        spent += grow[-1] + shrink[-1]
    fleet.check()
    return {
        "licenses": len(base),
        "grow_mean_ms": round(statistics.fmean(grow) / 1e6, 3),
        "grow_max_ms": round(max(grow) / 1e6, 3),
        "shrink_mean_ms": round(statistics.fmean(shrink) / 1e6, 3),
        "ns_per_license": round(statistics.fmean(grow) / len(base), 1),
        "reps": len(grow),
    }


def expect_one_seat_change(out: Outcome) -> None:
    changed = [e for e in out.events if isinstance(e, SeatChanged)]
    if len(changed) != 1:
        raise RuntimeError(f"a capacity change of one seat moved {len(changed)}")


def idle_advance(fleet: Fleet, ops: int = 100_000) -> Timing:
    """``advance`` when the earliest lease and license instant lie ahead."""
    now = fleet.clock.read()
    deadline = fleet.admission.next_deadline()
    if deadline is None or deadline <= now or fleet.admission.advance(now).events:
        raise RuntimeError("advance has due work; the idle figure would be wrong")
    args: Args = [(now,)] * 1000
    step = fleet.admission.advance
    return timed_batches(lambda: Batch(step, args), ops // 1000)


# -- memory -------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_figures(fleet: Fleet) -> dict[str, Any]:
    """Bytes per router held by the core, from a traced build."""
    build, routers = fleet.build, fleet.build["routers"]
    held = build["traced_bytes"] - build["license_bytes"]
    return {
        "routers": routers,
        "traced_bytes_per_router": round(held / routers, 1),
        "license_bytes_per_router": round(build["license_bytes"] / routers, 1),
        "target_bytes_per_router": TARGET_BYTES,
        **resident(routers),
    }


def resident(routers: int) -> dict[str, Any]:
    """Resident growth and full-collection pauses, measured in a new process.

    A process that has already freed other fleets hands their memory back
    to the next one, and its resident size then hides part of the growth.
    """
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "bench.core", "--resident", str(routers)]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def measure_resident(routers: int) -> dict[str, object]:
    """Run inside the new process of :func:`resident`."""
    admission, clock = Admission(LEASE, GRACE), Clock()
    admission.load_tenant(TENANT, licenses_for(TENANT, routers // 2), {}, clock.read())
    gc.collect()
    gc.disable()
    before = rss_bytes()
    admission.restore(stored_places([TENANT], routers, routers // 2), clock.read())
    grown = rss_bytes() - before
    gc.enable()
    pauses = []
    for _ in range(2):
        start = perf_counter_ns()
        gc.collect()
        pauses.append(round((perf_counter_ns() - start) / 1e6, 1))
    return {
        "resident_bytes_per_router": round(grown / routers, 1),
        # The first collection also untracks the lease heap's tuples.
        "full_gc_pause_ms": pauses,
    }


def breakdown(routers: int = 20_000, top: int = 7) -> list[dict[str, object]]:
    """Where a router's bytes go, by the line of code that allocated them."""
    admission, clock = Admission(LEASE, GRACE), Clock()
    licenses = licenses_for(TENANT, routers // 2)
    admission.load_tenant(TENANT, licenses, {}, clock.read())
    tracemalloc.start()
    admission.restore(stored_places([TENANT], routers, routers // 2), clock.read())
    stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
    tracemalloc.stop()
    sites: list[dict[str, object]] = []
    for stat in stats:
        frame = stat.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip()
        sites.append(
            {
                "site": f"{Path(frame.filename).name}:{frame.lineno}",
                "code": code[:70],
                "bytes_per_router": round(stat.size / routers, 1),
            }
        )
    return sites


# -- machine, plot, run -------------------------------------------------------


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "sortedcontainers": version("sortedcontainers"),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Other work on a shared machine makes every figure noisier.
        "load_before": round(os.getloadavg()[0], 2),
    }


def plot(figures: dict[str, Any], path: Path) -> None:
    """Three panels: cost against routers, the same as a ratio, many tenants."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (only when plotting)
    from matplotlib.ticker import StrMethodFormatter  # noqa: PLC0415

    fig = Figure(figsize=(16, 5.2), layout="constrained")
    cost, ratio, tenants = fig.subplots(1, 3, width_ratios=(4, 3, 3))
    sizes = [int(n) for n in figures["one_tenant"]]
    labels = [f"{n // 1000:,}k" if n < 1_000_000 else f"{n // 10**6}M" for n in sizes]
    for kind in KINDS:
        rows = [figures["one_tenant"][str(n)]["decisions"][kind] for n in sizes]
        means = [r["mean_ns"] for r in rows]
        (line,) = cost.plot(sizes, means, "o-", label=f"{kind} (mean)")
        colour = line.get_color()
        cost.plot(sizes, [r["p99_ns"] for r in rows], ":", color=colour, alpha=0.7)
        ratio.plot(sizes, [m / means[0] for m in means], "o-", label=kind)
    cost.plot([], [], ":", color="grey", label="p99 of batches")
    for ax in (cost, ratio):
        ax.set_xscale("log")
        ax.set_xticks(sizes, labels)
        ax.minorticks_off()
        ax.set_xlabel("routers in one tenant's line (capacity: half)")
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    cost.set_ylim(bottom=0)
    cost.set_ylabel("ns per decision")
    cost.set_title("Decision cost, one tenant")
    cost.legend(fontsize="small")
    ratio.axhline(1.0, color="black", linewidth=0.8)
    ratio.set_ylim(0, max(2.5, ratio.get_ylim()[1]))
    ratio.yaxis.set_major_formatter(StrMethodFormatter("×{x:.1f}"))
    ratio.set_ylabel(f"mean cost / mean cost at {labels[0]} routers")
    ratio.set_title("Growth with fleet size (target: ×1)")
    ratio.legend(fontsize="small", loc="upper left")
    plot_tenants(tenants, figures, labels[0])
    info = figures["machine"]
    fig.suptitle(
        f"irm-gateway policy core alone, virtual clock — {info['cpu_model']}, "
        f"{info['cpu_count']} CPUs, Python {info['python']}, "
        f"{figures['method']['ops_per_kind']:,} decisions per point"
    )
    fig.savefig(path, dpi=100)


def plot_tenants(ax: Any, figures: dict[str, Any], smallest: str) -> None:
    """Bars: one tenant of the smallest fleet against many small tenants."""
    from matplotlib.ticker import StrMethodFormatter  # noqa: PLC0415

    many, x = figures["many_tenants"], range(len(KINDS))
    base = next(iter(figures["one_tenant"].values()))["decisions"]
    lots = [many["decisions"][k]["mean_ns"] for k in KINDS]
    ax.bar(
        [i - 0.2 for i in x],
        [base[k]["mean_ns"] for k in KINDS],
        0.4,
        label=f"1 tenant × {smallest} routers",
    )
    ax.bar(
        [i + 0.2 for i in x],
        lots,
        0.4,
        label=f"{many['tenants']:,} tenants × {many['routers_per_tenant']} routers",
    )
    for i, kind in enumerate(KINDS):
        got = many["ratio_vs_one_tenant"][kind]
        ax.annotate(f"×{got:.2f}", (i + 0.2, lots[i]), ha="center", va="bottom")
    ax.set_xticks(list(x), list(KINDS))
    ax.set_ylim(0, max(lots) * 1.3)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_ylabel("ns per decision (mean)")
    ax.set_title("Many small tenants")
    ax.legend(fontsize="small", loc="upper right")


def fleet_row(routers: int, ops: int, traced: bool) -> dict[str, Any]:
    """Every figure for one tenant of ``routers``; print its table row."""
    fleet = build_fleet([TENANT], routers, traced=traced)
    row: dict[str, Any] = {"restore_s": fleet.build["restore_s"], "traced": traced}
    if traced:
        row["memory"] = memory_figures(fleet)
    costs = decision_costs(fleet, ops)
    row["decisions"] = {k: t.as_dict() for k, t in costs.items()}
    row["capacity_change"] = cap = capacity_change(fleet)
    row["advance_idle"] = adv = idle_advance(fleet).as_dict()
    del fleet
    gc.collect()

    say(
        f"{routers:>11,}  mean " + "".join(f"{costs[k].mean_ns:>10,.0f}" for k in KINDS)
    )
    say(f"{'':13}p99  " + "".join(f"{costs[k].p99_ns:>10,.0f}" for k in KINDS))
    say(f"{'':13}cpu  " + "".join(f"{costs[k].cpu_mean_ns:>10,.0f}" for k in KINDS))
    say(
        f"{'':13}capacity +1 seat {cap['grow_mean_ms']:,.2f} ms "
        f"({cap['licenses']:,} licenses); idle advance {adv['mean_ns']:,.0f} ns; "
        f"fill {row['restore_s']} s{' (traced)' if traced else ''}"
    )
    return row


def ratios(top: dict[str, Any], bottom: dict[str, Any], of: str) -> dict[str, float]:
    return {k: round(top[k][of] / bottom[k][of], 2) for k in KINDS}


def many_tenant_figures(baseline: dict[str, Any], ops: int) -> dict[str, Any]:
    fleet = build_fleet([f"T{i:05d}" for i in range(TENANTS)], ROUTERS_PER_TENANT)
    costs = {k: t.as_dict() for k, t in decision_costs(fleet, ops).items()}
    return {
        "tenants": TENANTS,
        "routers_per_tenant": ROUTERS_PER_TENANT,
        "restore_s": fleet.build["restore_s"],
        "decisions": costs,
        "ratio_vs_one_tenant": ratios(costs, baseline, "mean_ns"),
        "ratio_vs_one_tenant_p50": ratios(costs, baseline, "p50_ns"),
        "ratio_vs_one_tenant_cpu": ratios(costs, baseline, "cpu_mean_ns"),
    }


def run(out_dir: Path, quick: bool = False) -> dict[str, object]:
    """Measure the core, write ``core.json`` and ``core.png``, return the figures."""
    fleets, ops = (QUICK_FLEETS, QUICK_OPS) if quick else (FLEETS, OPS)
    figures: dict[str, Any] = {"machine": machine()}
    figures["method"] = {
        "clock": "virtual, 1 us per reading",
        "fill": "Admission.restore of places in arrival order, capacity half",
        "ops_per_kind": ops,
        "batch": BATCH,
        "gc": "cyclic GC off inside timed batches, as in timeit",
        "harness_ns_per_op": round(harness_cost(ops).mean_ns, 1),
    }
    info = figures["machine"]
    say(
        f"irm-gateway policy core: {info['cpu_model']}, {info['cpu_count']} CPUs, "
        f"Python {info['python']}, load average {info['load_before']}"
    )
    say(
        f"harness loop alone {figures['method']['harness_ns_per_op']:,.0f} ns/op, "
        "included in every figure"
    )

    say(
        "\n1. decision cost in one tenant's line, ns per decision: wall mean, "
        f"p99 of {BATCH}-decision batches, CPU-time mean"
    )
    say(f"{'routers':>11}{'':6}" + "".join(f"{k:>10}" for k in KINDS))
    rows = {str(n): fleet_row(n, ops, n == fleets[-1]) for n in fleets}
    figures["one_tenant"] = rows
    top, bottom = rows[str(fleets[-1])]["decisions"], rows[str(fleets[0])]["decisions"]
    figures["ratio_largest_over_smallest"] = {
        "of": f"{fleets[-1]} / {fleets[0]} routers",
        "mean": ratios(top, bottom, "mean_ns"),
        "p50": ratios(top, bottom, "p50_ns"),
        "cpu_mean": ratios(top, bottom, "cpu_mean_ns"),
    }
    figures["many_tenants"] = many_tenant_figures(bottom, ops)
    figures["time_driven"] = {
        "capacity_change_at_100000": rows["100000"]["capacity_change"],
        "advance_idle_ns": {n: r["advance_idle"]["mean_ns"] for n, r in rows.items()},
    }
    figures["memory"] = rows[str(fleets[-1])]["memory"]
    figures["memory"]["where_20000_routers"] = breakdown()
    info["load_after"] = round(os.getloadavg()[0], 2)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "core.json").write_text(json.dumps(figures, indent=2) + "\n")
    plot(figures, out_dir / "core.png")
    summarize(figures)
    return figures


def summarize(figures: dict[str, Any]) -> None:
    ratio, many = figures["ratio_largest_over_smallest"], figures["many_tenants"]
    say(f"\n   ratio {ratio['of']}")
    say(f"{'':17}" + "".join(f"{k:>10}" for k in KINDS))
    for of in ("mean", "p50", "cpu_mean"):
        say(f"{of:>15}  " + "".join(f"{ratio[of][k]:>10.2f}" for k in KINDS))

    say(
        f"\n2. {many['tenants']:,} tenants × {many['routers_per_tenant']} routers, "
        "against one tenant of 1,000"
    )
    say(f"{'':17}" + "".join(f"{k:>10}" for k in KINDS))
    decided = many["decisions"]
    say(
        f"{'mean ns':>15}  "
        + "".join(f"{decided[k]['mean_ns']:>10,.0f}" for k in KINDS)
    )
    for label, key in (("mean", ""), ("p50", "_p50"), ("cpu_mean", "_cpu")):
        got = many[f"ratio_vs_one_tenant{key}"]
        say(f"{'ratio ' + label:>15}  " + "".join(f"{got[k]:>10.2f}" for k in KINDS))

    cap = figures["time_driven"]["capacity_change_at_100000"]
    idle = figures["time_driven"]["advance_idle_ns"]
    say(
        f"\n3. at 100,000 routers: capacity +1 seat {cap['grow_mean_ms']:.2f} ms "
        f"(max {cap['grow_max_ms']:.2f}), -1 seat {cap['shrink_mean_ms']:.2f} ms, "
        f"{cap['licenses']:,} licenses at {cap['ns_per_license']:,.0f} ns each"
    )
    say(
        "   idle advance: "
        + ", ".join(f"{int(n):,} routers {v:,.0f} ns" for n, v in idle.items())
    )

    mem = figures["memory"]
    say(
        f"\n4. memory at {mem['routers']:,} routers: "
        f"{mem['traced_bytes_per_router']:,.0f} B/router traced, "
        f"{mem['resident_bytes_per_router']:,.0f} B/router resident "
        f"(target < {mem['target_bytes_per_router']:,}); licenses "
        f"{mem['license_bytes_per_router']:,.0f} B/router more"
    )
    first, then = mem["full_gc_pause_ms"]
    say(f"   one full GC collection: {first:,.0f} ms, then {then:,.0f} ms")
    say("   where it goes (20,000 routers, bytes per router):")
    for site in mem["where_20000_routers"]:
        say(f"   {site['bytes_per_router']:>7,.1f}  {site['site']:<22} {site['code']}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the policy core.")
    parser.add_argument("--quick", action="store_true", help="stop at 100,000")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results"
    )
    parser.add_argument("--resident", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.resident:
        print(json.dumps(measure_resident(options.resident)))
    else:
        run(options.out, quick=options.quick)


if __name__ == "__main__":
    main()
