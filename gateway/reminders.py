"""The gateway's reminder task: expiry reminders on the gateway's own schedule.

It runs beside the decider and shares nothing with it but the database
file: its own store connection (a connection runs one transaction at a
time, and the decider's must never wait behind this task's), its own
task, its own errors. Every ``smtp_check_seconds`` it claims what is due
and sends what is ready (gateway/mail.py); a mail server that is down
only delays the next attempt, never a decision.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from gateway.config import Settings
from gateway.mail import Pass, Reminders, Smtp
from gateway.service import Clock, system_clock
from policy.errors import IrmError
from policy.stores import open_store

log = structlog.get_logger("gateway.reminders")


def smtp_of(settings: Settings) -> Smtp | None:
    """The mail server the settings name, or None: reminders are off."""
    if settings.smtp_host is None:
        return None
    password = settings.smtp_password
    return Smtp(
        host=settings.smtp_host,
        port=settings.smtp_port,
        tls=settings.smtp_tls,
        sender=settings.smtp_from,
        username=settings.smtp_username,
        password=password.get_secret_value() if password is not None else None,
    )


async def remind(
    settings: Settings,
    leader: asyncio.Event | None = None,
    clock: Clock = system_clock,
) -> None:
    """Look for due reminders every ``smtp_check_seconds`` until cancelled.

    With several gateways on one store, only the one holding ``leader``
    looks; the claims in the store keep each reminder to one mail anyway.
    """
    smtp = smtp_of(settings)
    if smtp is None:
        log.info("expiry reminders off: no --smtp-host")
        return
    log.info(
        "expiry reminders on", smtp=f"{smtp.host}:{smtp.port}", tls=smtp.tls,
        sender=smtp.sender, every=settings.smtp_check_seconds,
    )  # fmt: skip
    store = await open_store(settings.store or settings.database, create=False)
    try:
        owner = f"gateway {settings.gateway_id}"
        sender = Reminders(store, smtp, owner, clock=clock)
        while True:
            if leader is not None:
                await leader.wait()
            await _one_pass(sender)
            await asyncio.sleep(settings.smtp_check_seconds)
    finally:
        await store.close()


async def _one_pass(sender: Reminders) -> None:
    try:
        done = await sender.run_once()
    except IrmError as exc:
        # The store was busy, or a tenant's data was refused: next pass.
        log.warning("reminder pass failed", error=str(exc))
        return
    except Exception:
        # Reminders must never take the gateway down: log it, try again.
        log.exception("reminder pass failed unexpectedly")
        return
    _log(done)


def _log(done: Pass) -> None:
    for mail in done.sent:
        log.info(
            "reminder sent", tenant=mail.tenant, mail=mail.mail,
            steps=[f"{s.license}:{s.days}" for s in mail.steps],
            to=list(mail.recipients), attempts=mail.attempts,
        )  # fmt: skip
    for mail, error in done.failed:
        log.warning(
            "reminder not sent, will retry", tenant=mail.tenant, mail=mail.mail,
            attempts=mail.attempts, error=error,
        )  # fmt: skip
    for mail, why in done.dropped:
        log.info("reminder dropped", tenant=mail.tenant, mail=mail.mail, why=why)


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel the task; a mail it was sending is resent after its hold."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if not task.cancelled() and task.exception() is not None:
        log.error("reminder task failed", error=str(task.exception()))
