"""One router floods hellos: what does it cost the others?

A steady load of well-behaved routers (open loop, a fixed rate) runs twice
through the same broker and gateway: alone, then while one more router
says hello 2,000 times a second. The figure is the others'
p50 and p99 hello-to-reply latency with the flood over without it; flood
control (gateway/flood.py) should keep it a small factor.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.mqtt import BIN, Service, machine, router_spec, seed
from gateway.protocol import Hello
from tools.broker import Broker
from tools.load import run_load
from tools.router import SimRouter

TENANTS = ("F0", "F1", "F2", "F3")
FLOODER = ("F0", "FLOOD")
FLOOD_RATE = 2000
"""Hellos a second from the flooder: 2,000 times the default allowance, and
not so many that its own process takes a core from the others on a 2-core
machine (which would measure the machine, not the gateway)."""


def flood(port: int, password: str, seconds: float) -> None:
    """Say hello ``FLOOD_RATE`` times a second for ``seconds``."""
    asyncio.run(_flood(port, password, seconds))


async def _flood(port: int, password: str, seconds: float) -> None:
    tenant, name = FLOODER
    router = SimRouter(
        "127.0.0.1", port, tenant, name, username=f"{tenant}/{name}", password=password
    )
    await router.connect()
    body = Hello(v=1, session=router.session, ref="flood").model_dump_json()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(FLOOD_RATE // 100):
            router.publish_to(router.topic("hello"), body)
        await asyncio.sleep(0.01)
    await router.disconnect()


def measure(broker: Broker, rate: float, duration: float) -> dict[str, Any]:
    # Well-behaved: each router says hello at most 8 times in the run,
    # within the gateway's default burst of 10.
    routers = max(200, int(rate * duration / 8))
    spec = router_spec(
        broker, tenants=TENANTS, routers=routers, mode="rate", rate=rate,
        duration=duration, processes=1,
    )  # fmt: skip
    report: dict[str, Any] = run_load(spec).report()
    return report


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Measure the others' latency without and with a flood; write flood.json."""
    work = Path(tempfile.mkdtemp(prefix="irm-flood-"))
    broker = Broker(work / "broker")
    broker.start()
    rate, duration = (300.0, 4.0) if quick else (1000.0, 10.0)
    figures: dict[str, Any] = {"machine": machine(), "quick": quick, "rate": rate}
    try:
        database = work / "irm.db"
        asyncio.run(seed(database, list(TENANTS), 400))
        gateway = Service(
            [str(BIN / "irm-gateway"), "--broker-port", str(broker.port),
             "--database", str(database), "--log-level", "warning",
             "--log-format", "json", "--lease-seconds", "600"],
            work / "gateway.log", "gw1",
        )  # fmt: skip
        gateway.start(broker)
        # A first pass makes every router known to the gateway (a first hello
        # is a new place, written to the store); both measured passes are
        # then the same kind of hello, and differ only by the flood.
        print(f"flood: warming up at {rate}/s")
        measure(broker, rate, duration)
        print(f"flood: others alone at {rate}/s")
        figures["without"] = measure(broker, rate, duration)
        password = broker.router_password(*FLOODER)
        broker.flush()
        flooder = multiprocessing.Process(
            target=flood, args=(broker.router_port, password, duration + 2)
        )
        flooder.start()
        print(f"flood: others at {rate}/s beside one flooding router")
        figures["with"] = measure(broker, rate, duration)
        flooder.join(timeout=60)
        gateway.stop()
    finally:
        broker.stop()
    for q in ("p50", "p99"):
        alone = figures["without"]["latency_ms"][q] or 1e-9
        figures[f"ratio_{q}"] = round(figures["with"]["latency_ms"][q] / alone, 2)
    print(f"  p50 x{figures['ratio_p50']}, p99 x{figures['ratio_p99']} with the flood")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "flood.json").write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    run(Path("bench/results"), quick="--quick" in sys.argv)
