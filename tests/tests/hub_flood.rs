//! Publishers flooding a hub with small bounded queues (issue 7, SPEC §4
//! "the hub cannot take more publishes now", G5), with stalled nodes on the
//! side: the hub refuses with `UNAVAILABLE` and a retry hint, applies
//! nothing of a refused call, keeps its log and its streams within their
//! configured bounds, and keeps serving a well-behaved writer and node.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use freshness::pb;
use freshness::pb::subscribe_response::Kind;
use freshness_client::publisher::RetryPolicy;
use freshness_client::{Backoff, Entity, Publisher, Version};
use freshness_tests::{NodeCursor, RawNode, TestHub, WAIT, connect, hello, test_config, wait_for};
use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::Code;

const SHARDS: u32 = 4;
const LOG_EVENTS: u64 = 8_192;
const LOG_BYTES: u64 = 2 << 20;
const WRITERS: usize = 12;
const BATCH: usize = 400;
/// Refusals the flood must provoke before it stops: proof that it pushed
/// the hub past what its queues take.
const REFUSALS: u64 = 40;
/// Calls each flooder makes at least.
const MIN_CALLS: u64 = 12;
/// Calls accepted in all before the flood stops: the log wraps four times.
const MIN_ACCEPTED: u64 = 4 * LOG_EVENTS / BATCH as u64 + 1;

/// What the flood did, as its writers saw it.
#[derive(Debug, Default)]
struct Tally {
    accepted_calls: AtomicU64,
    refused: AtomicU64,
    /// Refusals by code, for the failure message.
    codes: Mutex<HashMap<String, u64>>,
}

/// What the well-behaved node saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Entities delivered, in order.
    markers: Vec<String>,
    /// Resets received.
    resets: Vec<pb::Reset>,
    /// Messages that carried a watermark.
    watermarks: u64,
}

/// A node that applies and acks everything it gets, and records what it saw.
async fn steady_node(hub: &TestHub) -> watch::Receiver<Seen> {
    let mut node = RawNode::connect(&hub.url(), hello("steady", &["steady"], None))
        .await
        .unwrap();
    let (tx, rx) = watch::channel(Seen::default());
    tokio::spawn(async move {
        let mut cursor = NodeCursor::from_welcome(&node.welcome);
        while let Ok(Some(msg)) = node.next().await {
            cursor.apply(&msg);
            tx.send_modify(|s| match &msg {
                Kind::Events(b) => {
                    s.markers.extend(
                        b.events
                            .iter()
                            .map(|d| d.event.as_ref().unwrap().entity.clone()),
                    );
                    s.watermarks += u64::from(b.watermark_us != 0);
                }
                Kind::Progress(p) => s.watermarks += u64::from(p.watermark_us != 0),
                Kind::Reset(r) => s.resets.push(r.clone()),
                _ => {}
            });
            node.ack(cursor.cursor.clone()).await;
        }
    });
    rx
}

fn flood_request(w: usize, call: u64) -> pb::PublishRequest {
    pb::PublishRequest {
        events: (0..BATCH)
            .map(|i| pb::Event {
                entity: format!("flood:{w}-{call}-{i}"),
                version: 1,
                payload: vec![0xf1; 48].into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_publishers_are_refused_with_a_hint_and_everyone_else_is_served() {
    let mut config = test_config();
    config.shards = SHARDS;
    config.shard_queue = 1;
    config.admission_timeout = Duration::ZERO;
    config.log_max_events = LOG_EVENTS;
    config.log_max_bytes = LOG_BYTES;
    config.max_in_flight = 256;
    let hub = TestHub::start_with(config).await;
    let seen = steady_node(&hub).await;

    // Two nodes that stall: one never acks, one never even reads its stream.
    let mut lazy = RawNode::connect(&hub.url(), hello("never-acks", &[], None))
        .await
        .unwrap();
    let lazy_resets = Arc::new(Mutex::new(Vec::new()));
    let lazy_reader = tokio::spawn({
        let resets = lazy_resets.clone();
        async move {
            while let Ok(Some(msg)) = lazy.next().await {
                if let Kind::Reset(r) = msg {
                    resets.lock().push(r.reason);
                }
            }
        }
    });
    let deaf = RawNode::connect(&hub.url(), hello("never-reads", &[], None))
        .await
        .unwrap();

    // Status sampled throughout: the log and the streams stay in bounds.
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = {
        let url = hub.url();
        let flooding = flooding.clone();
        tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let (mut samples, mut max_events, mut max_bytes) = (0u64, 0u64, 0u64);
            while flooding.load(Ordering::Relaxed) {
                tick.tick().await;
                let s = client
                    .status(pb::StatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                assert!(s.retained_events <= LOG_EVENTS, "{}", s.retained_events);
                assert!(s.retained_bytes <= LOG_BYTES, "{}", s.retained_bytes);
                for n in &s.nodes {
                    assert!(n.in_flight <= n.max_in_flight, "{n:?}");
                }
                samples += 1;
                max_events = max_events.max(s.retained_events);
                max_bytes = max_bytes.max(s.retained_bytes);
            }
            (samples, max_events, max_bytes)
        })
    };

    // The flood: every writer as fast as it can, ignoring the hints.
    let tally = Arc::new(Tally::default());
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let url = hub.url();
        let tally = tally.clone();
        writers.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut call = 0u64;
            let deadline = tokio::time::Instant::now() + WAIT;
            while call < MIN_CALLS
                || tally.refused.load(Ordering::Relaxed) < REFUSALS
                || tally.accepted_calls.load(Ordering::Relaxed) < MIN_ACCEPTED
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the flood never got {REFUSALS} refusals and {MIN_ACCEPTED} accepted calls"
                );
                match client.publish(flood_request(w, call)).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        assert_eq!(resp.results.len(), BATCH);
                        assert!(
                            resp.results
                                .iter()
                                .all(|r| r.outcome == pb::PublishOutcome::Applied as i32),
                            "fresh entities are applied"
                        );
                        tally.accepted_calls.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *tally
                            .codes
                            .lock()
                            .entry(format!("{:?}", e.code()))
                            .or_default() += 1;
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        let hint: u64 = e
                            .metadata()
                            .get("retry-after-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .expect("a refusal carries retry-after-ms");
                        assert!(hint >= 1, "{hint}");
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                call += 1;
            }
        }));
    }

    // Meanwhile a well-behaved writer publishes markers one at a time,
    // retrying as the hints say; each reaches the node (or, as G1 allows, a
    // reset of its shard does).
    let publisher = Publisher::builder(hub.url())
        .linger(Duration::ZERO)
        .retry(RetryPolicy {
            max_attempts: 1_000,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(20)),
            give_up_after: WAIT,
            attempt_timeout: WAIT,
        })
        .build()
        .unwrap();
    let mut markers = Vec::new();
    let mut m = 0u64;
    while writers.iter().any(|w| !w.is_finished()) {
        let entity = format!("steady:{m}");
        let result = publisher
            .publish(Entity::parse(&entity).unwrap(), Version::new(1).unwrap())
            .await
            .expect("the well-behaved writer gets through");
        markers.push((entity, result.shard.0));
        m += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
    flooding.store(false, Ordering::Relaxed);
    let (samples, max_events, max_bytes) = sampler.await.unwrap();

    // After the flood, the writer and node are served as if nothing happened.
    let last = "steady:last".to_owned();
    publisher
        .publish(Entity::parse(&last).unwrap(), Version::new(1).unwrap())
        .await
        .unwrap();
    let mut rx = seen.clone();
    let s = tokio::time::timeout(WAIT, rx.wait_for(|s| s.markers.contains(&last)))
        .await
        .expect("the last marker arrives")
        .unwrap()
        .clone();
    for (entity, shard) in &markers {
        let covered = s.resets.iter().any(|r| r.all || r.shards.contains(shard));
        assert!(
            s.markers.contains(entity) || covered,
            "{entity} neither arrived nor was reset: {s:?}"
        );
    }

    // All or nothing: the log's heads count exactly the accepted calls'
    // events and the markers.
    let accepted = tally.accepted_calls.load(Ordering::Relaxed);
    let refused = tally.refused.load(Ordering::Relaxed);
    let status = hub.status().await;
    let head: u64 = status.shards.iter().map(|s| s.head_seq).sum();
    assert_eq!(
        head,
        accepted * BATCH as u64 + markers.len() as u64 + 1,
        "refused: {:?}",
        tally.codes.lock()
    );
    assert!(
        head > 4 * LOG_EVENTS,
        "the log wrapped several times: {head}"
    );
    assert!(status.retained_events <= LOG_EVENTS);

    // The stalled nodes are parked at their in-flight limit, not buffered
    // for, and the registry is back to the steady node once they leave.
    for id in ["never-acks", "never-reads"] {
        let n = status.nodes.iter().find(|n| n.node_id == id).unwrap();
        assert!(n.in_flight <= n.max_in_flight, "{n:?}");
    }
    // The node that never acks was reset as the log left it behind (G5).
    wait_for(|| async { (!lazy_resets.lock().is_empty()).then_some(()) }).await;
    let lazy_resets = lazy_resets.lock().clone();
    assert!(
        lazy_resets
            .iter()
            .all(|r| *r == pb::ResetReason::SlowConsumer as i32),
        "{lazy_resets:?}"
    );
    drop(deaf);
    lazy_reader.abort();
    wait_for(|| async {
        let nodes = hub.status().await.nodes;
        (nodes.len() == 1 && nodes[0].node_id == "steady").then_some(())
    })
    .await;
    println!(
        "flood: {accepted} calls of {BATCH} accepted, {refused} refused, {} markers; \
         {samples} status samples, retained at most {max_events} events / {max_bytes} bytes \
         (limits {LOG_EVENTS} / {LOG_BYTES}); steady node: {} resets, {} watermarks; \
         node that never acks: {} resets",
        markers.len(),
        s.resets.len(),
        s.watermarks,
        lazy_resets.len(),
    );
}
