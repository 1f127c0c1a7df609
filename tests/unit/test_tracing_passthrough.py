"""Without an OpenTelemetry SDK, a command's trace context is the caller's, passed through."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from services.tracing import command_span

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_without_an_sdk_the_callers_traceparent_is_stored_as_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    with command_span("create", TRACEPARENT) as stored:
        assert stored == TRACEPARENT
    with command_span("create", None) as stored:
        assert stored is None
