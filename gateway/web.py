"""The gateway's HTTP port: /metrics, /healthz, /readyz and /status.

aiohttp serves them on the gateway's own event loop, so each answer reads
the live state between two steps of the decider (prometheus_client's own
server would run in a thread, beside a loop it cannot safely read).

- ``/healthz``: 200 while the process runs and its loop answers; a loop
  that is stuck does not answer at all, which the prober counts as a
  failure.
- ``/readyz``: 200 only when the state is loaded, the broker connected and
  the store answers a read; otherwise 503 with the reasons in JSON.
- ``/metrics``: Prometheus' text format (gateway/metrics.py).
- ``/status``: :class:`gateway.protocol.GatewayState` as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import protocol
from policy.errors import IrmError
from policy.licenses import next_change_after
from policy.timeutil import to_text

if TYPE_CHECKING:
    from gateway.service import Gateway

log = structlog.get_logger("gateway.web")

STORE_CHECK_SECONDS = 2.0
"""A store that takes longer than this to answer a read is not ready."""

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")


@contextlib.asynccontextmanager
async def serving(gateway: Gateway, host: str, port: int | None) -> AsyncIterator[None]:
    """Serve the endpoints on ``host:port`` while the block runs (no port: none)."""
    if port is None:
        yield
        return
    # Probes and scrapes every few seconds would drown the decisions.
    runner = web.AppRunner(application(gateway), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise IrmError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from exc
    log.info("http serving", url=f"http://{host}:{port}/")
    try:
        yield
    finally:
        await runner.cleanup()


def application(gateway: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    reasons = []
    if not gateway.ready.is_set():
        reasons.append("state not loaded and subscribed yet")
    if not gateway.broker_connected:
        reasons.append("broker not connected")
    problem = await _store_problem(gateway)
    if problem:
        reasons.append(f"store: {problem}")
    body = {"ready": not reasons, "reasons": reasons}
    return web.json_response(body, status=503 if reasons else 200)


async def _store_problem(gateway: Gateway) -> str | None:
    """Why the store cannot answer a read now, or None if it can."""
    try:
        await asyncio.wait_for(gateway.store.poll_version(), STORE_CHECK_SECONDS)
    except TimeoutError:
        return f"no answer within {STORE_CHECK_SECONDS} s"
    except Exception as exc:  # any failure means not ready
        return str(exc) or type(exc).__name__
    return None


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[GATEWAY].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def status(request: web.Request) -> web.Response:
    state = live_state(request.app[GATEWAY])
    return web.Response(text=state.model_dump_json(), content_type="application/json")


def live_state(gateway: Gateway) -> protocol.GatewayState:
    """Every tenant's seats, line and next license event, as held now."""
    now = gateway.clock()
    tenants = []
    alarms = gateway.metrics.alarms
    for tenant, line in sorted(gateway.admission.lines.items()):
        upcoming = next_change_after(gateway.admission.licenses.get(tenant, []), now)
        alarm = alarms.get(tenant)
        tenants.append(
            protocol.TenantState(
                tenant=tenant,
                tier=line.capacity.tier,
                capacity=line.capacity.seats,
                seats_used=line.seated,
                waiting=len(line) - line.seated,
                capacity_alarm=alarm.raised if alarm else False,
                next_license_event=to_text(upcoming),
            )
        )
    return protocol.GatewayState(
        gateway=gateway.settings.gateway_id,
        at=to_text(now) or "",
        ready=gateway.ready.is_set() and gateway.broker_connected,
        broker_connected=gateway.broker_connected,
        tenants=tenants,
    )
