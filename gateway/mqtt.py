"""The gateway's seam over its MQTT client library (gmqtt).

Everything the service needs from MQTT is here and nowhere else: connect
with a persistent session and a last will, receive QoS 1 messages whose
PUBACK waits for our handler, publish with a bounded in-flight window,
and reconnect with capped, jittered backoff.

Why gmqtt: with MQTT 5 and ``optimistic_acknowledgement=False`` it sends
the PUBACK for an inbound QoS 1 message only when the async handler
returns, so a hello is acknowledged after its decision is durable, and
the broker's in-flight limit towards us becomes back-pressure. It does
not, however, hold back our own QoS 1 publishes while earlier ones are
unacknowledged (it runs out of packet ids), so :class:`_Window` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import gmqtt
import structlog
from gmqtt.mqtt.constants import UNLIMITED_RECONNECTS, MQTTv50
from gmqtt.storage import PersistentStorage

log = structlog.get_logger("gateway.mqtt")


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message, with the MQTT 5 properties the gateway honours."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    received: float = field(default_factory=time.monotonic)
    """When it arrived (``time.monotonic``), for the decision's latency."""


Handler = Callable[[Inbound], Awaitable[None]]
"""Handles one inbound message; the message is acknowledged when it returns,
or when it raises anything but :class:`Redeliver`."""


class Redeliver(Exception):
    """Raised by a handler to leave its message unacknowledged, for the broker
    to deliver it again (after a reconnect, or to the next session): the
    gateway could not make its decision durable."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter between half and all of it."""

    base: float = 0.2
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling)


class _Window(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of unacknowledged publishes, counting a bounded window."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._free = asyncio.Event()
        self._free.set()

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        if len(self._messages) >= self.size:
            self._free.clear()

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        if len(self._messages) < self.size:
            self._free.set()

    @property
    def free(self) -> asyncio.Event:
        """Set while the window has room for another publish."""
        return self._free


class _Corked:
    """A transport whose writes of one turn of the event loop go out as one.

    gmqtt writes every packet the moment it is built, and each write is a
    send() system call: a reply, a presence and a PUBACK per hello. Held
    until the loop's next turn, a whole batch's packets leave in one or two
    writes, in the order they were made. Everything but writing and closing
    is the transport's own.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def failure(exc: BaseException) -> dict[str, str]:
    """What to log of an unexpected exception: its type and where it was
    raised, not its message, which may quote the payload."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    where = "?" if last is None else f"{last.filename}:{last.lineno} in {last.name}"
    return {"error": type(exc).__name__, "where": where}


def _cork(client: gmqtt.Client) -> None:
    """Put :class:`_Corked` under a new connection's packet writers.

    gmqtt gives no hook for its transport, so this reaches into the
    connection it made: the connection and its protocol each hold the
    transport they write to.
    """
    connection = client._connection
    transport = connection._transport
    if not isinstance(transport, _Corked):
        corked = _Corked(transport)
        connection._transport = corked
        connection._protocol._transport = corked


class _Client(gmqtt.Client):  # type: ignore[misc]
    """gmqtt's client with our backoff on every reconnect path, after any
    refusal too.

    gmqtt gives up for good once the broker refuses a login with a code it
    deems permanent (bad user name or password, not authorised, banned):
    it neither reconnects nor tells its caller. For the gateway no refusal
    is permanent: an operator who rotates its account, or fixes a broken
    one, expects it back without a restart, and a gateway that stays
    silently disconnected keeps its routers waiting for ever (systemd
    restarts only a process that exits). So every refusal is retried, with
    the same capped, jittered backoff as a lost connection, and logged.
    """

    backoff = Backoff()
    attempts = 0
    account: str | None = None
    """The broker account it logs in as, named in its warnings (never the
    password)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._package_handler._is_retryable_connack = _always
        self._problem: str | None = None

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        """gmqtt's, remembering why a connection could not be made.

        None once the client is closed: gmqtt's reconnect sleeps its delay
        and then connects without looking again, which would bring a
        closed gateway back on line."""
        self._problem = None
        if not self._is_active:
            raise ConnectionAbortedError("the client is closed")
        try:
            return await super()._create_connection(*args, **kwargs)
        except OSError as exc:
            self._problem = str(exc) or type(exc).__name__
            raise

    def reason(self) -> str:
        """Why the last attempt failed: the broker's refusal, the network's
        error, or a connection that was lost."""
        if self._problem is not None:
            return self._problem
        refusal = self._package_handler._error
        return "connection lost" if refusal is None else str(refusal)

    async def reconnect(self, delay: bool = False) -> None:
        # gmqtt asks for a reconnect from several places for one failure (a
        # refusal, then the closed socket); only the first one goes on.
        if delay and self._allow_reconnect():
            self.reconnect_delay = self.backoff.delay(self.attempts)
            self.attempts += 1
            log.warning(
                "broker unreachable",
                reason=self.reason(),
                account=self.account,
                attempt=self.attempts,
                retry_in=round(self.reconnect_delay, 3),
            )
            # A refusal is not remembered past its own attempt.
            self._package_handler.reset_error_state()
        await super().reconnect(delay=delay)


def _always(result: int) -> bool:
    """Every CONNACK refusal is worth retrying (see :class:`_Client`)."""
    return True


class Mqtt:
    """One MQTT 5 connection of the gateway, as an async context manager.

    ``on_connected`` runs after every successful (re)connect, to subscribe
    and to republish what must be current.
    """

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        handler: Handler,
        on_connected: Callable[[], Awaitable[None]],
        *,
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
        credentials: tuple[str, str] | None = None,
        receive_maximum: int = 1000,
        window: int = 1000,
        keepalive: int = 30,
        backoff: Backoff = Backoff(),
    ) -> None:
        self._host, self._port, self._keepalive = host, port, keepalive
        self._handler = handler
        self._on_connected = on_connected
        self._window = _Window(window)
        self._window_wanted = window
        self._connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connects = 0
        """Successful connects so far; every one after the first is a reconnect."""
        will_message = None
        if will is not None:
            will_message = gmqtt.Message(will[0], will[1], qos=1, retain=True)
        self._client = _Client(
            client_id,
            clean_session=not persistent,
            optimistic_acknowledgement=False,
            will_message=will_message,
            persistent_storage=self._window,
            session_expiry_interval=0xFFFFFFFF if persistent else 0,
            receive_maximum=receive_maximum,
        )
        self._client.backoff = backoff
        self._client.set_config({"reconnect_retries": UNLIMITED_RECONNECTS})
        if credentials is not None:
            self._client.set_auth_credentials(*credentials)
            self._client.account = credentials[0]
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    async def __aenter__(self) -> Mqtt:
        """Connect, retrying with backoff until connected or :meth:`give_up`.

        Until a first connection is made, the retries are ours; once the
        broker answered at all, gmqtt retries (with our backoff, after a
        refusal too: :class:`_Client`) and this waits for it.
        """
        attempt = 0
        while not self._closing.is_set():
            try:
                await self._client.connect(
                    self._host, self._port, keepalive=self._keepalive, version=MQTTv50
                )
            except OSError as exc:
                delay = self._client.backoff.delay(attempt)
                attempt += 1
                log.warning(
                    "broker unreachable",
                    reason=str(exc) or type(exc).__name__,
                    account=self._client.account,
                    attempt=attempt,
                    retry_in=round(delay, 3),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                continue
            except gmqtt.mqtt.handler.MQTTConnectError:
                pass  # refused: the client has logged it, and retries itself
            await self._until(self._connected)
            break
        return self

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    @property
    def unacknowledged(self) -> int:
        """QoS 1 publishes handed to the connection and not yet acknowledged
        by the broker; after a reconnect gmqtt sends them again."""
        return len(self._window._messages)

    def give_up(self) -> None:
        """Stop waiting for the broker: publishes that cannot go out now are
        dropped, and inbound messages stay unacknowledged, so the broker
        delivers them again to the next session."""
        self._closing.set()

    async def _until(self, event: asyncio.Event) -> bool:
        """Wait for ``event`` unless giving up; True if it is set."""
        if event.is_set():
            return True
        waiters = [asyncio.ensure_future(e.wait()) for e in (event, self._closing)]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return event.is_set()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait briefly for unacknowledged publishes, then disconnect."""
        self._closing.set()
        if self._client.is_connected:
            try:
                await asyncio.wait_for(self._window.wait_empty(), timeout=5)
            except TimeoutError:
                log.warning("closing with publishes unacknowledged")
        self._connected.clear()
        await self._client.disconnect()
        self._connected.clear()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> None:
        """Send a QoS 1 publish once the in-flight window has room.

        Returns when the publish is handed to the connection, not when the
        broker acknowledges it; unacknowledged publishes are resent after a
        reconnect.
        """
        if not await self._until(self._window.free) or not await self._until(
            self._connected
        ):
            return
        properties: dict[str, Any] = {}
        if correlation is not None:
            properties["correlation_data"] = correlation
        self._client.publish(topic, payload, qos=1, retain=retain, **properties)

    def subscribe(self, *topics: str, retained: bool = False) -> None:
        """Subscribe at QoS 1; retained messages are sent only if ``retained``."""
        handling = 0 if retained else 2
        self._client.subscribe(
            [
                gmqtt.Subscription(t, qos=1, retain_handling_options=handling)
                for t in topics
            ]
        )

    def unsubscribe(self, *topics: str) -> None:
        self._client.unsubscribe(list(topics))

    async def _on_message(
        self,
        client: gmqtt.Client,
        topic: str,
        payload: bytes,
        qos: int,
        properties: dict[str, Any],
    ) -> int:
        response = properties.get("response_topic")
        correlation = properties.get("correlation_data")
        message = Inbound(
            topic,
            payload,
            response[0] if response else None,
            correlation[0] if correlation else None,
        )
        try:
            await self._handler(message)
        except Redeliver:
            raise  # gmqtt sends no PUBACK for a handler that raised
        except Exception as exc:
            # Unacknowledged, the broker would deliver it again and again,
            # to this session and every later one: a poison message.
            log.error(  # noqa: TRY400 - no trace: it could quote the payload
                "message handling failed", topic=topic, **failure(exc)
            )
        return 0

    def _on_connect(
        self, client: gmqtt.Client, flags: int, rc: int, properties: Any
    ) -> None:
        self._client.attempts = 0
        self.connects += 1
        _cork(self._client)
        # The broker's Receive Maximum (CONNACK) bounds our unacknowledged
        # QoS 1 publishes; gmqtt raises OverflowError one below it. The
        # ``properties`` handed to us merge our own CONNECT properties over
        # the broker's, hiding its value, so read the CONNACK's own.
        connack = self._client._package_handler._connack_properties
        advertised = connack.get("receive_maximum")
        if advertised:
            self._window.size = max(1, min(self._window_wanted, advertised[0] - 1))
        self._connected.set()
        log.info("broker connected", session_present=bool(flags))
        task = asyncio.ensure_future(self._on_connected())
        self._tasks.add(task)
        task.add_done_callback(self._connected_done)

    def _connected_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("after-connect work failed", exc_info=task.exception())

    def _on_disconnect(
        self, client: gmqtt.Client, packet: Any, exc: Any = None
    ) -> None:
        if self._connected.is_set():
            log.warning("broker connection lost")
        self._connected.clear()
