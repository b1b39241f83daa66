"""Logging: key-value events through structlog, JSON or readable lines."""

from __future__ import annotations

import logging
import sys

import structlog


def setup(fmt: str = "auto", level: str = "info") -> None:
    """JSON lines for machines, coloured key-values on a terminal."""
    number = getattr(logging, level.upper())
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=number)
    for noisy in ("gmqtt", "aiosqlite"):
        logging.getLogger(noisy).setLevel(max(number, logging.WARNING))
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
