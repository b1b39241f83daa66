"""Logging: key-value events through structlog, JSON or readable lines.

Levels, for the operator: ERROR the gateway cannot go on (it exits);
WARNING someone should look (broker lost, bad input, capacity alarm);
INFO one line per decision and per change of state; DEBUG per message.
At thousands of decisions a second the per-decision lines are most of
the log: ``log_level = "warning"`` keeps only what needs a look.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger

from gateway.config import MASK, SECRET_WORDS


def redact(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Mask any field named like a secret, should one ever be logged."""
    for key in event:
        if any(word in key for word in SECRET_WORDS):
            event[key] = MASK
    return event


def setup(fmt: str = "auto", level: str = "info") -> None:
    """JSON lines for machines, coloured key-values on a terminal.

    The standard library's records (the MQTT client's, for one) go through
    the same renderer, so a JSON log holds nothing but JSON lines.
    """
    number = getattr(logging, level.upper())
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        redact,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(number)
    for noisy in ("gmqtt", "aiosqlite"):
        logging.getLogger(noisy).setLevel(max(number, logging.WARNING))
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
