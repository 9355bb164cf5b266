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
//!
//! The export set-up, [`Adopt`] and the W3C context parsing are shared with
//! the client (crate `freshness_telemetry`) and re-exported here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::trace::SdkTracerProvider;
use parking_lot::Mutex;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

pub use freshness_telemetry::{
    Adopt, ConsoleExporter, Export, MAX_LINKS, Telemetry, TelemetryError, num, remote_span_context,
    span_json,
};

use crate::config::{Config, LogFormat};

/// Service name when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "freshness-hub";
/// Traced appends a shard remembers for the sessions' fan-out spans.
pub const TRACED_APPENDS: usize = 64;
/// The instrumentation scope of the hub's spans.
const SCOPE: &str = "freshness-hub";

/// Installs the global subscriber: logs per `log_format` and `FRESHNESS_LOG`,
/// plus span export when configured (see the module docs). Call it within a
/// tokio runtime: the OTLP exporter's channel is spawned on it.
pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
    let export = Export::from_env(config.otlp_endpoint.as_deref())?;
    let describe = export.to_string();
    let provider = tracer_provider(export, config)?;
    let filter = freshness_telemetry::log_filter("info");
    let logs = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(freshness_telemetry::stderr_colors())
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let telemetry = freshness_telemetry::install(logs, provider, SCOPE)?;
    if telemetry.exporting() {
        tracing::info!(export = %describe, "exporting traces");
    }
    Ok(telemetry)
}

/// The tracer provider for `export`, with the hub's resource: service name
/// (`OTEL_SERVICE_NAME` or [`DEFAULT_SERVICE_NAME`]), version, hub id and
/// region.
pub fn tracer_provider(
    export: Export,
    config: &Config,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    freshness_telemetry::tracer_provider(
        export,
        DEFAULT_SERVICE_NAME,
        [
            KeyValue::new("service.instance.id", config.hub_id.clone()),
            KeyValue::new("freshness.region", config.region.clone()),
        ],
    )
}

/// The `tracing` → OpenTelemetry layer over `provider`'s tracer, for `INFO`
/// spans and events and above. [`init`] installs it; tests and programs that
/// embed the hub compose it into their own subscriber.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    freshness_telemetry::otel_layer(provider, SCOPE)
}

/// The OpenTelemetry context of the current span, when it has a valid one
/// (only with an OpenTelemetry layer installed).
pub fn current_span_context() -> Option<SpanContext> {
    let cx = Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
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

#[cfg(test)]
mod tests {
    use super::*;

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
