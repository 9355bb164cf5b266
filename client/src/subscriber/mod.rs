//! The resilient subscriber: one long-lived `Hub/Subscribe` stream per node,
//! kept alive across hub restarts and network failures.
//!
//! It reconnects with jittered exponential backoff and resumes from its
//! cursor; it hands event batches and resets to a [`Handler`] and acks only
//! what the handler applied; a handler that keeps failing on a batch gets a
//! reset of the batch's shards instead (an invalidation is never skipped);
//! and it publishes the feed's state as a [`Feed`].
//!
//! ```no_run
//! use freshness_client::{EventBatch, Handler, HandlerError, Reset, Subscriber};
//!
//! struct Printer;
//!
//! impl Handler for Printer {
//!     async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
//!         for e in &batch.events {
//!             println!("{} is now at version {}", e.entity, e.version);
//!         }
//!         Ok(())
//!     }
//!
//!     async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
//!         println!("drop everything in shards {:?} ({})", reset.scope, reset.reason);
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), freshness_client::SubscriberError> {
//! let handle = Subscriber::builder("http://127.0.0.1:50051", "web-1")
//!     .namespaces(["user", "post"])
//!     .cursor_file("/var/lib/web/freshness.cursor")
//!     .build(Printer)?
//!     .spawn();
//! let mut feed = handle.feed();
//! feed.wait_for(|s| s.is_live()).await.ok();
//! // ... serve traffic ...
//! handle.shutdown().await
//! # }
//! ```

mod position;
mod session;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use freshness::pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

/// Default least time between two acks of a subscriber
/// ([`SubscriberBuilder::ack_interval`]).
pub const DEFAULT_ACK_INTERVAL: Duration = Duration::from_millis(2);

/// Default longest wait before a batch nobody waits on is acked
/// ([`SubscriberBuilder::lazy_ack_interval`]).
pub const DEFAULT_LAZY_ACK_INTERVAL: Duration = Duration::from_millis(50);

use crate::cursor_store::{CursorStore, CursorStoreError};
use crate::event::{EventBatch, Reset};
use crate::feed::{Feed, FeedTx};
use crate::transport::InvalidAddress;
use freshness::backoff::Backoff;

/// What a handler returns when it could not apply a batch or a reset.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Applies what the hub sends to a node's cache.
///
/// Both methods must be idempotent: delivery is at least once, so the same
/// `(entity, version)` can arrive again after a reconnect. The subscriber
/// acks a batch or a reset only after the method returned `Ok`; it retries a
/// failing call a few times, and when `on_events` keeps failing it calls
/// `on_reset` for the batch's shards instead.
pub trait Handler: Send + Sync + 'static {
    /// Applies a batch of invalidations.
    fn on_events(
        &self,
        batch: &EventBatch,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Drops every cached entry that depends on an entity in the reset's
    /// shards ([`Reset::covers`]).
    fn on_reset(&self, reset: &Reset) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Called when the node, which has no cursor, is about to start at the
    /// hub's head (its first welcome, or after its cursor was lost), before
    /// anything of the stream: events appended before that start are never
    /// sent, so nothing the handler holds from before it is covered (a cache
    /// filled while the hub was still unreachable, or warmed before the
    /// subscriber started). The default does nothing;
    /// [`VersionedCache`](crate::VersionedCache) drops every entry and
    /// refuses fills begun before it, and a handler that wraps one forwards
    /// this call to it.
    fn on_start_at_head(&self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }
}

impl<H: Handler> Handler for Arc<H> {
    fn on_events(
        &self,
        batch: &EventBatch,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).on_events(batch)
    }

    fn on_reset(&self, reset: &Reset) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).on_reset(reset)
    }

    fn on_start_at_head(&self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).on_start_at_head()
    }
}

/// Why a subscriber stopped (or could not be built).
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// The hub address is unusable.
    #[error(transparent)]
    Address(#[from] InvalidAddress),
    /// The node id or a namespace is malformed.
    #[error("invalid subscription: {0}")]
    Invalid(#[from] freshness::validate::InvalidHello),
    /// A newer stream with the same node id took over; this one does not
    /// reconnect (two processes with one node id would fight otherwise).
    #[error("replaced by a newer stream with the same node id: {0}")]
    Replaced(String),
    /// The hub has another shard count than the one configured.
    #[error("hub has {hub} shards, the node expects {expected}")]
    ShardCount {
        /// Configured.
        expected: u32,
        /// Announced by the hub.
        hub: u32,
    },
    /// The hub maps entities to shards with a hash this client does not know.
    #[error("hub shards with {0:?}, this client only knows fnv1a64")]
    Hash(String),
    /// The hub refused the subscription for good (for example
    /// `FAILED_PRECONDITION`, `PERMISSION_DENIED`).
    #[error("hub refused the subscription: {code:?}: {message}")]
    Refused {
        /// The hub's code.
        code: crate::Code,
        /// The hub's message.
        message: String,
    },
    /// The handler could not apply a reset the node owed its cache, so no
    /// cursor can be trusted.
    #[error("handler failed to apply a full reset: {0}")]
    Handler(String),
    /// The cursor file could not be used.
    #[error(transparent)]
    CursorStore(#[from] CursorStoreError),
    /// The subscriber task panicked.
    #[error("subscriber task failed: {0}")]
    Task(String),
}

/// How the subscriber retries a failing handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerRetry {
    /// Calls per batch (or reset) before giving up on it, at least 1.
    pub attempts: u32,
    /// Waits between calls.
    pub backoff: Backoff,
}

impl Default for HandlerRetry {
    fn default() -> Self {
        Self {
            attempts: 4,
            backoff: Backoff::new(Duration::from_millis(25), Duration::from_millis(500)),
        }
    }
}

/// Everything a subscriber needs besides its handler.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) hub: String,
    pub(crate) node_id: String,
    pub(crate) namespaces: Vec<String>,
    pub(crate) store: CursorStore,
    pub(crate) max_in_flight: u32,
    pub(crate) shard_count: u32,
    pub(crate) reconnect: Backoff,
    pub(crate) handler_retry: HandlerRetry,
    pub(crate) stale_after: Option<Duration>,
    pub(crate) persist_interval: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) ack_interval: Duration,
    pub(crate) lazy_ack_interval: Duration,
    pub(crate) credentials: crate::transport::Credentials,
}

/// Builds a [`Subscriber`]; see [`Subscriber::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SubscriberBuilder {
    config: Config,
}

impl SubscriberBuilder {
    /// The hubs this node may use: the replicas of its region, which share
    /// one log (`log = "jetstream"`), so a cursor means the same at each.
    /// The subscriber uses the first and moves to the next, with the
    /// reconnect backoff, whenever its stream breaks or a hub cannot be
    /// reached; its log says which hub it uses.
    pub fn hubs<I, S>(mut self, hubs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.hub = hubs
            .into_iter()
            .map(Into::into)
            .collect::<Vec<_>>()
            .join(",");
        self
    }

    /// Namespaces this node caches (the hub sends nothing else); none means
    /// all.
    pub fn namespaces<I, S>(mut self, namespaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.namespaces = namespaces.into_iter().map(Into::into).collect();
        self
    }

    /// Persists the cursor to `path` (atomically), for a node whose cache
    /// outlives the process. Without it the cursor lives in memory and a
    /// restarted node starts at the hub's head.
    pub fn cursor_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.store = CursorStore::File(path.into());
        self
    }

    /// Where the cursor lives ([`CursorStore::Memory`] by default).
    pub fn cursor_store(mut self, store: CursorStore) -> Self {
        self.config.store = store;
        self
    }

    /// Most unacked events in flight (0, the default, lets the hub choose).
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.config.max_in_flight = n;
        self
    }

    /// The shard count the node expects; the subscriber stops with
    /// [`SubscriberError::ShardCount`] if the hub has another. 0 (the
    /// default) accepts the hub's.
    pub fn shard_count(mut self, n: u32) -> Self {
        self.config.shard_count = n;
        self
    }

    /// Waits between reconnect attempts (100 ms doubling to 10 s by default).
    pub fn reconnect_backoff(mut self, backoff: Backoff) -> Self {
        self.config.reconnect = backoff;
        self
    }

    /// How a failing handler is retried.
    pub fn handler_retry(mut self, retry: HandlerRetry) -> Self {
        self.config.handler_retry = retry;
        self
    }

    /// How long without a watermark turns a live feed [`Stale`]; by default
    /// four progress intervals, at least one second.
    ///
    /// [`Stale`]: crate::FeedState::Stale
    pub fn stale_after(mut self, d: Duration) -> Self {
        self.config.stale_after = Some(d);
        self
    }

    /// Least time between two writes of the cursor file (1 s by default).
    /// The file lags the applied cursor by at most this much, which only
    /// means a few replayed events after a crash.
    pub fn persist_interval(mut self, d: Duration) -> Self {
        self.config.persist_interval = d;
        self
    }

    /// Least time between two acks (2 ms by default; zero acks after every
    /// message). A delayed-ack rule: after a quiet spell the ack goes out as
    /// soon as the handler applied the message; under a steady stream, at
    /// most one ack per interval covers everything applied since (acks are
    /// cumulative). Each ack costs the hub a read, a decode and a wake-up,
    /// about a third of its work per delivered frame at light load, so this
    /// halves that share at 1,000 frames/s per node; the price is up to this
    /// much more time before a `REGION` publish learns this node applied.
    pub fn ack_interval(mut self, d: Duration) -> Self {
        self.config.ack_interval = d;
        self
    }

    /// Longest wait before acking a batch the hub did not ask to have acked
    /// at once (50 ms by default). A hub that acks on request (its welcome
    /// says so) marks every batch a `REGION` or `GLOBAL` publish waits on,
    /// and every batch once a quarter of the node's in-flight budget is
    /// unacked; those follow [`ack_interval`](Self::ack_interval). The
    /// others are acked at most this long after they were applied, so at
    /// light load a node acks a few times a second instead of once per
    /// batch. The hub's view of this node (`Status`: acked cursor, lag) may
    /// trail by up to this much; progress and resets are always acked
    /// promptly. Zero acks every batch promptly, as with a hub that does
    /// not ack on request.
    pub fn lazy_ack_interval(mut self, d: Duration) -> Self {
        self.config.lazy_ack_interval = d;
        self
    }

    /// TLS settings and a bearer token for a secured hub.
    pub fn credentials(mut self, credentials: crate::transport::Credentials) -> Self {
        self.config.credentials = credentials;
        self
    }

    /// How long one connection attempt (up to the hub's welcome) may take
    /// (5 s by default).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }

    /// Checks the configuration and builds the subscriber around `handler`.
    /// Nothing connects yet.
    pub fn build<H: Handler>(self, handler: H) -> Result<Subscriber<H>, SubscriberError> {
        let c = self.config;
        let mut filter = freshness::validate::hello_filter(&pb::Hello {
            node_id: c.node_id.clone(),
            namespaces: c.namespaces.clone(),
            ..Default::default()
        })?;
        filter.sort();
        let endpoints = crate::transport::endpoints(&c.hub, c.connect_timeout, &c.credentials)?;
        // The token is checked once here; each stream sends it.
        crate::transport::Bearer::new(&c.hub, &c.credentials)?;
        Ok(Subscriber {
            config: Config {
                namespaces: filter,
                ..c
            },
            endpoints,
            handler,
            feed: FeedTx::new(),
        })
    }
}

/// A node's subscription to its hub. Build it with [`Subscriber::builder`],
/// then [`run`](Subscriber::run) it or [`spawn`](Subscriber::spawn) it.
pub struct Subscriber<H> {
    config: Config,
    /// The hubs to try, in turn (the replicas of the region).
    endpoints: Vec<(String, Endpoint)>,
    handler: H,
    feed: FeedTx,
}

impl<H> std::fmt::Debug for Subscriber<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("hub", &self.config.hub)
            .field("node_id", &self.config.node_id)
            .field("namespaces", &self.config.namespaces)
            .finish_non_exhaustive()
    }
}

impl Subscriber<()> {
    /// A builder for the node `node_id` (stable across the node's restarts)
    /// subscribing to the hub at `hub` (`http://host:port`), or to any of
    /// several hub replicas of one region, comma-separated
    /// (`http://a:50051,http://b:50051`; see [`SubscriberBuilder::hubs`]).
    pub fn builder(hub: impl Into<String>, node_id: impl Into<String>) -> SubscriberBuilder {
        SubscriberBuilder {
            config: Config {
                hub: hub.into(),
                node_id: node_id.into(),
                namespaces: Vec::new(),
                store: CursorStore::Memory,
                max_in_flight: 0,
                shard_count: 0,
                reconnect: Backoff::default(),
                handler_retry: HandlerRetry::default(),
                stale_after: None,
                persist_interval: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(5),
                ack_interval: DEFAULT_ACK_INTERVAL,
                lazy_ack_interval: DEFAULT_LAZY_ACK_INTERVAL,
                credentials: crate::transport::Credentials::default(),
            },
        }
    }
}

impl<H: Handler> Subscriber<H> {
    /// The feed's state and staleness; hand it to a
    /// [`VersionedCache`](crate::VersionedCache) for its freshness policies.
    pub fn feed(&self) -> Feed {
        self.feed.feed()
    }

    /// Runs until `shutdown` is cancelled (then `Ok`), or until the
    /// subscription ends for good (replaced, refused). The feed is
    /// [`Down`](crate::FeedState::Down) afterwards.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SubscriberError> {
        session::run(
            self.config,
            self.endpoints,
            self.handler,
            self.feed,
            shutdown,
        )
        .await
    }

    /// Runs the subscriber on a task of its own. Dropping the handle does not
    /// stop it: call [`SubscriberHandle::shutdown`].
    pub fn spawn(self) -> SubscriberHandle {
        self.spawn_with(CancellationToken::new())
    }

    /// Runs the subscriber on a task of its own, stopping when `shutdown`
    /// (or the handle's [`shutdown`](SubscriberHandle::shutdown)) is
    /// cancelled.
    pub fn spawn_with(self, shutdown: CancellationToken) -> SubscriberHandle {
        let feed = self.feed();
        let token = shutdown.child_token();
        let task = tokio::spawn(self.run(token.clone()));
        SubscriberHandle { feed, token, task }
    }
}

/// A running subscriber.
#[derive(Debug)]
pub struct SubscriberHandle {
    feed: Feed,
    token: CancellationToken,
    task: JoinHandle<Result<(), SubscriberError>>,
}

impl SubscriberHandle {
    /// The feed's state and staleness.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// True once the subscriber has stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the subscriber (it persists its cursor and closes the stream)
    /// and waits for it.
    pub async fn shutdown(self) -> Result<(), SubscriberError> {
        self.token.cancel();
        self.join().await
    }

    /// Waits until the subscriber stops by itself (replaced, refused).
    pub async fn join(self) -> Result<(), SubscriberError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(SubscriberError::Task(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;

    impl Handler for Nop {
        async fn on_events(&self, _: &EventBatch) -> Result<(), HandlerError> {
            Ok(())
        }
        async fn on_reset(&self, _: &Reset) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[test]
    fn builder_validates_before_anything_connects() {
        assert!(matches!(
            Subscriber::builder("http://127.0.0.1:1", "").build(Nop),
            Err(SubscriberError::Invalid(_))
        ));
        assert!(matches!(
            Subscriber::builder("http://127.0.0.1:1", "n")
                .namespaces(["Bad"])
                .build(Nop),
            Err(SubscriberError::Invalid(_))
        ));
        assert!(matches!(
            Subscriber::builder("ftp://x", "n").build(Nop),
            Err(SubscriberError::Address(_))
        ));
        let s = Subscriber::builder("127.0.0.1:1", "n")
            .namespaces(["user", "post", "user"])
            .build(Nop)
            .unwrap();
        assert_eq!(s.config.namespaces, vec!["post", "user"]);
    }
}
