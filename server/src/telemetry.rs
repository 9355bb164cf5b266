//! Logs and traces: the hub's `tracing` subscriber, its OpenTelemetry export,
//! and the W3C trace context carried by every event.
//!
//! ## Set-up ([`init`])
//! Logs go to stderr as text or JSON (`log_format`), filtered by
//! `FRESHNESS_LOG` (default `info`). Trace export is off by default; it is
//! switched on by the `otlp_endpoint` setting (`FRESHNESS_OTLP_ENDPOINT`), or
//! by the standard variables:
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | export OTLP over gRPC there (when `otlp_endpoint` is not set); gRPC is the only protocol built in, so `OTEL_EXPORTER_OTLP_PROTOCOL` is not read |
//! | `OTEL_TRACES_EXPORTER` | `otlp` (export, to `localhost:4317` if no endpoint is given), `console` (one JSON line per finished span on stderr, for a look without a collector), `none` (off) |
//! | `OTEL_SDK_DISABLED=true` | off, whatever else is set |
//! | `OTEL_SERVICE_NAME` | the service name (default `freshness-hub`) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` | read by the OpenTelemetry SDK as usual (default sampler: parent-based, always on) |
//!
//! Spans are exported in batches from a thread of their own; [`Telemetry`]
//! flushes what is left when it is shut down or dropped.
//!
//! ## Spans
//! All at `INFO`, all carrying `region`:
//!
//! | span | when | parent | links |
//! |---|---|---|---|
//! | `hub.publish` (server) | one per Publish call | the `traceparent` gRPC header, else the first event's context | the call's other distinct event contexts (at most [`MAX_LINKS`]) |
//! | `hub.wait_acks` | REGION / GLOBAL calls, while waiting | `hub.publish` | |
//! | `shard.append` | one per actor wake-up whose commands carry a trace | the first command's `hub.publish` span (or, for events replicated from a peer, the first event's context) | the other commands' contexts |
//! | `session.fanout` (producer) | one per frame that holds events of traced appends | the first such `shard.append` | the other `shard.append` spans of the frame |
//!
//! The event's own `traceparent` / `tracestate` are the writer's and are
//! never rewritten, not by this hub nor by the hubs it replicates to: a
//! node's apply span (the client's `subscriber.apply`) is parented on them,
//! in every region, so one trace shows publish → append → fan-out → apply.
//!
//! ## What it costs
//! Contexts are parsed only where a span records them, at most
//! [`MAX_LINKS`]` + 1` distinct ones per span (the first is the parent), and
//! the first parse already tells whether an OpenTelemetry layer is
//! installed: without one, nothing more is parsed. Events are encoded once
//! with their context (at append), so fan-out never decodes them: the shard
//! actor remembers, per shard, the seq ranges of its recent traced appends
//! with their span ([`AppendTraces`]), and a session links its frame to those
//! that overlap the seq ranges it sent. Ranges, not events: an append whose
//! only events the node's filter skipped may be linked too, and an append
//! older than the last [`TRACED_APPENDS`] of its shard (a node far behind) is
//! not. A frame with no traced event costs one atomic load per shard it read.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, Key, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use parking_lot::Mutex;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};

/// Service name when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "freshness-hub";
/// Most contexts one span links to, besides its parent; the rest are left
/// out (OpenTelemetry's default limit is 128 links a span).
pub const MAX_LINKS: usize = 32;
/// Traced appends a shard remembers for the sessions' fan-out spans.
pub const TRACED_APPENDS: usize = 64;
/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Telemetry that could not be set up; the hub does not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` variable has a value this hub does not support.
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
pub enum Export {
    /// Nowhere (the default).
    Off,
    /// OTLP over gRPC; `None` lets the exporter read `OTEL_EXPORTER_OTLP_*`.
    Otlp(Option<String>),
    /// One JSON line per span on stderr.
    Console,
}

impl Export {
    /// Decides from the `otlp_endpoint` setting and the environment (`env`
    /// returns a variable's value, `None` when unset or empty).
    pub fn choose(
        otlp_endpoint: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TelemetryError> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(Self::Off);
        }
        let endpoint = otlp_endpoint.map(str::to_owned);
        let exporter = env("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase());
        match exporter.as_deref() {
            Some("none") => Ok(Self::Off),
            Some("console") => Ok(Self::Console),
            Some("otlp") => Ok(Self::Otlp(endpoint)),
            Some(other) => Err(TelemetryError::Invalid {
                key: "OTEL_TRACES_EXPORTER",
                reason: format!("{other:?} is not one of otlp, console, none"),
            }),
            None if endpoint.is_some() => Ok(Self::Otlp(endpoint)),
            None if env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() =>
            {
                Ok(Self::Otlp(None))
            }
            None => Ok(Self::Off),
        }
    }
}

impl Export {
    /// For the start-up log line.
    fn describe(&self) -> String {
        match self {
            Self::Off => "off".into(),
            Self::Otlp(Some(e)) => format!("otlp {e}"),
            Self::Otlp(None) => "otlp (OTEL_EXPORTER_OTLP_*)".into(),
            Self::Console => "console (stderr)".into(),
        }
    }
}

fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
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

/// Installs the global subscriber: logs per `log_format` and `FRESHNESS_LOG`,
/// plus span export when configured (see the module docs). Call it within a
/// tokio runtime: the OTLP exporter's channel is spawned on it.
pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
    let export = Export::choose(config.otlp_endpoint.as_deref(), env_var)?;
    let describe = export.describe();
    let provider = tracer_provider(export, config)?;
    let filter =
        EnvFilter::try_from_env("FRESHNESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(provider.as_ref().map(otel_layer))
        .try_init()?;
    if provider.is_some() {
        tracing::info!(export = %describe, "exporting traces");
    }
    Ok(Telemetry { provider })
}

/// The tracer provider for `export`, with the hub's resource: service name
/// (`OTEL_SERVICE_NAME` or [`DEFAULT_SERVICE_NAME`]), version, hub id and
/// region.
pub fn tracer_provider(
    export: Export,
    config: &Config,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let service = env_var("OTEL_SERVICE_NAME").unwrap_or_else(|| DEFAULT_SERVICE_NAME.into());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", config.hub_id.clone()),
            KeyValue::new("freshness.region", config.region.clone()),
        ])
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let builder = match export {
        Export::Off => return Ok(None),
        Export::Console => builder.with_batch_exporter(ConsoleExporter::default()),
        Export::Otlp(endpoint) => {
            let mut otlp = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = endpoint {
                otlp = otlp.with_endpoint(e);
            }
            builder.with_batch_exporter(otlp.build()?)
        }
    };
    Ok(Some(builder.build()))
}

/// The `tracing` → OpenTelemetry layer over `provider`'s tracer, for `INFO`
/// spans and events and above. [`init`] installs it; tests and programs that
/// embed the hub compose it into their own subscriber.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("freshness-hub"))
        .with_threads(false)
        .with_filter(LevelFilter::INFO)
}

/// A count or seq as a span field: OpenTelemetry has no unsigned integers,
/// and `tracing-opentelemetry` records `u64` fields as text, so numeric
/// fields are recorded as `i64` (saturating).
pub fn num<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// The OpenTelemetry context of the current span, when it has a valid one
/// (only with an OpenTelemetry layer installed).
pub fn current_span_context() -> Option<SpanContext> {
    let cx = Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// A W3C trace context as carried by an event (or a gRPC header); `None` when
/// absent or malformed.
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

/// Gives a span the trace contexts of what it handles: the first distinct
/// context becomes its parent, the next [`MAX_LINKS`] are linked. Once the
/// span is known not to be exported (disabled, no OpenTelemetry layer) or
/// has all it takes, every call returns `false`, so callers stop looking.
pub struct Adopt<'s> {
    span: &'s Span,
    seen: Vec<SpanContext>,
    last_wire: String,
    open: bool,
}

impl<'s> Adopt<'s> {
    /// Starts with no context.
    pub fn new(span: &'s Span) -> Self {
        Self {
            span,
            seen: Vec::new(),
            last_wire: String::new(),
            open: !span.is_disabled(),
        }
    }

    /// Adds a context; `false` when no more are wanted.
    pub fn context(&mut self, sc: SpanContext) -> bool {
        if !self.open {
            return false;
        }
        if !sc.is_valid()
            || self
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

    /// Adds an event's wire context (skipped when empty, or equal to the
    /// previous one, without parsing); `false` when no more are wanted.
    pub fn wire(&mut self, traceparent: &str, tracestate: &str) -> bool {
        if !self.open {
            return false;
        }
        if traceparent.is_empty() || traceparent == self.last_wire {
            return true;
        }
        self.last_wire.clear();
        self.last_wire.push_str(traceparent);
        match remote_span_context(traceparent, tracestate) {
            Some(sc) => self.context(sc),
            None => true,
        }
    }

    /// How many contexts the span took (parent and links).
    pub fn count(&self) -> usize {
        self.seen.len()
    }
}

/// The recent appends of one shard that were traced and sampled: their seq
/// range and `shard.append` span. Written by the shard actor, read by the
/// sessions building frames; bounded by [`TRACED_APPENDS`].
#[derive(Debug, Default)]
pub struct AppendTraces {
    /// Last seq of the newest recorded append (0: none), so that sessions
    /// skip the lock when nothing they send was traced.
    newest: AtomicU64,
    recent: Mutex<VecDeque<(u64, u64, SpanContext)>>,
}

impl AppendTraces {
    /// Remembers that seqs `first..=last` were appended under `span`.
    pub fn record(&self, first: u64, last: u64, span: SpanContext) {
        let mut recent = self.recent.lock();
        if recent.len() == TRACED_APPENDS {
            recent.pop_front();
        }
        recent.push_back((first, last, span));
        self.newest.store(last, Ordering::Release);
    }

    /// True when an append after seq `after` may have been recorded.
    pub fn any_after(&self, after: u64) -> bool {
        self.newest.load(Ordering::Acquire) > after
    }

    /// Hands `f` the span of every remembered append that overlaps seqs
    /// `after+1..=upto`, oldest first, until `f` returns `false`.
    pub fn overlapping(&self, after: u64, upto: u64, mut f: impl FnMut(SpanContext) -> bool) {
        for (first, last, span) in self.recent.lock().iter() {
            if *last > after && *first <= upto && !f(span.clone()) {
                return;
            }
        }
    }
}

/// Writes finished spans as JSON lines on stderr (`OTEL_TRACES_EXPORTER=console`).
#[derive(Debug, Default)]
pub struct ConsoleExporter {
    service: String,
}

impl SpanExporter for ConsoleExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = Vec::new();
        for span in &batch {
            let line = span_json(span, &self.service);
            serde_json::to_writer(&mut out, &line)
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

/// One finished span as a JSON object.
pub fn span_json(span: &SpanData, service: &str) -> serde_json::Value {
    let micros = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    let attributes: serde_json::Map<String, serde_json::Value> = span
        .attributes
        .iter()
        .map(|kv| (kv.key.to_string(), value_json(&kv.value)))
        .collect();
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
    if !links.is_empty() {
        line["links"] = links.into();
    }
    if let opentelemetry::trace::Status::Error { description } = &span.status {
        line["error"] = description.to_string().into();
    }
    line
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => (*b).into(),
        Value::I64(i) => (*i).into(),
        Value::F64(f) => (*f).into(),
        other => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn choose(endpoint: Option<&str>, vars: &[(&str, &str)]) -> Result<Export, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Export::choose(endpoint, |k| vars.get(k).cloned())
    }

    #[test]
    fn export_is_off_unless_asked_for() {
        assert_eq!(choose(None, &[]).unwrap(), Export::Off);
        assert_eq!(
            choose(Some("http://c:4317"), &[]).unwrap(),
            Export::Otlp(Some("http://c:4317".into()))
        );
        assert_eq!(
            choose(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]).unwrap(),
            Export::Otlp(None)
        );
        assert_eq!(
            choose(None, &[("OTEL_TRACES_EXPORTER", "console")]).unwrap(),
            Export::Console
        );
        assert_eq!(
            choose(Some("http://c:4317"), &[("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            Export::Off
        );
        assert_eq!(
            choose(Some("http://c:4317"), &[("OTEL_SDK_DISABLED", "true")]).unwrap(),
            Export::Off
        );
        assert!(
            choose(None, &[("OTEL_TRACES_EXPORTER", "zipkin")])
                .unwrap_err()
                .to_string()
                .starts_with("invalid setting `OTEL_TRACES_EXPORTER`")
        );
    }

    #[test]
    fn wire_contexts_parse_or_are_ignored() {
        let sc = remote_span_context(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "vendor=x",
        )
        .unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=x");
        assert!(remote_span_context("", "").is_none());
        assert!(remote_span_context("not a traceparent", "").is_none());
    }

    #[test]
    fn append_traces_are_bounded_and_found_by_overlap() {
        let t = AppendTraces::default();
        assert!(!t.any_after(0));
        let sc = |n: u8| {
            remote_span_context(
                &format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000{n:02x}-01"),
                "",
            )
            .unwrap()
        };
        t.record(1, 3, sc(1));
        t.record(7, 9, sc(2));
        assert!(t.any_after(8) && !t.any_after(9));
        let mut found = Vec::new();
        t.overlapping(3, 7, |s| {
            found.push(s);
            true
        });
        assert_eq!(found, vec![sc(2)]);
        for i in 0..TRACED_APPENDS as u64 {
            t.record(10 + i, 10 + i, sc(3));
        }
        let mut n = 0;
        t.overlapping(0, u64::MAX, |_| {
            n += 1;
            true
        });
        assert_eq!(n, TRACED_APPENDS);
    }
}
