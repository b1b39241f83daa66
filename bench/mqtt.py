"""The whole path over MQTT: a bare echo, then the gateway, in one run.

Everything runs on this machine over loopback: a Mosquitto from the
repository's ``mosquitto.conf``, the echo or ``irm-gateway`` as a process,
and the load generator (``tools/load.py``) in worker processes. Each
gateway figure is reported beside the echo's, so the gateway's own cost is
a ratio measured on the same broker and client stack at the same moment.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gmqtt

from gateway import protocol
from tools.broker import Broker
from tools.load import LoadSpec, Summary, run_load

BIN = Path(sys.executable).parent


def machine() -> dict[str, Any]:
    """The facts that make figures comparable."""
    model = ""
    with Path("/proc/cpuinfo").open() as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mosquitto = subprocess.run(
        ["mosquitto", "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": mosquitto[0] if mosquitto else "",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def seed(store_at: Path | str, tenants: list[str], seats_each: int) -> None:
    """Tenants with ``seats_each`` seats of Cloud Basic 25 (rounded up), in
    an SQLite file or a PostgreSQL database."""
    from policy.licenses import Kind, State  # noqa: PLC0415 - bench-only
    from policy.stores import open_store  # noqa: PLC0415
    from tests.seeding import mint  # noqa: PLC0415

    now = datetime.now(UTC)
    store = await open_store(store_at)
    for tenant in tenants:
        await store.add_tenant(tenant, "UTC", now)
        items = [
            mint(Kind.BASIC_25, now - timedelta(days=1))
            for _ in range(-(-seats_each // 25))
        ]
        items = [(replace(lic, tenant=tenant), code) for lic, code in items]
        await store.add_licenses(tenant, items, now, "bench")
        active = [replace(lic, activation_at=now) for lic, _ in items]
        states = {lic.id: State.ACTIVE for lic in active}
        await store.save_activations(tenant, active, states, now, "bench")
    await store.close()


class Service:
    """The echo or the gateway, as a child process on the broker, logged in
    with the gateway's account (given in the environment, as an operator
    would)."""

    def __init__(self, command: list[str], log: Path, name: str) -> None:
        self.command = command
        self.log = log
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, broker: Broker) -> None:
        """Start, and return once its own retained status says online.

        Its own: the echo's retained ``online`` stays on the broker after the
        echo stopped, and a gateway is subscribed only once it says so.
        """
        user, password = broker.gateway
        env = {**os.environ, "IRM_BROKER_USERNAME": user}
        env["IRM_BROKER_PASSWORD"] = password
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=out, env=env
            )
        if not asyncio.run(until_online(broker, self.name, 30)):
            raise RuntimeError(f"{self.command[0]} did not come online: {self.log}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None


async def until_online(broker: Broker, name: str, timeout: float) -> bool:
    """True once the retained status of gateway ``name`` says online."""
    online = asyncio.Event()

    def on_message(client: object, topic: str, payload: bytes, *rest: object) -> int:
        if protocol.GatewayStatus.model_validate_json(payload).state == "online":
            online.set()
        else:
            online.clear()
        return 0

    client = gmqtt.Client(None)
    client.set_auth_credentials(*broker.admin)
    client.on_message = on_message
    await client.connect("127.0.0.1", broker.port)
    client.subscribe(protocol.status_topic(protocol.PREFIX, name), qos=1)
    try:
        await asyncio.wait_for(online.wait(), timeout)
    except TimeoutError:
        return False
    finally:
        await client.disconnect()
    return True


def load(broker: Broker, **options: Any) -> Summary:
    """Run the load generator's routers on the routers' password listener."""
    return run_load(router_spec(broker, **options))


def router_spec(broker: Broker, **options: Any) -> LoadSpec:
    """A load spec whose every router has its account (one broker reload)."""
    spec = LoadSpec("127.0.0.1", broker.router_port, **options)
    for tenant, router in spec.names():
        broker.router_password(tenant, router)
    broker.flush()
    names = {f"{t}/{r}" for t, r in spec.names()}
    mine = {
        user: password for user, password in broker.passwords.items() if user in names
    }
    return replace(spec, passwords=mine)


def sweep(broker: Broker, tenants: tuple[str, ...], routers: int, rates: list[int],
          duration: float, processes: int) -> list[dict[str, Any]]:  # fmt: skip
    """Latency at each offered rate (open loop)."""
    rows = []
    for rate in rates:
        summary = load(
            broker, tenants=tenants, routers=routers, mode="rate", rate=float(rate),
            duration=duration, processes=processes,
        )  # fmt: skip
        row = {"offered_per_s": rate, **summary.report()}
        row["achieved_per_s"] = round(summary.answered / duration, 1)
        rows.append(row)
        latency = row["latency_ms"]
        print(f"  offered {rate:>6}/s: p50 {latency['p50']} ms, "
              f"p99 {latency['p99']} ms, unanswered {row['unanswered']}")  # fmt: skip
    return rows


def leg(
    name: str,
    broker: Broker,
    tenants: tuple[str, ...],
    routers: int,
    rates: list[int],
    duration: float,
    processes: int,
) -> dict[str, Any]:
    """One service's throughput (closed loop) and latency at offered rates."""
    print(f"{name}: closed loop")
    closed = load(
        broker, tenants=tenants, routers=routers, mode="closed",
        duration=duration, processes=processes,
    ).report()  # fmt: skip
    print(f"  {closed['round_trips_per_s']} round trips/s")
    print(f"{name}: latency at offered rates")
    swept = sweep(broker, tenants, routers, rates, duration, processes)
    return {f"{name}_closed": closed, f"{name}_rates": swept}


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Measure echo and gateway; write ``mqtt.json`` and ``mqtt.png``."""
    work = Path(tempfile.mkdtemp(prefix="irm-bench-"))
    broker = Broker(work / "broker")
    broker.start()
    port = broker.port
    processes = 2
    routers = 400 if quick else 800
    duration = 4.0 if quick else 8.0
    rates = (
        [500, 1000, 2000, 3000] if quick else [500, 1000, 2000, 3000, 4000, 5000, 6000]
    )
    storm_routers = 2000 if quick else 10_000
    tenants = tuple(f"B{i}" for i in range(10))
    figures: dict[str, Any] = {"machine": machine(), "quick": quick}
    try:
        echo = Service(
            [sys.executable, "-m", "bench.echo", str(port)], work / "echo.log", "echo"
        )
        echo.start(broker)
        figures.update(
            leg("echo", broker, tenants, routers, rates, duration, processes)
        )
        echo.stop()

        database = work / "irm.db"
        asyncio.run(
            seed(database, list(tenants), storm_routers // len(tenants) * 8 // 10)
        )
        gateway = Service(
            [str(BIN / "irm-gateway"), "--broker-port", str(port), "--database",
             str(database), "--log-level", "warning", "--log-format", "json",
             "--lease-seconds", "600", "--uvloop",
             # The load's routers say hello far more often than real ones.
             "--hello-rate", "1000000", "--hello-burst", "1000000"],
            work / "gateway.log", "gw1",
        )  # fmt: skip
        gateway.start(broker)
        assert gateway.process is not None
        idle_rss = rss_kib(gateway.process.pid)
        figures.update(
            leg("gateway", broker, tenants, routers, rates, duration, processes)
        )
        print(f"gateway: reconnect storm of {storm_routers} routers")
        before_storm = rss_kib(gateway.process.pid)
        storm = load(
            broker, tenants=tenants, routers=storm_routers, mode="storm",
            processes=4, connect_rate=4000.0, timeout=120.0, name_prefix="S",
        )  # fmt: skip
        figures["storm"] = storm.report()
        print(f"  decided in {figures['storm']['storm_s']} s, same online: "
              f"{figures['storm']['storm_same_online']}")  # fmt: skip
        after_storm = rss_kib(gateway.process.pid)
        figures["storm_routers"] = storm_routers
        figures["memory"] = {
            "idle_kib": idle_rss,
            "before_storm_kib": before_storm,
            "after_storm_kib": after_storm,
            "routers": storm_routers,
            "bytes_per_router": round(
                (after_storm - before_storm) * 1024 / storm_routers, 1
            ),
        }
        gateway.stop()
    finally:
        broker.stop()
    echo_rate = figures["echo_closed"]["round_trips_per_s"] or 1
    figures["ratio_gateway_to_echo"] = round(
        (figures["gateway_closed"]["round_trips_per_s"] or 0) / echo_rate, 3
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mqtt.json").write_text(json.dumps(figures, indent=2) + "\n")
    plot(figures, out_dir / "mqtt.png")
    shutil.rmtree(work, ignore_errors=True)
    return figures


def plot(figures: dict[str, Any], path: Path) -> None:
    """Latency percentiles against offered rate, echo beside gateway."""
    import matplotlib  # noqa: PLC0415 - optional, for the benchmark only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, style in (("echo_rates", "--"), ("gateway_rates", "-")):
        rows = figures[name]
        x = [r["offered_per_s"] for r in rows]
        for q in ("p50", "p99"):
            y = [r["latency_ms"][q] for r in rows]
            ax.plot(x, y, style, marker="o", label=f"{name.split('_')[0]} {q}")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("offered hellos per second")
    ax.set_ylabel("hello-to-reply latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency against offered rate (QoS 1, loopback)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    started = time.monotonic()
    run(Path("bench/results"), quick="--quick" in sys.argv)
    print(f"done in {time.monotonic() - started:.0f} s")
