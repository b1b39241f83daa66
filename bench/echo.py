"""A bare echo through the gateway's own MQTT seam: the baseline.

It subscribes to the same hello topics with the same client, session and
in-flight window as the gateway, and answers every hello at once with a
fixed "accept", without deciding or storing anything. The gateway's own
cost is then its rate as a ratio of this one, measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from gateway import protocol
from gateway.mqtt import Inbound, Mqtt

TEMPLATE = (
    '{{"v":1,"type":"decision","tenant":"{t}","router":"{r}","session":null,'
    '"epoch":1,"decision":"accept","reason":"licensed","tier":"full",'
    '"position":null,"lease_seconds":90,"cause":"hello","ref":null,'
    '"detail":null,"at":"1970-01-01T00:00:00Z"}}'
)


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    mqtt: Mqtt

    async def echo(message: Inbound) -> None:
        parts = protocol.split_topic(protocol.PREFIX, message.topic)
        if parts is None or parts[2] != "hello":
            return
        tenant, router, _ = parts
        body = TEMPLATE.format(t=tenant, r=router).encode()
        topic = message.response_topic or protocol.topic(
            protocol.PREFIX, tenant, router, "reply"
        )
        await mqtt.publish(topic, body, correlation=message.correlation)

    async def subscribe() -> None:
        mqtt.subscribe(f"{protocol.PREFIX}/+/+/hello")
        status = protocol.GatewayStatus(gateway="echo", state="online", since="9999")
        await mqtt.publish(
            protocol.status_topic(protocol.PREFIX, "echo"),
            status.model_dump_json().encode(),
            retain=True,
        )

    # The gateway's account, from the environment as the gateway reads it.
    login = os.environ.get("IRM_BROKER_USERNAME"), os.environ.get("IRM_BROKER_PASSWORD")
    mqtt = Mqtt(
        "bench-echo", "127.0.0.1", port, echo, subscribe, persistent=False,
        credentials=(login[0], login[1] or "") if login[0] else None,
    )  # fmt: skip
    async with mqtt:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
