"""A load generator: thousands of routers, each its own MQTT connection.

The routers are spread over worker processes (one Python process moves a
few thousand MQTT messages a second at most, and is limited to about
20,000 open files here). Each worker runs its slice in one of these modes:

- ``once``: connect at a given rate, say hello, wait for the answer;
- ``closed``: every router says hello again with a new session as soon as
  it has its answer, for a while (throughput: round trips per second);
- ``rate``: hellos at a fixed offered rate, spread over the routers, each
  router with at most one hello in flight (latency at that rate);
- ``storm``: connect and hello once, then every connection drops at the
  same moment and comes back with a new session (a reconnect storm).

Heartbeats keep leases alive during long runs, and ``churn`` makes that
share of routers leave (goodbye) and come back once per ``period``.
The parent process merges the workers' results into one :class:`Summary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tools.router import Heard, SimRouter

Mode = Literal["once", "closed", "rate", "storm"]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What one run asks of the fleet (all workers together)."""

    host: str
    port: int
    tenants: tuple[str, ...]
    routers: int
    mode: Mode = "once"
    processes: int = 1
    connect_rate: float = 2000.0
    duration: float = 10.0
    rate: float = 1000.0
    churn: float = 0.0
    heartbeat: float = 20.0
    timeout: float = 30.0
    prefix: str = "irm/v1"
    name_prefix: str = "R"
    passwords: dict[str, str] | None = None
    """Broker password of each router's account ``{tenant}/{router}``."""

    def login(self, tenant: str, router: str) -> tuple[str | None, str | None]:
        """One router's broker username and password, if the fleet has any."""
        if self.passwords is None:
            return None, None
        account = f"{tenant}/{router}"
        return account, self.passwords[account]

    def names(self) -> list[tuple[str, str]]:
        """``(tenant, router)`` of every router, spread evenly over tenants."""
        width = max(2, len(str(self.routers)))
        tenants = self.tenants
        return [
            (tenants[i % len(tenants)], f"{self.name_prefix}{i + 1:0{width}d}")
            for i in range(self.routers)
        ]


@dataclass(slots=True)
class Summary:
    """What the fleet saw: counts, reasons and round-trip latencies."""

    sent: int = 0
    answered: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    online: dict[str, bool] = field(default_factory=dict)
    elapsed: float = 0.0
    storm_seconds: float | None = None
    storm_same_online: bool | None = None
    skipped: int = 0
    """Hellos of an offered rate not sent: every router still waited."""

    def merge(self, other: Summary) -> None:
        self.sent += other.sent
        self.skipped += other.skipped
        self.answered += other.answered
        self.decisions.update(other.decisions)
        self.latencies += other.latencies
        self.unanswered += other.unanswered
        self.online.update(other.online)
        self.elapsed = max(self.elapsed, other.elapsed)
        if other.storm_seconds is not None:
            self.storm_seconds = max(self.storm_seconds or 0.0, other.storm_seconds)
            same = other.storm_same_online
            self.storm_same_online = (self.storm_same_online is not False) and bool(
                same
            )

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def report(self) -> dict[str, Any]:
        """A flat dict for ``--json`` and for the benchmark files (ms)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 2)

        return {
            "sent": self.sent,
            "skipped": self.skipped,
            "answered": self.answered,
            "unanswered": len(self.unanswered),
            "decisions": dict(self.decisions),
            "online": sum(self.online.values()),
            "offline": sum(not v for v in self.online.values()),
            "elapsed_s": round(self.elapsed, 3),
            "round_trips_per_s": round(self.answered / self.elapsed, 1)
            if self.elapsed
            else None,
            "latency_ms": {
                "p50": ms(self.percentile(50)),
                "p95": ms(self.percentile(95)),
                "p99": ms(self.percentile(99)),
                "max": ms(max(self.latencies, default=None)),
            },
            "storm_s": None
            if self.storm_seconds is None
            else round(self.storm_seconds, 3),
            "storm_same_online": self.storm_same_online,
        }


class _Worker:
    """One process's share of the fleet."""

    def __init__(
        self,
        spec: LoadSpec,
        names: list[tuple[str, str]],
        progress: Callable[[int], None],
    ) -> None:
        self.spec = spec
        self.summary = Summary()
        self.progress = progress
        self.routers = [self._router(tenant, name) for tenant, name in names]
        self._pending: dict[str, float] = {}
        self._answered = asyncio.Event()
        self._first_answer: dict[str, asyncio.Future[None]] = {}
        self._stopping = asyncio.Event()
        """Set when the run ends: churn finishes its round and stops."""
        self._away: set[str] = set()
        """Routers (``tenant/router``) churn has taken off line, not yet back."""
        self._back = asyncio.Event()
        """Set whenever no router is away."""
        self._back.set()

    def _router(self, tenant: str, name: str) -> SimRouter:
        username, password = self.spec.login(tenant, name)
        return SimRouter(
            self.spec.host, self.spec.port, tenant, name, self.spec.prefix,
            on_heard=self._heard, username=username, password=password,
        )  # fmt: skip

    def _heard(self, heard: Heard) -> None:
        decision = heard.decision
        key = f"{decision.tenant}/{decision.router}"
        self.summary.online[key] = decision.decision == "accept"
        sent = self._pending.pop(key, None)
        if sent is None:
            return  # news about a seat, not an answer to a hello
        self._answered.set()
        self.summary.answered += 1
        self.summary.latencies.append(heard.at - sent)
        self.summary.decisions[f"{decision.decision}:{decision.reason.value}"] += 1
        self.progress(1)
        waiter = self._first_answer.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _hello(self, router: SimRouter) -> asyncio.Future[None]:
        key = f"{router.tenant}/{router.router}"
        waiter = asyncio.get_running_loop().create_future()
        self._first_answer[key] = waiter
        self._pending[key] = time.monotonic()
        self.summary.sent += 1
        router.hello()
        return waiter

    async def connect_all(self) -> None:
        gap = 1.0 / self.spec.connect_rate if self.spec.connect_rate > 0 else 0.0
        for router in self.routers:
            await router.connect(keepalive=60)
            if gap:
                await asyncio.sleep(gap)

    async def hello_all(self) -> None:
        waiters = [self._hello(r) for r in self.routers]
        await self._wait(waiters)

    async def _wait(self, waiters: list[asyncio.Future[None]]) -> None:
        _, pending = await asyncio.wait(waiters, timeout=self.spec.timeout)
        for waiter in pending:
            waiter.cancel()
        self.summary.unanswered += sorted(self._pending)
        self._pending.clear()

    async def closed_loop(self) -> None:
        end = time.monotonic() + self.spec.duration

        async def one(router: SimRouter) -> None:
            while time.monotonic() < end:
                if f"{router.tenant}/{router.router}" in self._away:
                    await self._back.wait()
                    continue
                router.new_session()
                waiter = self._hello(router)
                try:
                    await asyncio.wait_for(waiter, self.spec.timeout)
                except TimeoutError:
                    return

        await asyncio.gather(*(one(r) for r in self.routers))

    async def open_loop(self) -> None:
        """Hellos at a fixed rate; a router still waiting is skipped."""
        gap = 1.0 / self.spec.rate
        start = time.monotonic()
        end = start + self.spec.duration
        count = 0
        index = 0
        while (now := time.monotonic()) < end:
            due = int((now - start) / gap)
            looked = 0
            while count < due:
                if looked == len(self.routers):
                    # Every router still waits for its answer: the offered
                    # rate is beyond what comes back; skip, and say so.
                    self.summary.skipped += due - count
                    count = due
                    break
                router = self.routers[index % len(self.routers)]
                index += 1
                looked += 1
                key = f"{router.tenant}/{router.router}"
                if key in self._pending or key in self._away:
                    continue
                router.new_session()
                self._hello(router)
                count += 1
            await asyncio.sleep(gap)
        await self._drain()

    async def _drain(self) -> None:
        """Wait (bounded) for the answers still owed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.spec.timeout):
                while self._pending:
                    self._answered.clear()
                    await self._answered.wait()
        self.summary.unanswered += sorted(self._pending)
        self._pending.clear()

    async def storm(self) -> None:
        """Everyone drops at once and comes back with a new session."""
        before = dict(self.summary.online)
        for router in self.routers:
            await router.drop()
        start = time.monotonic()
        waiters: list[asyncio.Future[None]] = []

        async def back(router: SimRouter) -> None:
            # As a router does: hello as soon as its connection is up.
            router.new_session()
            await router.connect(keepalive=60)
            waiters.append(self._hello(router))

        await asyncio.gather(*(back(r) for r in self.routers))
        await self._wait(waiters)
        self.summary.storm_seconds = time.monotonic() - start
        self.summary.storm_same_online = before == self.summary.online

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.spec.heartbeat)
            for router in self.routers:
                with contextlib.suppress(Exception):
                    router.heartbeat()

    async def churn(self) -> None:
        """A share of routers leave and come back once per ``duration / 3``."""
        count = int(len(self.routers) * self.spec.churn)
        if not count:
            return
        period = max(1.0, self.spec.duration / 3)
        turn = 0
        while True:
            # A round is never cut short: a router cancelled while it
            # disconnects would leave its connection half closed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), period)
            if self._stopping.is_set():
                return
            leaving = [
                self.routers[(turn + i) % len(self.routers)] for i in range(count)
            ]
            turn += count
            self._away.update(f"{r.tenant}/{r.router}" for r in leaving)
            self._back.clear()
            for router in leaving:
                key = f"{router.tenant}/{router.router}"
                # As a router does, it leaves once its hello is answered.
                waiter = self._first_answer.get(key)
                if waiter is not None and key in self._pending:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            asyncio.shield(waiter), self.spec.timeout
                        )
                router.goodbye()
                self.summary.online[key] = False
                await router.disconnect()
                router.new_session()
            for router in leaving:
                await router.connect(keepalive=60)
                self._away.discard(f"{router.tenant}/{router.router}")
                if self.spec.mode != "closed":  # the closed loop says it itself
                    self._hello(router)
            self._back.set()

    async def run(self) -> Summary:
        start = time.monotonic()
        await self.connect_all()
        beats = asyncio.create_task(self.heartbeats())
        churn = asyncio.create_task(self.churn())
        try:
            if self.spec.mode == "closed":
                await self.closed_loop()
            elif self.spec.mode == "rate":
                await self.open_loop()
            else:
                await self.hello_all()
                if self.spec.mode == "storm":
                    await self.storm()
        finally:
            beats.cancel()
            self._stopping.set()
            await churn
        await self._drain()  # the hellos of churn's last round
        self.summary.elapsed = time.monotonic() - start
        for router in self.routers:
            await router.disconnect()
        return self.summary


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _work(
    spec: LoadSpec,
    names: list[tuple[str, str]],
    results: Any,
    ticks: Any,
) -> None:
    """A worker process: run its slice, send the summary back."""
    _raise_open_files()
    batch = 0

    def progress(n: int) -> None:
        nonlocal batch
        batch += n
        if batch >= 50:
            ticks.put(batch)
            batch = 0

    summary = asyncio.run(_Worker(spec, names, progress).run())
    ticks.put(batch)
    results.put(summary)


def run_load(spec: LoadSpec, progress: Callable[[int], None] | None = None) -> Summary:
    """Run the fleet over ``spec.processes`` worker processes; merge results."""
    names = spec.names()
    if spec.processes <= 1:
        _raise_open_files()
        return asyncio.run(_Worker(spec, names, progress or (lambda n: None)).run())
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ticks = context.Queue()
    slices = [names[i :: spec.processes] for i in range(spec.processes)]
    per_process = _per_process(spec)
    workers = [
        context.Process(
            target=_work, args=(per_process, part, results, ticks), daemon=True
        )
        for part in slices
        if part
    ]
    for worker in workers:
        worker.start()
    merged = Summary()
    finished = 0
    while finished < len(workers):
        while not ticks.empty():
            if progress is not None:
                progress(ticks.get())
            else:
                ticks.get()
        try:
            merged.merge(results.get(timeout=0.1))
            finished += 1
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and results.empty():
                break
    for worker in workers:
        worker.join(timeout=10)
    while not ticks.empty():
        tick = ticks.get()
        if progress is not None:
            progress(tick)
    return merged


def _per_process(spec: LoadSpec) -> LoadSpec:
    """The spec each worker runs: rates split evenly between them."""
    share = max(1, spec.processes)
    return LoadSpec(
        spec.host, spec.port, spec.tenants, spec.routers, spec.mode, 1,
        spec.connect_rate / share, spec.duration, spec.rate / share, spec.churn,
        spec.heartbeat, spec.timeout, spec.prefix, spec.name_prefix,
        spec.passwords,
    )  # fmt: skip
