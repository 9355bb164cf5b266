//! The client library as a cache node uses it, against real hubs on loopback:
//! resume from a persisted cursor, start at the head, the fill race, fail
//! closed while the hub is down, scoped resets, replacement.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use freshness::{Entity, ShardId, Version, shard};
use freshness_client::{
    Backoff, Dep, EventBatch, FeedState, FillRefused, FreshnessPolicy, Handler, HandlerError,
    Loaded, Publisher, Reset, ResetReason, ResetScope, Subscriber, SubscriberError,
    SubscriberHandle, VersionedCache,
};
use freshness_tests::{TestHub, WAIT, test_config, wait_for};
use tokio::sync::{oneshot, watch};

type Cache = VersionedCache<String, String>;

/// What a node's handler saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    events: Vec<(String, u64)>,
    resets: Vec<Reset>,
}

impl Seen {
    fn saw(&self, entity: &str, version: u64) -> bool {
        self.events
            .iter()
            .any(|(e, v)| e == entity && *v == version)
    }
}

/// The cache as the node's handler, recording what it applies so tests can
/// await it.
#[derive(Clone)]
struct Recorder {
    cache: Cache,
    seen: Arc<watch::Sender<Seen>>,
}

impl Recorder {
    fn new(cache: Cache) -> Self {
        Self {
            cache,
            seen: Arc::new(watch::Sender::new(Seen::default())),
        }
    }

    /// Waits until what was seen satisfies `pred`.
    async fn until(&self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        let mut rx = self.seen.subscribe();
        match tokio::time::timeout(WAIT, rx.wait_for(|s| pred(s))).await {
            Ok(Ok(s)) => s.clone(),
            _ => panic!("never saw {what}; saw {:?}", self.seen.borrow()),
        }
    }
}

impl Handler for Recorder {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        self.cache.on_events(batch).await?;
        self.seen.send_modify(|s| {
            s.events.extend(
                batch
                    .events
                    .iter()
                    .map(|e| (e.entity.to_string(), e.version.get())),
            );
        });
        Ok(())
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.cache.on_reset(reset).await?;
        self.seen.send_modify(|s| s.resets.push(reset.clone()));
        Ok(())
    }

    async fn on_start_at_head(&self) -> Result<(), HandlerError> {
        self.cache.on_start_at_head().await
    }
}

fn e(s: &str) -> Entity {
    Entity::parse(s).unwrap()
}

fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

/// A cursor file path of its own for each test (removed when dropped).
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self(std::env::temp_dir().join(format!(
            "freshness-{name}-{}-{nanos}.cursor",
            std::process::id()
        )))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts a node and waits until its feed is live.
async fn start_node(
    url: &str,
    node_id: &str,
    cursor: Option<&TempPath>,
    recorder: &Recorder,
) -> SubscriberHandle {
    let mut b = Subscriber::builder(url, node_id)
        .reconnect_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
        ))
        .stale_after(Duration::from_millis(500));
    if let Some(p) = cursor {
        b = b
            .cursor_file(&p.0)
            .persist_interval(Duration::from_millis(50));
    }
    let handle = b.build(recorder.clone()).unwrap().spawn();
    recorder.cache.bind_feed(handle.feed());
    let mut feed = handle.feed();
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
        .await
        .expect("feed live in time")
        .expect("subscriber running");
    handle
}

async fn publish(p: &Publisher, entity: &str, version: u64) {
    p.publish(e(entity), v(version)).await.unwrap();
}

#[tokio::test]
async fn restarted_node_resumes_from_its_persisted_cursor_and_misses_nothing() {
    let hub = TestHub::start().await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    let cursor = TempPath::new("resume");
    // The cache outlives the subscriber, as an on-disk cache outlives a
    // process.
    let cache: Cache = VersionedCache::builder().build();
    let first = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "resumer", Some(&cursor), &first).await;
    publish(&publisher, "user:1", 1).await;
    first.until("user:1 v1", |s| s.saw("user:1", 1)).await;
    node.shutdown().await.unwrap();
    assert!(cursor.0.exists(), "the cursor was persisted");

    for key in ["user:2", "user:3"] {
        cache
            .insert(key.into(), format!("{key} at v1"), [Dep::at(e(key), v(1))])
            .await
            .unwrap();
    }
    // Published while the node is down.
    publish(&publisher, "user:2", 2).await;
    publish(&publisher, "post:9", 4).await;

    let second = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "resumer", Some(&cursor), &second).await;
    let seen = second
        .until("what was published while down", |s| {
            s.saw("user:2", 2) && s.saw("post:9", 4)
        })
        .await;
    assert!(seen.resets.is_empty(), "resumed without a reset: {seen:?}");
    assert!(
        !seen.saw("user:1", 1),
        "nothing from before the cursor is replayed"
    );
    assert_eq!(
        cache.get(&"user:2".into()).await,
        None,
        "the missed invalidation landed"
    );
    assert_eq!(
        cache.get(&"user:3".into()).await.as_deref(),
        Some("user:3 at v1"),
        "no full flush"
    );
    node.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn node_without_cursor_and_empty_cache_starts_at_the_head() {
    let hub = TestHub::start().await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    publish(&publisher, "user:1", 1).await;
    publish(&publisher, "user:2", 1).await;

    let node_cache: Cache = VersionedCache::builder().build();
    let rec = Recorder::new(node_cache);
    let node = start_node(&hub.url(), "fresh", None, &rec).await;
    publish(&publisher, "user:3", 1).await;
    let seen = rec.until("user:3 v1", |s| s.saw("user:3", 1)).await;
    assert_eq!(
        seen.events,
        vec![("user:3".to_owned(), 1)],
        "only what came after the start"
    );
    assert!(seen.resets.is_empty());
    node.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn slow_fill_overtaken_by_an_invalidation_is_not_stored() {
    let hub = TestHub::start().await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    let cache: Cache = VersionedCache::builder().build();
    let rec = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "filler", None, &rec).await;

    // A loader that cannot tell versions reads the row, then stalls.
    let (read_tx, read_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let fill = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load("profile:7".to_owned(), || async move {
                    let value = "name at v1".to_owned();
                    let _ = read_tx.send(());
                    let _ = go_rx.await;
                    Ok::<_, std::io::Error>(Loaded::new(value, [Dep::unversioned(e("user:7"))]))
                })
                .await
        })
    };
    read_rx.await.unwrap();
    // Meanwhile the writer commits v2 and publishes; the node applies it.
    publish(&publisher, "user:7", 2).await;
    rec.until("user:7 v2", |s| s.saw("user:7", 2)).await;
    go_tx.send(()).unwrap();
    assert_eq!(fill.await.unwrap().unwrap(), "name at v1");
    assert_eq!(
        cache.get(&"profile:7".into()).await,
        None,
        "the overtaken fill was not stored"
    );
    assert_eq!(cache.stats().refused_fills, 1);

    // A fill that read v1 after v2 was invalidated is refused outright ...
    assert_eq!(
        cache
            .insert(
                "profile:7".into(),
                "name at v1".into(),
                [Dep::at(e("user:7"), v(1))]
            )
            .await,
        Err(FillRefused::StaleRead {
            entity: e("user:7"),
            read: v(1),
            invalidated: v(2)
        })
    );
    // ... one that read v2 is stored.
    cache
        .insert(
            "profile:7".into(),
            "name at v2".into(),
            [Dep::at(e("user:7"), v(2))],
        )
        .await
        .unwrap();
    assert_eq!(
        cache.get(&"profile:7".into()).await.as_deref(),
        Some("name at v2")
    );
    node.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn fail_closed_namespace_misses_while_the_hub_is_down_and_recovers() {
    let config = test_config();
    let hub = TestHub::start_with(config.clone()).await;
    let addr = hub.addr;
    // Well above the hub's 250 ms progress interval (a busy machine).
    let bound = Duration::from_millis(1500);
    let cache: Cache = VersionedCache::builder()
        .policy(
            "price",
            FreshnessPolicy::FailClosed {
                max_staleness: bound,
            },
        )
        .policy("user", FreshnessPolicy::ServeStale)
        .build();
    let rec = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "strict", None, &rec).await;
    let feed = node.feed();
    cache
        .insert(
            "price:1".into(),
            "9.99".into(),
            [Dep::at(e("price:1"), v(1))],
        )
        .await
        .unwrap();
    cache
        .insert("user:1".into(), "Ada".into(), [Dep::at(e("user:1"), v(1))])
        .await
        .unwrap();
    assert_eq!(cache.get(&"price:1".into()).await.as_deref(), Some("9.99"));

    hub.stop().await;
    wait_for(|| async { feed.staleness().filter(|s| *s > bound).map(|_| ()) }).await;
    let mut states = feed.clone();
    tokio::time::timeout(WAIT, states.wait_for(|s| !s.is_live()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cache.get(&"price:1".into()).await, None, "fails closed");
    assert_eq!(
        cache.get(&"user:1".into()).await.as_deref(),
        Some("Ada"),
        "serves stale"
    );
    assert!(cache.stats().fail_closed >= 1);

    let hub = TestHub::start_on(addr, config).await;
    tokio::time::timeout(WAIT, states.wait_for(FeedState::is_live))
        .await
        .expect("live again in time")
        .unwrap();
    // A restarted hub (without a durable log) is a new epoch: everything
    // cached was flushed before the feed went live again.
    let seen = rec
        .until("the epoch reset", |s| {
            s.resets
                .iter()
                .any(|r| r.reason == ResetReason::EpochChanged && r.is_all())
        })
        .await;
    assert_eq!(seen.resets.len(), 1, "{seen:?}");
    assert_eq!(cache.get(&"user:1".into()).await, None);
    cache
        .insert(
            "price:1".into(),
            "10.49".into(),
            [Dep::at(e("price:1"), v(2))],
        )
        .await
        .unwrap();
    assert_eq!(cache.get(&"price:1".into()).await.as_deref(), Some("10.49"));
    node.shutdown().await.unwrap();
    hub.stop().await;
}

/// An entity of namespace `ns` in shard `s` of `shards`.
fn entity_in(ns: &str, s: u32, shards: u32, skip: usize) -> String {
    (0..)
        .map(|i| format!("{ns}:{i}"))
        .filter(|name| shard(name, shards) == ShardId(s))
        .nth(skip)
        .unwrap()
}

#[tokio::test]
async fn scoped_reset_drops_only_the_entries_of_the_expired_shards() {
    // Four shards retaining one event each: two events in a shard expire a
    // cursor that points before them.
    let mut config = test_config();
    config.shards = 4;
    config.log_max_events = 4;
    let hub = TestHub::start_with(config).await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    let cursor = TempPath::new("scoped");
    let cache: Cache = VersionedCache::builder().build();
    let in0 = entity_in("user", 0, 4, 0);
    let in1 = entity_in("user", 1, 4, 0);
    let in2 = entity_in("user", 2, 4, 0);

    let rec = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "scoped", Some(&cursor), &rec).await;
    node.shutdown().await.unwrap();
    for key in [&in0, &in1, &in2] {
        cache
            .insert(key.clone(), "v1".into(), [Dep::at(e(key), v(1))])
            .await
            .unwrap();
    }
    // While the node is down, shard 0 moves two events on (its log keeps one)
    // and shard 2 one (still replayable).
    publish(&publisher, &entity_in("user", 0, 4, 1), 1).await;
    publish(&publisher, &entity_in("user", 0, 4, 2), 1).await;
    publish(&publisher, &entity_in("post", 2, 4, 0), 1).await;

    let rec = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "scoped", Some(&cursor), &rec).await;
    let replayed = entity_in("post", 2, 4, 0);
    let seen = rec
        .until("the reset and the replay", |s| {
            !s.resets.is_empty() && s.saw(&replayed, 1)
        })
        .await;
    assert_eq!(seen.resets.len(), 1, "{seen:?}");
    assert_eq!(seen.resets[0].reason, ResetReason::CursorExpired);
    assert_eq!(
        seen.resets[0].scope,
        ResetScope::Shards([ShardId(0)].into())
    );
    assert_eq!(cache.get(&in0).await, None, "shard 0 was reset");
    assert_eq!(cache.get(&in1).await.as_deref(), Some("v1"), "shard 1 kept");
    assert_eq!(
        cache.get(&in2).await.as_deref(),
        Some("v1"),
        "shard 2 replayed, kept"
    );
    node.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn a_node_replaced_by_a_newer_stream_stops_with_an_error() {
    let hub = TestHub::start().await;
    let first = Recorder::new(VersionedCache::builder().build());
    let old = start_node(&hub.url(), "twin", None, &first).await;
    let second = Recorder::new(VersionedCache::builder().build());
    let new = start_node(&hub.url(), "twin", None, &second).await;
    let mut feed = old.feed();
    let state = tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_down))
        .await
        .unwrap();
    // The subscriber is gone for good: the watch has no sender left, or it
    // shows Down with the reason.
    if let Ok(s) = state {
        assert!(matches!(s, FeedState::Down { .. }));
    }
    assert!(matches!(
        old.join().await,
        Err(SubscriberError::Replaced(_))
    ));
    assert!(new.feed().state().is_live());
    new.shutdown().await.unwrap();
    hub.stop().await;
}

/// A handler that cannot apply events of one entity (say its cache backend
/// rejects the key), in front of the cache.
#[derive(Clone)]
struct Flaky {
    inner: Recorder,
    poison: String,
}

impl Handler for Flaky {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        if batch
            .events
            .iter()
            .any(|e| e.entity.as_str() == self.poison)
        {
            return Err(format!("cannot apply {}", self.poison).into());
        }
        self.inner.on_events(batch).await
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.inner.on_reset(reset).await
    }
}

#[tokio::test]
async fn a_handler_that_keeps_failing_resets_the_batch_shards_instead_of_losing_it() {
    let hub = TestHub::start().await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    let shards = hub.status().await.shard_count;
    let cache: Cache = VersionedCache::builder().build();
    let rec = Recorder::new(cache.clone());
    let poison = "user:poison".to_owned();
    let poisoned_shard = shard(&poison, shards);
    let neighbour = entity_in("user", poisoned_shard.0, shards, 0);
    let elsewhere = entity_in("user", (poisoned_shard.0 + 1) % shards, shards, 0);
    let handle = Subscriber::builder(hub.url(), "flaky")
        .build(Flaky {
            inner: rec.clone(),
            poison: poison.clone(),
        })
        .unwrap()
        .spawn();
    let mut feed = handle.feed();
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
        .await
        .unwrap()
        .unwrap();
    for key in [&neighbour, &elsewhere] {
        cache
            .insert(key.clone(), "v1".into(), [Dep::at(e(key), v(1))])
            .await
            .unwrap();
    }
    publish(&publisher, &poison, 3).await;
    let seen = rec.until("the local reset", |s| !s.resets.is_empty()).await;
    assert_eq!(seen.resets[0].reason, ResetReason::HandlerFailed);
    assert_eq!(
        seen.resets[0].scope,
        ResetScope::Shards([poisoned_shard].into())
    );
    assert_eq!(cache.get(&neighbour).await, None, "its shard was dropped");
    assert_eq!(cache.get(&elsewhere).await.as_deref(), Some("v1"));
    // The batch counts as applied: the node acks past it and stays live.
    wait_for(|| async {
        let status = hub.status().await;
        status
            .nodes
            .iter()
            .find(|n| n.node_id == "flaky")
            .filter(|n| n.lag_events == 0)
            .map(|_| ())
    })
    .await;
    publish(&publisher, "user:after", 1).await;
    rec.until("the next event", |s| s.saw("user:after", 1))
        .await;
    handle.shutdown().await.unwrap();
    hub.stop().await;
}

/// A handler that holds every batch until its gate opens, in front of the
/// recorder; counts the batches it was handed.
#[derive(Clone)]
struct Gated {
    inner: Recorder,
    gate: watch::Sender<bool>,
    entered: Arc<watch::Sender<usize>>,
}

impl Handler for Gated {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        self.entered.send_modify(|n| *n += 1);
        let mut gate = self.gate.subscribe();
        gate.wait_for(|open| *open).await?;
        self.inner.on_events(batch).await
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.inner.on_reset(reset).await
    }
}

#[tokio::test]
async fn a_stalled_node_is_reset_for_the_shards_its_hub_no_longer_retains() {
    let mut config = test_config();
    config.shards = 4;
    config.log_max_events = 4;
    let hub = TestHub::start_with(config).await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    let cache: Cache = VersionedCache::builder().build();
    let rec = Recorder::new(cache.clone());
    let gated = Gated {
        inner: rec.clone(),
        gate: watch::Sender::new(false),
        entered: Arc::new(watch::Sender::new(0)),
    };
    let handle = Subscriber::builder(hub.url(), "stalled")
        .max_in_flight(1)
        .build(gated.clone())
        .unwrap()
        .spawn();
    let mut feed = handle.feed();
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
        .await
        .unwrap()
        .unwrap();
    let (in0, in1) = (entity_in("user", 0, 4, 0), entity_in("user", 1, 4, 0));
    for key in [&in0, &in1] {
        cache
            .insert(key.clone(), "v1".into(), [Dep::at(e(key), v(1))])
            .await
            .unwrap();
    }
    // The node takes the first event of shard 0 and stalls on it ...
    publish(&publisher, &entity_in("post", 0, 4, 0), 1).await;
    let mut entered = gated.entered.subscribe();
    tokio::time::timeout(WAIT, entered.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    // ... while shard 0 moves on further than its log keeps.
    publish(&publisher, &entity_in("post", 0, 4, 1), 1).await;
    publish(&publisher, &entity_in("post", 0, 4, 2), 1).await;
    gated.gate.send_replace(true);
    let seen = rec
        .until("the slow-consumer reset", |s| !s.resets.is_empty())
        .await;
    assert_eq!(seen.resets[0].reason, ResetReason::SlowConsumer);
    assert_eq!(
        seen.resets[0].scope,
        ResetScope::Shards([ShardId(0)].into())
    );
    assert_eq!(cache.get(&in0).await, None, "shard 0 was reset");
    assert_eq!(cache.get(&in1).await.as_deref(), Some("v1"));
    // The feed goes on from the reset position.
    publish(&publisher, "user:next", 1).await;
    let seen = rec.until("user:next", |s| s.saw("user:next", 1)).await;
    assert!(
        !seen.saw(&entity_in("post", 0, 4, 1), 1),
        "the evicted event came as a reset"
    );
    handle.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn a_cursor_the_hub_refuses_flushes_the_cache_and_starts_at_the_head() {
    // The deployment changes its shard count: the saved cursor no longer fits.
    let mut config = test_config();
    config.shards = 4;
    let hub = TestHub::start_with(config.clone()).await;
    let addr = hub.addr;
    let cursor = TempPath::new("refused");
    let cache: Cache = VersionedCache::builder().build();
    let rec = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "resharded", Some(&cursor), &rec).await;
    node.shutdown().await.unwrap();
    hub.stop().await;
    cache
        .insert("user:1".into(), "v1".into(), [Dep::at(e("user:1"), v(1))])
        .await
        .unwrap();

    config.shards = 8;
    let hub = TestHub::start_on(addr, config).await;
    let rec = Recorder::new(cache.clone());
    let node = start_node(&hub.url(), "resharded", Some(&cursor), &rec).await;
    let seen = rec
        .until("a full reset", |s| s.resets.iter().any(Reset::is_all))
        .await;
    assert!(
        matches!(
            seen.resets[0].reason,
            ResetReason::CursorLost | ResetReason::EpochChanged
        ),
        "{seen:?}"
    );
    assert_eq!(
        cache.get(&"user:1".into()).await,
        None,
        "nothing stale survives"
    );
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    publish(&publisher, "user:2", 1).await;
    rec.until("user:2 v1", |s| s.saw("user:2", 1)).await;
    node.shutdown().await.unwrap();
    let saved: serde_like::Saved = serde_like::read(&cursor.0);
    assert_eq!(saved.shards, 8, "the new cursor was persisted");
    hub.stop().await;
}

/// Reads the cursor file without a JSON dependency: `{"epoch":N,"seqs":[...]}`.
mod serde_like {
    pub struct Saved {
        pub shards: usize,
    }

    pub fn read(path: &std::path::Path) -> Saved {
        let text = std::fs::read_to_string(path).unwrap();
        let seqs = text.split('[').nth(1).unwrap().split(']').next().unwrap();
        Saved {
            shards: seqs.split(',').filter(|s| !s.trim().is_empty()).count(),
        }
    }
}

/// Publishes one event at ack level `REGION` and returns the nodes that had
/// not acked it within `timeout`.
async fn region_pending(
    p: &Publisher,
    entity: &str,
    version: u64,
    timeout: Duration,
) -> Vec<String> {
    let receipt = p
        .publish_events(
            vec![freshness_client::publisher::Event::new(
                e(entity),
                v(version),
            )],
            freshness_client::PublishOptions::ack(freshness_client::AckLevel::Region)
                .with_timeout(timeout),
        )
        .await
        .unwrap();
    assert_eq!(receipt.complete, receipt.pending_nodes.is_empty());
    receipt.pending_nodes
}

#[tokio::test]
async fn acks_follow_the_delayed_ack_rule() {
    let hub = TestHub::start().await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();

    // An interval no test outlives. The feed is live once a progress
    // message was applied, and that one was acked at once (nothing was acked
    // before): every later ack waits for the interval, even for an event the
    // node applied.
    let rec = Recorder::new(VersionedCache::builder().build());
    let handle = Subscriber::builder(hub.url(), "patient")
        .ack_interval(Duration::from_secs(3600))
        .build(rec.clone())
        .unwrap()
        .spawn();
    let mut feed = handle.feed();
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
        .await
        .unwrap()
        .unwrap();
    let delayed = region_pending(&publisher, "user:1", 1, Duration::from_millis(300)).await;
    rec.until("user:1 applied", |s| s.saw("user:1", 1)).await;
    handle.shutdown().await.unwrap();

    // The default interval: every publish completes.
    let rec = Recorder::new(VersionedCache::builder().build());
    let handle = start_node(&hub.url(), "prompt", None, &rec).await;
    let mut pending = Vec::new();
    for version in 1..=20 {
        pending.extend(region_pending(&publisher, "user:2", version, WAIT).await);
    }
    handle.shutdown().await.unwrap();
    hub.stop().await;

    assert_eq!(delayed, ["patient"], "the ack waits for the interval");
    assert!(
        pending.is_empty(),
        "with the default interval every ack comes: {pending:?}"
    );
}

/// Acks on request: with a lazy interval no test outlives and no progress
/// to ack (the hub's progress interval is a minute), the batches of REGION
/// publishes are still acked at once, because the hub asks for it.
#[tokio::test]
async fn batches_a_publish_waits_on_are_acked_at_once_whatever_the_lazy_interval() {
    let mut config = test_config();
    config.progress_interval = Duration::from_secs(60);
    let hub = TestHub::start_with(config).await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    let rec = Recorder::new(VersionedCache::builder().build());
    let handle = Subscriber::builder(hub.url(), "lazy")
        .lazy_ack_interval(Duration::from_secs(3600))
        .build(rec.clone())
        .unwrap()
        .spawn();
    wait_for(|| async {
        let s = hub.status().await;
        s.nodes.iter().any(|n| n.node_id == "lazy").then_some(())
    })
    .await;
    let mut pending = Vec::new();
    for version in 1..=5 {
        // An ACCEPTED publish in between: its batch may wait, and the next
        // prompt ack covers it (acks are cumulative).
        publish(&publisher, "user:9", version).await;
        pending.extend(region_pending(&publisher, "user:2", version, WAIT).await);
    }
    rec.until("user:9 applied", |s| s.saw("user:9", 5)).await;
    let acked = hub.status().await.nodes[0].acked.clone().unwrap();
    handle.shutdown().await.unwrap();
    hub.stop().await;
    assert!(
        pending.is_empty(),
        "every REGION publish completes: {pending:?}"
    );
    let shard = shard("user:9", 64).index();
    assert!(
        acked.seqs[shard] >= 5,
        "the ACCEPTED events before the last REGION one are acked: {acked:?}"
    );
}

/// A handler that holds every batch until its gate opens and, before
/// applying a batch that invalidates `watched`, records what the cache would
/// serve for it at that moment.
#[derive(Clone)]
struct Watching {
    gated: Gated,
    watched: String,
    served_before: Arc<watch::Sender<Option<Option<String>>>>,
}

impl Handler for Watching {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        if batch
            .events
            .iter()
            .any(|e| e.entity.as_str() == self.watched)
        {
            let served = self.gated.inner.cache.get(&self.watched).await;
            self.served_before.send_replace(Some(served));
        }
        self.gated.on_events(batch).await
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.gated.on_reset(reset).await
    }
}

#[tokio::test]
async fn watermarks_that_waited_behind_a_stalled_handler_do_not_make_the_feed_fresh() {
    let hub = TestHub::start().await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    // Well above the hub's 250 ms progress interval, so that the first
    // read is fresh even on a busy machine.
    let bound = Duration::from_secs(1);
    let cache: Cache = VersionedCache::builder()
        .policy(
            "price",
            FreshnessPolicy::FailClosed {
                max_staleness: bound,
            },
        )
        .build();
    let rec = Recorder::new(cache.clone());
    let gated = Gated {
        inner: rec.clone(),
        gate: watch::Sender::new(true),
        entered: Arc::new(watch::Sender::new(0)),
    };
    let watching = Watching {
        gated: gated.clone(),
        watched: "price:1".into(),
        served_before: Arc::new(watch::Sender::new(None)),
    };
    let handle = Subscriber::builder(hub.url(), "stuck")
        .max_in_flight(4)
        .build(watching.clone())
        .unwrap()
        .spawn();
    cache.bind_feed(handle.feed());
    let mut feed = handle.feed();
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
        .await
        .unwrap()
        .unwrap();
    cache
        .insert(
            "price:1".into(),
            "9.99".into(),
            [Dep::at(e("price:1"), v(1))],
        )
        .await
        .unwrap();
    assert_eq!(cache.get(&"price:1".into()).await.as_deref(), Some("9.99"));
    // The handler stalls on the first batch; three more, each bringing the
    // node to the head and so carrying a watermark, queue behind it; the
    // node is then parked at its in-flight limit, and the change to price:1
    // waits at the hub.
    gated.gate.send_replace(false);
    let mut entered = gated.entered.subscribe();
    for (i, entity) in ["post:1", "post:2", "post:3", "post:4"].iter().enumerate() {
        publish(&publisher, entity, 1).await;
        if i == 0 {
            tokio::time::timeout(WAIT, entered.wait_for(|n| *n == 1))
                .await
                .unwrap()
                .unwrap();
        }
    }
    wait_for(|| async {
        let status = hub.status().await;
        status
            .nodes
            .iter()
            .find(|n| n.node_id == "stuck")
            .filter(|n| n.parked)
            .map(|_| ())
    })
    .await;
    publish(&publisher, "price:1", 2).await;
    // Held well past the bound.
    tokio::time::sleep(bound * 3).await;
    gated.gate.send_replace(true);
    let mut served = watching.served_before.subscribe();
    let served = tokio::time::timeout(WAIT, served.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(
        served, None,
        "old watermarks drained after the stall made the feed look fresh: price:1 was served \
         at v1 while v2 waited at the hub"
    );
    rec.until("price:1 v2", |s| s.saw("price:1", 2)).await;
    handle.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn fills_made_before_a_node_without_cursor_first_connects_are_dropped() {
    // The node starts while its hub is down; its cache is filled meanwhile.
    let listener = freshness_tests::bind().await;
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let cache: Cache = VersionedCache::builder().build();
    let rec = Recorder::new(cache.clone());
    // Its next attempt comes 1.5–3 s (jittered) after the first failed:
    // time enough, on a busy machine, for the hub to start and take v2.
    let handle = Subscriber::builder(format!("http://{addr}"), "early")
        .reconnect_backoff(Backoff::new(Duration::from_secs(3), Duration::from_secs(3)))
        .build(rec.clone())
        .unwrap()
        .spawn();
    cache.bind_feed(handle.feed());
    let mut feed = handle.feed();
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_down))
        .await
        .unwrap()
        .unwrap();
    cache
        .insert("user:1".into(), "v1".into(), [Dep::at(e("user:1"), v(1))])
        .await
        .unwrap();
    // The hub comes up and takes v2 before the node's next attempt, so the
    // node, which has no cursor, starts at the head after it.
    let hub = TestHub::start_on(addr, test_config()).await;
    let publisher = Publisher::builder(hub.url()).build().unwrap();
    publish(&publisher, "user:1", 2).await;
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
        .await
        .unwrap()
        .unwrap();
    assert!(!rec.seen.borrow().saw("user:1", 2), "v2 predates the start");
    assert_eq!(
        cache.get(&"user:1".into()).await,
        None,
        "nothing covered the fill made before the node's start position existed"
    );
    handle.shutdown().await.unwrap();
    hub.stop().await;
}
