"""The gateway: hellos in, durable decisions, replies and presence out.

How it works. The MQTT handler validates each message and queues it with
a future, without awaiting anything first, so the queue keeps the order
in which the broker delivered the hellos. One task, the decider, owns all
state: it takes a batch from the queue, decides every message of it
through the policy core at one ``now``, writes the batch's events in one
transaction, then publishes the replies and presence and resolves the
futures. Only then do the handlers return, and only then does the MQTT
client send their PUBACKs: a hello the gateway acknowledged has a durable
decision, and one it did not is delivered again by the broker.

The decider also wakes at the core's next deadline (a lease running out,
a license instant) and every ``poll_seconds`` to see whether the admin
tool changed a tenant's licenses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from pydantic import BaseModel, ValidationError

from gateway import protocol
from gateway.config import Settings
from gateway.flood import Limiter
from gateway.flood import Verdict as Flood
from gateway.metrics import Metrics
from gateway.mqtt import Inbound, Mqtt, Redeliver, failure
from gateway.protocol import Goodbye, Heartbeat, Hello
from policy.admission import (
    Admission,
    Cause,
    Event,
    Joined,
    Left,
    Reason,
    SeatChanged,
    Verdict,
)
from policy.licenses import License, State
from policy.store import Store
from policy.timeutil import to_text

log = structlog.get_logger("gateway")

Clock = Callable[[], datetime]

MAX_REF = 128
"""A hello's ``ref`` is at most this long (gateway/protocol.py)."""

SHUTDOWN_GRACE = 5.0
"""Seconds a stopping gateway waits for an absent broker before it leaves."""

WATCH_BACKOFF_MAX = 30.0
"""Longest wait, in seconds, between tries to read the tool's changes while
the store fails to answer."""

TAKEOVER_COUNT = 3
TAKEOVER_WINDOW = timedelta(seconds=30)
"""Three new sessions of one router within 30 s suggest two devices, one id."""


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Item:
    """One validated message waiting for the decider."""

    kind: str
    tenant: str
    router: str
    message: Hello | Heartbeat | Goodbye
    inbound: Inbound
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Reload:
    """A tenant's licenses as the tool left them, read by the watcher."""

    tenant: str
    licenses: list[License]
    states: dict[str, State]


class _Republish:
    """After a (re)connect: make every router's retained presence current."""


Work = _Item | _Reload | _Republish


@dataclass(slots=True)
class _Batch:
    events: list[Event] = field(default_factory=list)
    replies: list[tuple[str, bytes, bytes | None]] = field(default_factory=list)


class Gateway:
    """The service; :meth:`run` until ``stop`` is set."""

    def __init__(
        self, settings: Settings, store: Store, clock: Clock = system_clock
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.admission = Admission(
            timedelta(seconds=settings.lease_seconds),
            timedelta(seconds=settings.grace_seconds),
        )
        self.bad_input: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()
        self.suspected_duplicates: Counter[str] = Counter()
        self._resumes: dict[tuple[str, str], deque[datetime]] = {}
        self._limiter = Limiter(settings.hello_rate, settings.hello_burst)
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        self._mqtt: Mqtt | None = None
        self._logged: set[tuple[str, str]] = set()
        self._change_seq = 0
        self._version = -1
        self._startup: list[Event] = []
        self.ready = asyncio.Event()
        """Set once subscribed and announced; the retained status says so too."""
        self.is_leader = asyncio.Event()
        """Set while this gateway may do once-per-deployment work (a gateway
        alone always may; in a cluster, the leader: gateway/cluster.py)."""
        self.is_leader.set()
        self.metrics = Metrics(self)

    @property
    def broker_connected(self) -> bool:
        return self._mqtt is not None and self._mqtt.connected

    @property
    def broker_connects(self) -> int:
        return 0 if self._mqtt is None else self._mqtt.connects

    # -- life cycle ------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Load the store, connect, decide until ``stop``, then drain and leave."""
        await self._load()
        prefix, gid = self.settings.prefix, self.settings.gateway_id
        status = protocol.status_topic(prefix, gid)
        offline = protocol.GatewayStatus(gateway=gid, state="offline")
        credentials = None
        if self.settings.broker_username is not None:
            credentials = (
                self.settings.broker_username,
                self.settings.broker_password or "",
            )
        self._mqtt = Mqtt(
            self.settings.client_id,
            self.settings.broker_host,
            self.settings.broker_port,
            self._on_message,
            self._on_connected,
            will=(status, offline.model_dump_json().encode()),
            credentials=credentials,
            receive_maximum=self.settings.receive_maximum,
            window=self.settings.publish_window,
        )
        giving_up = asyncio.create_task(self._give_up_on(stop))
        async with self._mqtt:
            watcher = asyncio.create_task(self._watch_store(stop), name="watch-store")
            try:
                await self._decide_until(stop)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                # Said on every way out, a failed store's included: a clean
                # disconnect fires no last will, and consumers (and a
                # cluster's leader) must not keep seeing this gateway online.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._publish(status, offline, retain=True), SHUTDOWN_GRACE
                    )
        giving_up.cancel()
        log.info("gateway stopped", decisions=dict(self.decisions))

    async def _give_up_on(self, stop: asyncio.Event) -> None:
        """On stop, allow the broker a few seconds to take our last words."""
        await stop.wait()
        await asyncio.sleep(SHUTDOWN_GRACE)
        assert self._mqtt is not None
        self._mqtt.give_up()

    async def _load(self) -> None:
        now = self.clock()
        events: list[Event] = []
        for tenant in await self.store.tenants():
            licenses = await self.store.licenses(tenant.id)
            states = await self.store.license_states(tenant.id)
            events += self.admission.load_tenant(
                tenant.id, licenses, states, now
            ).events
        for (tenant_id, router), epoch in (await self.store.epochs()).items():
            self.admission.note_epoch(tenant_id, router, epoch)
        events += self.admission.restore(await self.store.places(), now).events
        await self.store.apply(events, now)
        self._startup = events
        # A full collection over a million places paused for 0.3 to 0.7 s
        # (bench/core.py). The loaded lines live as long as the process:
        # freeze them out of the collector's view, and collect young
        # objects less often under a stream of hellos.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        self._version = await self.store.poll_version()
        self._change_seq, _ = await self.store.changes_after(0)
        log.info(
            "state loaded",
            tenants=len(self.admission.lines),
            in_line=sum(len(line) for line in self.admission.lines.values()),
            reconciled=sum(isinstance(e, SeatChanged) for e in events),
        )

    async def _on_connected(self) -> None:
        """Subscribe, announce ourselves, and make presence current.

        The broker handles one client's packets in order, so once a consumer
        sees the retained ``online`` status, the subscriptions are in place.
        """
        assert self._mqtt is not None
        prefix = self.settings.prefix
        self._mqtt.subscribe(*self._topics())
        since = to_text(self.clock())
        status = protocol.GatewayStatus(
            gateway=self.settings.gateway_id, state="online", since=since
        )
        await self._publish(
            protocol.status_topic(prefix, self.settings.gateway_id), status, retain=True
        )
        # The decider republishes presence, so that all presence leaves from
        # one task, in order.
        self._queue.put_nowait(_Republish())
        self.ready.set()

    def _topics(self) -> list[str]:
        """What the gateway subscribes to: every router's inbound messages."""
        prefix = self.settings.prefix
        return [f"{prefix}/+/+/{kind}" for kind in protocol.INBOUND]

    async def _republish_presence(self) -> None:
        """Publish every known router's presence from the stored state.

        Done after every (re)connect: a broker that restarted may have lost
        retained messages, or kept older ones from its last snapshot.
        """
        now = self.clock()
        for tenant in list(self.admission.lines):
            for row in await self.store.routers(tenant):
                state = row.state
                await self._publish_presence(
                    tenant, row.router, state, row.epoch, "restart", now
                )
        for event in self._startup:
            if isinstance(event, SeatChanged):
                await self._notify(event.verdict, event.cause, now)
        self._startup = []

    # -- receiving ---------------------------------------------------------

    async def _on_message(self, inbound: Inbound) -> None:
        """Validate and queue; returns once the decision is durable.

        Returning acknowledges the message, so a message that could not be
        handled is acknowledged too (:meth:`_handling_failed`): left unacknowledged,
        the broker would deliver it again, to this session and every later
        one. Only a decision that could not be stored leaves it so.
        """
        try:
            item = self._parse(inbound)
        except Exception as exc:
            self._handling_failed(inbound, exc)
            return
        if item is None:
            return
        self._queue.put_nowait(item)
        try:
            await item.done
        except Exception as exc:
            raise Redeliver("the decision could not be stored") from exc

    def _handling_failed(
        self, inbound: Inbound, exc: Exception, batch: _Batch | None = None
    ) -> None:
        """A message whose handling raised: logged as an error (its topic,
        never its payload), counted as bad input, and a hello refused.

        Given the ``batch`` it was being decided in, the refusal goes out
        with the batch's replies, after its commit; else at once (nothing
        of it was stored)."""
        self.bad_input["unhandled"] += 1
        log.error("message handling failed", topic=inbound.topic, **failure(exc))
        try:
            parts = protocol.split_topic(self.settings.prefix, inbound.topic)
        except Exception:  # an unreadable topic: nobody to tell
            return
        if parts is None or parts[2] != "hello":
            return
        tenant, router, _ = parts
        reason = Reason.MALFORMED_HELLO
        detail = "the gateway could not handle this hello: do not send it again"
        try:
            if batch is None:
                self._refuse(tenant, router, reason, inbound, detail)
                return
            now = self.clock()
            reply = protocol.refusal(
                tenant, router, reason, now, _ref_of(inbound.payload), detail
            )
            self.metrics.decided("reject", reason.value, Cause.HELLO.value)
            topic = self._reply_topic(tenant, router, inbound)
            payload = reply.model_dump_json().encode()
            batch.replies.append((topic, payload, inbound.correlation))
        except Exception as again:
            log.error(  # noqa: TRY400 - no trace: it could quote the payload
                "refusal failed", topic=inbound.topic, **failure(again)
            )

    def _parse(self, inbound: Inbound) -> _Item | None:
        parts = protocol.split_topic(self.settings.prefix, inbound.topic)
        if parts is None:
            self._bad("topic", "-", inbound.topic)
            return None
        tenant, router, kind = parts
        self.metrics.received(kind)
        log.debug("received", tenant=tenant, router=router, kind=kind)
        if not self._within_budget(tenant, router, kind, inbound):
            return None
        problem, message = self._validate(kind, inbound.payload)
        if message is None:
            label = "oversized" if problem.startswith("payload of") else "malformed"
            self._bad(label, tenant, router, problem)
            if kind == "hello":
                self._refuse(tenant, router, Reason.MALFORMED_HELLO, inbound, problem)
            return None
        if message.tenant not in (None, tenant) or message.router not in (None, router):
            detail = "tenant or router in the payload differs from the topic"
            self._bad("topic_mismatch", tenant, router, detail)
            if kind == "hello":
                self._refuse(tenant, router, Reason.TOPIC_MISMATCH, inbound, detail)
            return None
        done = asyncio.get_running_loop().create_future()
        return _Item(kind, tenant, router, message, inbound, done)

    def _within_budget(
        self, tenant: str, router: str, kind: str, inbound: Inbound
    ) -> bool:
        """Whether this message may go on; a flood of hellos is refused once,
        then dropped, and one of heartbeats or goodbyes dropped."""
        now = asyncio.get_running_loop().time()
        verdict = self._limiter.take((tenant, router, kind), now)
        if verdict is Flood.PASS:
            return True
        then = "say hello once" if kind == "hello" else f"send one {kind}"
        detail = (
            f"over {self.settings.hello_burst} {kind}s at once or "
            f"{self.settings.hello_rate:g} a second: wait, then {then}"
        )
        self._bad("rate_limited", tenant, router, detail)
        if verdict is Flood.TELL and kind == "hello":
            self._refuse(tenant, router, Reason.RATE_LIMITED, inbound, detail)
        return False

    @staticmethod
    def _validate(
        kind: str, payload: bytes
    ) -> tuple[str, Hello | Heartbeat | Goodbye | None]:
        if len(payload) > protocol.MAX_PAYLOAD:
            return f"payload of {len(payload)} bytes over {protocol.MAX_PAYLOAD}", None
        model = protocol.INBOUND_MODELS[kind]
        try:
            message = model.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            return f"{where}: {first['msg']}", None
        assert isinstance(message, Hello | Heartbeat | Goodbye)
        return "", message

    def _bad(self, kind: str, tenant: str, router: str, detail: str = "") -> None:
        """Count bad input by kind, and log each kind once per sender."""
        self.bad_input[kind] += 1
        key = (kind, f"{tenant}/{router}")
        if key not in self._logged:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged.add(key)
            log.warning(
                "bad input", kind=kind, detail=detail, tenant=tenant, router=router
            )

    def _refuse(
        self, tenant: str, router: str, reason: Reason, inbound: Inbound, detail: str
    ) -> None:
        """Reject a hello that never reaches the decider (nothing to store)."""
        now = self.clock()
        ref = _ref_of(inbound.payload)
        reply = protocol.refusal(tenant, router, reason, now, ref, detail or None)
        self.metrics.decided("reject", reason.value, Cause.HELLO.value)
        topic = self._reply_topic(tenant, router, inbound)
        task = asyncio.ensure_future(
            self._send(topic, reply.model_dump_json().encode(), inbound.correlation)
        )
        task.add_done_callback(lambda t: t.exception())

    # -- deciding ----------------------------------------------------------------

    async def _decide_until(self, stop: asyncio.Event) -> None:
        stopping: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
        try:
            while not (stop.is_set() and self._queue.empty()):
                batch = await self._next_batch(stopping)
                await self._decide(batch)
        finally:
            stopping.cancel()

    async def _next_batch(self, stopping: asyncio.Future[bool]) -> list[Work]:
        """Wait for work (or a deadline), then take what is queued, in order."""
        batch: list[Work] = []
        if self._queue.empty() and not stopping.done():
            getter = asyncio.ensure_future(self._queue.get())
            waiting: set[asyncio.Future[object]] = {getter, stopping}  # type: ignore[arg-type]
            await asyncio.wait(
                waiting,
                timeout=self._idle_timeout(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if getter.done():
                batch.append(getter.result())
            else:
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
        while not self._queue.empty() and len(batch) < self.settings.batch_max:
            batch.append(self._queue.get_nowait())
        return batch

    def _idle_timeout(self) -> float | None:
        deadline = self.admission.next_deadline()
        timeout = (
            None if deadline is None else (deadline - self.clock()).total_seconds()
        )
        return None if timeout is None else max(0.0, timeout)

    async def _decide(self, work: list[Work]) -> None:
        if any(isinstance(entry, _Republish) for entry in work):
            await self._republish_presence()
        now = self.clock()
        batch = _Batch()
        # The tool's changes first: a scheduled activation cancelled just
        # before its instant must never fire from the stale licenses.
        for entry in work:
            if isinstance(entry, _Reload):
                outcome = self.admission.load_tenant(
                    entry.tenant, entry.licenses, entry.states, now
                )
                batch.events += outcome.events
                log.info("licenses reloaded", tenant=entry.tenant)
        batch.events += self.admission.advance(now).events
        items = []
        for entry in work:
            if isinstance(entry, _Item):
                self._decide_one(entry, now, batch)
                items.append(entry)
        started = time.perf_counter()
        try:
            await self.store.apply(batch.events, now)
        except Exception as exc:
            for item in items:
                item.done.set_exception(exc)
            raise
        self.metrics.stored(time.perf_counter() - started)
        for topic, payload, correlation in batch.replies:
            await self._send(topic, payload, correlation)
        await self._publish_events(batch.events, now)
        for item in items:
            item.done.set_result(None)

    def _decide_one(self, item: _Item, now: datetime, batch: _Batch) -> None:
        """Decide one message into ``batch``, whatever it raises: a message
        whose decision failed is refused like one that could not be read
        (:meth:`_handling_failed`), and the rest of the batch goes on."""
        answered = len(batch.replies)
        try:
            self._decide_message(item, now, batch)
        except Exception as exc:
            if len(batch.replies) > answered:
                # Its answer is queued already: only bookkeeping failed.
                self.bad_input["unhandled"] += 1
                log.error(  # noqa: TRY400 - no trace: it could quote the payload
                    "message handling failed", topic=item.inbound.topic,
                    **failure(exc),
                )  # fmt: skip
            else:
                self._handling_failed(item.inbound, exc, batch)

    def _decide_message(self, item: _Item, now: datetime, batch: _Batch) -> None:
        """The core's events join ``batch`` as soon as they are made, so that
        what it decided is stored even if something after it fails."""
        tenant, router, message = item.tenant, item.router, item.message
        if tenant not in self.admission.lines:
            if item.kind == "hello":
                self._bad("unknown_tenant", tenant, router, "no such tenant")
                self.metrics.decided("reject", Reason.UNKNOWN_TENANT.value, "hello")
                reply = protocol.refusal(
                    tenant, router, Reason.UNKNOWN_TENANT, now, _ref(message)
                )
                self._reply(batch, item, reply)
            return
        if isinstance(message, Hello):
            outcome = self.admission.hello(tenant, router, message.session, now)
            batch.events += outcome.events
            assert outcome.verdict is not None
            # The answer is what the core decided, queued before anything
            # else can fail; it leaves after the batch's commit.
            reply = self._decision(outcome.verdict, Cause.HELLO, now, message.ref)
            self._reply(batch, item, reply)
            if outcome.events and isinstance(outcome.events[0], Joined):
                self._watch_takeovers(outcome.events[0], now)
            self._log_decision(outcome.verdict, now, received=item.inbound.received)
        elif isinstance(message, Heartbeat):
            outcome = self.admission.heartbeat(tenant, router, message.session, now)
            batch.events += outcome.events
            if outcome.stale:
                self._bad("stale_heartbeat", tenant, router)
                reply = protocol.refusal(
                    tenant, router, Reason.SESSION_UNKNOWN, now, None,
                    "no current session by that name: say hello again",
                    cause=Cause.LEASE,
                )  # fmt: skip
                self._reply(batch, item, reply)
        else:
            outcome = self.admission.goodbye(
                tenant, router, message.session, message.will, now
            )
            batch.events += outcome.events
            if outcome.stale:
                self._bad("stale_goodbye", tenant, router)

    def _watch_takeovers(self, joined: Joined, now: datetime) -> None:
        """Flag a router whose session keeps being replaced.

        Two devices sharing one client id take the broker session from each
        other in a loop; each hello names a new session. The seat stays one
        (the router keeps its place), but the operator should hear of it.
        """
        if not joined.resumed:
            return
        key = (joined.place.tenant, joined.place.router)
        recent = self._resumes.setdefault(key, deque(maxlen=TAKEOVER_COUNT))
        recent.append(now)
        if len(recent) == TAKEOVER_COUNT and now - recent[0] <= TAKEOVER_WINDOW:
            self.suspected_duplicates[f"{key[0]}/{key[1]}"] += 1
            self._bad("duplicate_client", *key, "session replaced repeatedly")
            recent.clear()
        if len(self._resumes) > 100_000:
            self._resumes.clear()

    async def _watch_store(self, stop: asyncio.Event) -> None:
        """Queue a reload for each tenant the tool changed, within a second.

        The reading happens here, not in the decider, so that hellos are not
        held up while a tenant's thousands of licenses are read.
        """
        failures = 0
        while not stop.is_set():
            wait = self.settings.poll_seconds
            try:
                await self._read_changes()
                failures = 0
            except Exception as exc:
                # Hellos go on being decided from what is in memory; the
                # change is read again, so none is lost, only late.
                failures += 1
                wait = min(wait * 2**failures, WATCH_BACKOFF_MAX)
                log.error(  # noqa: TRY400 - type and place say enough
                    "store read failed",
                    task="watch-store",
                    attempt=failures,
                    retry_in=round(wait, 2),
                    **failure(exc),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _read_changes(self) -> None:
        """Queue the reloads of what the tool changed since the last read.

        The marks move only once every read succeeded: a failed read is
        tried again in full at the next poll.
        """
        version = await self.store.poll_version()
        if version == self._version:
            return
        seq, tenants = await self.store.changes_after(self._change_seq)
        reloads = [await self._reload_of(tenant) for tenant in sorted(tenants)]
        for reload in reloads:
            self._queue.put_nowait(reload)
        self._version, self._change_seq = version, seq

    async def _reload_of(self, tenant: str) -> _Reload:
        """A tenant's licenses as the tool left them, read for the decider."""
        licenses = await self.store.licenses(tenant)
        states = await self.store.license_states(tenant)
        return _Reload(tenant, licenses, states)

    # -- publishing -------------------------------------------------------------

    def _decision(
        self, verdict: Verdict, cause: Cause, now: datetime, ref: str | None = None
    ) -> protocol.Decision:
        lease = self.settings.lease_seconds
        return protocol.decision(verdict, cause, now, lease, ref)

    def _reply(self, batch: _Batch, item: _Item, reply: protocol.Decision) -> None:
        topic = self._reply_topic(item.tenant, item.router, item.inbound)
        payload = reply.model_dump_json().encode()
        batch.replies.append((topic, payload, item.inbound.correlation))

    def _reply_topic(self, tenant: str, router: str, inbound: Inbound) -> str:
        """The MQTT 5 Response Topic if it is the router's reply topic or below
        it, else the fixed one: a router must not have the gateway write on
        its presence, or anywhere else only the gateway may write."""
        fixed = protocol.topic(self.settings.prefix, tenant, router, "reply")
        wanted = inbound.response_topic
        if wanted is None or set("+#") & set(wanted):
            return fixed
        return wanted if wanted == fixed or wanted.startswith(f"{fixed}/") else fixed

    async def _publish_events(self, events: list[Event], now: datetime) -> None:
        for event in events:
            if isinstance(event, Joined):
                place = event.place
                state = "online" if place.seated else "waiting"
                await self._publish_presence(
                    place.tenant, place.router, state, place.epoch, "hello", now
                )
            elif isinstance(event, SeatChanged):
                await self._notify(event.verdict, event.cause, now)
            elif isinstance(event, Left):
                await self._publish_presence(
                    event.tenant, event.router, "offline", event.epoch,
                    event.cause.value, now,
                )  # fmt: skip
                log.info(
                    "router left", tenant=event.tenant, router=event.router,
                    cause=event.cause.value, was_seated=event.was_seated,
                )  # fmt: skip
            else:
                log.info("license event", **_fields(event))

    async def _notify(self, verdict: Verdict, cause: Cause, now: datetime) -> None:
        """Tell a router of a seat change it did not ask for, and show it."""
        self._log_decision(verdict, now, cause)
        reply = self._decision(verdict, cause, now)
        topic = protocol.topic(
            self.settings.prefix, verdict.tenant, verdict.router, "reply"
        )
        await self._send(topic, reply.model_dump_json().encode(), None)
        state = "online" if verdict.accepted else "waiting"
        await self._publish_presence(
            verdict.tenant, verdict.router, state, verdict.epoch, cause.value, now
        )

    async def _publish_presence(
        self, tenant: str, router: str, state: str, epoch: int, reason: str,
        now: datetime,
    ) -> None:  # fmt: skip
        presence = protocol.Presence(
            tenant=tenant,
            router=router,
            state=state,  # type: ignore[arg-type]
            online=state == "online",
            epoch=epoch,
            reason=reason,
            since=to_text(now) or "",
        )
        topic = protocol.topic(self.settings.prefix, tenant, router, "presence")
        await self._publish(topic, presence, retain=True)

    async def _publish(self, topic: str, model: BaseModel, *, retain: bool) -> None:
        assert self._mqtt is not None
        await self._mqtt.publish(topic, model.model_dump_json().encode(), retain=retain)

    async def _send(
        self, topic: str, payload: bytes, correlation: bytes | None
    ) -> None:
        assert self._mqtt is not None
        await self._mqtt.publish(topic, payload, correlation=correlation)

    def _log_decision(
        self,
        verdict: Verdict,
        now: datetime,
        cause: Cause = Cause.HELLO,
        received: float | None = None,
    ) -> None:
        """One INFO line per answer; ``latency_ms`` for an answer to a hello."""
        decision = "accept" if verdict.accepted else "reject"
        self.decisions[f"{decision}:{verdict.reason.value}"] += 1
        latency = None if received is None else time.monotonic() - received
        self.metrics.decided(decision, verdict.reason.value, cause.value, latency)
        log.info(
            "decision",
            tenant=verdict.tenant,
            router=verdict.router,
            decision=decision,
            reason=verdict.reason.value,
            tier=verdict.tier,
            position=verdict.position,
            epoch=verdict.epoch,
            cause=cause.value,
            latency_ms=None if latency is None else round(latency * 1000, 3),
        )


def _ref(message: Hello | Heartbeat | Goodbye) -> str | None:
    return message.ref if isinstance(message, Hello) else None


def _ref_of(payload: bytes) -> str | None:
    """The ``ref`` of a hello that failed validation, if one can be read.

    A router that sent a wrong hello needs its ``ref`` back most of all, to
    tell which of its hellos was refused; any JSON object with a short
    string ``ref`` gives it.
    """
    if len(payload) > protocol.MAX_PAYLOAD:
        return None
    try:
        loaded = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON, or nested past reading
        return None
    ref = loaded.get("ref") if isinstance(loaded, dict) else None
    return ref if isinstance(ref, str) and len(ref) <= MAX_REF else None


def _fields(event: Event) -> dict[str, object]:
    fields = {k: getattr(event, k) for k in getattr(event, "__slots__", ())}
    return {
        k: to_text(v) if isinstance(v, datetime) else str(v) for k, v in fields.items()
    }
