"""Several gateways on PostgreSQL: round trips per second with 1, 2 and 3.

Each leg starts a fresh PostgreSQL database, seeds the tenants, starts
that many ``irm-gateway`` processes sharing the hellos through one MQTT
shared subscription, and drives the fleet in closed loop. A bare echo
runs first on the same broker in the same run, as the baseline. The
server is ``IRM_BENCH_POSTGRES`` (a ``postgresql://`` URL) or the one on
127.0.0.1:5432.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench.mqtt import BIN, Service, load, machine, rss_kib, seed
from tools.broker import Broker

SERVER = os.environ.get(
    "IRM_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
GATEWAYS = (1, 2, 3)


class Database:
    """A fresh database on the server, dropped afterwards."""

    def __init__(self) -> None:
        self.name = f"irm_bench_{uuid.uuid4().hex[:10]}"
        head, _, tail = SERVER.partition("://")
        self.url = f"{head}://{tail.split('/', 1)[0]}/{self.name}"

    def __enter__(self) -> str:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"'.encode())
        return self.url

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(
                f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'.encode()
            )


def cluster_leg(
    broker: Broker,
    work: Path,
    count: int,
    tenants: tuple[str, ...],
    spec: dict[str, Any],
) -> dict[str, Any]:
    """``count`` gateways on a fresh database: closed-loop round trips."""
    with Database() as url:
        asyncio.run(seed(url, list(tenants), spec["routers"] // len(tenants) * 8 // 10))
        gateways = []
        try:
            for n in range(1, count + 1):
                gateway = Service(
                    [str(BIN / "irm-gateway"), "--broker-port", str(broker.port),
                     "--store", url, "--gateway-id", f"bench{n}",
                     "--log-level", "warning", "--log-format", "json",
                     "--lease-seconds", "600", "--uvloop",
                     # The load's routers say hello far more often than real ones.
                     "--hello-rate", "1000000", "--hello-burst", "1000000"],
                    work / f"gateway{count}-{n}.log", f"bench{n}",
                )  # fmt: skip
                gateway.start(broker)
                gateways.append(gateway)
            closed = load(broker, tenants=tenants, mode="closed", **spec).report()
            rss = [rss_kib(g.process.pid) for g in gateways if g.process is not None]
        finally:
            for gateway in gateways:
                gateway.stop()
    closed["gateways"] = count
    closed["rss_kib"] = rss
    print(f"  {count} gateway(s): {closed['round_trips_per_s']} round trips/s, "
          f"p99 {closed['latency_ms']['p99']} ms")  # fmt: skip
    return closed


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Echo, then 1, 2 and 3 gateways; write ``cluster.json`` and ``cluster.png``."""
    work = Path(tempfile.mkdtemp(prefix="irm-bench-cluster-"))
    broker = Broker(work / "broker")
    broker.start()
    port = broker.port
    spec = {
        "routers": 400 if quick else 800,
        "duration": 4.0 if quick else 8.0,
        "processes": 2,
    }
    tenants = tuple(f"B{i}" for i in range(10))
    figures: dict[str, Any] = {"machine": machine(), "quick": quick, **spec}
    try:
        echo = Service(
            [sys.executable, "-m", "bench.echo", str(port)], work / "echo.log", "echo"
        )
        echo.start(broker)
        print("echo: closed loop")
        figures["echo_closed"] = load(
            broker, tenants=tenants, mode="closed", **spec
        ).report()
        echo.stop()
        print(f"  {figures['echo_closed']['round_trips_per_s']} round trips/s")
        print("gateways on PostgreSQL: closed loop")
        figures["gateways"] = [
            cluster_leg(broker, work, count, tenants, spec) for count in GATEWAYS
        ]
    finally:
        broker.stop()
    echo_rate = figures["echo_closed"]["round_trips_per_s"] or 1
    for row in figures["gateways"]:
        row["ratio_to_echo"] = round((row["round_trips_per_s"] or 0) / echo_rate, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cluster.json").write_text(json.dumps(figures, indent=2) + "\n")
    plot(figures, out_dir / "cluster.png")
    shutil.rmtree(work, ignore_errors=True)
    return figures


def plot(figures: dict[str, Any], path: Path) -> None:
    """Round trips per second against the number of gateways, echo as a line."""
    import matplotlib  # noqa: PLC0415 - optional, for the benchmark only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = figures["gateways"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(
        [str(r["gateways"]) for r in rows],
        [r["round_trips_per_s"] or 0 for r in rows],
        color="tab:blue",
    )
    echo = figures["echo_closed"]["round_trips_per_s"] or 0
    ax.axhline(echo, color="grey", linestyle="--", label=f"bare echo {echo}/s")
    ax.set_xlabel("gateways on one PostgreSQL")
    ax.set_ylabel("hello round trips per second (closed loop)")
    ax.set_title("Several gateways, one broker, one PostgreSQL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_rows(figures: dict[str, Any]) -> list[str]:
    """Lines for ``summary.md``: one per leg."""
    echo = figures["echo_closed"]["round_trips_per_s"]
    lines = [
        "",
        "Several gateways on one PostgreSQL (closed loop, "
        f"{figures['routers']} routers, bare echo {echo}/s in the same run):",
        "",
        "| gateways | round trips/s | p99 ms | of echo |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['gateways']} | {r['round_trips_per_s']} | {r['latency_ms']['p99']} "
        f"| {r['ratio_to_echo']} |"
        for r in figures["gateways"]
    ]
    return lines


if __name__ == "__main__":
    run(Path("bench/results"), quick="--quick" in sys.argv)
