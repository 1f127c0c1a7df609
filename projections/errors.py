"""Errors as log lines may carry them: never client content (docs/architecture.md, "Logs").

An exception's message may quote what a client wrote: PostgreSQL quotes the value that failed a cast
or a unique key (`invalid input syntax ...: "<value>"`, `Key (...)=(<value>) already exists`), a
validation message may repeat its input. Logs therefore name an error by its type and, for a
database error, its SQLSTATE; only exception types marked `safe_to_log` (their messages hold
counts, codes and ids) are logged with their message.
"""

from __future__ import annotations


def describe(exc: BaseException) -> str:
    """`TypeName`, `TypeName (SQLSTATE xxxxx)`, or `TypeName: message` for a type marked safe."""
    if getattr(exc, "safe_to_log", False):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ + (f" (SQLSTATE {code})" if (code := sqlstate(exc)) else "")


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
