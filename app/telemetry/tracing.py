"""W3C trace context: each participant call is a child span of the saga's caller.

A saga stores the `traceparent` it was started with; every attempt opens a client
span under it and forwards that span as the call's `traceparent`. Spans are exported
over OTLP only when an endpoint is configured and the exporter package is installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    def __init__(self, otlp_endpoint: str | None = None) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "saga-orchestrator"})
        )
        if otlp_endpoint:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("OTLP endpoint set but opentelemetry-exporter-otlp is not installed")
            else:
                self.provider.add_span_processor(
                    BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
                )
        self.tracer = self.provider.get_tracer("saga-orchestrator")

    @contextlib.contextmanager
    def call_span(
        self, traceparent: str | None, name: str, attributes: dict[str, str | int]
    ) -> Iterator[dict[str, str]]:
        """A client span for one participant call; yields the headers that carry it."""
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else Context()
        with self.tracer.start_as_current_span(
            name, context=parent, kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
            yield carrier

    def shutdown(self) -> None:
        self.provider.shutdown()
