"""The leader lock moves on when the leader's host dies or is cut off.

A leader killed outright closes its connection and PostgreSQL frees the
lock at once (tests/test_e2e_several_gateways.py). Here the leader reaches
PostgreSQL through a proxy on loopback that stops forwarding without
closing anything, as when the leader's host loses power or the network
between them fails: no FIN or RST reaches PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from gateway.cluster import ClusterGateway
from gateway.config import Settings
from policy.postgres_store import PostgresStore
from tests.seeding import seed_tenant


class _Cutoff:
    """Forwards TCP to PostgreSQL until :meth:`cut`, then swallows it all."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut_off = False
        self.pipes: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection(*self.target)
        self.writers += [client_out, server_out]
        for reader, writer in ((client_in, server_out), (server_in, client_out)):
            task = asyncio.create_task(self._pipe(reader, writer))
            self.pipes.add(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.cut_off:
                    continue  # swallowed: nothing forwarded, nothing closed
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        self.cut_off = True

    async def close(self) -> None:
        for task in self.pipes:
            task.cancel()
        for writer in self.writers:
            writer.transport.abort()
        self.server.close()


@pytest.fixture
async def cutoff(postgres_url: str) -> AsyncIterator[tuple[_Cutoff, str]]:
    parts = urlsplit(postgres_url)
    proxy = _Cutoff(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    netloc = f"{parts.username}@127.0.0.1:{port}"
    yield proxy, urlunsplit(parts._replace(netloc=netloc))
    await proxy.close()


async def _led(member: ClusterGateway, seconds: float) -> bool:
    """Whether ``member`` leads within ``seconds``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(member.is_leader.wait(), seconds)
    return member.is_leader.is_set()


async def _stops_leading(member: ClusterGateway, seconds: float) -> bool:
    """Whether ``member`` stops leading within ``seconds``, polled: an
    ``asyncio.Event`` can be awaited being set, not being cleared."""
    deadline = asyncio.get_running_loop().time() + seconds
    while member.is_leader.is_set():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_a_leader_cut_off_from_postgresql_hands_the_lead_over(
    postgres_url: str, cutoff: tuple[_Cutoff, str]
) -> None:
    await seed_tenant(postgres_url, "T8", basic1=1)
    proxy, via_proxy = cutoff
    stores: list[PostgresStore] = []
    stops = [asyncio.Event(), asyncio.Event()]
    leading: list[asyncio.Task[None]] = []
    try:
        members = []
        for name, url in (("a", via_proxy), ("b", postgres_url)):
            store = await PostgresStore.open(url)
            stores.append(store)
            member = ClusterGateway(Settings(store=url, gateway_id=name), store)
            await member._load()
            members.append(member)
        a, b = members
        leading.append(asyncio.create_task(a._lead(stops[0])))
        assert await _led(a, 10), "a never led"
        leading.append(asyncio.create_task(b._lead(stops[1])))

        proxy.cut()
        b_leads = await _led(b, 20)
        a_stopped = await _stops_leading(a, 5)
    finally:
        for stop in stops:
            stop.set()
        for task in leading:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        await proxy.close()
        for store in stores:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.close(), 5)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )

    assert b_leads, "b did not lead within 20 s of the leader being cut off"
    assert a_stopped, "the cut-off leader still believes it leads"
