"""The gateway's MQTT seam against a real Mosquitto."""

from __future__ import annotations

import asyncio

import pytest

from gateway.mqtt import Inbound, Mqtt
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
