"""Readiness reads the store for real: a closed store is not ready."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway import web
from gateway.config import Settings
from gateway.service import Gateway
from policy.sqlite_store import SqliteStore


async def test_readiness_names_a_closed_store_and_an_absent_broker(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(tmp_path / "irm.db", create=True)
    gateway = Gateway(Settings(), store)
    gateway.ready.set()
    app = web.application(gateway)

    async with TestClient(TestServer(app)) as client:
        open_store = await (await client.get("/readyz")).json()
        await store.close()
        response = await client.get("/readyz")
        closed_store = await response.json()
        alive = await client.get("/healthz")

    assert open_store == {"ready": False, "reasons": ["broker not connected"]}
    assert response.status == 503
    assert closed_store["reasons"][0] == "broker not connected"
    assert closed_store["reasons"][1].startswith("store: ")
    assert alive.status == 200
