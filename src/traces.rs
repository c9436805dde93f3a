//! OpenTelemetry traces: the OTLP exporter behind `tracing`, and W3C trace context in and out.
//! Traces are off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set; off, nothing here runs per
//! reading. On, a span is made per RPC (continuing the caller's `traceparent`) and per reading
//! that carries a `traceparent` header; readings without one start no trace.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{TraceConfig, TraceSampler};

/// The W3C header (and Kafka record header) carrying a span's context.
pub const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported: the one check made per reading.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracer provider exporting to the configured collector; `None` when traces are off.
/// Needs a Tokio runtime (the exporter's gRPC channel).
pub fn provider(config: &TraceConfig) -> Result<Option<SdkTracerProvider>, String> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler(config.trace_sampler, config.trace_sampler_arg))
        .with_resource(
            Resource::builder()
                .with_service_name(config.otel_service_name.clone())
                .build(),
        )
        .build();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(provider))
}

/// The `tracing` layer feeding `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("thermostat"))
}

fn sampler(kind: TraceSampler, ratio: f64) -> Sampler {
    match kind {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::TraceIdRatio => Sampler::TraceIdRatioBased(ratio),
        TraceSampler::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TraceSampler::ParentbasedTraceIdRatio => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    }
}

/// Headers of any carrier (gRPC metadata, Kafka record headers), looked up by name.
struct Carrier<'a, F>(F, PhantomData<&'a ()>);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Carrier<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The remote span a carrier's `traceparent` (and `tracestate`) name, if valid.
pub fn remote_parent<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(&Carrier(header, PhantomData));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of `parent`, if traces are on and the carrier names one.
pub fn continue_from<'a>(span: &tracing::Span, header: impl Fn(&str) -> Option<&'a str>) {
    if let Some(parent) = remote_parent(header) {
        // Fails only for a span already entered; ours are fresh.
        let _ = span.set_parent(parent);
    }
}

/// `span`'s context as a `traceparent` value, for the next hop; `None` without a trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    headers.remove(TRACEPARENT)
}

/// The span of one traced reading's decision, child of the reading's remote span.
pub fn decision_span(sensor: &str, parent: Context) -> tracing::Span {
    let span = tracing::info_span!(
        "decide",
        otel.name = "thermostat.decide",
        otel.kind = "consumer",
        sensor.id = sensor,
        heater.command = tracing::field::Empty,
        command.reason = tracing::field::Empty,
        command.sequence = tracing::field::Empty,
        setpoint.revision = tracing::field::Empty,
    );
    let _ = span.set_parent(parent);
    span
}

/// Records on a decision span the command it decided.
pub fn decided(span: &tracing::Span, command: &str, reason: &str, sequence: u64, revision: i64) {
    span.record("heater.command", command);
    span.record("command.reason", reason);
    span.record("command.sequence", sequence);
    span.record("setpoint.revision", revision);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_valid_traceparent_names_a_remote_parent_and_garbage_none() {
        let cx = remote_parent(|k| (k == TRACEPARENT).then_some(PARENT)).expect("valid");
        let span = cx.span();
        let remote = span.span_context();
        assert!(remote.is_remote() && remote.is_sampled());
        assert_eq!(
            remote.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(remote.span_id().to_string(), "b7ad6b7169203331");
        for bad in [
            "",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "garbage",
        ] {
            assert!(remote_parent(|_| Some(bad)).is_none(), "{bad:?}");
        }
        assert!(remote_parent(|_| None).is_none());
    }
}
