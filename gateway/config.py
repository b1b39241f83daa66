"""The gateway's settings, validated once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    """Everything an operator can set; defaults suit one gateway on one host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_host: str = "127.0.0.1"
    broker_port: int = Field(18830, ge=1, le=65535)
    broker_username: str | None = None
    broker_password: str | None = None
    database: Path = Path("irm.db")
    prefix: str = "irm/v1"
    gateway_id: str = Field("gw1", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    lease_seconds: float = Field(90.0, gt=0)
    grace_seconds: float = Field(10.0, ge=0)
    batch_max: int = Field(2000, ge=1)
    receive_maximum: int = Field(2000, ge=1, le=65535)
    publish_window: int = Field(2000, ge=1, le=65000)
    poll_seconds: float = Field(0.25, gt=0, le=1.0)
    vendor_public_key: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def client_id(self) -> str:
        return f"irm-gateway-{self.gateway_id}"
