"""What the OpenTelemetry tests share: installing SDK providers as the globals, and forgetting them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util._once import Once


def reset_globals() -> None:
    """Forget the global providers (as OpenTelemetry's own test utilities do), so others run untraced."""
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()


@contextlib.contextmanager
def global_providers(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> Iterator[None]:
    """These providers as the globals while the block runs; then forgotten and shut down."""
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    assert trace.get_tracer_provider() is tracer_provider, "another global tracer provider was set first"
    try:
        yield
    finally:
        reset_globals()
        tracer_provider.shutdown()
        meter_provider.shutdown()
