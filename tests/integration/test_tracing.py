"""OpenTelemetry: a command runs in a span that continues the caller's trace, and the published
event carries that span's context."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.bootstrap import Runtime
from tests.conftest import Requester

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def recording_exporter() -> InMemorySpanExporter:
    """An SDK provider recording spans in memory (set once for the whole test process)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_command_span_continues_the_callers_trace_onto_the_event(
    request_command: Requester, runtime: Runtime, nc: Any
) -> None:
    exporter = recording_exporter()
    created = await request_command("create", {"account_id": "acc_traced"}, headers={"traceparent": TRACEPARENT})
    spans = [span for span in exporter.get_finished_spans() if span.name == "activities.command.create"]
    assert len(spans) == 1
    span = spans[0]
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"

    subscription = await nc.jetstream().subscribe(f"{runtime.settings.subject_prefix}.events.>", ordered_consumer=True)
    message = await subscription.next_msg(timeout=10)
    assert message.headers["Activity-Id"] == created["data"]["id"]
    # the subscriber's parent is the command's span, in the caller's trace
    assert message.headers["traceparent"] == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"
    await subscription.unsubscribe()
