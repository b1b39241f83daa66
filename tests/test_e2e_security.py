"""Attacks through the real broker, with the repository's configuration, fail.

Each test is one router (or tenant, or stranger) trying to affect another:
speaking for it, reading its replies, writing presence, taking over its
session, connecting without or with revoked credentials, flooding. Each
attempt is followed by a legitimate message from the same client: the
broker handles one client's packets in order, so once the legitimate one
has arrived, the forged one would have arrived before it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import gmqtt
import pytest

from gateway import protocol
from gateway.protocol import Decision
from tests.conftest import (
    BIN,
    GatewayProcess,
    PresenceWatch,
    mqtt_client,
    sim_router,
    started_gateway,
)
from tools import accounts, tls
from tools.broker import Broker
from tools.router import SimRouter

pytestmark = pytest.mark.broker

PREFIX = protocol.PREFIX


class Everything:
    """Every message on the broker, as the read-only operator account sees it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.seen: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()
        self._client: Any = None

    def _on_message(self, client: object, topic: str, payload: bytes, *r: Any) -> int:
        self.seen.append((topic, payload))
        self._changed.set()
        return 0

    async def __aenter__(self) -> Everything:
        self._client = await mqtt_client(self.broker)
        self._client.on_message = self._on_message
        self._client.subscribe(f"{PREFIX}/#", qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.disconnect()

    def topics(self) -> set[str]:
        return {topic for topic, _ in self.seen}

    def messages(self) -> set[tuple[str, str]]:
        return {(topic, payload.decode()) for topic, payload in self.seen}

    async def until_topic(self, topic: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while topic not in self.topics():
                self._changed.clear()
                await self._changed.wait()


OFFLINE = '{"v":1,"gateway":"gw1","state":"offline"}'


def hello_body(session: str = "forged") -> str:
    return json.dumps({"v": 1, "session": session, "ref": "forged"})


async def test_a_router_cannot_speak_for_another_router_or_tenant(
    broker: Broker, tmp_path: Path
) -> None:
    await started_gateway(broker, tmp_path, "acme", basic1=2)
    victim = sim_router(broker, "acme", "R02")
    await victim.connect()
    assert (await victim.ask())[0].decision == "accept"
    attacker = sim_router(broker, "acme", "R01")
    await attacker.connect()

    async with (
        Everything(broker) as everything,
        PresenceWatch(broker, "acme") as presence,
    ):
        goodbye = protocol.Goodbye(v=1, session=victim.session).model_dump_json()
        forged = {
            f"{PREFIX}/acme/R02/hello": hello_body(),
            f"{PREFIX}/acme/R02/goodbye": goodbye,
            f"{PREFIX}/acme/R02/heartbeat": goodbye,
            f"{PREFIX}/other/R01/hello": hello_body(),
            f"{PREFIX}/other/R01/goodbye": goodbye,
            f"{PREFIX}/acme/R01/reply": "{}",
            f"{PREFIX}/_gateway/gw1/status": OFFLINE,
        }
        for topic, payload in forged.items():
            attacker.publish_to(topic, payload)
        decision, _ = await attacker.ask()
        await everything.until_topic(f"{PREFIX}/acme/R01/hello")

    assert decision.decision == "accept"
    assert not set(forged.items()) & everything.messages()
    assert [p.state for p in presence.of("R02")] in ([], ["online"])
    assert (await victim.ask())[0].decision == "accept"


async def test_a_router_reads_only_its_own_replies(
    broker: Broker, tmp_path: Path
) -> None:
    await started_gateway(broker, tmp_path, "acme", basic1=3)
    heard: list[str] = []
    attacker = sim_router(
        broker, "acme", "R01", on_heard=lambda h: heard.append(h.decision.router)
    )
    await attacker.connect()
    for pattern in ("R02/reply", "+/reply", "#", "+/presence"):
        attacker.subscribe(f"{PREFIX}/acme/{pattern}")
    attacker.subscribe("#")
    victim = sim_router(broker, "acme", "R02")
    await victim.connect()
    assert (await victim.ask())[0].decision == "accept"

    await attacker.ask()

    assert set(heard) == {"R01"}


async def test_presence_is_written_only_by_the_gateway_and_read_by_its_tenant(
    broker: Broker, tmp_path: Path
) -> None:
    await started_gateway(broker, tmp_path, "acme", basic1=2)
    consumer_password = broker.account(accounts.tenant_account("acme"))
    stranger_password = broker.account(accounts.tenant_account("other"))
    broker.flush()
    attacker = sim_router(broker, "acme", "R01")
    await attacker.connect()
    fake = protocol.Presence(
        tenant="acme", router="R02", state="online", online=True, epoch=999,
        reason="hello", since="2026-01-01T00:00:00Z",
    ).model_dump_json()  # fmt: skip

    consumer = await mqtt_client(broker, ("acme", consumer_password))
    stranger = await mqtt_client(broker, ("other", stranger_password))
    got: dict[str, list[str]] = {"acme": [], "other": []}
    own_presence = asyncio.Event()

    def keep(name: str) -> Any:
        def on_message(client: object, topic: str, payload: bytes, *r: Any) -> int:
            got[name].append(topic)
            if name == "acme" and topic == f"{PREFIX}/acme/R01/presence":
                own_presence.set()
            return 0

        return on_message

    consumer.on_message, stranger.on_message = keep("acme"), keep("other")
    consumer.subscribe(f"{PREFIX}/acme/+/presence", qos=1)
    stranger.subscribe(f"{PREFIX}/acme/+/presence", qos=1)
    for topic in ("R02/presence", "R01/presence"):
        attacker.publish_to(f"{PREFIX}/acme/{topic}", fake, retain=True)
        consumer.publish(f"{PREFIX}/acme/{topic}", fake, qos=1, retain=True)
    async with PresenceWatch(broker, "acme") as watch:
        await attacker.ask()
        await watch.until(lambda w: bool(w.of("R01")))
    await asyncio.wait_for(own_presence.wait(), 10)
    await consumer.disconnect()
    await stranger.disconnect()

    assert all(p.epoch != 999 for p in watch.seen)
    assert got["other"] == []


async def test_no_connection_without_valid_credentials(broker: Broker) -> None:
    user = accounts.router_account("acme", "R01")
    password = broker.router_password("acme", "R01")
    broker.flush()
    logins = {broker.router_port: (user, password), broker.port: broker.gateway}
    for port, (name, secret) in logins.items():
        assert accounts.connack("127.0.0.1", port, name, secret) == 0
        assert accounts.connack("127.0.0.1", port, name, "wrong") == 5
        assert accounts.connack("127.0.0.1", port, "", "") == 5
        assert accounts.connack("127.0.0.1", port, "acme/R09", secret) == 5
    anonymous = sim_router(broker, "acme", "R01", username=None)
    with pytest.raises(gmqtt.mqtt.handler.MQTTConnectError):
        await anonymous.connect()


async def test_a_revoked_router_can_no_longer_connect(
    broker: Broker, tmp_path: Path
) -> None:
    """``irm-tool accounts revoke`` removes it and has the broker reload."""
    await started_gateway(broker, tmp_path, "acme", basic1=2)
    router = sim_router(broker, "acme", "R01")
    await router.connect()
    assert (await router.ask())[0].decision == "accept"
    await router.disconnect()
    user, password = accounts.router_account("acme", "R01"), router.password
    assert password is not None

    result = subprocess.run(
        [str(BIN / "irm-tool"), "accounts", "--password-file",
         str(broker.password_file), "--pid-file", str(broker.pid_file),
         "revoke", "--tenant", "acme", "R01"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    accounts.wait_for_reload(
        "127.0.0.1", broker.router_port, (user, password), accounts.CONNACK_REFUSED
    )

    again = sim_router(broker, "acme", "R01", username=user, password=password)
    with pytest.raises(gmqtt.mqtt.handler.MQTTConnectError):
        await again.connect()
    assert password not in result.stdout + result.stderr


async def test_rotating_a_password_retires_the_old_one(broker: Broker) -> None:
    tool = [
        str(BIN / "irm-tool"), "accounts", "--password-file",
        str(broker.password_file), "--pid-file", str(broker.pid_file), "--json",
    ]  # fmt: skip
    made = subprocess.run(
        [*tool, "add", "--tenant", "acme", "R07"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    old = json.loads(made.stdout)["added"][0]["password"]
    accounts.wait_for_reload("127.0.0.1", broker.router_port, ("acme/R07", old), 0)

    rotated = subprocess.run(
        [*tool, "rotate", "--tenant", "acme", "R07"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    new = json.loads(rotated.stdout)["rotated"][0]["password"]
    accounts.wait_for_reload("127.0.0.1", broker.router_port, ("acme/R07", new), 0)

    assert accounts.connack("127.0.0.1", broker.router_port, "acme/R07", old) == 5
    assert new not in broker.password_file.read_text()


async def test_another_routers_client_id_does_not_take_its_session(
    broker: Broker, tmp_path: Path
) -> None:
    """On the routers' listeners the client id is the account name."""
    await started_gateway(broker, tmp_path, "acme", basic1=2)
    victim = sim_router(broker, "acme", "R02")
    await victim.connect()
    assert (await victim.ask())[0].decision == "accept"
    async with PresenceWatch(broker, "acme") as presence:
        for client_id in ("acme/R02", "acme.R02"):
            attacker = sim_router(broker, "acme", "R01", client_id=client_id)
            await attacker.connect()
            await attacker.ask()
            await attacker.disconnect()
        decision, _ = await victim.ask()

    assert decision.decision == "accept"
    assert all(p.state == "online" for p in presence.of("R02"))


async def test_on_the_routers_listener_every_client_id_is_the_account_name(
    broker: Broker, tmp_path: Path
) -> None:
    """Every account logs in on both password listeners (one password file,
    mosquitto.conf says why); on the routers' one the broker replaces the
    client id by the account name, so no account takes over the gateway's
    session or a router's from there, whatever client id it gives."""
    _, gateway = await started_gateway(broker, tmp_path, "beta", basic1=2)
    victim = sim_router(broker, "beta", "R02")
    await victim.connect()
    assert (await victim.ask())[0].decision == "accept"
    logins = {
        **attacker_logins(broker), "gateway": broker.gateway, "operator": broker.admin
    }  # fmt: skip
    codes = {
        who: tuple(
            accounts.connack("127.0.0.1", port, *login)
            for port in (broker.port, broker.router_port)
        )
        for who, login in logins.items()
    }
    let_in = []

    async with (
        Everything(broker) as everything,
        PresenceWatch(broker, "beta") as presence,
    ):
        for client_id in (gateway_client_id(), "beta/R02", "beta.R02"):
            for who, login in logins.items():
                if await try_client_id(broker, client_id, login, broker.router_port):
                    let_in.append(who)
        decision, _ = await victim.ask()
        await everything.until_topic(victim.topic("hello"))

    assert codes == dict.fromkeys(logins, (0, 0))
    assert sorted(let_in) == sorted(list(logins) * 3)
    assert decision.decision == "accept"
    assert victim.topic("goodbye") not in everything.topics()
    assert [p.state for p in presence.of("R02")] in ([], ["online"])
    assert len(gateway_connects(gateway)) == 1


def attacker_logins(broker: Broker) -> dict[str, tuple[str, str]]:
    """A router of tenant acme and acme's consumers, known to the broker."""
    logins = {
        "router": (
            accounts.router_account("acme", "R01"),
            broker.router_password("acme", "R01"),
        ),
        "consumer": ("acme", broker.account(accounts.tenant_account("acme"))),
    }
    broker.flush()
    return logins


async def try_client_id(
    broker: Broker, client_id: str, login: tuple[str, str], port: int
) -> bool:
    """Connect with ``client_id`` and leave cleanly; whether the broker let us."""
    try:
        attacker = await mqtt_client(broker, login, port=port, client_id=client_id)
    except gmqtt.mqtt.handler.MQTTConnectError:
        return False
    await attacker.disconnect()
    return True


async def test_no_one_takes_another_tenants_or_the_gateways_session_by_client_id(
    broker: Broker, tmp_path: Path
) -> None:
    """Acme's router and consumers, on the routers' listeners (password and
    TLS), using beta's router's or the gateway's client id: both stay
    connected. (The service listener lets a client choose its client id:
    only the gateway's and operators' hosts may reach it.)"""
    _, gateway = await started_gateway(broker, tmp_path, "beta", basic1=2)
    victim = sim_router(broker, "beta", "R02")
    await victim.connect()
    assert (await victim.ask())[0].decision == "accept"
    logins = attacker_logins(broker)

    async with (
        Everything(broker) as everything,
        PresenceWatch(broker, "beta") as presence,
    ):
        for client_id in ("beta/R02", "beta.R02", gateway_client_id()):
            for login in logins.values():
                await try_client_id(broker, client_id, login, broker.router_port)
            over_tls = sim_router(broker, "acme", "R05", tls=True, client_id=client_id)
            await over_tls.connect()
            await over_tls.disconnect()
        decision, _ = await victim.ask()
        await everything.until_topic(victim.topic("hello"))

    assert decision.decision == "accept"
    assert victim.topic("goodbye") not in everything.topics()
    assert [p.state for p in presence.of("R02")] in ([], ["online"])
    assert len(gateway_connects(gateway)) == 1


async def test_the_gateways_session_survives_its_client_id_while_it_is_down(
    broker: Broker, tmp_path: Path
) -> None:
    """A hello sent while the gateway is down waits in its session, whatever
    client id routers and consumers give on the routers' listener."""
    _, gateway = await started_gateway(broker, tmp_path, "beta", basic1=2)
    router = sim_router(broker, "beta", "R02")
    await router.connect()
    logins = attacker_logins(broker)
    gateway.kill()

    for login in logins.values():
        await try_client_id(broker, gateway_client_id(), login, broker.router_port)
    router.hello()
    await gateway.start()
    decision = await router.next_decision()

    assert decision.decision == "accept"
    assert gateway_connects(gateway)[-1]["session_present"] is True


def gateway_client_id() -> str:
    """The client id of a gateway started with the default --gateway-id."""
    return "irm-gateway-gw1"


def gateway_connects(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [e for e in gateway.log_lines() if e.get("event") == "broker connected"]


async def test_a_response_topic_outside_the_reply_topic_is_not_written(
    broker: Broker, tmp_path: Path
) -> None:
    await started_gateway(broker, tmp_path, "acme", basic1=2)
    router = sim_router(broker, "acme", "R01")
    await router.connect()
    async with Everything(broker) as everything:
        router.publish_to(
            router.topic("hello"), hello_body(router.session),
            response_topic=router.topic("presence"), correlation_data=b"x",
        )  # fmt: skip
        decision = await router.next_decision()
        await everything.until_topic(router.topic("reply"))

    assert decision.decision == "accept"
    payloads = [p for t, p in everything.seen if t == router.topic("presence")]
    assert all(protocol.Presence.model_validate_json(p) for p in payloads)


async def test_routers_with_a_certificate_are_admitted_over_tls(
    broker: Broker, tmp_path: Path
) -> None:
    await started_gateway(broker, tmp_path, "acme", basic1=2)
    router = sim_router(broker, "acme", "R05", tls=True)
    await router.connect()
    async with Everything(broker) as everything:
        router.publish_to(f"{PREFIX}/acme/R06/hello", hello_body())
        decision, _ = await router.ask()
        await everything.until_topic(router.topic("hello"))

    assert (decision.decision, decision.router) == ("accept", "R05")
    assert f"{PREFIX}/acme/R06/hello" not in everything.topics()
    await router.disconnect()


async def test_tls_refuses_routers_without_a_certificate_of_its_ca(
    broker: Broker, tmp_path: Path
) -> None:
    stranger_ca = tls.make_ca(tmp_path / "stranger", "a stranger's CA")
    forged = tls.issue(stranger_ca, tmp_path / "stranger", "r", "acme/R01")
    contexts = {
        "own CA": broker.tls_context(broker.router_cert("acme", "R01")),
        "no certificate": broker.tls_context(None),
        "another CA": broker.tls_context(forged),
    }

    codes = {
        name: accounts.connack("127.0.0.1", broker.tls_port, "", "", tls=context)
        for name, context in contexts.items()
    }

    assert codes == {"own CA": 0, "no certificate": 5, "another CA": 5}


async def test_a_flooding_router_is_refused_and_the_others_are_answered(
    broker: Broker, tmp_path: Path
) -> None:
    _, gateway = await started_gateway(
        broker, tmp_path, "acme", options={"hello-burst": 5, "hello-rate": 1}, basic1=3
    )
    flooder = sim_router(broker, "acme", "R01")
    await flooder.connect()
    others = [sim_router(broker, "acme", f"R1{i}") for i in range(2)]
    for router in others:
        await router.connect()

    for _ in range(300):
        flooder.hello()
    answers = [(await r.ask())[0] for r in others]
    # The refusal leaves before the decider's answers to the first five.
    heard: Counter[str] = Counter()
    while heard["licensed"] < 5 or not heard["rate_limited"]:
        heard[(await flooder.next_decision(20)).reason] += 1
    later = await slowed_down_not_banned(flooder)

    assert [a.decision for a in answers] == ["accept", "accept"]
    assert heard == {"licensed": 5, "rate_limited": 1}
    assert later.reason == "licensed"
    assert gateway.alive()


async def test_a_flood_of_stale_heartbeats_is_answered_a_burst_not_one_each(
    broker: Broker, tmp_path: Path
) -> None:
    """Each stale heartbeat is answered, so a flood of them would cost the
    gateway a reply each and fill the router's reply queue in the broker."""
    _, gateway = await started_gateway(
        broker, tmp_path, "acme", options={"hello-burst": 5, "hello-rate": 1}, basic1=3
    )
    flooder = sim_router(broker, "acme", "R01")
    await flooder.connect()
    other = sim_router(broker, "acme", "R11")
    await other.connect()
    started = asyncio.get_running_loop().time()

    for _ in range(300):
        flooder.heartbeat()  # its session holds no place: stale
    answer, _ = await other.ask()
    ref = flooder.hello()  # a bucket of its own: decided after the flood
    stale = 0
    while (decision := await flooder.next_decision(20)).ref != ref:
        stale += decision.reason == "session_unknown"
    elapsed = asyncio.get_running_loop().time() - started

    assert answer.decision == "accept"
    assert decision.reason == "licensed"
    assert 5 <= stale <= 5 + math.ceil(elapsed)
    await gateway.until_logged("bad input", kind="stale_heartbeat")
    await gateway.until_logged("bad input", kind="rate_limited")


async def slowed_down_not_banned(router: SimRouter) -> Decision:
    """Once its bucket refills (a second here), a hello is answered again."""
    for _ in range(10):
        try:
            decision, _ = await router.ask(2.0)
        except TimeoutError:
            continue
        if decision.reason != "rate_limited":
            return decision
    raise AssertionError("the flooding router was never answered again")


async def test_the_gateway_logs_no_password(broker: Broker, tmp_path: Path) -> None:
    _, gateway = await started_gateway(broker, tmp_path, "acme", basic1=1)
    router = sim_router(broker, "acme", "R01")
    await router.connect()
    await router.ask()
    gateway.stop()

    assert broker.gateway[1] not in gateway.log.read_text()
    assert broker.gateway[1] not in " ".join(gateway.command())
    assert os.environ.get("IRM_BROKER_PASSWORD") != broker.gateway[1]


async def test_a_revoked_certificate_can_no_longer_connect(broker: Broker) -> None:
    """``irm-tool accounts cert revoke`` lists it as revoked, and the broker
    rereads the list when the tool reloads it."""
    context = broker.tls_context(broker.router_cert("acme", "R05"))
    other = broker.tls_context(broker.router_cert("acme", "R06"))
    assert accounts.connack("127.0.0.1", broker.tls_port, "", "", tls=context) == 0

    result = subprocess.run(
        [str(BIN / "irm-tool"), "accounts", "--pid-file", str(broker.pid_file),
         "cert", "--ca-dir", str(broker.tls_dir), "revoke", "--tenant", "acme", "R05"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    accounts.wait_for_reload(
        "127.0.0.1", broker.tls_port, ("", ""), accounts.CONNACK_REFUSED, tls=context
    )

    assert accounts.connack("127.0.0.1", broker.tls_port, "", "", tls=other) == 0
    assert "revoked 1 certificate(s) of acme/R05" in result.stdout


async def test_a_last_will_on_another_routers_topic_is_never_published(
    broker: Broker, tmp_path: Path
) -> None:
    """Mosquitto takes the connection but drops the will: it may not write there."""
    await started_gateway(broker, tmp_path, "acme", basic1=2)
    victim = sim_router(broker, "acme", "R02")
    await victim.connect()
    assert (await victim.ask())[0].decision == "accept"
    login = {
        "username": accounts.router_account("acme", "R01"),
        "password": broker.router_password("acme", "R01"),
    }
    broker.flush()
    # A router of R02's name and session, logged in as R01: its will is
    # R02's goodbye.
    forger = sim_router(broker, "acme", "R02", **login, session=victim.session)

    async with Everything(broker) as everything:
        await forger.connect()
        await forger.drop()
        # The broker publishes a will the moment it sees the connection
        # break, before it takes the next connection of the same account.
        attacker = sim_router(broker, "acme", "R01")
        await attacker.connect()
        await attacker.ask()
        await everything.until_topic(attacker.topic("hello"))

    assert victim.topic("goodbye") not in everything.topics()
    assert (await victim.ask())[0].decision == "accept"


def test_a_broker_started_again_on_an_earlier_runs_directory_admits_its_own(
    tmp_path: Path,
) -> None:
    """Each harness run makes new service passwords: its broker.env must work."""
    answers = []
    for _ in range(2):
        server = Broker(tmp_path / "broker")
        server.start()
        try:
            answers.append(accounts.connack("127.0.0.1", server.port, *server.gateway))
        finally:
            server.stop()

    assert answers == [accounts.CONNACK_ACCEPTED] * 2


async def test_a_router_rotated_or_revoked_while_connected_is_cut_off_at_the_reload(
    broker: Broker, tmp_path: Path
) -> None:
    """Mosquitto (2.0.11) checks connected clients against the password file
    it rereads: one whose password no longer matches is disconnected at once,
    without its last will, so its seat stays until its lease runs out; the
    others keep their connections."""
    await started_gateway(broker, tmp_path)
    tool = [
        str(BIN / "irm-tool"), "accounts", "--password-file",
        str(broker.password_file), "--pid-file", str(broker.pid_file), "--json",
    ]  # fmt: skip
    routers = {name: sim_router(broker, "T8", name) for name in ("R01", "R02", "R03")}
    for router in routers.values():
        await router.connect()
        assert (await router.ask())[0].decision == "accept"
    cut_off = {name: asyncio.Event() for name in ("R01", "R02")}
    for name, event in cut_off.items():
        routers[name]._client.on_disconnect = lambda *_, e=event: e.set()

    async with Everything(broker) as seen, PresenceWatch(broker, "T8") as presence:
        for action, name in (("rotate", "R01"), ("revoke", "R02")):
            subprocess.run(
                [*tool, action, "--tenant", "T8", name],
                capture_output=True, text=True, check=True, timeout=60,
            )  # fmt: skip
        async with asyncio.timeout(10):
            for event in cut_off.values():
                await event.wait()
        # Any will of theirs went out when they were cut off; R03's goodbye,
        # sent after, shows what the gateway made of it.
        routers["R03"].goodbye()
        await presence.until(lambda p: p.latest()["R03"].state == "offline")

    goodbyes = {t for t in seen.topics() if t.endswith("/goodbye")}
    assert goodbyes == {f"{PREFIX}/T8/R03/goodbye"}
    latest = presence.latest()
    assert (latest["R01"].state, latest["R02"].state) == ("online", "online")
    for router in routers.values():
        await router.disconnect()
