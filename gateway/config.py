"""The gateway's settings, validated once at start.

Where a value comes from, highest first: a command-line option, an
``IRM_*`` environment variable, the TOML file (``--config PATH`` or
``IRM_CONFIG``), the default here. The model stays flat, one field per
key, so a new setting is one line; a constrained one states its rule in
``description``, in the words an operator reads when a value breaks it
(:func:`load` and gateway/__main__.py).

A variable ``IRM_*`` that nothing reads is warned of (:func:`stray_variables`),
not refused: it may be a tool's.

A field typed ``SecretStr``, or whose name holds ``password``, ``secret``
or ``token``, is masked wherever the settings are shown (:func:`shown`).
"""

from __future__ import annotations

import difflib
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from gateway.mail import SENDER_PATTERN, SENDER_RULE
from gateway.protocol import NAME_PATTERN, PREFIX

ENV_PREFIX = "IRM_"
PREFIX_PATTERN = r"^[^/+#]([^+#]*[^/+#])?$"
"""Topic levels with no MQTT wildcard, not starting or ending with ``/``."""

GATEWAY_VARIABLES = frozenset({f"{ENV_PREFIX}CONFIG", f"{ENV_PREFIX}UVLOOP"})
"""The gateway's own variables that are not settings (its --config, --uvloop)."""

OTHER_VARIABLES = frozenset(
    {
        # irm-tool's root options (tools/cli.py) and commands
        "IRM_NOW",
        "IRM_VENDOR_PUBLIC_KEY",
        "IRM_VENDOR_PRIVATE_KEY",
        "IRM_GATEWAY_URL",
        "IRM_ROUTER_CA_DIR",
        "IRM_BROKER_PASSWORD_FILE",
        "IRM_BROKER_PID_FILE",
        # written to broker/broker.env by tools/broker.py, read by demos
        "IRM_ROUTER_PORT",
        "IRM_TLS_PORT",
        "IRM_ADMIN_USERNAME",
        "IRM_ADMIN_PASSWORD",
        # the tests' and the benchmarks' PostgreSQL servers
        "IRM_TEST_POSTGRES",
        "IRM_BENCH_POSTGRES",
    }
)
"""``IRM_*`` variables that belong to irm-tool, the demo broker, the tests or
the benchmarks: the gateway ignores them without a warning. (irm-tool's
IRM_DATABASE, IRM_STORE, IRM_BROKER_* and IRM_SMTP_* are settings too.)"""

MASK = "********"
SECRET_WORDS = ("password", "secret", "token")
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@]*):[^@/]*@")
"""``scheme://user:password@host``: the password of a URL, e.g. a database's."""


class Settings(BaseSettings):
    """Everything an operator can set; defaults suit one gateway on one host."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX
    )

    broker_host: str = "127.0.0.1"
    broker_port: int = Field(
        18830, ge=1, le=65535, description="a whole number from 1 to 65535"
    )
    broker_username: str | None = None
    broker_password: str | None = None
    database: Path = Path("irm.db")
    store: str | None = Field(
        None,
        pattern=r"^postgres(ql)?://",
        description="a postgresql:// URL (leave it unset for the SQLite database)",
    )
    share_group: str = Field(
        "irm-gateways",
        pattern=NAME_PATTERN,
        description="1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit",
    )
    prefix: str = Field(
        PREFIX,
        pattern=PREFIX_PATTERN,
        description="a topic prefix without + or #, not starting or ending with /",
    )
    gateway_id: str = Field(
        "gw1",
        pattern=NAME_PATTERN,
        description="1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit",
    )
    lease_seconds: float = Field(
        90.0,
        ge=1,
        le=86_400,
        allow_inf_nan=False,
        description="a finite number from 1 to 86400",
    )
    # Not 0: a router's last will often reaches the gateway just before its
    # new session's hello, and with no grace the will would end its place
    # first (it would lose its seat and join at the back of the line).
    grace_seconds: float = Field(
        10.0,
        ge=1,
        le=3_600,
        allow_inf_nan=False,
        description="a finite number from 1 to 3600",
    )
    hello_rate: float = Field(
        1.0, gt=0, le=1_000_000, allow_inf_nan=False,
        description="a finite number over 0 and up to 1000000",
    )  # fmt: skip
    hello_burst: int = Field(
        10, ge=1, le=1_000_000, description="a whole number from 1 to 1000000"
    )
    batch_max: int = Field(2000, ge=1, description="a whole number from 1 up")
    receive_maximum: int = Field(
        2000, ge=1, le=65535, description="a whole number from 1 to 65535"
    )
    publish_window: int = Field(
        2000, ge=1, le=65000, description="a whole number from 1 to 65000"
    )
    poll_seconds: float = Field(
        0.25, gt=0, le=1.0, description="a number over 0, at most 1"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="one of auto, json, console"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="one of debug, info, warning, error"
    )
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="a whole number from 1 to 65535 (or unset: no HTTP server)",
    )
    alarm_on_percent: float = Field(
        90.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="a number over 0, at most 100",
    )
    alarm_off_percent: float = Field(
        85.0,
        ge=0,
        lt=100,
        allow_inf_nan=False,
        description="a number from 0 to below alarm_on_percent",
    )

    # Expiry reminders by e-mail (gateway/reminders.py): off without a host.
    smtp_host: str | None = None
    smtp_port: int = Field(
        587, ge=1, le=65535, description="a whole number from 1 to 65535"
    )
    smtp_tls: Literal["starttls", "implicit", "none"] = Field(
        "starttls", description="one of starttls, implicit, none"
    )
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = Field(
        "irm-gateway@localhost",
        pattern=SENDER_PATTERN,
        description=SENDER_RULE,
    )
    smtp_check_seconds: float = Field(
        60.0,
        ge=1,
        le=86_400,
        allow_inf_nan=False,
        description="a finite number from 1 to 86400",
    )

    @field_validator("alarm_off_percent")
    @classmethod
    def _below_on(cls, value: float, info: ValidationInfo) -> float:
        # Hysteresis: an alarm that clears where it is raised would flap.
        on = info.data.get("alarm_on_percent")
        if on is not None and value >= on:
            raise ValueError(f"must be below alarm_on_percent ({on})")
        return value

    @property
    def client_id(self) -> str:
        return f"irm-gateway-{self.gateway_id}"


# -- loading -------------------------------------------------------------------


class ConfigError(Exception):
    """The operator's settings are wrong; ``problems`` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Layer:
    """The values one source gave, and how an operator names that source."""

    source: Literal["option", "env", "file"]
    values: Mapping[str, Any]
    path: Path | None = None

    def where(self, key: str) -> str:
        if self.source == "option":
            return f"--{key.replace('_', '-')}"
        if self.source == "env":
            return f"{ENV_PREFIX}{key.upper()}"
        return f"{self.path}: {key}"


@dataclass(frozen=True, slots=True)
class Loaded:
    """The settings, and for each key the source that set it."""

    settings: Settings
    origins: dict[str, str]


def load(options: Mapping[str, Any], config: Path | None = None) -> Loaded:
    """Settings from ``options`` over the environment over ``config``.

    Raises :class:`ConfigError` naming every bad key, its source and its
    rule, so that an operator fixes them all in one go.
    """
    layers = [Layer("option", options), Layer("env", EnvSettingsSource(Settings)())]
    if config is not None:
        layers.append(Layer("file", read_toml(config), config))
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged.update(layer.values)
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        raise ConfigError([_explain(e, layers) for e in exc.errors()]) from exc
    origins = {key: _origin(key, layers) for key in Settings.model_fields}
    return Loaded(settings, origins)


def read_toml(path: Path) -> dict[str, Any]:
    """The file's top-level keys; a missing or broken file is the operator's."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


def _origin(key: str, layers: list[Layer]) -> str:
    for layer in layers:
        if key in layer.values:
            return layer.where(key)
    return "default"


def _explain(error: ErrorDetails, layers: list[Layer]) -> str:
    """``<where> = <value>: must be <rule>``, where names the source."""
    key = str(error["loc"][0]) if error["loc"] else "settings"
    where = _origin(key, layers)
    if where == "default":
        # Only a rule between two keys breaks a default: name the key, which
        # the operator may never have typed.
        where = f"default {key}"
    if error["type"] == "extra_forbidden":
        return f"{where} = {_typed(error['input'])}: {_unknown(key)}"
    field = Settings.model_fields.get(key)
    rule = f"must be {field.description}" if field and field.description else None
    if error["type"] == "value_error":
        rule = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    return f"{where} = {_typed(error['input'])}: {rule or error['msg']}"


def _unknown(key: str) -> str:
    near = difflib.get_close_matches(key, list(Settings.model_fields), n=1)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"unknown key{hint} ('irm-gateway check-config' lists them all)"


def _typed(value: object) -> str:
    """The value as typed; quoted when blank space would hide it."""
    text = str(value)
    return text if text and text.strip() == text else repr(text)


def known_variables() -> frozenset[str]:
    """Every ``IRM_*`` variable that a setting, the gateway or a tool reads."""
    settings = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    return frozenset(settings) | GATEWAY_VARIABLES | OTHER_VARIABLES


def stray_variables(names: Iterable[str]) -> list[str]:
    """A warning for each ``IRM_*`` name that nothing reads: a typo, likely.

    Warnings, not errors, as the gateway's environment may hold variables of
    the tools it does not know of. Compared in capitals, as the settings are
    read (a lower-case ``irm_broker_port`` sets broker_port).
    """
    known = known_variables()
    found = []
    for name in sorted(names):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        near = difflib.get_close_matches(upper, sorted(known), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        found.append(
            f"environment variable {name} is not a setting and is ignored{hint} "
            "('irm-gateway check-config' lists the settings)"
        )
    return found


# -- cautions ------------------------------------------------------------------


def cautions(settings: Settings) -> list[str]:
    """What is valid but will not work: with the broker configuration that
    ships, or for want of the database.

    Warnings, not errors: a broker of the operator's own may admit it, and
    the database may be made before the gateway starts.
    """
    found = []
    if settings.broker_username is None:
        found.append(
            "broker_username is not set: the shipped mosquitto.conf admits no "
            "anonymous client, so the broker will refuse the gateway (MQTT code "
            '135, not authorized): set broker_username = "_gateway" and its '
            "broker_password"
        )
    database = settings.database
    if settings.store is None and not database.exists():
        where = "" if database.is_absolute() else f" (here, {database.absolute()})"
        found.append(
            f"database {database}{where} does not exist: the gateway will "
            "refuse to start; create it by adding the first tenant, as the "
            f"gateway's user: irm-tool --database {shlex.quote(str(database))} "
            "tenant add TENANT (or check the path)"
        )
    return found


# -- showing -------------------------------------------------------------------


def is_secret(name: str, value: object) -> bool:
    return isinstance(value, SecretStr) or any(w in name for w in SECRET_WORDS)


def shown(settings: Settings) -> dict[str, Any]:
    """Every key's value as it may be printed or logged: secrets masked.

    URLs lose their password too (a database URL may carry one).
    """
    values: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is not None and is_secret(name, value):
            value = MASK
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, str):
            value = _URL_PASSWORD.sub(rf"\1:{MASK}@", value)
        values[name] = value
    return values
