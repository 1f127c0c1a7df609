"""Errors as log lines may carry them: never client content (docs/architecture.md, "Logs").

An exception's message may quote what a client wrote: PostgreSQL quotes the value that failed a cast
or a unique key (`invalid input syntax ...: "<value>"`, `Key (...)=(<value>) already exists`), a
validation message may repeat its input. Logs therefore name an error by its type and, for a
database error, its SQLSTATE; only exception types marked `safe_to_log` (their messages hold
counts, codes and ids) are logged with their message.
"""

from __future__ import annotations

SAFE_TYPES = ("OperationalError", "InterfaceError", "ConnectionError", "ConnectionRefusedError", "TimeoutError")
"""Errors of the connection, not of the data (libpq's and PostgreSQL's primary messages of these,
"connection refused", "SSL required", "could not obtain lock", quote no values): logged with the
first line of their message, which says what to fix."""


def describe(exc: BaseException) -> str:
    """`TypeName`, `TypeName (SQLSTATE xxxxx)`, or `TypeName: message` for a type marked safe
    (`safe_to_log`) and, first line only, for connection errors (SAFE_TYPES)."""
    code = sqlstate(exc)
    name = type(exc).__name__ + (f" (SQLSTATE {code})" if code else "")
    if getattr(exc, "safe_to_log", False):
        return f"{name}: {exc}"
    if any(type(item).__name__ in SAFE_TYPES for item in _chain(exc)):
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{name}: {first_line}" if first_line else name
    return name


def _chain(exc: BaseException) -> list[BaseException]:
    items: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in items and len(items) < 4:
        items.append(seen)
        seen = seen.__cause__ or seen.__context__
    return items


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error, also one wrapped by the event-sourcing library."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        code = getattr(seen, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
        seen = seen.__cause__ or seen.__context__
    return None
