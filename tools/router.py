"""A simulated router: one real MQTT connection speaking the gateway protocol.

It does what router firmware does (docs/protocol.md): it names a session,
sets a goodbye for that session as its last will, subscribes to its reply
topic, says hello with an MQTT 5 Response Topic and Correlation Data (or,
as an MQTT 3.1.1 router, with a ``ref`` in the payload), renews its lease
with heartbeats, and says goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from gateway import protocol
from gateway.protocol import Decision, Goodbye, Heartbeat, Hello


class _Client(gmqtt.Client):  # type: ignore[misc]
    """gmqtt's client that never reconnects by itself.

    A router comes back with a new session, a new will and a new hello,
    which is the simulator's decision; gmqtt's automatic reconnect would
    reuse the old will and, after a takeover, take the session back.
    """

    async def reconnect(self, delay: bool = False) -> None:
        return


@dataclass(slots=True)
class Heard:
    """A decision this router received, and when (monotonic seconds)."""

    decision: Decision
    at: float
    correlation: bytes | None = None


@dataclass(slots=True)
class SimRouter:
    """One router. ``client_id`` defaults to ``tenant.router``.

    It logs in with ``username`` and ``password`` when given, and speaks
    TLS when given an ``ssl`` context (with its client certificate).
    """

    host: str
    port: int
    tenant: str
    router: str
    prefix: str = protocol.PREFIX
    mqtt5: bool = True
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ssl: ssl.SSLContext | None = None
    before_connect: Callable[[], None] | None = None
    """Called first by :meth:`connect`, e.g. to have the broker learn the
    credentials of a whole fleet at once."""
    session: str = field(default_factory=lambda: secrets.token_hex(6))
    heard: asyncio.Queue[Heard] = field(default_factory=asyncio.Queue)
    on_heard: Callable[[Heard], None] | None = None
    """Called for every decision heard, e.g. to tally a whole fleet's answers."""
    _client: gmqtt.Client | None = None
    _sent: dict[str, float] = field(default_factory=dict)

    def topic(self, kind: str) -> str:
        return protocol.topic(self.prefix, self.tenant, self.router, kind)

    async def connect(self, *, will: bool = True, keepalive: int = 60) -> None:
        """Open the connection with this session's goodbye as last will."""
        if self.before_connect is not None:
            self.before_connect()
        will_message = None
        if will:
            body = Goodbye(v=1, session=self.session, will=True)
            will_message = gmqtt.Message(
                self.topic("goodbye"), body.model_dump_json(), qos=1
            )
        client = _Client(
            self.client_id or f"{self.tenant}.{self.router}",
            clean_session=True,
            will_message=will_message,
        )
        client.on_message = self._on_message
        if self.username is not None:
            client.set_auth_credentials(self.username, self.password)
        version = MQTTv50 if self.mqtt5 else MQTTv311
        await client.connect(
            self.host,
            self.port,
            keepalive=keepalive,
            version=version,
            ssl=self.ssl or False,
        )
        client.subscribe(self.topic("reply"), qos=1)
        self._client = client

    def _on_message(
        self,
        client: object,
        topic: str,
        payload: bytes,
        qos: int,
        properties: dict[str, Any],
    ) -> int:
        try:
            decision = Decision.model_validate_json(payload)
        except ValueError:
            return 0
        correlation = properties.get("correlation_data")
        heard = Heard(
            decision, time.monotonic(), correlation[0] if correlation else None
        )
        self.heard.put_nowait(heard)
        if self.on_heard is not None:
            self.on_heard(heard)
        return 0

    def new_session(self) -> None:
        self.session = secrets.token_hex(6)

    def hello(self, ref: str | None = None) -> str:
        """Publish a hello; returns its ``ref`` (also used as correlation)."""
        assert self._client is not None
        ref = ref or secrets.token_hex(4)
        body = Hello(v=1, session=self.session, ref=ref)
        properties: dict[str, object] = {}
        if self.mqtt5:
            properties = {
                "response_topic": self.topic("reply"),
                "correlation_data": ref.encode(),
            }
        self._sent[ref] = time.monotonic()
        self._client.publish(
            self.topic("hello"), body.model_dump_json(), qos=1, **properties
        )
        return ref

    def publish_raw(self, kind: str, payload: bytes | str) -> None:
        """Publish anything on one of this router's topics (for bad input)."""
        assert self._client is not None
        self._client.publish(self.topic(kind), payload, qos=1)

    def publish_to(
        self, topic: str, payload: bytes | str, *, retain: bool = False, **props: Any
    ) -> None:
        """Publish anything on any topic, as a compromised router would try."""
        assert self._client is not None
        self._client.publish(topic, payload, qos=1, retain=retain, **props)

    def subscribe(self, topic: str) -> None:
        """Subscribe to any topic; decisions heard there join :attr:`heard`."""
        assert self._client is not None
        self._client.subscribe(topic, qos=1)

    def heartbeat(self) -> None:
        assert self._client is not None
        body = Heartbeat(v=1, session=self.session)
        self._client.publish(self.topic("heartbeat"), body.model_dump_json(), qos=1)

    def goodbye(self) -> None:
        assert self._client is not None
        body = Goodbye(v=1, session=self.session)
        self._client.publish(self.topic("goodbye"), body.model_dump_json(), qos=1)

    async def ask(self, timeout: float = 10.0) -> tuple[Decision, float]:
        """Say hello and wait for its reply; returns it and the round trip (s)."""
        ref = self.hello()
        while True:
            heard = await asyncio.wait_for(self.heard.get(), timeout)
            if heard.decision.ref == ref:
                return heard.decision, heard.at - self._sent.pop(ref)

    async def next_decision(self, timeout: float = 10.0) -> Decision:
        heard = await asyncio.wait_for(self.heard.get(), timeout)
        return heard.decision

    async def disconnect(self) -> None:
        """A clean disconnect: the broker discards the last will."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), 5)
            self._client = None

    async def drop(self) -> None:
        """Cut the link without DISCONNECT, as a lost network would.

        The broker then publishes this session's last will.
        """
        if self._client is None:
            return
        client, self._client = self._client, None
        # gmqtt has no public "abort": reach the asyncio transport under it,
        # which is what a lost network looks like to the broker.
        client._connection._transport.abort()
