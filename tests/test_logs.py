"""What the log keeps out: secrets, whatever a future event carries."""

from __future__ import annotations

from gateway.config import MASK
from gateway.logs import redact


def test_a_field_named_like_a_secret_is_masked_in_the_log() -> None:
    event = {"event": "x", "broker_password": "hunter2", "smtp_secret": "s", "n": 1}

    redact(None, "info", event)

    assert event == {"event": "x", "broker_password": MASK, "smtp_secret": MASK, "n": 1}
