"""irm-gateway's options in process, and the wire fields the review fixed.

Bad settings stop the gateway before it opens the store or the broker, so
none of these tests needs either.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner, Result
from structlog.testing import capture_logs

from gateway import protocol
from gateway.__main__ import cli
from gateway.config import Settings
from gateway.mqtt import Inbound, Redeliver
from gateway.service import Gateway, _Batch, _Item, _Reload
from policy.admission import Cause, LicenseChanged, Reason, Verdict
from policy.licenses import Kind, State, Tier
from policy.store import Store
from tests.conftest import BIN
from tests.seeding import mint

NOW = datetime(2026, 12, 3, 16, 38, 39, 412_000, tzinfo=UTC)
OPTIONS = (
    "broker_host", "broker_port", "broker_username", "broker_password",
    "database", "prefix", "gateway_id", "lease_seconds", "grace_seconds",
    "log_format", "log_level", "uvloop", "config", "http_host", "http_port",
    "hello_rate", "hello_burst",
)  # fmt: skip
# The tests must not pick up a setting from the shell.
CLEAN_ENV: dict[str, str | None] = {
    f"IRM_{name.upper()}": None for name in (*OPTIONS, *Settings.model_fields)
}


def gateway(*args: str, **env: str) -> Result:
    runner = CliRunner(env={**CLEAN_ENV, **env})
    return runner.invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("--lease-seconds", "inf", "a finite number from 1 to 86400"),
        ("--lease-seconds", "nan", "a finite number from 1 to 86400"),
        ("--lease-seconds", "0", "a finite number from 1 to 86400"),
        ("--lease-seconds", "1e300", "a finite number from 1 to 86400"),
        ("--grace-seconds", "inf", "a finite number from 1 to 3600"),
        ("--grace-seconds", "0", "a finite number from 1 to 3600"),
        ("--grace-seconds", "3601", "a finite number from 1 to 3600"),
        ("--broker-port", "0", "a whole number from 1 to 65535"),
        ("--broker-port", "65536", "a whole number from 1 to 65535"),
        ("--broker-port", "http", "a whole number from 1 to 65535"),
    ],
)
def test_a_bad_number_exits_2_naming_option_value_and_rule(
    option: str, value: str, rule: str
) -> None:
    result = gateway(option, value)

    assert result.exit_code == 2
    assert result.stderr == f"irm-gateway: {option} = {value}: must be {rule}\n"


@pytest.mark.parametrize("prefix", ["", "/irm/v1", "irm/v1/", "irm/+/v1", "irm/#", "/"])
def test_a_bad_prefix_exits_2_naming_option_and_value(prefix: str) -> None:
    result = gateway("--prefix", prefix)

    assert result.exit_code == 2
    shown = prefix or "''"
    assert result.stderr.startswith(f"irm-gateway: --prefix = {shown}:")
    assert "without + or #, not starting or ending with /" in result.stderr


def test_a_bad_value_from_the_environment_names_the_variable() -> None:
    result = gateway(IRM_LEASE_SECONDS="0.5")

    assert result.exit_code == 2
    assert result.stderr.startswith("irm-gateway: IRM_LEASE_SECONDS = 0.5: must be")


def test_every_bad_setting_is_reported_at_once() -> None:
    result = gateway("--broker-port", "0", "--grace-seconds", "nan")

    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 2


def test_help_lists_the_environment_variable_of_every_option() -> None:
    result = gateway("--help")

    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for name in OPTIONS:
        assert f"IRM_{name.upper()}" in text
    assert "--prefix" in text
    assert "default: irm/v1" in text


def test_prefix_and_numbers_reach_the_settings_as_typed() -> None:
    typed = {"prefix": "site-7/irm", "lease_seconds": "1.5", "broker_port": "1883"}
    settings = Settings.model_validate(typed)

    assert (settings.prefix, settings.lease_seconds, settings.broker_port) == (
        "site-7/irm",
        1.5,
        1883,
    )


def verdict(*, accepted: bool = True, position: int | None = None) -> Verdict:
    reason = Reason.LICENSED if accepted else Reason.CAPACITY_EXCEEDED
    return Verdict(
        "acme", "R09", "9f3a1c22b7e0", 3, accepted, reason, Tier.FULL, position
    )


@pytest.mark.parametrize(
    ("configured", "told"), [(90.0, 90), (1.5, 2), (0.5, 1), (90.000001, 91)]
)
def test_a_decision_rounds_the_lease_up_to_whole_seconds(
    configured: float, told: int
) -> None:
    reply = protocol.decision(verdict(), Cause.HELLO, NOW, configured)

    assert reply.lease_seconds == told


def test_a_waiting_router_is_told_its_lease_and_a_refused_one_is_not() -> None:
    waiting = protocol.decision(
        verdict(accepted=False, position=2), Cause.HELLO, NOW, 1.5
    )
    without_place = protocol.decision(verdict(accepted=False), Cause.HELLO, NOW, 1.5)

    assert waiting.lease_seconds == 2
    assert without_place.lease_seconds is None


def test_a_refusal_has_cause_hello_unless_told_otherwise() -> None:
    bad = protocol.refusal("acme", "R09", Reason.MALFORMED_HELLO, NOW, "a1", "v: ...")
    stale = protocol.refusal(
        "acme", "R09", Reason.SESSION_UNKNOWN, NOW, cause=Cause.LEASE
    )

    assert (bad.cause, bad.session, bad.epoch, bad.ref) == (Cause.HELLO, None, 0, "a1")
    assert (stale.cause, stale.session, stale.epoch) == (Cause.LEASE, None, 0)


class Decider:
    """The gateway's decider on one message, with no store or broker behind it.

    ``_decide_one`` only decides and queues the reply in the batch; storing
    and publishing happen later in ``_decide``, which these tests skip.
    """

    def __init__(self, lease_seconds: float = 90.0) -> None:
        settings = Settings(lease_seconds=lease_seconds)
        self.gateway = Gateway(settings, cast(Store, None), clock=lambda: NOW)
        self.gateway.admission.load_tenant("acme", [], {}, NOW)

    def reply_to(self, kind: str, message: Any) -> dict[str, Any]:
        topic = protocol.topic(protocol.PREFIX, "acme", "R09", kind)
        inbound = Inbound(topic, message.model_dump_json().encode())
        done = asyncio.get_running_loop().create_future()
        batch = _Batch()
        item = _Item(kind, "acme", "R09", message, inbound, done)
        self.gateway._decide_one(item, NOW, batch)
        [(reply_topic, payload, _)] = batch.replies
        assert reply_topic == protocol.topic(protocol.PREFIX, "acme", "R09", "reply")
        return cast(dict[str, Any], json.loads(payload))


async def test_a_heartbeat_of_a_session_with_no_place_gets_cause_lease() -> None:
    decider = Decider()

    reply = decider.reply_to("heartbeat", protocol.Heartbeat(v=1, session="gone"))

    assert reply["reason"] == "session_unknown"
    assert reply["cause"] == "lease"
    assert (reply["session"], reply["epoch"], reply["ref"]) == (None, 0, None)


async def test_the_gateway_tells_a_router_its_lease_rounded_up() -> None:
    decider = Decider(lease_seconds=1.5)

    reply = decider.reply_to("hello", protocol.Hello(v=1, session="s1", ref="a1"))

    assert reply["reason"] == "no_valid_license"
    assert reply["position"] == 1
    assert reply["lease_seconds"] == 2


class _Outbox:
    """Stands in for the gateway's MQTT connection: what it publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False,
        correlation: bytes | None = None,
    ) -> None:  # fmt: skip
        self.sent.append((topic, json.loads(payload)))


class _Store:
    async def apply(self, events: list[Any], now: datetime) -> None:
        return None


def _offline_gateway() -> tuple[Gateway, _Outbox]:
    """A gateway whose broker is an outbox and whose store stores nothing."""
    gateway = Gateway(Settings(), cast(Store, _Store()), clock=lambda: NOW)
    gateway.admission.load_tenant("acme", [], {}, NOW)
    outbox = _Outbox()
    gateway._mqtt = cast(Any, outbox)
    return gateway, outbox


async def _settled() -> None:
    """Let the tasks a handler started (a refusal's publish) run."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.parametrize("kind", ["hello", "heartbeat", "goodbye"])
async def test_a_message_whose_handling_raises_is_counted_refused_and_done(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway, outbox = _offline_gateway()

    def broken(inbound: Inbound) -> None:
        raise RuntimeError(f"cannot read {inbound.payload!r}")

    monkeypatch.setattr(gateway, "_parse", broken)
    topic = protocol.topic(protocol.PREFIX, "acme", "R09", kind)

    # Returning, rather than raising, is what acknowledges the message.
    with capture_logs() as logged:
        await gateway._on_message(Inbound(topic, b'{"v": 1, "session": "secret"}'))
        await _settled()

    assert gateway.bad_input["unhandled"] == 1
    [error] = [line for line in logged if line["log_level"] == "error"]
    assert (error["event"], error["topic"], error["error"]) == (
        "message handling failed",
        topic,
        "RuntimeError",
    )
    assert "secret" not in repr(logged)
    replies = [reply for _, reply in outbox.sent]
    if kind == "hello":
        assert [(r["decision"], r["reason"]) for r in replies] == [
            ("reject", "malformed_hello")
        ]
    else:
        assert replies == []


async def test_a_message_whose_decision_raises_leaves_the_rest_of_its_batch_decided(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, outbox = _offline_gateway()
    decide = gateway._decide_message

    def broken_on_heartbeats(item: _Item, now: datetime, batch: _Batch) -> None:
        if item.kind == "heartbeat":
            raise KeyError(item.router)
        decide(item, now, batch)

    monkeypatch.setattr(gateway, "_decide_message", broken_on_heartbeats)
    loop = asyncio.get_running_loop()
    items = []
    for kind, router, message in [
        ("hello", "R01", protocol.Hello(v=1, session="s1", ref="a")),
        ("heartbeat", "R02", protocol.Heartbeat(v=1, session="s2")),
        ("hello", "R03", protocol.Hello(v=1, session="s3", ref="c")),
    ]:
        topic = protocol.topic(protocol.PREFIX, "acme", router, kind)
        inbound = Inbound(topic, message.model_dump_json().encode())
        items.append(
            _Item(kind, "acme", router, message, inbound, loop.create_future())
        )

    await gateway._decide(list(items))
    await _settled()

    assert all(item.done.done() and item.done.exception() is None for item in items)
    assert gateway.bad_input["unhandled"] == 1
    answered = {r["ref"] for _, r in outbox.sent if r.get("type") == "decision"}
    assert answered == {"a", "c"}


async def test_a_decision_that_was_not_stored_leaves_the_message_unacknowledged() -> (
    None
):
    gateway, _ = _offline_gateway()
    topic = protocol.topic(protocol.PREFIX, "acme", "R09", "hello")
    inbound = Inbound(topic, b'{"v": 1, "session": "s1"}')

    handling = asyncio.ensure_future(gateway._on_message(inbound))
    item = await gateway._queue.get()
    assert isinstance(item, _Item)
    item.done.set_exception(OSError("disk full"))

    with pytest.raises(Redeliver):
        await handling


WRONG_INT = "must be the integer 1"
NOT_STR = "Input should be a valid string"
NOT_BOOL = "Input should be a valid boolean"
CONTROL = "must be printable: control character"


@pytest.mark.parametrize(
    ("kind", "payload", "detail"),
    [
        ("hello", b'{"v": true, "session": "s"}', f"v: {WRONG_INT}"),
        ("hello", b'{"v": 1.0, "session": "s"}', f"v: {WRONG_INT}"),
        ("hello", b'{"v": "1", "session": "s"}', f"v: {WRONG_INT}"),
        ("heartbeat", b'{"v": false, "session": "s"}', f"v: {WRONG_INT}"),
        ("goodbye", b'{"v": 1e0, "session": "s"}', f"v: {WRONG_INT}"),
        ("hello", b'{"v": 1, "session": 7}', f"session: {NOT_STR}"),
        ("hello", b'{"v": 1, "session": "s", "ref": 7}', f"ref: {NOT_STR}"),
        ("hello", b'{"v": 1, "session": "s", "firmware": 6.2}', f"firmware: {NOT_STR}"),
        ("hello", b'{"v": 1, "session": "s", "tenant": 8}', f"tenant: {NOT_STR}"),
        ("goodbye", b'{"v": 1, "session": "s", "will": "true"}', f"will: {NOT_BOOL}"),
        ("goodbye", b'{"v": 1, "session": "s", "will": 1}', f"will: {NOT_BOOL}"),
        (
            "hello",
            b'{"v": 1, "session": "a\\u0000b"}',
            f"session: {CONTROL} U+0000 at position 1",
        ),
        (
            "heartbeat",
            b'{"v": 1, "session": "\\u001b[2J"}',
            f"session: {CONTROL} U+001B at position 0",
        ),
        (
            "hello",
            b'{"v": 1, "session": "s\\n"}',
            f"session: {CONTROL} U+000A at position 1",
        ),
        (
            "hello",
            b'{"v": 1, "session": "s\\u007f"}',
            f"session: {CONTROL} U+007F at position 1",
        ),
        (
            "hello",
            b'{"v": 1, "ref": "r\\u0085", "session": "s"}',
            f"ref: {CONTROL} U+0085 at position 1",
        ),
    ],
)
def test_an_inbound_field_of_the_wrong_json_type_or_unprintable_is_refused_by_name(
    kind: str, payload: bytes, detail: str
) -> None:
    assert Gateway._validate(kind, payload) == (detail, None)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v": 1, "session": "9f3a1c22b7e0"}',
        b'{"v": 1, "session": "s p a c e", "ref": "caf\\u00e9 \\u2713"}',
        b'{"v": 1, "session": "s", "ref": "", "firmware": "icom-os 6.2"}',
        b'{"v": 1, "session": "s", "tenant": "acme", "router": "R09", "x": [1.0]}',
    ],
)
def test_a_hello_of_the_right_types_and_printable_strings_is_read(
    payload: bytes,
) -> None:
    problem, message = Gateway._validate("hello", payload)

    assert (problem, type(message)) == ("", protocol.Hello)
    assert message is not None
    assert message.v == 1


def test_a_database_that_cannot_be_opened_is_one_line_of_error_every_time(
    tmp_path: Path,
) -> None:
    """aiosqlite's thread used to outlive the loop now and then, and die with
    an "Event loop is closed" traceback after the error. Runs side by side,
    which slows the threads down, show it nearly every time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRM_")}
    command = [str(BIN / "irm-gateway"), "--database", str(tmp_path)]
    runs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(8)
    ]

    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1
        assert out == b""
        [line] = err.decode().splitlines()  # the log's one line, nothing after
        assert "cannot open database" in line


class _RecordingStore:
    """Stores nothing; remembers every batch of events, or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batches: list[list[Any]] = []

    async def apply(self, events: list[Any], now: datetime) -> None:
        if self.fail:
            raise OSError("disk full")
        self.batches.append(list(events))


def _hello_item(router: str, ref: str) -> _Item:
    message = protocol.Hello(v=1, session=f"s-{router}", ref=ref)
    topic = protocol.topic(protocol.PREFIX, "acme", router, "hello")
    inbound = Inbound(topic, message.model_dump_json().encode())
    future = asyncio.get_running_loop().create_future()
    return _Item("hello", "acme", router, message, inbound, future)


async def test_a_hello_decided_before_its_bookkeeping_failed_keeps_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the core decided is stored and is the answer: no refusal that
    contradicts the place the router now holds."""
    gateway, outbox = _offline_gateway()
    store = _RecordingStore()
    gateway.store = cast(Store, store)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(gateway, "_log_decision", broken)
    item = _hello_item("R01", "a")
    await gateway._decide([item])
    await _settled()

    replies = [r for _, r in outbox.sent if r.get("type") == "decision"]
    assert [(r["ref"], r["reason"]) for r in replies] == [("a", "no_valid_license")]
    assert store.batches
    assert store.batches[0]
    assert gateway.bad_input["unhandled"] == 1
    assert item.done.result() is None


async def test_a_failed_decision_is_refused_only_after_its_batch_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal waits for the batch's commit like any answer: if the commit
    fails, nothing was said, and the redelivered hello is decided afresh."""
    gateway, outbox = _offline_gateway()
    gateway.store = cast(Store, _RecordingStore(fail=True))

    def broken(item: _Item, now: datetime, batch: _Batch) -> None:
        raise KeyError(item.router)

    monkeypatch.setattr(gateway, "_decide_message", broken)
    item = _hello_item("R01", "a")
    with pytest.raises(OSError, match="disk full"):
        await gateway._decide([item])
    await _settled()

    assert [r for _, r in outbox.sent if r.get("type") == "decision"] == []
    assert isinstance(item.done.exception(), OSError)


async def test_a_cancelled_activation_never_fires_even_when_read_at_its_instant() -> (
    None
):
    """The tool's reload and the instant in one batch: the reload counts
    first, so the stale schedule never activates the license."""
    store = _RecordingStore()
    gateway = Gateway(Settings(), cast(Store, store), clock=lambda: NOW)
    license, _ = mint(Kind.BASIC_1, NOW - timedelta(days=1))
    license = replace(license, tenant="acme")
    scheduled = replace(license, activation_at=NOW - timedelta(microseconds=1))
    gateway.admission.load_tenant(
        "acme", [scheduled], {license.id: State.SCHEDULED}, NOW - timedelta(seconds=5)
    )
    gateway._mqtt = cast(Any, _Outbox())

    await gateway._decide([_Reload("acme", [license], {license.id: State.AVAILABLE})])

    changed = [
        e for batch in store.batches for e in batch if isinstance(e, LicenseChanged)
    ]
    assert [e for e in changed if e.after is State.ACTIVE] == []
    assert gateway.admission.lines["acme"] is not None
