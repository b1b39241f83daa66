"""The gateway's MQTT seam against a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from gateway.mqtt import Inbound, Mqtt, _Corked
from tests.conftest import mqtt_client
from tools.broker import Broker

pytestmark = pytest.mark.broker


async def test_publishing_far_past_the_brokers_receive_maximum_never_overflows(
    broker: Broker,
) -> None:
    """gmqtt runs out of packet ids past the broker's limit; the window holds."""
    received = 0
    everything = asyncio.Event()

    def on_message(client: object, topic: str, payload: bytes, *rest: object) -> int:
        nonlocal received
        received += 1
        if received == 5000:
            everything.set()
        return 0

    listener = await mqtt_client(broker)
    listener.on_message = on_message
    listener.subscribe("irm/v1/_seam/#", qos=1)

    async def ignore(message: Inbound) -> None:
        return None

    async def connected() -> None:
        return None

    async with Mqtt(
        "seam", "127.0.0.1", broker.port, ignore, connected, window=5000,
        credentials=broker.gateway,
    ) as mqtt:  # fmt: skip
        assert mqtt._window.size == 1999  # max_inflight_messages 2000 in mosquitto.conf
        for i in range(5000):
            await mqtt.publish(f"irm/v1/_seam/{i % 7}", str(i).encode())
        await asyncio.wait_for(everything.wait(), 30)
    await listener.disconnect()
    assert received == 5000


class _Transport:
    """What a transport is asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


async def _after_what_is_scheduled() -> None:
    """Return once every callback scheduled so far has run (FIFO)."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned


async def test_packets_of_one_turn_of_the_loop_leave_in_one_write_in_order() -> None:
    transport = _Transport()
    corked = _Corked(transport)  # type: ignore[arg-type]

    for packet in (b"reply", b"presence", b"puback"):
        corked.write(packet)
    assert transport.calls == []
    await _after_what_is_scheduled()
    corked.write(b"next")
    await _after_what_is_scheduled()

    assert transport.calls == [("write", b"replypresencepuback"), ("write", b"next")]


async def test_closing_sends_what_is_held_first_and_nothing_after() -> None:
    transport = _Transport()
    corked = _Corked(transport)  # type: ignore[arg-type]

    corked.write(b"disconnect")
    corked.close()
    corked.write(b"late")
    await _after_what_is_scheduled()

    assert transport.calls == [("write", b"disconnect"), ("close", b"")]
    assert corked.is_closing()


async def test_a_message_whose_handler_raises_is_acknowledged_once(
    broker: Broker,
) -> None:
    """Unacknowledged, it would come back to every later session for ever."""
    seen: list[bytes] = []
    arrived = asyncio.Event()
    subscribed = asyncio.Event()

    async def handler(message: Inbound) -> None:
        if message.topic.endswith("/probe"):
            subscribed.set()
            return
        seen.append(message.payload)
        arrived.set()
        if message.payload == b"poison":
            raise RecursionError("maximum recursion depth exceeded")

    async def connected() -> None:
        return None

    async def session() -> Mqtt:
        mqtt = Mqtt(
            "seam-poison", "127.0.0.1", broker.port, handler, connected,
            credentials=broker.gateway,
        )  # fmt: skip
        await mqtt.__aenter__()
        mqtt.subscribe("irm/v1/_seam/#")
        return mqtt

    sender = await mqtt_client(broker, broker.gateway)
    mqtt = await session()
    async with asyncio.timeout(10):  # until the subscription is in place
        while not subscribed.is_set():
            sender.publish("irm/v1/_seam/probe", b"", qos=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(subscribed.wait(), 0.1)
    for payload in (b"poison", b"after"):
        await _delivered(arrived, sender, payload)
    await mqtt.close()

    # The same persistent session again: nothing of the first is redelivered,
    # so the first message it hears is the one sent now.
    mqtt = await session()
    await _delivered(arrived, sender, b"next")
    await mqtt.close()
    await sender.disconnect()

    assert seen == [b"poison", b"after", b"next"]


async def _delivered(arrived: asyncio.Event, sender: Any, payload: bytes) -> None:
    """Send ``payload`` and wait until the handler had it."""
    arrived.clear()
    sender.publish("irm/v1/_seam/x", payload, qos=1)
    await asyncio.wait_for(arrived.wait(), 10)
