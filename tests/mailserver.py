"""A real SMTP server on loopback (aiosmtpd) that keeps what it accepts.

It runs in its own thread (aiosmtpd's controller), so the process under
test talks to it over TCP like to any mail server. It can be taken down
and brought back on the same port, or told to refuse mail for a while.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        message = message_from_bytes(self.raw, policy=default)
        assert isinstance(message, EmailMessage)
        return message

    @property
    def text(self) -> str:
        return str(self.message.get_content())


class Inbox:
    """aiosmtpd's handler: accepts (or refuses) and keeps every message."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.refusing = False
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        if self.refusing:
            return "451 4.3.0 try again later"
        with self._lock:
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
            )
        return "250 2.0.0 accepted"

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.received)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MailServer:
    """An SMTP server on 127.0.0.1; ``accounts`` turns on AUTH (plain text)."""

    def __init__(self, accounts: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.inbox = Inbox()
        self.accounts = accounts
        self._controller: Controller | None = None

    def start(self) -> None:
        options: dict[str, Any] = {}
        if self.accounts is not None:
            options = {
                "auth_required": True,
                "auth_require_tls": False,
                "authenticator": self._authenticate,
            }
        self._controller = Controller(
            self.inbox, hostname="127.0.0.1", port=self.port, **options
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.accounts is not None
            and self.accounts.get(data.login.decode()) == data.password.decode()
        )
        # handled=False: aiosmtpd answers 535 itself (True means "we replied").
        return AuthResult(success=ok, handled=False)

    def messages(self) -> list[Received]:
        return self.inbox.messages()

    async def until(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Poll until ``count`` messages arrived, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(found := self.messages()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} mails arrived")
            await asyncio.sleep(0.05)
        return found
