"""The gateway's settings, validated once at start.

A constrained setting states its rule in ``description``, in the words
an operator reads when the value breaks it (see gateway/__main__.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.protocol import NAME_PATTERN, PREFIX

PREFIX_PATTERN = r"^[^/+#]([^+#]*[^/+#])?$"
"""Topic levels with no MQTT wildcard, not starting or ending with ``/``."""


class Settings(BaseModel):
    """Everything an operator can set; defaults suit one gateway on one host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    grace_seconds: float = Field(
        10.0,
        ge=0,
        le=3_600,
        allow_inf_nan=False,
        description="a finite number from 0 to 3600",
    )
    batch_max: int = Field(2000, ge=1)
    receive_maximum: int = Field(2000, ge=1, le=65535)
    publish_window: int = Field(2000, ge=1, le=65000)
    poll_seconds: float = Field(0.25, gt=0, le=1.0)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def client_id(self) -> str:
        return f"irm-gateway-{self.gateway_id}"
