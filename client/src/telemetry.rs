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
//!
//! [`Publisher`]: crate::Publisher
//! [`Publisher::publish_events`]: crate::Publisher::publish_events
//! [`Subscriber`]: crate::Subscriber
//! [`Handler::on_events`]: crate::Handler::on_events

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, Key, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Most contexts one span links to, besides its parent.
pub const MAX_LINKS: usize = 32;
/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Telemetry that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` variable has a value this library does not support.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// The variable.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// The OTLP exporter refused its configuration.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// Another global subscriber is already installed.
    #[error("cannot install the log subscriber: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

/// Where finished spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Export {
    Off,
    Otlp,
    Console,
}

fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

fn choose(env: impl Fn(&str) -> Option<String>) -> Result<Export, TelemetryError> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(Export::Off);
    }
    match env("OTEL_TRACES_EXPORTER")
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("none") => Ok(Export::Off),
        Some("console") => Ok(Export::Console),
        Some("otlp") => Ok(Export::Otlp),
        Some(other) => Err(TelemetryError::Invalid {
            key: "OTEL_TRACES_EXPORTER",
            reason: format!("{other:?} is not one of otlp, console, none"),
        }),
        None if env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() =>
        {
            Ok(Export::Otlp)
        }
        None => Ok(Export::Off),
    }
}

/// The installed telemetry. Dropping it (or [`Telemetry::shutdown`]) flushes
/// the spans not yet exported; do it outside async code, while the runtime
/// the exporter was built in still runs.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported somewhere.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the export.
    pub fn shutdown(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!(error = %e, "trace export did not flush");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Installs the global subscriber: text logs on stderr filtered by
/// `FRESHNESS_LOG` (else `default_filter`), plus span export when the
/// `OTEL_*` variables ask for it, as service `OTEL_SERVICE_NAME` (else
/// `service_name`). Call it within a tokio runtime: the OTLP exporter's
/// channel is spawned on it.
pub fn init(service_name: &str, default_filter: &str) -> Result<Telemetry, TelemetryError> {
    let provider = tracer_provider(service_name)?;
    let filter =
        EnvFilter::try_from_env("FRESHNESS_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(provider.as_ref().map(otel_layer))
        .try_init()?;
    Ok(Telemetry { provider })
}

/// The tracer provider the `OTEL_*` variables ask for (`None`: no export),
/// named `OTEL_SERVICE_NAME`, else `service_name`.
pub fn tracer_provider(service_name: &str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let service = env_var("OTEL_SERVICE_NAME").unwrap_or_else(|| service_name.to_owned());
    let builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(service)
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build(),
    );
    let builder = match choose(env_var)? {
        Export::Off => return Ok(None),
        Export::Console => builder.with_batch_exporter(ConsoleExporter::default()),
        Export::Otlp => builder.with_batch_exporter(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?,
        ),
    };
    Ok(Some(builder.build()))
}

/// The `tracing` → OpenTelemetry layer over `provider`'s tracer, for `INFO`
/// spans and events and above.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("freshness-client"))
        .with_threads(false)
        .with_filter(LevelFilter::INFO)
}

/// A count or seq as a span field: OpenTelemetry has no unsigned integers,
/// and `tracing-opentelemetry` records `u64` fields as text, so numeric
/// fields are recorded as `i64` (saturating).
pub fn num<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
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

/// A W3C trace context as carried by an event; `None` when absent or
/// malformed.
pub fn remote_span_context(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    if traceparent.is_empty() {
        return None;
    }
    struct Carrier<'a>(&'a str, &'a str);
    impl Extractor for Carrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                "traceparent" => Some(self.0),
                "tracestate" => Some(self.1),
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent", "tracestate"]
        }
    }
    let cx = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &Carrier(traceparent, tracestate));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Gives a span the trace contexts of the events it handles: the first
/// distinct one becomes its parent, the next [`MAX_LINKS`] are linked. Once
/// the span is known not to be exported (disabled, no OpenTelemetry layer)
/// or has all it takes, [`Adopt::wire`] returns `false`.
pub(crate) struct Adopt<'s> {
    span: &'s Span,
    seen: Vec<SpanContext>,
    last_wire: String,
    open: bool,
}

impl<'s> Adopt<'s> {
    pub(crate) fn new(span: &'s Span) -> Self {
        Self {
            span,
            seen: Vec::new(),
            last_wire: String::new(),
            open: !span.is_disabled(),
        }
    }

    /// Adds an event's context (skipped when empty, or equal to the previous
    /// one, without parsing); `false` when no more are wanted.
    pub(crate) fn wire(&mut self, traceparent: &str, tracestate: &str) -> bool {
        if !self.open {
            return false;
        }
        if traceparent.is_empty() || traceparent == self.last_wire {
            return true;
        }
        self.last_wire.clear();
        self.last_wire.push_str(traceparent);
        let Some(sc) = remote_span_context(traceparent, tracestate) else {
            return true;
        };
        if self
            .seen
            .iter()
            .any(|s| s.span_id() == sc.span_id() && s.trace_id() == sc.trace_id())
        {
            return true;
        }
        if self.seen.is_empty() {
            let parent = Context::new().with_remote_span_context(sc.clone());
            if self.span.set_parent(parent).is_err() {
                // No OpenTelemetry layer sees this span: nothing to record.
                self.open = false;
                return false;
            }
        } else {
            self.span.add_link(sc.clone());
        }
        self.seen.push(sc);
        self.open = self.seen.len() <= MAX_LINKS;
        self.open
    }

    /// Without any context, makes the span the root of a trace of its own
    /// rather than one more child of the long-lived stream span.
    pub(crate) fn root_unless_joined(&self) {
        if self.seen.is_empty() && self.open {
            let _ = self.span.set_parent(Context::new());
        }
    }
}

/// Writes finished spans as JSON lines on stderr (`OTEL_TRACES_EXPORTER=console`).
#[derive(Debug, Default)]
struct ConsoleExporter {
    service: String,
}

impl SpanExporter for ConsoleExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = Vec::new();
        for span in &batch {
            serde_json::to_writer(&mut out, &span_json(span, &self.service))
                .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
            out.push(b'\n');
        }
        std::io::stderr()
            .lock()
            .write_all(&out)
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.service = resource
            .get(&Key::new("service.name"))
            .map(|v| v.to_string())
            .unwrap_or_default();
    }
}

/// One finished span as a JSON object (the same shape as the hub's).
fn span_json(span: &SpanData, service: &str) -> serde_json::Value {
    let micros = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    let attributes: serde_json::Map<String, serde_json::Value> = span
        .attributes
        .iter()
        .map(|kv| {
            let v = match &kv.value {
                Value::Bool(b) => (*b).into(),
                Value::I64(i) => (*i).into(),
                Value::F64(f) => (*f).into(),
                other => other.to_string().into(),
            };
            (kv.key.to_string(), v)
        })
        .collect();
    let start = micros(span.start_time);
    let mut line = serde_json::json!({
        "service": service,
        "span": span.name,
        "kind": format!("{:?}", span.span_kind).to_lowercase(),
        "trace_id": span.span_context.trace_id().to_string(),
        "span_id": span.span_context.span_id().to_string(),
        "start_us": start,
        "duration_us": micros(span.end_time).saturating_sub(start),
        "attributes": attributes,
    });
    if span.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        line["parent_span_id"] = span.parent_span_id.to_string().into();
    }
    let links: Vec<serde_json::Value> = span
        .links
        .iter()
        .map(|l| {
            serde_json::json!({
                "trace_id": l.span_context.trace_id().to_string(),
                "span_id": l.span_context.span_id().to_string(),
            })
        })
        .collect();
    if !links.is_empty() {
        line["links"] = links.into();
    }
    if let opentelemetry::trace::Status::Error { description } = &span.status {
        line["error"] = description.to_string().into();
    }
    line
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn export_is_off_unless_asked_for() {
        let with = |vars: &[(&str, &str)]| {
            let vars: HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            choose(|k| vars.get(k).cloned())
        };
        assert_eq!(with(&[]).unwrap(), Export::Off);
        assert_eq!(
            with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]).unwrap(),
            Export::Otlp
        );
        assert_eq!(
            with(&[("OTEL_TRACES_EXPORTER", "console")]).unwrap(),
            Export::Console
        );
        assert_eq!(
            with(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_SDK_DISABLED", "true")
            ])
            .unwrap(),
            Export::Off
        );
        assert!(with(&[("OTEL_TRACES_EXPORTER", "jaeger")]).is_err());
    }

    #[test]
    fn no_context_without_an_opentelemetry_layer() {
        let span = tracing::info_span!("x");
        assert_eq!(traceparent(&span), None);
        let mut adopt = Adopt::new(&span);
        assert!(!adopt.wire(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ""
        ));
    }

    #[test]
    fn apply_spans_join_the_events_trace_or_start_their_own() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(otel_layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let stream = tracing::info_span!("stream");
            let _in = stream.enter();
            let trace_of = |s: &Span| s.context().span().span_context().trace_id();

            let joined = tracing::info_span!("subscriber.apply");
            let mut adopt = Adopt::new(&joined);
            assert!(adopt.wire(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ""
            ));
            adopt.root_unless_joined();
            assert_eq!(
                trace_of(&joined).to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );

            let orphan = tracing::info_span!("subscriber.apply");
            let adopt = Adopt::new(&orphan);
            adopt.root_unless_joined();
            assert_ne!(trace_of(&orphan), trace_of(&stream));
            assert_ne!(trace_of(&orphan), trace_of(&joined));
        });
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
