"""The error codes of the wire contract (docs/contract.md section 3), as exceptions.

The service raises these and maps them to the reply envelope; the client rebuilds the same
classes from a reply, so `except VersionConflict` works on both sides of the wire.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ActivitiesError(Exception):
    """Base of every error the service replies with."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def to_envelope(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "details": self.details}
        return {"error": error}


class ValidationError(ActivitiesError):
    code = "validation_error"
    http_status = 422


class Unauthorized(ActivitiesError):
    code = "unauthorized"
    http_status = 401


class NotFound(ActivitiesError):
    code = "not_found"
    http_status = 404


class Gone(ActivitiesError):
    code = "gone"
    http_status = 410


class VersionConflict(ActivitiesError):
    code = "version_conflict"
    http_status = 409

    def __init__(self, message: str, current_version: int, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message, details)
        self.current_version = current_version

    def to_envelope(self) -> dict[str, Any]:
        envelope = super().to_envelope()
        envelope["error"]["current_version"] = self.current_version
        return envelope


class IdempotencyConflict(ActivitiesError):
    code = "idempotency_conflict"
    http_status = 409


class Unavailable(ActivitiesError):
    code = "unavailable"
    http_status = 503


class InternalError(ActivitiesError):
    code = "internal"
    http_status = 500


ERRORS_BY_CODE: dict[str, type[ActivitiesError]] = {
    cls.code: cls
    for cls in (
        ValidationError,
        Unauthorized,
        NotFound,
        Gone,
        VersionConflict,
        IdempotencyConflict,
        Unavailable,
        InternalError,
    )
}


def error_from_envelope(envelope: dict[str, Any]) -> ActivitiesError:
    """Rebuild the exception from a failure reply (used by the client)."""
    error = envelope.get("error") or {}
    code = str(error.get("code", "internal"))
    message = str(error.get("message", ""))
    details = list(error.get("details") or [])
    if code == VersionConflict.code:
        return VersionConflict(message, int(error.get("current_version", 0)), details)
    return ERRORS_BY_CODE.get(code, InternalError)(message, details)


def field_error(field: str, message: str) -> ValidationError:
    """A validation error about one field."""
    return ValidationError(f"{field}: {message}", [{"field": field, "message": message}])
