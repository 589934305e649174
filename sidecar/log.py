"""The only structlog.configure() call: JSON lines in production, colour at a TTY, one stream for everything.

structlog events and stdlib records (aiohttp's access log, botocore, asyncio) pass through the same chain:
context variables, logger name, level and an ISO UTC timestamp, then one renderer. structlog hands its events
to stdlib logging, so a single handler on the root logger writes every line.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import FilteringBoundLogger, Processor

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("json", "console", "auto")

# Chatty libraries stay at INFO even when we debug: botocore logs every request's signature at DEBUG.
_NOISY = ("botocore", "aiobotocore", "s3transfer", "urllib3")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that a second setup() replaces it and leaves other handlers (pytest's caplog) alone."""


def setup(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging through one renderer on `stream` (default: the current sys.stderr).

    `fmt` is "json" (one object per line), "console", or "auto": console at a TTY, JSON otherwise.
    Calling it again replaces the previous setup.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: must be one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: must be one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    tty = stream.isatty()
    if fmt == "auto":
        fmt = "console" if tty else "json"
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks as data, without locals: a frame's locals may hold a token.
    tracebacks = ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    render: list[Processor] = (
        [tracebacks, structlog.processors.JSONRenderer(default=str)] if fmt == "json"
        else [structlog.dev.ConsoleRenderer(colors=tty)])
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: module-level loggers must see a later setup() (tests, or a --log-level change).
        cache_logger_on_first_use=False,
    )
    handler = _Handler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(LEVELS[level], logging.INFO))
    # watchfiles logs every batch of file events at INFO: many lines a second under load.
    logging.getLogger("watchfiles").setLevel(max(LEVELS[level], logging.WARNING))


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger named `name` (the stdlib logger it writes through has the same name)."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger


def debugging(name: str) -> bool:
    """Whether `name`'s debug lines are written: asked of the stdlib logger, whose level setup() set alongside the
    structlog filter, because asking a structlog logger binds a new one per call. Hot paths (a line per upload or
    per flush) ask first and build no line at all when the answer is no."""
    return logging.getLogger(name).isEnabledFor(logging.DEBUG)


__all__ = ["FORMATS", "LEVELS", "debugging", "get_logger", "setup"]
