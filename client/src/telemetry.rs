//! Traces for writers and nodes: the W3C trace context the [`Publisher`]
//! puts on each event and the [`Subscriber`] joins when it applies it, and a
//! helper that sets up logs and span export for programs (it is what
//! `freshctl` uses).
//!
//! ## Spans
//!
//! | span | where | parent | links |
//! |---|---|---|---|
//! | `publisher.publish` (producer) | one per [`Publisher::publish_events`] call | the caller's current span | |
//! | `subscriber.apply` (consumer) | one per batch handed to [`Handler::on_events`], retries included | the first event's context (none: a trace of its own) | the batch's other distinct contexts (at most [`MAX_LINKS`]) |
//!
//! `publisher.publish` writes its own context into the `traceparent` /
//! `tracestate` of every event that has none, so the hub's spans, and the
//! apply spans of every node in every region, join the writer's trace.
//! Without an OpenTelemetry layer in the subscriber there is no context:
//! nothing is written and at most one context per batch is parsed.
//!
//! ## Export ([`init`])
//! Off by default; the standard variables switch it on:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
//! OTLP over gRPC; `OTEL_TRACES_EXPORTER=otlp|console|none` (`console`
//! writes one JSON line per finished span on stderr); `OTEL_SDK_DISABLED=true`;
//! `OTEL_SERVICE_NAME`. Programs with a subscriber of their own add
//! [`otel_layer`] over [`tracer_provider`] instead.
//! The set-up and the context parsing are shared with the hub (crate
//! `freshness_telemetry`).
//!
//! [`Publisher`]: crate::Publisher
//! [`Publisher::publish_events`]: crate::Publisher::publish_events
//! [`Subscriber`]: crate::Subscriber
//! [`Handler::on_events`]: crate::Handler::on_events

use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

pub(crate) use freshness_telemetry::Adopt;
pub use freshness_telemetry::{MAX_LINKS, Telemetry, TelemetryError, num, remote_span_context};

/// The instrumentation scope of the client's spans.
const SCOPE: &str = "freshness-client";

/// Installs the global subscriber: text logs on stderr filtered by
/// `FRESHNESS_LOG` (else `default_filter`), plus span export when the
/// `OTEL_*` variables ask for it, as service `OTEL_SERVICE_NAME` (else
/// `service_name`). Call it within a tokio runtime: the OTLP exporter's
/// channel is spawned on it.
pub fn init(service_name: &str, default_filter: &str) -> Result<Telemetry, TelemetryError> {
    let provider = tracer_provider(service_name)?;
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(freshness_telemetry::stderr_colors())
        .with_writer(std::io::stderr)
        .with_filter(freshness_telemetry::log_filter(default_filter));
    freshness_telemetry::install(logs, provider, SCOPE)
}

/// The tracer provider the `OTEL_*` variables ask for (`None`: no export),
/// named `OTEL_SERVICE_NAME`, else `service_name`.
pub fn tracer_provider(service_name: &str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let export = freshness_telemetry::Export::from_env(None)?;
    freshness_telemetry::tracer_provider(export, service_name, [])
}

/// The `tracing` → OpenTelemetry layer over `provider`'s tracer, for `INFO`
/// spans and events and above.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    freshness_telemetry::otel_layer(provider, SCOPE)
}

/// The W3C `traceparent` and `tracestate` (possibly empty) of `span`, when
/// it has a valid OpenTelemetry context (only with an OpenTelemetry layer).
pub fn traceparent(span: &Span) -> Option<(String, String)> {
    struct Carrier(Option<String>, String);
    impl Injector for Carrier {
        fn set(&mut self, key: &str, value: String) {
            match key {
                "traceparent" => self.0 = Some(value),
                "tracestate" => self.1 = value,
                _ => {}
            }
        }
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier(None, String::new());
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0.map(|tp| (tp, carrier.1))
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn no_context_without_an_opentelemetry_layer() {
        let span = tracing::info_span!("x");
        assert_eq!(traceparent(&span), None);
    }

    #[test]
    fn spans_inject_what_events_carry() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(otel_layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("publish");
            let (tp, ts) = traceparent(&span).expect("a context");
            let sc = span.context().span().span_context().clone();
            assert_eq!(
                tp,
                format!("00-{}-{}-01", sc.trace_id(), sc.span_id()),
                "W3C traceparent, sampled"
            );
            assert_eq!(ts, "");
            assert_eq!(
                remote_span_context(&tp, &ts).map(|r| r.span_id()),
                Some(sc.span_id())
            );
        });
    }
}
