//! Logs and traces for the Freshness programs: what the hub
//! (`freshness-hub`) and the client (`freshness-client`, `freshctl`) set up
//! the same way. Each keeps its own `init` and the spans it records; this
//! crate holds the parts they share.
//!
//! ## Export ([`Export`], [`tracer_provider`], [`install`])
//! Off by default. An explicit OTLP endpoint (the hub's `otlp_endpoint`
//! setting) or the standard variables switch it on:
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | export OTLP over gRPC there (when no endpoint is given explicitly); gRPC is the only protocol built in, so `OTEL_EXPORTER_OTLP_PROTOCOL` is not read |
//! | `OTEL_TRACES_EXPORTER` | `otlp` (export, to `localhost:4317` if no endpoint is given), `console` (one JSON line per finished span on stderr, see [`ConsoleExporter`]), `none` (off) |
//! | `OTEL_SDK_DISABLED=true` | off, whatever else is set |
//! | `OTEL_SERVICE_NAME` | the service name (default: the program's own) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` | read by the OpenTelemetry SDK as usual (default sampler: parent-based, always on) |
//!
//! Logs go to stderr, filtered by `FRESHNESS_LOG` ([`log_filter`]). Spans are
//! exported in batches from a thread of their own; [`Telemetry`] flushes what
//! is left when it is shut down or dropped.
//!
//! ## Trace context
//! Events carry the writer's W3C `traceparent` / `tracestate`.
//! [`remote_span_context`] parses them, and [`Adopt`] makes a span the child
//! of the first distinct context it handles and links it to the next
//! [`MAX_LINKS`]. Without an OpenTelemetry layer in the subscriber, [`Adopt`]
//! stops after the first parse.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod tls;
pub use tls::{crypto_provider, install_crypto_provider};

use std::fmt;
use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, Key, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
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
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Most contexts one span links to, besides its parent; the rest are left
/// out (OpenTelemetry's default limit is 128 links a span).
pub const MAX_LINKS: usize = 32;
/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Telemetry that could not be set up; the program does not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` variable has a value that is not supported.
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
    /// Decides from an explicit OTLP endpoint (a program's own setting, if it
    /// has one) and the process environment.
    pub fn from_env(otlp_endpoint: Option<&str>) -> Result<Self, TelemetryError> {
        Self::choose(otlp_endpoint, env_var)
    }

    /// Decides from an explicit OTLP endpoint and the environment (`env`
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

/// For a start-up log line: `off`, `otlp <endpoint>`, `console (stderr)`.
impl fmt::Display for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Otlp(Some(e)) => write!(f, "otlp {e}"),
            Self::Otlp(None) => f.write_str("otlp (OTEL_EXPORTER_OTLP_*)"),
            Self::Console => f.write_str("console (stderr)"),
        }
    }
}

fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// Waits for SIGTERM or Ctrl-C: how every Freshness binary learns to shut
/// down gracefully. Without a SIGTERM handler (it cannot be installed),
/// Ctrl-C alone, with a warning.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("signal received");
}

/// Whether logs on stderr get ANSI colours: only when stderr is a terminal
/// and `NO_COLOR` is unset or empty (<https://no-color.org>). A file or a
/// pipe never gets escape sequences.
pub fn stderr_colors() -> bool {
    use std::io::IsTerminal;
    colors(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// [`stderr_colors`] for a given terminal test and `NO_COLOR` value.
pub fn colors(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The log filter: `FRESHNESS_LOG` when set and valid, else `default`.
pub fn log_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env("FRESHNESS_LOG").unwrap_or_else(|_| EnvFilter::new(default))
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

/// Installs the global subscriber: `logs`, plus [`otel_layer`] over
/// `provider` (its tracer named `scope`) when there is one. The returned
/// [`Telemetry`] owns `provider` and flushes it.
pub fn install<L>(
    logs: L,
    provider: Option<SdkTracerProvider>,
    scope: &'static str,
) -> Result<Telemetry, TelemetryError>
where
    L: Layer<Registry> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(logs)
        .with(provider.as_ref().map(|p| otel_layer(p, scope)))
        .try_init()?;
    Ok(Telemetry { provider })
}

/// The tracer provider for `export` (`None` for [`Export::Off`]), with a
/// resource naming the service `OTEL_SERVICE_NAME`, else `service_name`, its
/// `service.version` (the workspace's, which every Freshness crate shares),
/// and `attributes`. Call it within a tokio runtime when exporting OTLP: the
/// exporter's channel is spawned on it.
pub fn tracer_provider(
    export: Export,
    service_name: &str,
    attributes: impl IntoIterator<Item = KeyValue>,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let service = env_var("OTEL_SERVICE_NAME").unwrap_or_else(|| service_name.to_owned());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attributes(
            std::iter::once(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .chain(attributes),
        )
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

/// The `tracing` → OpenTelemetry layer over `provider`'s tracer named
/// `scope` (the instrumentation scope of every span it exports), for `INFO`
/// spans and events and above.
pub fn otel_layer<S>(
    provider: &SdkTracerProvider,
    scope: &'static str,
) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(scope))
        .with_threads(false)
        .with_filter(LevelFilter::INFO)
}

/// A count or seq as a span field: OpenTelemetry has no unsigned integers,
/// and `tracing-opentelemetry` records `u64` fields as text, so numeric
/// fields are recorded as `i64` (saturating).
pub fn num<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
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

    /// Without any context, makes the span the root of a trace of its own
    /// rather than one more child of the current (long-lived) span.
    pub fn root_unless_joined(&self) {
        if self.seen.is_empty() && self.open {
            let _ = self.span.set_parent(Context::new());
        }
    }
}

/// Writes finished spans as JSON lines on stderr (`OTEL_TRACES_EXPORTER=console`),
/// one [`span_json`] object a line.
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

/// One finished span as a JSON object: `service`, `span`, `kind`,
/// `trace_id`, `span_id`, `start_us`, `duration_us`, `attributes`, and when
/// present `parent_span_id`, `links` and `error`.
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

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn colors_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colors(true, None));
        assert!(colors(true, Some(OsStr::new(""))));
        assert!(!colors(true, Some(OsStr::new("1"))));
        assert!(!colors(false, None));
    }

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
        assert_eq!(
            choose(
                None,
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_SDK_DISABLED", "true")
                ]
            )
            .unwrap(),
            Export::Off
        );
        assert_eq!(
            choose(None, &[("OTEL_TRACES_EXPORTER", "zipkin")])
                .unwrap_err()
                .to_string(),
            "invalid setting `OTEL_TRACES_EXPORTER`: \"zipkin\" is not one of otlp, console, none"
        );
    }

    #[test]
    fn export_describes_itself_for_the_log() {
        assert_eq!(Export::Off.to_string(), "off");
        assert_eq!(
            Export::Otlp(Some("http://c:4317".into())).to_string(),
            "otlp http://c:4317"
        );
        assert_eq!(
            Export::Otlp(None).to_string(),
            "otlp (OTEL_EXPORTER_OTLP_*)"
        );
        assert_eq!(Export::Console.to_string(), "console (stderr)");
    }

    #[test]
    fn wire_contexts_parse_or_are_ignored() {
        let sc = remote_span_context(TRACEPARENT, "vendor=x").unwrap();
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

    /// Runs `f` with a subscriber that has an OpenTelemetry layer.
    fn with_otel(f: impl FnOnce()) {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(otel_layer(&provider, "test"));
        tracing::subscriber::with_default(subscriber, f);
    }

    #[test]
    fn adopt_stops_without_an_opentelemetry_layer() {
        let span = tracing::info_span!("x");
        let mut adopt = Adopt::new(&span);
        assert!(!adopt.wire(TRACEPARENT, ""));
        assert!(!adopt.wire(TRACEPARENT, ""));
        assert_eq!(adopt.count(), 0);
    }

    #[test]
    fn spans_join_the_first_context_link_the_rest_or_start_their_own() {
        with_otel(|| {
            let stream = tracing::info_span!("stream");
            let _in = stream.enter();
            let trace_of = |s: &Span| s.context().span().span_context().trace_id();

            let joined = tracing::info_span!("subscriber.apply");
            let mut adopt = Adopt::new(&joined);
            assert!(adopt.wire(TRACEPARENT, ""));
            assert!(adopt.wire(TRACEPARENT, ""), "the same context again");
            assert!(adopt.wire(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b8-01",
                ""
            ));
            assert!(adopt.wire("not a traceparent", ""));
            assert_eq!(adopt.count(), 2, "one parent, one link");
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
    fn adopt_takes_at_most_max_links_besides_the_parent() {
        with_otel(|| {
            let span = tracing::info_span!("fanout");
            let mut adopt = Adopt::new(&span);
            let mut taken = 0;
            for n in 1..=u8::try_from(MAX_LINKS + 5).unwrap() {
                let tp = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000{n:02x}-01");
                if !adopt.wire(&tp, "") {
                    taken = n;
                    break;
                }
            }
            assert_eq!(usize::from(taken), MAX_LINKS + 1);
            assert_eq!(adopt.count(), MAX_LINKS + 1);
        });
    }
}
