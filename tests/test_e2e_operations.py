"""What an operator sees of a running gateway: metrics, readiness, logs, status.

The gateway runs as a process with its HTTP port on a free loopback port;
the fleet is ``irm-tool fleet``, as an operator would run it, and the
metrics it scrapes are checked against what the fleet was told.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BIN, GatewayProcess, started_gateway, tool
from tools.broker import Broker, free_port

pytestmark = pytest.mark.broker


def fleet(broker: Broker, tenant: str, count: int) -> dict[str, Any]:
    """Run ``irm-tool fleet`` (routers leave without a goodbye); its JSON."""
    result = subprocess.run(
        [
            str(BIN / "irm-tool"), "fleet", "--tenant", tenant,
            "--routers", str(count), "--port", str(broker.router_port),
            "--password-file", str(broker.password_file),
            "--pid-file", str(broker.pid_file), "--no-goodbye", "--json",
        ],
        capture_output=True, text=True, check=False, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("IRM_")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(page: dict[Any, float], name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def until_status(url: str, status: int, timeout: float = 30.0) -> str:
    """Poll ``url`` until it answers ``status``; its body then."""
    seen: object = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    code, body = await get(url)
                except aiohttp.ClientError as exc:
                    seen = exc
                else:
                    if code == status:
                        return body
                    seen = (code, body)
                await asyncio.sleep(0.1)
    except TimeoutError:
        pass
    raise AssertionError(f"{url} did not answer {status} in {timeout} s: {seen}")


async def operated_gateway(
    broker: Broker, tmp_path: Path, **options: Any
) -> tuple[Path, GatewayProcess, str]:
    port = free_port()
    database, gateway = await started_gateway(
        broker, tmp_path, options={"http-port": port, **options}
    )
    return database, gateway, f"http://127.0.0.1:{port}"


async def test_metrics_scraped_after_a_fleet_count_what_the_fleet_was_told(
    broker: Broker, tmp_path: Path
) -> None:
    _, _, url = await operated_gateway(broker, tmp_path)

    running = asyncio.ensure_future(asyncio.to_thread(fleet, broker, "T8", 10))
    during = []
    while not running.done():
        page = samples(await until_status(f"{url}/metrics", 200))
        during.append(value(page, "irm_messages_received_total", kind="hello"))
    seen = await running
    page = samples(await until_status(f"{url}/metrics", 200))

    assert during == sorted(during)
    assert all(count <= 10 for count in during)
    assert (len(seen["online"]), len(seen["offline"])) == (8, 2)
    assert value(page, "irm_messages_received_total", kind="hello") == 10
    hello = {"cause": "hello"}
    accepted = value(
        page, "irm_decisions_total", decision="accept", reason="licensed", **hello
    )
    rejected = value(
        page, "irm_decisions_total", decision="reject",
        reason="capacity_exceeded", **hello,
    )  # fmt: skip
    assert (accepted, rejected) == (len(seen["online"]), len(seen["offline"]))
    assert seen["reasons"] == {"licensed": 8, "capacity_exceeded": 2}
    assert value(page, "irm_decision_latency_seconds_count") == 10
    assert value(page, "irm_store_write_seconds_count") >= 1
    assert value(page, "irm_tenant_capacity", tenant="T8") == 8
    assert value(page, "irm_tenant_seats_used", tenant="T8") == 8
    assert value(page, "irm_tenant_waiting", tenant="T8") == 2
    assert value(page, "irm_broker_connected") == 1
    assert value(page, "irm_broker_reconnects_total") == 0


async def test_the_capacity_alarm_is_a_metric_and_a_warning_once_seats_run_out(
    broker: Broker, tmp_path: Path
) -> None:
    _, gateway, url = await operated_gateway(broker, tmp_path)

    fleet(broker, "T8", 9)

    async with asyncio.timeout(10):
        while True:
            page = samples(await until_status(f"{url}/metrics", 200))
            if value(page, "irm_tenant_capacity_alarm", tenant="T8") == 1:
                break
            await asyncio.sleep(0.1)
    raised = await gateway.until_logged("capacity alarm raised")
    assert len(raised) == 1
    assert raised[0]["level"] == "warning"
    assert (raised[0]["tenant"], raised[0]["capacity"]) == ("T8", 8)


async def test_bad_input_is_counted_by_kind(broker: Broker, tmp_path: Path) -> None:
    _, _, url = await operated_gateway(broker, tmp_path)

    fleet(broker, "nobody", 2)
    page = samples(await until_status(f"{url}/metrics", 200))

    assert value(page, "irm_bad_input_total", kind="unknown_tenant") == 2
    refused = {"decision": "reject", "reason": "unknown_tenant", "cause": "hello"}
    assert value(page, "irm_decisions_total", **refused) == 2


async def test_readiness_follows_the_broker_stopped_and_started(
    broker: Broker, tmp_path: Path
) -> None:
    _, gateway, url = await operated_gateway(broker, tmp_path)
    await until_status(f"{url}/readyz", 200)

    broker.stop()
    body = json.loads(await until_status(f"{url}/readyz", 503))
    alive, _ = await get(f"{url}/healthz")
    # The gateway says itself that it retries, and when it tries next.
    retries = await gateway.until_logged("broker unreachable", level="warning")
    broker.start()
    await until_status(f"{url}/readyz", 200)
    page = samples(await until_status(f"{url}/metrics", 200))

    assert body == {"ready": False, "reasons": ["broker not connected"]}
    assert alive == 200
    assert 0 < retries[0]["retry_in"] <= 10
    assert value(page, "irm_broker_reconnects_total") >= 1
    assert value(page, "irm_broker_connected") == 1


async def test_a_decision_is_one_json_line_with_its_fields_and_no_secret(
    broker: Broker, tmp_path: Path
) -> None:
    # The gateway's real account, given on the command line this time.
    secret = broker.gateway[1]
    options = {"broker-username": broker.gateway[0], "broker-password": secret}
    _, gateway, _ = await operated_gateway(
        broker, tmp_path, **options, **{"log-level": "debug"}
    )

    seen = fleet(broker, "T8", 10)
    await asyncio.to_thread(gateway.stop)

    raw = gateway.log.read_text()
    lines = [json.loads(line) for line in raw.splitlines()]
    decisions = [e for e in lines if e["event"] == "decision"]
    told = {e["router"]: e["decision"] for e in decisions if e["cause"] == "hello"}
    fleet_told = {r: d["decision"] for r, d in seen["routers"].items()}
    assert secret not in raw
    assert told == fleet_told
    for entry in decisions:
        assert entry["level"] == "info"
        assert entry["tenant"] == "T8"
        assert entry["reason"] in {"licensed", "capacity_exceeded"}
        assert isinstance(entry["latency_ms"], float | int)
        assert entry["latency_ms"] >= 0
        assert {"timestamp", "epoch", "position", "tier"} <= entry.keys()


async def test_status_shows_the_live_state_and_falls_back_to_the_database(
    broker: Broker, tmp_path: Path
) -> None:
    database, gateway, url = await operated_gateway(broker, tmp_path)
    fleet(broker, "T8", 10)

    live = tool(database, "status", "--gateway", url, "--json")
    live_table = tool(database, "status", "--gateway", url)
    await asyncio.to_thread(gateway.stop)
    stored = tool(database, "status", "--gateway", url, "--json")
    stored_table = tool(database, "status", "--gateway", url)

    assert live.returncode == 0, live.stderr
    [tenant] = json.loads(live.stdout)["tenants"]
    assert (tenant["capacity"], tenant["seats_used"], tenant["waiting"]) == (8, 8, 2)
    assert json.loads(live.stdout)["source"] == "gateway"
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["source"] == "database"
    [kept] = json.loads(stored.stdout)["tenants"]
    assert (kept["capacity"], kept["seats_used"], kept["waiting"]) == (8, 8, 2)
    assert "no gateway answered" in stored.stderr
    for table in (live_table, stored_table):
        row = next(line for line in table.stdout.splitlines() if "T8" in line)
        assert row.split() == ["T8", "8", "full", "8", "2", *row.split()[5:]]
    assert "live state of gateway gw1" in live_table.stdout
    assert "stored state" in stored_table.stdout
