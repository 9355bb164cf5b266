//! The writer side: publish invalidations to the hub, batched and retried.
//!
//! **Commit, then invalidate.** Publish only after the transaction that
//! changed the entity has committed, with the version it committed. Publishing
//! before the commit lets a cache node reload the old row after the
//! invalidation and keep it; publishing after is safe because a node that
//! reloads in between reads the new row.
//!
//! ```no_run
//! use freshness_client::{Entity, Publisher, Version};
//!
//! # struct Db;
//! # impl Db { async fn update_user_name(&self, _: u64, _: &str) -> Result<u64, std::io::Error> { Ok(1) } }
//! # async fn rename(db: &Db, publisher: &Publisher) -> anyhow::Result<()> {
//! // 1. Commit: the database returns the row's new version.
//! let version = db.update_user_name(42, "Ada").await?;
//! // 2. Then invalidate, with that version.
//! let result = publisher
//!     .publish(Entity::parse("user:42")?, Version::new(version).expect("versions start at 1"))
//!     .await?;
//! println!("{:?} at seq {}", result.outcome, result.seq);
//! # Ok(()) }
//! ```
//!
//! Calls made within a short linger (2 ms by default) with the same ack level
//! and timeout travel in one `Publish` request of up to `max_batch` events.
//! Publishing is idempotent (a version the hub already has comes back
//! [`Outcome::Duplicate`]), so the publisher retries transient failures with
//! jittered backoff, honouring the hub's `retry-after-ms` hint, until its
//! retry budget runs out; it never blocks forever.

use std::time::Duration;

use bytes::Bytes;
use freshness::validate::{self, AckLevel, InvalidPublish, PublishLimits};
use freshness::{Entity, ShardId, Version, pb};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep, sleep_until};
use tonic::transport::Channel;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Code;
use crate::transport::InvalidAddress;
use freshness::backoff::{Attempts, Backoff};
use freshness::status::HubStatus;

/// One change to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What changed.
    pub entity: Entity,
    /// The version the transaction committed.
    pub version: Version,
    /// The new value, for nodes that refresh in place (at most 64 KiB).
    pub payload: Option<Bytes>,
    /// W3C trace context of the change, carried to the nodes. Unset, the
    /// publisher fills in its `publisher.publish` span's, when it has one
    /// (see [`crate::telemetry`]).
    pub traceparent: Option<String>,
    /// W3C trace state that goes with `traceparent`.
    pub tracestate: Option<String>,
}

impl Event {
    /// `entity` changed to `version`.
    pub fn new(entity: Entity, version: Version) -> Self {
        Self {
            entity,
            version,
            payload: None,
            traceparent: None,
            tracestate: None,
        }
    }

    /// Adds the new value.
    #[must_use]
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = Some(payload.into());
        self
    }

    /// Adds a W3C `traceparent`.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Adds a W3C `tracestate`.
    #[must_use]
    pub fn with_tracestate(mut self, tracestate: impl Into<String>) -> Self {
        self.tracestate = Some(tracestate.into());
        self
    }

    fn to_wire(&self) -> pb::Event {
        pb::Event {
            entity: self.entity.as_str().to_owned(),
            version: self.version.get(),
            payload: self.payload.clone().unwrap_or_default(),
            traceparent: self.traceparent.clone().unwrap_or_default(),
            tracestate: self.tracestate.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// What one call waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublishOptions {
    /// [`AckLevel::Accepted`] (the default): the hub ordered and appended the
    /// events. `Region`: also every matching node of the region acked them.
    /// `Global`: also every peer region.
    pub ack: AckLevel,
    /// How long `Region` and `Global` wait for acks (2 s by default, at most
    /// 60 s). When it passes the call still succeeds, and the receipt names
    /// who has not acked.
    pub timeout: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            ack: AckLevel::Accepted,
            timeout: Duration::from_millis(u64::from(freshness::limits::DEFAULT_ACK_TIMEOUT_MS)),
        }
    }
}

impl PublishOptions {
    /// The options with ack level `ack`.
    pub fn ack(ack: AckLevel) -> Self {
        Self {
            ack,
            ..Self::default()
        }
    }

    /// The same options with another timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// What became of one event. All three are success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// New: appended and given a seq.
    Applied,
    /// The hub already had this version (a retry, or another writer).
    Duplicate,
    /// The hub already had a newer version of the entity.
    Superseded,
}

impl Outcome {
    /// `applied`, `duplicate` or `superseded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Superseded => "superseded",
        }
    }
}

/// The hub's answer for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResult {
    /// The entity published.
    pub entity: Entity,
    /// The version published.
    pub version: Version,
    /// What became of it.
    pub outcome: Outcome,
    /// The entity's shard.
    pub shard: ShardId,
    /// The seq of the entity's newest accepted event in its shard (this
    /// event's when applied).
    pub seq: u64,
    /// The newest version the hub has accepted for the entity.
    pub current_version: u64,
}

/// The hub's answer for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    /// One per event, in call order.
    pub results: Vec<PublishResult>,
    /// For `Region` and `Global`: every node (and region) concerned acked.
    /// Always true for `Accepted`.
    pub complete: bool,
    /// Nodes that had not acked when the timeout passed.
    pub pending_nodes: Vec<String>,
    /// Peer regions that had not confirmed when the timeout passed.
    pub pending_regions: Vec<String>,
    /// The ack level the hub applied (`Global` degrades to `Region` on a hub
    /// without peers).
    pub applied_ack: AckLevel,
    /// Why the applied ack level differs from the requested one, if it does.
    pub note: String,
    /// The hub epoch the seqs belong to.
    pub epoch: u64,
}

/// A publish that did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The call is malformed; nothing was sent.
    #[error("invalid publish: {0}")]
    Invalid(#[from] InvalidPublish),
    /// The hub refused the call for good; nothing of it was applied.
    #[error("hub refused the publish: {code:?}: {message}")]
    Rejected {
        /// The hub's code.
        code: Code,
        /// The hub's message.
        message: String,
    },
    /// The hub stayed unreachable or overloaded through every retry. Some
    /// events may have been applied; publishing again is safe.
    #[error("hub unavailable after {attempts} attempts: {code:?}: {message}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last code.
        code: Code,
        /// The last message. With several hubs (replicas), each hub tried
        /// and its own last message, `URL: message` joined by `; `, so that
        /// one hub down and another refusing are told apart.
        message: String,
    },
    /// The hub's answer does not match the call.
    #[error("malformed answer from the hub: {0}")]
    Malformed(String),
    /// The publisher's batching task is gone (the runtime is shutting down).
    #[error("publisher is closed")]
    Closed,
}

/// The hub's status could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("status call failed: {code:?}: {message}")]
pub struct StatusError {
    /// The hub's code.
    pub code: Code,
    /// The message, with its causes.
    pub message: String,
}

/// A status's message followed by its causes (`tcp connect error: connection
/// refused`), which tonic keeps apart.
pub(crate) fn status_message(s: &tonic::Status) -> String {
    let mut line = s.message().to_owned();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = e.source();
    }
    line
}

/// How the publisher retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts per request, at least 1 (10 by default).
    pub max_attempts: u32,
    /// Waits between attempts without a hint from the hub (50 ms doubling to
    /// 2 s by default).
    pub backoff: Backoff,
    /// No retry starts later than this after the first attempt (30 s by
    /// default).
    pub give_up_after: Duration,
    /// How long one attempt may take, on top of a `Region`/`Global` timeout
    /// (5 s by default).
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            give_up_after: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

/// Configures a [`Publisher`].
#[derive(Debug, Clone)]
#[must_use]
pub struct PublisherBuilder {
    hub: String,
    linger: Duration,
    max_batch: usize,
    max_concurrent: usize,
    queue: usize,
    retry: RetryPolicy,
    limits: PublishLimits,
    connect_timeout: Duration,
    credentials: crate::transport::Credentials,
}

impl PublisherBuilder {
    /// TLS settings and a bearer token for a secured hub.
    pub fn credentials(mut self, credentials: crate::transport::Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// How long a call waits for others to share its request (2 ms by
    /// default; zero sends at once).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// Most events in one request (1,000 by default, at most 10,000).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.clamp(1, freshness::limits::MAX_EVENTS_PER_PUBLISH);
        self
    }

    /// Most requests in flight at once (4 by default); further calls queue.
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// Calls that may wait for a batch slot (1,024 by default); further
    /// calls wait to enter the queue.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// How failures are retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The limits calls are checked against before sending (the hub's
    /// defaults unless the hub is configured otherwise).
    pub fn limits(mut self, limits: PublishLimits) -> Self {
        self.limits = limits;
        self
    }

    /// How long connecting to the hub may take (5 s by default).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Builds the publisher. It connects lazily, on the first call, and
    /// needs a tokio runtime (it spawns its batching task).
    pub fn build(self) -> Result<Publisher, InvalidAddress> {
        let channel = Hubs::new(
            crate::transport::endpoints(&self.hub, self.connect_timeout, &self.credentials)?,
            crate::transport::Bearer::new(&self.hub, &self.credentials)?,
        );
        let (tx, rx) = mpsc::channel(self.queue);
        let batcher = Batcher {
            channel: channel.clone(),
            linger: self.linger,
            max_batch: self.max_batch,
            permits: std::sync::Arc::new(Semaphore::new(self.max_concurrent)),
            retry: self.retry,
        };
        tokio::spawn(
            batcher
                .run(rx)
                .instrument(info_span!("publisher", hub = %self.hub)),
        );
        Ok(Publisher {
            tx,
            channel,
            max_batch: self.max_batch,
            retry: self.retry,
            limits: self.limits,
        })
    }
}

/// Publishes invalidations to a hub over one shared connection. Cheap to
/// clone; clones share the connection and the batching.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Call>,
    channel: Hubs,
    max_batch: usize,
    retry: RetryPolicy,
    limits: PublishLimits,
}

/// One caller's events waiting for a batch.
struct Call {
    events: Vec<Event>,
    opts: PublishOptions,
    reply: oneshot::Sender<Result<PublishReceipt, PublishError>>,
}

impl Publisher {
    /// A builder for the hub at `hub` (`http://host:port`), or for several
    /// hub replicas of one region, comma-separated
    /// (`http://a:50051,http://b:50051`): calls go to one of them and move
    /// to the next when an attempt fails and is retried.
    pub fn builder(hub: impl Into<String>) -> PublisherBuilder {
        PublisherBuilder {
            hub: hub.into(),
            linger: Duration::from_millis(2),
            max_batch: 1_000,
            max_concurrent: 4,
            queue: 1_024,
            retry: RetryPolicy::default(),
            limits: PublishLimits::default(),
            connect_timeout: Duration::from_secs(5),
            credentials: crate::transport::Credentials::default(),
        }
    }

    /// Publishes that `entity` committed `version`, waiting for
    /// [`AckLevel::Accepted`]. Call it after the commit.
    pub async fn publish(
        &self,
        entity: Entity,
        version: Version,
    ) -> Result<PublishResult, PublishError> {
        let mut receipt = self
            .publish_events(vec![Event::new(entity, version)], PublishOptions::default())
            .await?;
        receipt
            .results
            .pop()
            .ok_or_else(|| PublishError::Malformed("no result".into()))
    }

    /// Publishes `events` (1 to 10,000), waiting for `opts.ack`. Call it after
    /// the commit. Small calls with the same options share requests.
    ///
    /// The call is the span `publisher.publish`, a child of the caller's
    /// current span; events without a `traceparent` carry its context.
    pub async fn publish_events(
        &self,
        mut events: Vec<Event>,
        opts: PublishOptions,
    ) -> Result<PublishReceipt, PublishError> {
        let span = info_span!(
            "publisher.publish",
            otel.kind = "producer",
            events = crate::telemetry::num(events.len()),
            ack = ?opts.ack,
            otel.status_description = tracing::field::Empty,
        );
        if let Some((traceparent, tracestate)) = crate::telemetry::traceparent(&span) {
            let tracestate = (!tracestate.is_empty()).then_some(tracestate);
            for e in events.iter_mut().filter(|e| e.traceparent.is_none()) {
                e.traceparent = Some(traceparent.clone());
                e.tracestate.clone_from(&tracestate);
            }
        }
        let result = self
            .publish_now(events, opts)
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            span.record("otel.status_description", tracing::field::display(e));
        }
        result
    }

    async fn publish_now(
        &self,
        events: Vec<Event>,
        opts: PublishOptions,
    ) -> Result<PublishReceipt, PublishError> {
        validate::publish(request(&events, opts), self.limits)?;
        if events.len() >= self.max_batch {
            return send(&self.channel, &self.retry, &events, opts).await;
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Call {
                events,
                opts,
                reply,
            })
            .await
            .map_err(|_| PublishError::Closed)?;
        answer.await.map_err(|_| PublishError::Closed)?
    }

    /// The address of the hub calls go to now (the first of the list until
    /// an attempt there fails).
    pub fn hub(&self) -> String {
        self.channel.current().2.to_owned()
    }

    /// The hub's status (what `freshctl status` shows), over the
    /// publisher's connection.
    pub async fn status(&self) -> Result<HubStatus, StatusError> {
        let mut client = self.channel.current().1;
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.set_timeout(self.retry.attempt_timeout);
        client
            .status(req)
            .await
            .map(|r| HubStatus::from_wire(r.into_inner()))
            .map_err(|s| StatusError {
                code: Code::from_tonic(s.code()),
                message: status_message(&s),
            })
    }
}

fn request(events: &[Event], opts: PublishOptions) -> pb::PublishRequest {
    pb::PublishRequest {
        events: events.iter().map(Event::to_wire).collect(),
        ack: opts.ack.to_wire() as i32,
        timeout_ms: u32::try_from(opts.timeout.as_millis()).unwrap_or(u32::MAX),
    }
}

/// Calls waiting to share one request.
struct Group {
    opts: PublishOptions,
    calls: Vec<Call>,
    events: usize,
    deadline: Instant,
}

struct Batcher {
    channel: Hubs,
    linger: Duration,
    max_batch: usize,
    permits: std::sync::Arc<Semaphore>,
    retry: RetryPolicy,
}

impl Batcher {
    async fn run(self, mut rx: mpsc::Receiver<Call>) {
        let mut groups: Vec<Group> = Vec::new();
        loop {
            let next = groups.iter().map(|g| g.deadline).min();
            tokio::select! {
                call = rx.recv() => {
                    let Some(call) = call else { break };
                    let n = call.events.len();
                    let i = match groups.iter().position(|g| g.opts == call.opts) {
                        Some(i) if groups[i].events + n > self.max_batch => {
                            let full = groups.swap_remove(i);
                            self.flush(full).await;
                            None
                        }
                        found => found,
                    };
                    let i = i.unwrap_or_else(|| {
                        groups.push(Group {
                            opts: call.opts,
                            calls: Vec::new(),
                            events: 0,
                            deadline: Instant::now() + self.linger,
                        });
                        groups.len() - 1
                    });
                    groups[i].events += n;
                    groups[i].calls.push(call);
                    if groups[i].events >= self.max_batch {
                        let full = groups.swap_remove(i);
                        self.flush(full).await;
                    }
                }
                () = async {
                    match next {
                        Some(at) => sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = Instant::now();
                    let (due, rest): (Vec<Group>, Vec<Group>) =
                        groups.drain(..).partition(|g| g.deadline <= now);
                    groups = rest;
                    for g in due {
                        self.flush(g).await;
                    }
                }
            }
        }
        for g in groups {
            self.flush(g).await;
        }
    }

    /// Sends a group on a task of its own once a concurrency permit is free
    /// (waiting for it is what pushes back on callers).
    async fn flush(&self, group: Group) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        let channel = self.channel.clone();
        let retry = self.retry;
        tokio::spawn(
            async move {
                send_group(&channel, &retry, group).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// The hubs a publisher may use (the replicas of a region), one
/// connection each, opened lazily; calls go to the current one, and a
/// failed attempt moves every later call to the next.
#[derive(Debug, Clone)]
struct Hubs {
    list: std::sync::Arc<Vec<(String, Channel)>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The token every call carries.
    bearer: crate::transport::Bearer,
}

impl Hubs {
    fn new(
        endpoints: Vec<(String, tonic::transport::Endpoint)>,
        bearer: crate::transport::Bearer,
    ) -> Self {
        Self {
            list: std::sync::Arc::new(
                endpoints
                    .into_iter()
                    .map(|(u, e)| (u, e.connect_lazy()))
                    .collect(),
            ),
            current: std::sync::Arc::default(),
            bearer,
        }
    }

    /// The hub in use: its index, a client over its connection, its
    /// address.
    fn current(&self) -> (usize, crate::transport::Client, &str) {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed) % self.list.len();
        let client = crate::transport::HubChannel {
            channel: self.list[i].1.clone(),
            bearer: self.bearer.clone(),
        }
        .client();
        (i, client, &self.list[i].0)
    }

    /// The last failure of each hub tried, for the error that ends the
    /// retries: the message alone with one hub, `URL: message` of each
    /// hub tried, joined by `; `, with several.
    fn each_last(&self, last: &[Option<String>]) -> String {
        if self.list.len() == 1 {
            return last[0].clone().unwrap_or_default();
        }
        self.list
            .iter()
            .zip(last)
            .filter_map(|((url, _), m)| m.as_ref().map(|m| format!("{url}: {m}")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// After an attempt at hub `failed` failed: the next hub, unless
    /// another call moved on already.
    fn advance(&self, failed: usize) {
        if self.list.len() < 2 {
            return;
        }
        let next = (failed + 1) % self.list.len();
        if self
            .current
            .compare_exchange(
                failed,
                next,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
        {
            info!(hub = %self.list[next].0, "publishing to the next hub");
        }
    }
}

/// Sends a group's calls as one request and hands each caller its results.
async fn send_group(channel: &Hubs, retry: &RetryPolicy, group: Group) {
    let events: Vec<Event> = group
        .calls
        .iter()
        .flat_map(|c| c.events.iter().cloned())
        .collect();
    match send(channel, retry, &events, group.opts).await {
        Ok(receipt) => {
            let mut results = receipt.results.into_iter();
            for call in group.calls {
                let mine = results.by_ref().take(call.events.len()).collect();
                let _ = call.reply.send(Ok(PublishReceipt {
                    results: mine,
                    pending_nodes: receipt.pending_nodes.clone(),
                    pending_regions: receipt.pending_regions.clone(),
                    note: receipt.note.clone(),
                    ..receipt
                }));
            }
        }
        Err(PublishError::Rejected { code, .. })
            if code == Code::InvalidArgument && group.calls.len() > 1 =>
        {
            // The hub's limits are tighter than ours, or one call is bad: send
            // each call alone so that the error reaches only its caller.
            debug!(
                calls = group.calls.len(),
                "batch refused, sending its calls one by one"
            );
            for call in group.calls {
                let r = send(channel, retry, &call.events, group.opts).await;
                let _ = call.reply.send(r);
            }
        }
        Err(e) => {
            for call in group.calls {
                let _ = call.reply.send(Err(e.clone()));
            }
        }
    }
}

/// One request, retried.
async fn send(
    hubs: &Hubs,
    retry: &RetryPolicy,
    events: &[Event],
    opts: PublishOptions,
) -> Result<PublishReceipt, PublishError> {
    let wire = request(events, opts);
    let mut backoff = Attempts::new(retry.backoff);
    let give_up = Instant::now() + retry.give_up_after;
    let mut attempt = 0u32;
    // Filled on the first failure only: a call answered at once allocates
    // nothing for it.
    let mut last_by_hub: Vec<Option<String>> = Vec::new();
    loop {
        attempt += 1;
        let mut req = tonic::Request::new(wire.clone());
        let ack_wait = if opts.ack == AckLevel::Accepted {
            Duration::ZERO
        } else {
            opts.timeout
        };
        req.set_timeout(retry.attempt_timeout + ack_wait);
        let (at, mut client, _) = hubs.current();
        let status = match client.publish(req).await {
            Ok(resp) => return receipt(events, resp.into_inner()),
            Err(s) => s,
        };
        let hint = retry_after(&status);
        if !retryable(&status, hint.is_some()) {
            return Err(PublishError::Rejected {
                code: Code::from_tonic(status.code()),
                message: status_message(&status),
            });
        }
        last_by_hub.resize(hubs.list.len(), None);
        last_by_hub[at] = Some(status_message(&status));
        let delay = hint.map_or_else(|| backoff.next_delay(), |h| h.max(retry.backoff.initial));
        if attempt >= retry.max_attempts.max(1) || Instant::now() + delay > give_up {
            return Err(PublishError::Unavailable {
                attempts: attempt,
                code: Code::from_tonic(status.code()),
                message: hubs.each_last(&last_by_hub),
            });
        }
        warn!(attempt, code = ?status.code(), message = status.message(), ?delay, "publish failed, retrying");
        hubs.advance(at);
        metrics::counter!("freshness_publisher_retries_total").increment(1);
        sleep(delay).await;
    }
}

/// The hub's `retry-after-ms` hint.
fn retry_after(s: &tonic::Status) -> Option<Duration> {
    s.metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.min(60_000)))
}

/// Whether a failed attempt may be retried: publishing is idempotent, so any
/// transient failure may, including ones after which the hub may have applied
/// the events. `RESOURCE_EXHAUSTED` is an overload only with a retry hint;
/// without one it is a message over the size limit, which no retry fixes.
fn retryable(s: &tonic::Status, hinted: bool) -> bool {
    use tonic::Code;
    match s.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => true,
        Code::ResourceExhausted => hinted,
        _ => false,
    }
}

fn receipt(events: &[Event], r: pb::PublishResponse) -> Result<PublishReceipt, PublishError> {
    if r.results.len() != events.len() {
        return Err(PublishError::Malformed(format!(
            "{} results for {} events",
            r.results.len(),
            events.len()
        )));
    }
    let results = events
        .iter()
        .zip(r.results)
        .map(|(e, res)| {
            let outcome = match pb::PublishOutcome::try_from(res.outcome) {
                Ok(pb::PublishOutcome::Applied) => Outcome::Applied,
                Ok(pb::PublishOutcome::Duplicate) => Outcome::Duplicate,
                Ok(pb::PublishOutcome::Superseded) => Outcome::Superseded,
                _ => {
                    return Err(PublishError::Malformed(format!(
                        "unknown outcome {} for {}",
                        res.outcome, e.entity
                    )));
                }
            };
            Ok(PublishResult {
                entity: e.entity.clone(),
                version: e.version,
                outcome,
                shard: ShardId(res.shard),
                seq: res.seq,
                current_version: res.current_version,
            })
        })
        .collect::<Result<_, _>>()?;
    let applied_ack = match pb::AckLevel::try_from(r.applied_ack) {
        Ok(pb::AckLevel::Region) => AckLevel::Region,
        Ok(pb::AckLevel::Global) => AckLevel::Global,
        _ => AckLevel::Accepted,
    };
    Ok(PublishReceipt {
        results,
        complete: r.complete,
        pending_nodes: r.pending_nodes,
        pending_regions: r.pending_regions,
        applied_ack,
        note: r.note,
        epoch: r.epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rules() {
        let mut overloaded = tonic::Status::resource_exhausted("queue full");
        overloaded
            .metadata_mut()
            .insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&overloaded), Some(Duration::from_millis(250)));
        assert!(retryable(&overloaded, true));
        let too_big = tonic::Status::resource_exhausted("message too large");
        assert!(!retryable(&too_big, retry_after(&too_big).is_some()));
        assert!(retryable(&tonic::Status::unavailable("down"), false));
        assert!(!retryable(
            &tonic::Status::invalid_argument("event 0"),
            false
        ));
    }

    #[test]
    fn receipt_matches_results_to_events() {
        let events = vec![Event::new(
            Entity::parse("user:1").unwrap(),
            Version::new(3).unwrap(),
        )];
        let r = pb::PublishResponse {
            results: vec![pb::EventResult {
                outcome: pb::PublishOutcome::Duplicate as i32,
                shard: 5,
                seq: 9,
                current_version: 3,
            }],
            complete: true,
            epoch: 77,
            ..Default::default()
        };
        let got = receipt(&events, r.clone()).unwrap();
        assert_eq!(got.results[0].outcome, Outcome::Duplicate);
        assert_eq!(
            (got.results[0].shard, got.results[0].seq, got.epoch),
            (ShardId(5), 9, 77)
        );
        let mut short = r;
        short.results.clear();
        assert!(matches!(
            receipt(&events, short),
            Err(PublishError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn invalid_calls_fail_before_anything_is_sent() {
        let p = Publisher::builder("http://127.0.0.1:1").build().unwrap();
        let e = Event::new(Entity::parse("user:1").unwrap(), Version::new(1).unwrap())
            .with_payload(vec![0u8; 64 * 1024 + 1]);
        let err = p
            .publish_events(vec![e], PublishOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            PublishError::Invalid(InvalidPublish::Event {
                index: 0,
                field: "payload",
                ..
            })
        ));
        assert!(matches!(
            p.publish_events(vec![], PublishOptions::default()).await,
            Err(PublishError::Invalid(InvalidPublish::Empty { .. }))
        ));
    }

    /// What publishing to `hubs` with `attempts` quick attempts ends with.
    async fn give_up(hubs: &str, attempts: u32) -> PublishError {
        let p = Publisher::builder(hubs)
            .retry(RetryPolicy {
                max_attempts: attempts,
                backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
                ..RetryPolicy::default()
            })
            .build()
            .unwrap();
        p.publish(Entity::parse("user:1").unwrap(), Version::new(1).unwrap())
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn gives_up_on_an_unreachable_hub() {
        // Port 1 on loopback refuses connections.
        let err = give_up("http://127.0.0.1:1", 3).await;
        assert!(
            matches!(err, PublishError::Unavailable { attempts: 3, .. }),
            "{err:?}"
        );
    }

    /// With several hubs, giving up names each hub's own last failure, not
    /// only the last attempt's.
    #[tokio::test]
    async fn giving_up_on_several_hubs_names_each_ones_failure() {
        // Ports 1 and 2 on loopback refuse connections.
        let err = give_up("http://127.0.0.1:1,http://127.0.0.1:2", 4).await;
        let PublishError::Unavailable {
            attempts: 4,
            message,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        let parts: Vec<&str> = message.split("; ").collect();
        assert_eq!(parts.len(), 2, "{message}");
        for (part, url) in parts
            .iter()
            .zip(["http://127.0.0.1:1: ", "http://127.0.0.1:2: "])
        {
            assert!(
                part.starts_with(url) && part.to_lowercase().contains("refused"),
                "{message}"
            );
        }
    }
}
