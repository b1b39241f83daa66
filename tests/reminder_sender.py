"""A reminder sender in a process of its own, on a virtual clock.

``python -m tests.reminder_sender DB PORT OWNER [--crash-after-accept]
[--go FILE] AT...`` runs one pass of :class:`gateway.mail.Reminders` at
each instant AT against the SQLite file DB and the SMTP server on
127.0.0.1:PORT, and prints what each pass sent as JSON lines. With
``--crash-after-accept`` the process kills itself (SIGKILL) as soon as the
server has accepted a mail, before the store records it. With ``--go`` it
waits for FILE to exist first, so that two senders start together.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from gateway.mail import Reminders, Smtp
from policy.sqlite_store import SqliteStore
from policy.store import ReminderMail
from policy.timeutil import from_text


def _wait_for(go: Path) -> None:
    """Another process creates ``go``: poll for it, for 30 s at most."""
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _die(mail: ReminderMail) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(argv: list[str]) -> None:
    crash = "--crash-after-accept" in argv
    argv = [a for a in argv if a != "--crash-after-accept"]
    go = None
    if "--go" in argv:
        at = argv.index("--go")
        go = Path(argv[at + 1])
        del argv[at : at + 2]
    database, port, owner, *instants = argv
    if go is not None:
        _wait_for(go)
    store = await SqliteStore.open(database, create=False)
    smtp = Smtp("127.0.0.1", int(port), "none", "reminders@irm.example")
    sender = Reminders(store, smtp, owner, on_accepted=_die if crash else None)
    try:
        for text in instants:
            now = from_text(text)
            assert now is not None
            done = await sender.run_once(now)
            sent = [[f"{s.license}:{s.days}" for s in m.steps] for m in done.sent]
            print(json.dumps({"at": text, "sent": sent}), flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
