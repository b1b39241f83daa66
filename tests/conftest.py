"""Fixtures for tests that run against a real Mosquitto and real processes.

The broker is started from the repository's ``mosquitto.conf`` on a free
loopback port (tools/broker.py); the gateway and the tool run as the
commands an operator and an admin would type.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gmqtt
import pytest
from hypothesis import settings

from gateway import protocol
from tests.seeding import seed_tenant
from tools.accounts import SERVICE_ACCOUNTS, router_account
from tools.broker import Broker
from tools.router import SimRouter

BIN = Path(sys.executable).parent

pytest_plugins = ["tests.postgres"]

# Property tests assert behaviour, not speed: on a busy machine one example
# can take longer than Hypothesis's default 200 ms deadline, which it would
# report as a failure (or as flaky). Speed is the benchmarks' business.
settings.register_profile("irm", deadline=None)
settings.load_profile("irm")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of our configuration on a free port, stopped afterwards."""
    server = Broker(tmp_path / "broker")
    server.start()
    yield server
    server.stop()


def sim_router(broker: Broker, tenant: str, router: str, **options: Any) -> SimRouter:
    """A simulated router of ``tenant`` that will connect to ``broker``.

    It logs in on the routers' password listener with its own account,
    made here as ``irm-tool accounts`` makes it; the broker learns the
    accounts made so far when the first of them connects
    (:func:`flush_accounts`). ``tls=True``
    makes it connect to the TLS listener with a client certificate
    instead. Given ``username`` (and ``password``), it uses those as is.
    """
    if options.pop("tls", False):
        context = broker.tls_context(broker.router_cert(tenant, router))
        return SimRouter(
            "127.0.0.1", broker.tls_port, tenant, router, ssl=context, **options
        )
    if "username" not in options:
        options["username"] = router_account(tenant, router)
        options["password"] = broker.router_password(tenant, router)
        options.setdefault("before_connect", lambda: flush_accounts(broker))
    return SimRouter("127.0.0.1", broker.router_port, tenant, router, **options)


def flush_accounts(broker: Broker, timeout: float = 20.0) -> None:
    """``broker.flush()``, once the running gateways are back after a restart.

    The flush reloads the broker. A reload after the broker restarted, but
    before a persistent session it restored has its client back, makes
    Mosquitto forget what that session may read: the gateway's hellos are
    dropped until it reconnects (docs/operating.md; upstream issues #1521,
    #2934). An operator does not add accounts in that moment; the harness,
    which makes a router's account as the router first connects, would, so
    it waits for the gateways it started on this broker first.
    """
    if broker.starts > 1 and broker.started_at is not None:
        since = broker.started_at
        deadline = time.monotonic() + timeout
        for gateway in _started:
            if gateway.broker is not broker:
                continue
            while gateway.alive() and not gateway.connected_since(since):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the gateway did not reconnect to the restarted broker "
                        f"within {timeout} s: {gateway.log}"
                    )
                time.sleep(0.02)  # a child's log: nothing to await here
    broker.flush()


async def mqtt_client(
    broker: Broker, account: tuple[str, str] | None = None, *,
    port: int | None = None, client_id: str | None = None,
) -> Any:  # fmt: skip
    """A connected gmqtt client as ``account``, on the listener it may use.

    Default: the operator's read-only account, as every watcher here uses.
    The service accounts log in on the service listener, a tenant's
    consumers on the routers' password listener; ``port`` and
    ``client_id`` override the listener and the (random) client id.
    """
    user, password = account or broker.admin
    if port is None:
        port = broker.port if user in SERVICE_ACCOUNTS else broker.router_port
    client = gmqtt.Client(client_id)
    client.set_auth_credentials(user, password)
    await client.connect("127.0.0.1", port)
    return client


def tool(
    database: Path, *args: str, now: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``irm-tool`` as an admin would; never raises on a non-zero exit."""
    command = [str(BIN / "irm-tool"), "--database", str(database)]
    if now is not None:
        command += ["--now", now]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRM_")}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )


def tool_json(database: Path, *args: str, now: str | None = None) -> Any:
    result = tool(database, *args, "--json", now=now)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


_started: list[GatewayProcess] = []


@pytest.fixture(autouse=True)
def _no_gateway_outlives_its_test() -> Iterator[None]:
    """Kill every gateway a test started, whether it passed or failed."""
    yield
    while _started:
        gateway = _started.pop()
        if gateway.alive():
            gateway.kill()


class GatewayProcess:
    """``irm-gateway`` as a child process, started, stopped or killed at will."""

    def __init__(self, broker: Broker, database: Path, log: Path, **options: Any):
        self.broker = broker
        self.database = database
        self.log = log
        # Tests say hello again and again from one router to measure or to
        # provoke; flood control is tested on its own, with its own limits.
        self.options = {
            "lease-seconds": 60, "grace-seconds": 2,
            "hello-burst": 10_000, "hello-rate": 1_000, **options,
        }  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        _started.append(self)

    def command(self) -> list[str]:
        command = [
            str(BIN / "irm-gateway"),
            "--broker-port", str(self.broker.port),
            "--database", str(self.database),
            "--log-format", "json",
            "--broker-username", self.broker.gateway[0],
        ]  # fmt: skip
        for key, value in self.options.items():
            command += [f"--{key}", str(value)]
        return command

    def spawn(self) -> None:
        """Start the process and return at once."""
        # The password goes in the environment, where ``ps`` does not show it.
        env = {**os.environ, "IRM_BROKER_PASSWORD": self.broker.gateway[1]}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=env
            )

    async def start(self, timeout: float = 20.0) -> None:
        """Start, and return once its retained status says it came online."""
        started = datetime.now(UTC)
        self.spawn()
        await wait_gateway_online(self.broker, started, timeout, self)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as systemd would; returns the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def connected_since(self, since: datetime) -> bool:
        """Whether the gateway logged a connection to the broker at or after
        ``since``."""
        return any(
            datetime.fromisoformat(e["timestamp"]) >= since
            for e in self.log_lines()
            if e.get("event") == "broker connected"
        )

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    async def until_logged(
        self, event: str, count: int = 1, timeout: float = 10.0, **fields: Any
    ) -> list[dict[str, Any]]:
        """The lines logging ``event`` (with ``fields``), once there are
        ``count`` of them.

        The log is a file the gateway writes after it acts (a mail is
        accepted before "reminder sent" is written), so it is polled.
        """
        wanted = {"event": event, **fields}
        async with asyncio.timeout(timeout):
            while True:
                found = [
                    e for e in self.log_lines()
                    if all(e.get(k) == v for k, v in wanted.items())
                ]  # fmt: skip
                if len(found) >= count:
                    return found
                await asyncio.sleep(0.05)  # a file: nothing to await


async def wait_gateway_online(
    broker: Broker,
    since: datetime,
    timeout: float,
    process: GatewayProcess | None = None,
) -> None:
    """Wait for a retained ``online`` status stamped at or after ``since``."""
    online = asyncio.Event()

    def on_message(client: object, topic: str, payload: bytes, *rest: object) -> int:
        status = protocol.GatewayStatus.model_validate_json(payload)
        stamp = datetime.fromisoformat(status.since or "1970-01-01T00:00:00Z")
        if status.state == "online" and stamp >= since:
            online.set()
        return 0

    client = gmqtt.Client(None)
    client.on_message = on_message
    client.set_auth_credentials(*broker.admin)
    await client.connect("127.0.0.1", broker.port)
    client.subscribe(protocol.status_topic(protocol.PREFIX, "+"), qos=1)
    try:
        async with asyncio.timeout(timeout):
            while not online.is_set():
                if process is not None and not process.alive():
                    raise RuntimeError(f"gateway exited:\n{process.log.read_text()}")
                try:
                    await asyncio.wait_for(online.wait(), 0.2)
                except TimeoutError:
                    continue
    finally:
        await client.disconnect()


async def started_gateway(
    broker: Broker,
    tmp_path: Path,
    tenant: str = "T8",
    options: dict[str, Any] | None = None,
    **seats: int,
) -> tuple[Path, GatewayProcess]:
    """A tenant with ``seats`` (default 8 Cloud Basic 1) and a gateway, online."""
    database = tmp_path / "irm.db"
    await seed_tenant(database, tenant, **(seats or {"basic1": 8}))
    gateway = GatewayProcess(broker, database, tmp_path / "gw.log", **(options or {}))
    await gateway.start()
    return database, gateway


@pytest.fixture
async def gateway_process(
    broker: Broker, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """An ``irm-gateway`` process on ``broker`` with ``tmp_path/irm.db``."""
    process = GatewayProcess(broker, tmp_path / "irm.db", tmp_path / "gateway.log")
    yield process
    if process.alive():
        process.kill()


class PresenceWatch:
    """Every presence message of one tenant, in the order the broker sent them."""

    def __init__(self, broker: Broker, tenant: str) -> None:
        self.broker = broker
        self.tenant = tenant
        self.seen: list[protocol.Presence] = []
        self._client = gmqtt.Client(None)
        self._client.on_message = self._on_message
        self._changed = asyncio.Event()

    def _on_message(
        self, client: object, topic: str, payload: bytes, *rest: object
    ) -> int:
        self.seen.append(protocol.Presence.model_validate_json(payload))
        self._changed.set()
        return 0

    async def __aenter__(self) -> PresenceWatch:
        self._client.set_auth_credentials(*self.broker.admin)
        await self._client.connect("127.0.0.1", self.broker.port)
        self._client.subscribe(f"{protocol.PREFIX}/{self.tenant}/+/presence", qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.disconnect()

    def of(self, router: str) -> list[protocol.Presence]:
        return [p for p in self.seen if p.router == router]

    def latest(self) -> dict[str, protocol.Presence]:
        return {p.router: p for p in self.seen}

    async def until(self, check: Any, timeout: float = 15.0) -> None:
        """Wait until ``check(self)`` holds, or fail after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not check(self):
                self._changed.clear()
                await self._changed.wait()


class TopicWatch:
    """Goodbyes (and wills) published on one topic, awaited one by one."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        self._queue: asyncio.Queue[protocol.Goodbye] = asyncio.Queue()
        self._client = gmqtt.Client(None)
        self._client.on_message = self._on_message

    def _on_message(
        self, client: object, topic: str, payload: bytes, *rest: object
    ) -> int:
        self._queue.put_nowait(protocol.Goodbye.model_validate_json(payload))
        return 0

    async def __aenter__(self) -> TopicWatch:
        self._client.set_auth_credentials(*self.broker.admin)
        await self._client.connect("127.0.0.1", self.broker.port)
        self._client.subscribe(self.topic, qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.disconnect()

    async def next(self, timeout: float = 10.0) -> protocol.Goodbye:
        return await asyncio.wait_for(self._queue.get(), timeout)


class StatusWatch:
    """The gateway's retained status messages, awaited one by one."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._queue: asyncio.Queue[protocol.GatewayStatus] = asyncio.Queue()
        self._client = gmqtt.Client(None)
        self._client.on_message = self._on_message

    def _on_message(
        self, client: object, topic: str, payload: bytes, qos: int, props: Any
    ) -> int:
        if not props.get("retain"):
            self._queue.put_nowait(protocol.GatewayStatus.model_validate_json(payload))
        return 0

    async def __aenter__(self) -> StatusWatch:
        self._client.set_auth_credentials(*self.broker.admin)
        await self._client.connect("127.0.0.1", self.broker.port)
        self._client.subscribe(protocol.status_topic(protocol.PREFIX, "+"), qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.disconnect()

    async def next(self, timeout: float = 10.0) -> protocol.GatewayStatus:
        """The next live (not retained-on-subscribe) status."""
        return await asyncio.wait_for(self._queue.get(), timeout)
