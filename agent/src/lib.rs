//! The Freshness agent: a node of the hub that keeps a Redis cache tier
//! fresh for apps in any language.
//!
//! - [`config`]: the typed configuration (defaults < TOML < env < flags).
//! - [`store`]: the Redis side: the `freshness` function library
//!   (`lua/freshness.lua`), the run-id check on every connection, pipelined
//!   invalidations, resets, the cursor kept in Redis.
//! - [`RedisHandler`]: the subscriber's [`Handler`] that applies
//!   invalidations and resets to Redis.
//! - [`run`]: the subscriber, the feed writer (`freshness:feed`) and the
//!   fail-closed checks, until shutdown.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod metrics;
pub mod store;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use freshness_client::{
    Backoff, CursorStore, EventBatch, Feed, FeedState, Handler, HandlerError, Reset, Subscriber,
    SubscriberError,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub use config::{Args, Config, ConfigError};
pub use store::{Applied, RedisCursor, Store, StoreError};

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Redis URL is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A credential file changed between the start and now.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The subscriber stopped for good (refused, replaced, wrong shard
    /// count).
    #[error(transparent)]
    Subscriber(#[from] SubscriberError),
}

/// Applies what the hub sends to Redis.
#[derive(Debug, Clone)]
pub struct RedisHandler {
    store: Arc<Store>,
}

impl RedisHandler {
    /// A handler over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

impl Handler for RedisHandler {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        let started = tokio::time::Instant::now();
        let span = info_span!("agent.apply", events = batch.events.len());
        let result = self.store.apply(&batch.events).instrument(span).await;
        ::metrics::histogram!(metrics::REDIS_SECONDS).record(started.elapsed().as_secs_f64());
        match result {
            Ok(a) => {
                ::metrics::counter!(metrics::APPLIED).increment(a.applied);
                ::metrics::counter!(metrics::IGNORED).increment(a.ignored);
                ::metrics::counter!(metrics::DELETED).increment(a.deleted);
                Ok(())
            }
            Err(e) => {
                ::metrics::counter!(metrics::REDIS_ERRORS).increment(1);
                Err(Box::new(e))
            }
        }
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        let shards: Option<BTreeSet<u32>> =
            (!reset.is_all()).then(|| reset.shard_list().into_iter().map(|s| s.0).collect());
        let span = info_span!(
            "agent.reset",
            reason = reset.reason.as_str(),
            all = reset.is_all()
        );
        match self.store.reset(shards.as_ref()).instrument(span).await {
            Ok(deleted) => {
                info!(reason = %reset.reason, all = reset.is_all(), deleted, "reset applied");
                ::metrics::counter!(metrics::RESETS, "reason" => reset.reason.as_str())
                    .increment(1);
                ::metrics::counter!(metrics::DELETED).increment(deleted);
                Ok(())
            }
            Err(e) => {
                ::metrics::counter!(metrics::REDIS_ERRORS).increment(1);
                Err(Box::new(e))
            }
        }
    }

    async fn on_start_at_head(&self) -> Result<(), HandlerError> {
        // Nothing before the head is ever sent: whatever Redis holds from
        // before it is covered by nothing.
        let deleted = self.store.reset(None).await?;
        info!(
            deleted,
            "starting at the hub's head: every managed key deleted"
        );
        ::metrics::counter!(metrics::RESETS, "reason" => "start_at_head").increment(1);
        Ok(())
    }
}

/// Runs the agent until `shutdown` is cancelled or the subscriber stops for
/// good. Waits for Redis first: without it nothing can be applied, and the
/// cursor lives there.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    let store = Store::new(&config)?;
    if !wait_for_redis(&store, &shutdown).await {
        return Ok(());
    }
    let credentials = config.credentials()?;
    let subscriber = Subscriber::builder(&config.hub, &config.node_id)
        .credentials(credentials)
        .namespaces(config.namespaces.clone())
        .shard_count(config.shards)
        .cursor_store(CursorStore::Backend(Arc::new(RedisCursor(store.clone()))))
        .persist_interval(config.persist_interval)
        .build(RedisHandler::new(store.clone()))?;
    let feed = subscriber.feed();
    info!(hub = %config.hub, redis = %store.target(), node_id = %config.node_id, "agent started");
    let handle = subscriber.spawn_with(shutdown.clone());
    let feed_task = tokio::spawn(feed_loop(
        store.clone(),
        feed,
        config.fail_closed.clone().into_iter().collect(),
        config.feed_interval,
        shutdown.clone(),
    ));
    let result = handle.join().await;
    shutdown.cancel();
    let _ = feed_task.await;
    if let Err(e) = store.write_feed("stopped", None).await {
        warn!(error = %e, "could not write the final feed state");
    }
    Ok(result?)
}

/// Waits until Redis answers (false: shut down first).
async fn wait_for_redis(store: &Store, shutdown: &CancellationToken) -> bool {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut attempt = 0;
    let mut warned = false;
    loop {
        match store.ping().await {
            Ok(()) => return true,
            Err(e) if !warned => {
                warn!(error = %e, "waiting for Redis");
                warned = true;
            }
            Err(_) => {}
        }
        let delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn state_name(s: &FeedState) -> &'static str {
    match s {
        FeedState::Connecting => "connecting",
        FeedState::Live { .. } => "live",
        FeedState::Stale { .. } => "stale",
        FeedState::Down { .. } => "down",
    }
}

/// Writes `freshness:feed` every interval, and fails namespaces closed:
/// past its bound a namespace's keys are deleted once (fills are refused
/// by the library itself, from `freshness:feed`, until the feed is fresh).
async fn feed_loop(
    store: Arc<Store>,
    feed: Feed,
    fail_closed: Vec<(String, Duration)>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed: BTreeSet<String> = BTreeSet::new();
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The staleness clock keeps running while the feed is down, and the
        // library's fail-closed check in `freshness_fill` reads the same
        // clock from `fresh_at_ms`: both sides close a namespace together.
        let state = feed.state();
        let staleness = feed.staleness();
        ::metrics::gauge!(metrics::STALENESS).set(staleness.map_or(-1.0, |d| d.as_secs_f64()));
        match store.write_feed(state_name(&state), staleness).await {
            Ok(refused) => {
                failing = false;
                #[allow(clippy::cast_precision_loss)] // a count, far below 2^53
                ::metrics::gauge!(metrics::REFUSED_FILLS).set(refused as f64);
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot write the feed state to Redis");
                }
                failing = true;
                continue;
            }
        }
        for (ns, bound) in &fail_closed {
            let fresh = staleness.is_some_and(|s| s <= *bound);
            if !fresh && !closed.contains(ns) {
                match store.drop_namespace(ns).await {
                    Ok(deleted) => {
                        warn!(namespace = %ns, deleted, bound = ?bound, "feed too stale: namespace fails closed");
                        ::metrics::counter!(metrics::DELETED).increment(deleted);
                        closed.insert(ns.clone());
                    }
                    Err(e) => warn!(namespace = %ns, error = %e, "cannot fail closed"),
                }
            } else if fresh && closed.remove(ns) {
                info!(namespace = %ns, "feed fresh again: namespace serves again");
            }
            let v = if closed.contains(ns) { 1.0 } else { 0.0 };
            ::metrics::gauge!(metrics::FAIL_CLOSED, "namespace" => ns.clone()).set(v);
        }
    }
}
