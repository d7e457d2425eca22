"""Structured log events for HQ, in the shared shape of `protocol.logfmt` (fields, then a message).

Fields identify the work (node id, batch sequence, counts, byte sizes, outcome), never record
contents, tokens or keys.
"""

from __future__ import annotations

import logging
from typing import Any

from protocol.logfmt import setup_logging as _setup_fieldsync_logging


def event(
    logger: logging.Logger, level: int, msg: str, /, *, exc_info: bool = False, **fields: Any
) -> None:
    """Log `msg` with structured `fields`; `exc_info=True` inside `except` adds the traceback."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra={"fields": fields})


def setup_logging(level: str = "info") -> None:
    """JSON lines on stderr for fieldsync's loggers, and aiohttp's warnings in the same format."""
    _setup_fieldsync_logging(level)
    handlers = logging.getLogger("fieldsync").handlers
    aiohttp_log = logging.getLogger("aiohttp")
    aiohttp_log.handlers[:] = list(handlers)
    aiohttp_log.setLevel(logging.WARNING)
    aiohttp_log.propagate = False
