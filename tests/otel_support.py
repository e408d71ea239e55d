"""What the OpenTelemetry tests share: forgetting the global providers a test set."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.util._once import Once


def reset_globals() -> None:
    """Forget the global providers (as OpenTelemetry's own test utilities do), so others run untraced."""
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
