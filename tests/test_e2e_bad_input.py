"""Thousands of bad messages through the broker change nothing and stop nothing.

The payloads are generated with hypothesis and are invalid by construction
(not by asking the gateway's own validator): wrong types, missing or extra
levels, unknown versions, oversized or non-JSON bodies, payloads that
contradict their topic, unknown tenants and stale sessions.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import mqtt_client, sim_router, started_gateway
from tools.broker import Broker

pytestmark = pytest.mark.broker

KINDS = ("hello", "heartbeat", "goodbye")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
NOT_A_SESSION = (
    st.none() | st.integers() | st.lists(st.text(), max_size=2) | st.just("")
    | st.sampled_from(["a\x00b", "\x1b[31m", "s\n", "\x7f", "s\x85"])
)  # fmt: skip
NOT_VERSION_ONE = (
    st.none() | st.integers().filter(lambda v: v != 1) | st.text(max_size=3)
    | st.sampled_from([True, 1.0, "1", [1]])
)  # fmt: skip
BAD_NAME = st.sampled_from(["T 8", "T8!", "-T8", "a" * 65, "T8/x", "ü"])


def _topic(tenant: str, router: str, kind: str) -> str:
    return f"irm/v1/{tenant}/{router}/{kind}"


BAD = st.one_of(
    # Not JSON, or not a JSON object.
    st.tuples(st.sampled_from(KINDS), st.binary(max_size=200)).map(
        lambda t: (_topic("T8", "R01", t[0]), b"\xff" + t[1])
    ),
    st.tuples(
        st.sampled_from(KINDS), JSON.filter(lambda j: not isinstance(j, dict))
    ).map(lambda t: (_topic("T8", "R02", t[0]), json.dumps(t[1]).encode())),
    # An object without a usable session, or of another version.
    st.tuples(st.sampled_from(KINDS), NOT_A_SESSION, JSON).map(
        lambda t: (
            _topic("T8", "R03", t[0]),
            json.dumps({"v": 1, "session": t[1], "extra": t[2]}).encode(),
        )
    ),
    st.tuples(st.sampled_from(KINDS), NOT_VERSION_ONE).map(
        lambda t: (
            _topic("T8", "R04", t[0]),
            json.dumps({"v": t[1], "session": "s"}).encode(),
        )
    ),
    # A payload that names another tenant or router than its topic.
    st.sampled_from(KINDS).map(
        lambda kind: (
            _topic("T8", "R05", kind),
            json.dumps({"v": 1, "session": "s", "router": "R06"}).encode(),
        )
    ),
    # Oversized.
    st.integers(4097, 9000).map(
        lambda n: (
            _topic("T8", "R07", "hello"),
            b'{"v":1,"session":"' + b"x" * n + b'"}',
        )
    ),
    # Topics that are not ours.
    st.tuples(BAD_NAME, st.sampled_from(KINDS)).map(
        lambda t: (_topic(t[0], "R08", t[1]), b'{"v":1,"session":"s"}')
    ),
    st.sampled_from(KINDS).map(
        lambda kind: (f"irm/v1/T8/R09/{kind}/extra", b'{"v":1,"session":"s"}')
    ),
    # Well formed, but for a tenant that does not exist, or a stale session.
    st.sampled_from(KINDS).map(
        lambda kind: (_topic("NOPE", "R10", kind), b'{"v":1,"session":"s"}')
    ),
    st.sampled_from(("heartbeat", "goodbye")).map(
        lambda kind: (
            _topic("T8", "R11", kind),
            b'{"v":1,"session":"never-said-hello"}',
        )
    ),
)


def generate(count: int) -> list[tuple[str, bytes]]:
    """Draw ``count`` bad messages with hypothesis."""
    drawn: list[tuple[str, bytes]] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(BAD)
    def draw(message: tuple[str, bytes]) -> None:
        drawn.append(message)

    draw()
    return drawn


def snapshot(database: Path) -> dict[str, list[Any]]:
    with sqlite3.connect(database) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("tenants", "licenses", "routers", "audit")
        }


async def test_thousands_of_bad_messages_change_nothing_and_a_good_hello_still_works(
    broker: Broker, tmp_path: Path
) -> None:
    database, gateway = await started_gateway(broker, tmp_path)
    seated = sim_router(broker, "T8", "R00")
    await seated.connect()
    await seated.ask()
    before = snapshot(database)

    messages = generate(3000)
    assert len(messages) >= 1000
    # The gateway's own account may write every topic: the worst a broker
    # rule could let through, so that all of it reaches the gateway.
    sender = await mqtt_client(broker, broker.gateway)
    for topic, payload in messages:
        sender.publish(topic, payload, qos=0)
    # The gateway receives one subscription's messages in order, so a reply
    # to a hello sent after them means every bad message was handled.
    control = sim_router(broker, "T8", "R99")
    await control.connect()
    decision, _ = await control.ask(30)
    await sender.disconnect()

    assert (decision.decision, decision.reason) == ("accept", "licensed")
    after = snapshot(database)
    assert after["tenants"] == before["tenants"]
    assert after["licenses"] == before["licenses"]
    assert [r for r in after["routers"] if r[1] != "R99"] == before["routers"]
    new_audit = after["audit"][len(before["audit"]) :]
    assert {row[4] for row in new_audit} == {"R99"}
    assert gateway.alive()

    kinds = {
        line.get("kind")
        for line in gateway.log_lines()
        if line.get("event") == "bad input"
    }
    assert {
        "malformed",
        "oversized",
        "topic",
        "topic_mismatch",
        "unknown_tenant",
    } <= kinds
    await seated.disconnect()
    await control.disconnect()
    assert gateway.stop() == 0


async def test_malformed_hello_is_answered_with_a_reason_naming_the_problem(
    broker: Broker, tmp_path: Path
) -> None:
    _, gateway = await started_gateway(broker, tmp_path)
    router = sim_router(broker, "T8", "R01")
    await router.connect()
    cases = [
        (b'{"v": 1, "ref": "r7"}', "malformed_hello", "session"),
        (b"not json", "malformed_hello", "json"),
        (
            b'{"v": true, "session": "s", "ref": "r7"}',
            "malformed_hello",
            "v: must be the integer 1",
        ),
        (b'{"v": 1.0, "session": "s"}', "malformed_hello", "v: must be the integer 1"),
        (
            b'{"v": 1, "session": "s\\u0000"}',
            "malformed_hello",
            "session: must be printable",
        ),
        (b'{"v": 1, "session": "s", "tenant": "T9"}', "topic_mismatch", "differs"),
    ]
    for payload, reason, words in cases:
        router.publish_raw("hello", payload)
        decision = await router.next_decision()
        assert (decision.decision, decision.reason) == ("reject", reason)
        assert words in (decision.detail or "").lower()
        assert decision.ref == ("r7" if b'"r7"' in payload else None)
    stranger = sim_router(broker, "NOPE", "R01")
    await stranger.connect()
    decision, _ = await stranger.ask()
    assert (decision.decision, decision.reason) == ("reject", "unknown_tenant")
    await router.disconnect()
    await stranger.disconnect()
    gateway.stop()


HELLO_ONLY = BAD.filter(lambda m: re.fullmatch(r"irm/v1/T8/R0[1-7]/hello", m[0]))
"""Bad hello payloads (the rest are bad for their topic, not their body)."""


async def test_a_routers_own_bad_hellos_are_each_refused_and_change_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    """The realistic attacker: a router's own account, on its own hello topic."""
    database, gateway = await started_gateway(broker, tmp_path)
    seated = sim_router(broker, "T8", "R00")
    await seated.connect()
    await seated.ask()
    before = snapshot(database)
    payloads = [payload for _, payload in _draw_hellos(200)]
    attacker = sim_router(broker, "T8", "R01")
    await attacker.connect()

    for payload in payloads:
        attacker.publish_raw("hello", payload)
    reasons = [(await attacker.next_decision(30)).reason for _ in payloads]

    assert set(reasons) <= {"malformed_hello", "topic_mismatch"}
    assert snapshot(database) == before
    assert (await seated.ask())[0].decision == "accept"
    assert gateway.alive()


def _draw_hellos(count: int) -> list[tuple[str, bytes]]:
    drawn: list[tuple[str, bytes]] = []

    @settings(
        max_examples=count, database=None, deadline=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(HELLO_ONLY)
    def draw(message: tuple[str, bytes]) -> None:
        drawn.append(message)

    draw()
    return drawn


DEEP_HELLO = (
    b'{"v":1,"ref":"deep","session":"s1","x":' + b"[" * 1900 + b"]" * 1900 + b"}"
)
"""Under the size limit, but nested deeper than any JSON reader recurses."""


async def test_a_deeply_nested_hello_is_refused_once_and_never_delivered_again(
    broker: Broker, tmp_path: Path
) -> None:
    assert len(DEEP_HELLO) < 4096
    _, gateway = await started_gateway(broker, tmp_path)
    router = sim_router(broker, "T8", "R01")
    await router.connect()

    router.publish_raw("hello", DEEP_HELLO)
    refused = await router.next_decision()
    assert (refused.decision, refused.reason) == ("reject", "malformed_hello")
    assert "json" in (refused.detail or "").lower()
    assert gateway.stop() == 0

    # Acknowledged: the gateway's persistent session has nothing to redeliver,
    # so the next answer the router hears is the one to its next hello.
    await gateway.start()
    ref = router.hello()
    answer = await router.next_decision()
    assert (answer.ref, answer.decision) == (ref, "accept")
    assert not [line for line in gateway.log_lines() if line["level"] == "error"]
    assert "[[[" not in gateway.log.read_text()
    await router.disconnect()
    assert gateway.stop() == 0
