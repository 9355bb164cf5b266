//! One trace from the writer to the node, in one region and across two: the
//! W3C context of the publishing call travels with the event, and every hop
//! records its span in the writer's trace.
//!
//! The spans are exported to memory by the hub's own OpenTelemetry layer,
//! installed as this process's global subscriber; that is why these tests
//! live in a test binary of their own. Each test looks only at the trace its
//! own publish started, so they can run side by side.

use std::sync::{Arc, OnceLock};

use freshness::{Entity, Version};
use freshness_client::{
    EventBatch, FeedState, Handler, HandlerError, Invalidation, Publisher, Reset, Subscriber,
    SubscriberHandle,
};
use freshness_tests::{TestHub, WAIT, bind, test_config, wait_for};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Every span that ended in this process; `ended` counts exports, to await
/// spans without polling.
#[derive(Debug, Clone)]
struct Memory {
    spans: Arc<Mutex<Vec<SpanData>>>,
    ended: Arc<watch::Sender<u64>>,
}

impl SpanExporter for Memory {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.spans.lock().extend(batch);
        self.ended.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// Installs the hub's OpenTelemetry layer over an in-memory exporter, once
/// per process, before any hub or client starts.
fn memory() -> &'static Memory {
    static MEMORY: OnceLock<Memory> = OnceLock::new();
    MEMORY.get_or_init(|| {
        let memory = Memory {
            spans: Arc::default(),
            ended: Arc::new(watch::Sender::new(0)),
        };
        // A simple (synchronous) processor: a span is in memory once it ended.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(memory.clone())
            .build();
        tracing_subscriber::registry()
            .with(freshness_hub::telemetry::otel_layer(&provider))
            .init();
        memory
    })
}

impl Memory {
    /// Waits until `f` finds what it looks for among the ended spans.
    async fn until<T>(&self, what: &str, f: impl Fn(&[SpanData]) -> Option<T>) -> T {
        let mut ended = self.ended.subscribe();
        let mut found = None;
        let waited = tokio::time::timeout(
            WAIT,
            ended.wait_for(|_| {
                found = f(&self.spans.lock());
                found.is_some()
            }),
        )
        .await;
        match (waited, found) {
            (Ok(Ok(_)), Some(v)) => v,
            _ => panic!(
                "{what} never ended; spans: {:#?}",
                names(&self.spans.lock())
            ),
        }
    }
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans
        .iter()
        .map(|s| format!("{} {}", s.name, s.span_context.trace_id()))
        .collect()
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The one span of `trace` named `name` whose attributes include `with`.
fn one(spans: &[SpanData], trace: TraceId, name: &str, with: &[(&str, &str)]) -> Option<SpanData> {
    let mut found = spans.iter().filter(|s| {
        s.span_context.trace_id() == trace
            && s.name == name
            && with.iter().all(|(k, v)| attr(s, k).as_deref() == Some(*v))
    });
    let span = found.next()?.clone();
    assert!(
        found.next().is_none(),
        "two {name} spans with {with:?} in trace {trace}"
    );
    Some(span)
}

/// `child` is a child of `parent`; `remote` when the parent's context came
/// over the wire rather than from this hop's own caller.
fn assert_parent(child: &SpanData, parent: &SpanData, remote: bool) {
    assert_eq!(
        (child.parent_span_id, child.parent_span_is_remote),
        (parent.span_context.span_id(), remote),
        "{} is a child of {}",
        child.name,
        parent.name
    );
}

/// A node that records what it applies.
#[derive(Clone, Default)]
struct Node {
    applied: Arc<watch::Sender<Vec<Invalidation>>>,
}

impl Handler for Node {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        self.applied
            .send_modify(|a| a.extend(batch.events.iter().cloned()));
        Ok(())
    }

    async fn on_reset(&self, _: &Reset) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl Node {
    /// Subscribes as `node_id` and waits until its feed is live.
    async fn start(url: String, node_id: &str) -> (Self, SubscriberHandle) {
        let node = Self::default();
        let handle = Subscriber::builder(url, node_id)
            .build(node.clone())
            .unwrap()
            .spawn();
        let mut feed = handle.feed();
        tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
            .await
            .expect("node live in time")
            .expect("feed open");
        (node, handle)
    }

    /// The applied event of `entity`.
    async fn applied(&self, entity: &str) -> Invalidation {
        let mut rx = self.applied.subscribe();
        let found = tokio::time::timeout(
            WAIT,
            rx.wait_for(|a| a.iter().any(|e| e.entity.as_str() == entity)),
        )
        .await
        .expect("event applied in time")
        .expect("node alive");
        let event = found.iter().find(|e| e.entity.as_str() == entity).cloned();
        event.expect("just found")
    }
}

/// The traceparent the node received is the writer's span, unchanged.
fn assert_carried(event: &Invalidation, writer: &SpanData) {
    assert_eq!(
        event.traceparent.as_deref(),
        Some(
            format!(
                "00-{}-{}-01",
                writer.span_context.trace_id(),
                writer.span_context.span_id()
            )
            .as_str()
        ),
        "the node got the writer's W3C context"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_writer_to_the_node() {
    let memory = memory();
    let hub = TestHub::start().await;
    let (node, handle) = Node::start(hub.url(), "node-local").await;

    let entity = "user:trace-local";
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    publisher
        .publish(Entity::parse(entity).unwrap(), Version::new(1).unwrap())
        .await
        .expect("published");
    let event = node.applied(entity).await;
    let traceparent = event
        .traceparent
        .clone()
        .expect("the event carries a context");
    let trace = TraceId::from_hex(traceparent.split('-').nth(1).unwrap()).unwrap();

    let shard = freshness::shard(entity, 64).0.to_string();
    let [writer, hub_publish, append, fanout, apply] = memory
        .until(
            "the chain publish → append → fan-out → apply",
            |spans| {
                Some([
                    one(spans, trace, "publisher.publish", &[])?,
                    one(spans, trace, "hub.publish", &[("region", "local")])?,
                    one(spans, trace, "shard.append", &[("shard", &shard)])?,
                    one(spans, trace, "session.fanout", &[("node_id", "node-local")])?,
                    one(
                        spans,
                        trace,
                        "subscriber.apply",
                        &[("node_id", "node-local")],
                    )?,
                ])
            },
        )
        .await;

    assert_carried(&event, &writer);
    assert_eq!(
        writer.parent_span_id,
        SpanId::INVALID,
        "the writer starts the trace"
    );
    assert_eq!(writer.span_kind, SpanKind::Producer);
    assert_parent(&hub_publish, &writer, true);
    assert_eq!(hub_publish.span_kind, SpanKind::Server);
    assert_eq!(attr(&hub_publish, "applied").as_deref(), Some("1"));
    assert_parent(&append, &hub_publish, false);
    assert_eq!(attr(&append, "appended").as_deref(), Some("1"));
    assert_parent(&fanout, &append, false);
    assert_eq!(fanout.span_kind, SpanKind::Producer);
    assert_eq!(attr(&fanout, "events").as_deref(), Some("1"));
    assert_parent(&apply, &writer, true);
    assert_eq!(apply.span_kind, SpanKind::Consumer);
    assert_eq!(attr(&apply, "events").as_deref(), Some("1"));

    handle.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_regions() {
    let memory = memory();
    let (us_listener, eu_listener) = (bind().await, bind().await);
    let url = |l: &tokio::net::TcpListener| format!("http://{}", l.local_addr().unwrap());
    let config = |region: &str, peer: &str, peer_url: String| {
        let mut c = test_config();
        c.region = region.into();
        c.hub_id = format!("hub-{region}");
        c.peers = [(peer.to_owned(), peer_url)].into_iter().collect();
        c
    };
    let us_config = config("us", "eu", url(&eu_listener));
    let eu_config = config("eu", "us", url(&us_listener));
    let us = TestHub::start_with_listener(us_listener, us_config);
    let eu = TestHub::start_with_listener(eu_listener, eu_config);
    for hub in [&us, &eu] {
        wait_for(|| async {
            hub.status()
                .await
                .peers
                .iter()
                .all(|p| p.connected)
                .then_some(())
        })
        .await;
    }
    let (node, handle) = Node::start(eu.url(), "node-eu").await;

    let entity = "user:trace-regions";
    let publisher = Publisher::builder(us.url()).build().unwrap();
    publisher
        .publish(Entity::parse(entity).unwrap(), Version::new(1).unwrap())
        .await
        .expect("published");
    let event = node.applied(entity).await;
    assert_eq!(event.origin, "us");
    let traceparent = event
        .traceparent
        .clone()
        .expect("the event carries a context");
    let trace = TraceId::from_hex(traceparent.split('-').nth(1).unwrap()).unwrap();

    let [
        writer,
        us_publish,
        us_append,
        us_to_eu,
        eu_append,
        eu_fanout,
        apply,
    ] = memory
        .until("the chain across us and eu", |spans| {
            Some([
                one(spans, trace, "publisher.publish", &[])?,
                one(spans, trace, "hub.publish", &[("region", "us")])?,
                one(spans, trace, "shard.append", &[("region", "us")])?,
                one(
                    spans,
                    trace,
                    "session.fanout",
                    &[("region", "us"), ("replication", "true")],
                )?,
                one(spans, trace, "shard.append", &[("region", "eu")])?,
                one(spans, trace, "session.fanout", &[("node_id", "node-eu")])?,
                one(spans, trace, "subscriber.apply", &[("node_id", "node-eu")])?,
            ])
        })
        .await;

    // Region us: the writer's publish, its append, the fan-out to eu's link.
    assert_carried(&event, &writer);
    assert_parent(&us_publish, &writer, true);
    assert_parent(&us_append, &us_publish, false);
    assert_parent(&us_to_eu, &us_append, false);
    assert_eq!(attr(&us_to_eu, "node_id").as_deref(), Some("hub/eu/hub-eu"));
    // Region eu: the replicated event kept the writer's context, so eu's
    // append, its fan-out and the node's apply are in the same trace.
    assert_parent(&eu_append, &writer, true);
    assert_eq!(attr(&eu_fanout, "region").as_deref(), Some("eu"));
    assert_parent(&eu_fanout, &eu_append, false);
    assert_parent(&apply, &writer, true);

    handle.shutdown().await.unwrap();
    us.stop().await;
    eu.stop().await;
}
