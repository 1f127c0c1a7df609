"""Correlation ids: the caller's trace id, or a fresh id made once, when first needed."""

from __future__ import annotations

import contextvars
import re

from services.logs import correlation_id, start_request

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_outside_a_request_there_is_no_correlation_id() -> None:
    assert contextvars.Context().run(correlation_id) is None


def test_a_request_without_a_trace_gets_one_fresh_id_for_all_its_lines() -> None:
    def request() -> tuple[str | None, str | None]:
        start_request(None)
        return correlation_id(), correlation_id()

    first, again = contextvars.Context().run(request)
    assert first is not None and re.fullmatch(r"[0-9a-f]{32}", first) and again == first
    other, _ = contextvars.Context().run(request)
    assert other != first


def test_a_traced_request_is_correlated_by_its_trace_id() -> None:
    def request() -> str | None:
        start_request(TRACEPARENT)
        return correlation_id()

    assert contextvars.Context().run(request) == "4bf92f3577b34da6a3ce929d0e0e4736"
