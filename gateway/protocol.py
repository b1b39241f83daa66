"""What crosses the wire between routers and the gateway, version 1.

Topics (``{prefix}`` defaults to ``irm/v1``)::

    {prefix}/{tenant}/{router}/hello       router -> gateway, QoS 1
    {prefix}/{tenant}/{router}/heartbeat   router -> gateway, QoS 1
    {prefix}/{tenant}/{router}/goodbye     router -> gateway, QoS 1; also
                                           the router's last will
    {prefix}/{tenant}/{router}/reply       gateway -> router, QoS 1
    {prefix}/{tenant}/{router}/presence    gateway, retained, QoS 1
    {prefix}/_gateway/{gateway}/status     gateway, retained, with a will

The topic names the speaker; a payload may repeat ``tenant`` and
``router`` and must then agree with the topic. Every payload is a UTF-8
JSON object with ``"v": 1``; unknown fields are ignored so that routers
and gateways can be upgraded one at a time. docs/protocol.md is the
prose version of this module, for firmware engineers.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
)
from pydantic_core import PydanticCustomError

from policy.admission import Cause, Reason, Verdict
from policy.errors import BadInput
from policy.licenses import Tier
from policy.timeutil import to_text

PREFIX = "irm/v1"
MAX_PAYLOAD = 4096
"""Hellos, heartbeats and goodbyes are a few hundred bytes; more is abuse."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Tenant and router ids: one topic level, no MQTT wildcards, 1 to 64."""
NAME = re.compile(NAME_PATTERN)

RESERVED_ROUTERS = frozenset({"reply"})
"""Ids no router may have: a tenant's consumers may read
``irm/v1/{tenant}/reply/#`` (mosquitto.acl's rule for a router's replies,
given the tenant's one-level account name), which would be every topic of
a router named ``reply``."""


def refuse_reserved(router: str) -> None:
    """Raise :class:`BadInput` for a router id in :data:`RESERVED_ROUTERS`."""
    if router in RESERVED_ROUTERS:
        raise BadInput(
            f"router {router!r} is reserved: its topics would be readable by "
            "the tenant's consumers; name the router otherwise"
        )


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""Unicode's control characters (C0, DEL and C1), which no session or ref
may hold: they would reach logs, replies and operators' terminals."""


def _printable(text: str) -> str:
    found = CONTROL.search(text)
    if found is not None:
        raise PydanticCustomError(
            "control_character",
            "must be printable: control character U+{code} at position {at}",
            {"code": f"{ord(found[0]):04X}", "at": found.start()},
        )
    return text


Printable = AfterValidator(_printable)


def _version_one(value: object) -> object:
    # Literal[1] takes true and 1.0 too, being equal to 1, strict or not.
    if type(value) is not int or value != 1:
        raise PydanticCustomError("version", "must be the integer 1")
    return value


VersionOne = Annotated[Literal[1], BeforeValidator(_version_one)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Session = Annotated[str, StringConstraints(min_length=1, max_length=64), Printable]
Ref = Annotated[str, StringConstraints(max_length=128), Printable]

Kind = Literal["hello", "heartbeat", "goodbye"]
INBOUND: tuple[Kind, ...] = ("hello", "heartbeat", "goodbye")


class _Message(BaseModel):
    """What a router sends. Strict: each field must have its JSON type (``v``
    the number 1, not ``true`` or ``1.0``; strings strings; ``will`` true or
    false), since a lenient reading would accept what firmware never meant."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    v: VersionOne
    tenant: Name | None = None
    router: Name | None = None
    session: Session


class Hello(_Message):
    """A router asks for a seat for the session it names."""

    ref: Ref | None = None
    firmware: Annotated[str, StringConstraints(max_length=64)] | None = None


class Heartbeat(_Message):
    """A router renews the lease of its current session."""


class Goodbye(_Message):
    """A router leaves; ``will`` is true in the copy set as its last will."""

    will: bool = False


INBOUND_MODELS: dict[str, type[_Message]] = {
    "hello": Hello,
    "heartbeat": Heartbeat,
    "goodbye": Goodbye,
}


class Decision(BaseModel):
    """The gateway's answer to a hello, or news about a router's seat."""

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    type: Literal["decision"] = "decision"
    tenant: str
    router: str
    session: str | None
    epoch: int
    decision: Literal["accept", "reject"]
    reason: Reason
    tier: Tier | None
    position: int | None = None
    lease_seconds: int | None = None
    cause: Cause
    ref: str | None = None
    detail: str | None = None
    at: str


class Presence(BaseModel):
    """A router's retained presence; ``epoch`` orders the sessions."""

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    tenant: str
    router: str
    state: Literal["online", "waiting", "offline"]
    online: bool
    epoch: int
    reason: str
    since: str


class GatewayStatus(BaseModel):
    """A gateway's retained status; its last will says ``offline``."""

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    gateway: str
    state: Literal["online", "offline"]
    since: str | None = None


class TenantState(BaseModel):
    """One tenant as a running gateway holds it now (``GET /status``)."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    tier: Tier | None
    capacity: int
    seats_used: int
    waiting: int
    capacity_alarm: bool
    next_license_event: str | None
    """The next instant a license of the tenant activates or expires."""


class GatewayState(BaseModel):
    """A running gateway's live state, served on its HTTP port at ``/status``.

    ``irm-tool status`` reads it; it is not part of the MQTT protocol.
    """

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    gateway: str
    at: str
    ready: bool
    broker_connected: bool
    tenants: list[TenantState]


def topic(prefix: str, tenant: str, router: str, kind: str) -> str:
    return f"{prefix}/{tenant}/{router}/{kind}"


def status_topic(prefix: str, gateway: str) -> str:
    return f"{prefix}/_gateway/{gateway}/status"


def split_topic(prefix: str, name: str) -> tuple[str, str, str] | None:
    """``(tenant, router, kind)`` of an inbound topic, or None if not ours."""
    head, _, rest = name.rpartition("/")
    parts = head[len(prefix) + 1 :].split("/") if head.startswith(prefix + "/") else []
    if len(parts) != 2 or rest not in INBOUND:
        return None
    tenant, router = parts
    if not (NAME.match(tenant) and NAME.match(router)) or router in RESERVED_ROUTERS:
        return None
    return tenant, router, rest


def whole_seconds(seconds: float) -> int:
    """A lease as told to a router: rounded up, never less than it has."""
    return math.ceil(seconds)


def decision(
    verdict: Verdict,
    cause: Cause,
    at: datetime,
    lease_seconds: float | None,
    ref: str | None = None,
) -> Decision:
    """The wire form of a verdict; ``lease_seconds`` is rounded up."""
    lease = None if lease_seconds is None else whole_seconds(lease_seconds)
    return Decision(
        tenant=verdict.tenant,
        router=verdict.router,
        session=verdict.session,
        epoch=verdict.epoch,
        decision="accept" if verdict.accepted else "reject",
        reason=verdict.reason,
        tier=verdict.tier,
        position=verdict.position,
        lease_seconds=lease if verdict.accepted or verdict.position else None,
        cause=cause,
        ref=ref,
        at=to_text(at) or "",
    )


def refusal(
    tenant: str,
    router: str,
    reason: Reason,
    at: datetime,
    ref: str | None = None,
    detail: str | None = None,
    cause: Cause = Cause.HELLO,
) -> Decision:
    """A reject that never reached the line: ``session`` null, ``epoch`` 0.

    Bad hellos and unknown tenants are refused with cause ``hello``; a
    heartbeat of a session that holds no place, with cause ``lease``.
    """
    return Decision(
        tenant=tenant,
        router=router,
        session=None,
        epoch=0,
        decision="reject",
        reason=reason,
        tier=None,
        cause=cause,
        ref=ref,
        detail=detail,
        at=to_text(at) or "",
    )
