"""OpenTelemetry tracing: a command's W3C trace context goes into its event and onto the
published event.

Each command runs in a span (`activities.command.<name>`) whose parent is the `traceparent` the
caller sent. The trace context of that span is stored with the event and the relay publishes it
as the event's `traceparent` header, so a subscriber's span joins the caller's trace. Without an
OpenTelemetry SDK the API is a no-op and the caller's own `traceparent` is passed through; with
one (e.g. `opentelemetry-instrument activities serve` and the OTEL_* variables) spans are exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

_tracer = trace.get_tracer("activities")


@contextmanager
def command_span(name: str, traceparent: str | None) -> Iterator[str | None]:
    """Run a command in a span; yields the traceparent to store with its event (None: no trace).

    Without an SDK there is no span to make: the caller's (valid) traceparent is passed through,
    as the no-op API would, without its cost (a twentieth of a create's CPU)."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield traceparent
        return
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    with _tracer.start_as_current_span(f"activities.command.{name}", context=parent, kind=SpanKind.SERVER):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield carrier.get("traceparent")


def current_trace_id() -> str | None:
    """The trace id of the current span, for log lines; None outside a trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
