"""Structured logs: JSON lines when not on a terminal, readable lines when on one."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(
    level: str = "info", fmt: str = "auto", leave_out: frozenset[str] = frozenset(), *, process_ids: bool = False
) -> None:
    """Log lines at `level` and above, but none of the events `leave_out` names; with `process_ids`
    (several worker processes write to one log), each line says which process wrote it (`process`, its pid)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())

    def left_out(logger: object, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        if event.get("event") in leave_out:
            raise structlog.DropEvent
        return event

    processors: list[structlog.typing.Processor] = [
        *([left_out] if leave_out else []),
        *([_add_process_id] if process_ids else []),
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    binary_stderr = getattr(sys.stderr, "buffer", None)
    if use_json and binary_stderr is not None:
        # orjson and a bytes logger: a third less CPU per line than json + print,
        # and there is a line for every request.
        processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
        factory: Callable[..., Any] = structlog.BytesLoggerFactory(binary_stderr)
    elif use_json:
        processors.append(structlog.processors.JSONRenderer())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    else:
        # Colours only for a terminal: LOG_FORMAT=console into journald or a file wrote escape codes.
        colours = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
        processors.append(structlog.dev.ConsoleRenderer(colors=colours))
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _add_process_id(logger: object, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    event["process"] = os.getpid()  # at each line: a worker forked after `configure` says its own
    return event


def _dumps(value: Any, **options: Any) -> bytes:
    """orjson's JSON, or, for text that is not valid UTF-8, the same with its bad bytes escaped
    (`\\xff`): a request header's bytes, which aiohttp decodes with surrogates for the bytes that
    are not UTF-8, made orjson raise, and the request that logged the header failed with a 500."""
    try:
        return orjson.dumps(value, **options)
    except orjson.JSONEncodeError:
        # Other objects' text (structlog's `default`) is made valid too.
        return orjson.dumps(_valid_utf8(value), **{**options, "default": lambda other: _valid_utf8(str(other))})


def _valid_utf8(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte (an escape in JSON, "\\ud800")
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_valid_utf8(key): _valid_utf8(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_valid_utf8(item) for item in value]
    return value


class Throttle:
    """Lets one log line through per `interval` seconds and counts the others: for events
    a client can repeat at will (a full disk, an exhausted resource), whose every line would flood the log."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last = float("-inf")
        self._held_back = 0

    def due(self) -> int | None:
        """None while the interval runs; else how many events were held back since the last one."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held_back += 1
            return None
        held_back, self._last, self._held_back = self._held_back, now, 0
        return held_back
