//! The subscriber's loops: the outer one reconnects with backoff, the inner
//! one drives one stream (welcome, batches, progress, resets, goodbye) and
//! acks what the handler applied.

use std::collections::BTreeSet;
use std::time::Duration;

use freshness::{AckPacer, Cursor, HASH_NAME, ShardId, pb};
use futures::StreamExt;
use pb::subscribe_response::Kind;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{Instrument, debug, info, info_span, warn};

use super::position::Position;
use super::{Config, Handler, HandlerError, SubscriberError};
use crate::event::{EventBatch, Reset, ResetReason, ResetScope, batch_from_wire, hub_time};
use crate::feed::{FeedState, FeedTx};
use crate::publisher::status_message;
use crate::telemetry::Adopt;
use freshness::backoff::Attempts;

/// How a stream ended.
#[derive(Debug)]
enum StreamEnd {
    /// The shutdown token fired.
    Shutdown,
    /// The hub said goodbye (shutting down): reconnect at once.
    Goodbye(String),
    /// Connecting failed before the hub answered.
    Unreachable(String),
    /// The stream broke (or the hub broke the protocol) after it was
    /// established: reconnect.
    Broken(String),
    /// The hub refused the resume cursor: forget it and flush everything.
    CursorRefused(String),
    /// Do not reconnect.
    Fatal(SubscriberError),
}

pub(super) async fn run<H: Handler>(
    config: Config,
    endpoints: Vec<(String, Endpoint)>,
    handler: H,
    feed: FeedTx,
    shutdown: CancellationToken,
) -> Result<(), SubscriberError> {
    let span = info_span!("subscriber", node_id = %config.node_id, hub = %config.hub);
    let result = run_inner(&config, &endpoints, &handler, &feed, &shutdown)
        .instrument(span)
        .await;
    let error = match &result {
        Ok(()) => "subscriber stopped".to_owned(),
        Err(e) => e.to_string(),
    };
    feed.set(FeedState::Down { error });
    result
}

async fn run_inner<H: Handler>(
    config: &Config,
    endpoints: &[(String, Endpoint)],
    handler: &H,
    feed: &FeedTx,
    shutdown: &CancellationToken,
) -> Result<(), SubscriberError> {
    let saved = match config.store.load().await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cursor file unusable: flushing the cache and starting at the head");
            flush_all(config, handler, ResetReason::CursorLost).await?;
            config.store.clear().await?;
            None
        }
    };
    if let Some(c) = &saved {
        info!(
            epoch = c.epoch,
            shards = c.seqs.len(),
            "resuming from saved cursor"
        );
    }
    let mut session = Session {
        config,
        handler,
        feed,
        position: Position::new(saved),
        acked: None,
        persisted: None,
    };
    let mut attempts = Attempts::new(config.reconnect);
    let mut attempt = 0u64;
    // Which hub of the list: the next one after a stream that broke or a
    // hub that could not be reached.
    let mut at = 0usize;
    loop {
        attempt += 1;
        let Some((hub, endpoint)) = endpoints.get(at % endpoints.len().max(1)) else {
            return Ok(());
        };
        let span = info_span!("stream", attempt, %hub, epoch = tracing::field::Empty);
        if endpoints.len() > 1 {
            info!(parent: &span, %hub, "using hub");
        }
        let (end, welcomed) = session.stream(endpoint, shutdown).instrument(span).await;
        if !matches!(
            end,
            StreamEnd::Shutdown | StreamEnd::Fatal(_) | StreamEnd::CursorRefused(_)
        ) {
            at += 1;
        }
        session.persist().await;
        if welcomed {
            attempts.reset();
        }
        let delay = match end {
            StreamEnd::Shutdown => return Ok(()),
            StreamEnd::Fatal(e) => {
                warn!(error = %e, "subscription ended for good");
                return Err(e);
            }
            StreamEnd::Goodbye(message) => {
                info!(%message, "hub said goodbye, reconnecting");
                feed.set(FeedState::Connecting);
                // Give a restarting hub a moment; every node reconnects now.
                attempts.next_delay()
            }
            StreamEnd::Broken(error) => {
                warn!(%error, "stream broke, reconnecting");
                feed.set(FeedState::Connecting);
                attempts.next_delay()
            }
            StreamEnd::Unreachable(error) => {
                debug!(%error, "hub unreachable");
                feed.set(FeedState::Down { error });
                attempts.next_delay()
            }
            StreamEnd::CursorRefused(error) => {
                warn!(%error, "hub refused the saved cursor: flushing the cache, starting at the head");
                flush_all(config, handler, ResetReason::CursorLost).await?;
                session.position.forget();
                session.acked = None;
                session.persisted = None;
                if let Err(e) = config.store.clear().await {
                    warn!(error = %e, "could not remove the refused cursor file");
                }
                Duration::ZERO
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = sleep(delay) => {}
        }
    }
}

/// Calls `on_reset(all)` until it succeeds or the retries run out.
async fn flush_all<H: Handler>(
    config: &Config,
    handler: &H,
    reason: ResetReason,
) -> Result<(), SubscriberError> {
    let reset = Reset::all(reason, config.shard_count);
    retry(config, || handler.on_reset(&reset))
        .await
        .map_err(|e| SubscriberError::Handler(e.to_string()))
}

/// Calls `f` up to the configured number of times.
async fn retry<F, Fut>(config: &Config, mut f: F) -> Result<(), HandlerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), HandlerError>>,
{
    let mut attempts = Attempts::new(config.handler_retry.backoff);
    let mut left = config.handler_retry.attempts.max(1);
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                left -= 1;
                if left == 0 {
                    return Err(e);
                }
                let delay = attempts.next_delay();
                warn!(error = %e, retry_in = ?delay, "handler failed");
                sleep(delay).await;
            }
        }
    }
}

struct Session<'a, H> {
    config: &'a Config,
    handler: &'a H,
    feed: &'a FeedTx,
    position: Position,
    /// The last cursor acked on the current stream.
    acked: Option<Cursor>,
    /// The last cursor written to the store.
    persisted: Option<Cursor>,
}

/// The outbound half: the hello, then the newest ack cursor whenever it
/// changes. A watch coalesces acks (they are cumulative), so the queue is
/// bounded at one.
fn outbound(
    hello: pb::Hello,
    acks: watch::Receiver<Option<Cursor>>,
) -> impl futures::Stream<Item = pb::SubscribeRequest> + Send + 'static {
    let hello = pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Hello(hello)),
    };
    let acks = futures::stream::unfold(acks, |mut rx| async move {
        rx.changed().await.ok()?;
        let cursor = rx.borrow_and_update().clone();
        Some((cursor, rx))
    })
    .filter_map(|c| async move {
        c.map(|c| pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Ack(pb::Ack {
                cursor: Some(c.to_wire()),
                // Cache nodes leave the replication fields unset.
                ..Default::default()
            })),
        })
    });
    futures::stream::iter([hello]).chain(acks)
}

impl<H: Handler> Session<'_, H> {
    /// Drives one stream. Returns how it ended and whether the hub welcomed
    /// the node.
    async fn stream(
        &mut self,
        endpoint: &Endpoint,
        shutdown: &CancellationToken,
    ) -> (StreamEnd, bool) {
        let config = self.config;
        let connect = async {
            let channel = endpoint.connect().await.map_err(|e| {
                StreamEnd::Unreachable(format!("connect: {}", crate::error_chain(&e)))
            })?;
            let (ack_tx, ack_rx) = watch::channel(None);
            let hello = pb::Hello {
                node_id: config.node_id.clone(),
                namespaces: config.namespaces.clone(),
                resume: self.position.resume().map(Cursor::to_wire),
                max_in_flight: config.max_in_flight,
                shard_count: config.shard_count,
                ..Default::default()
            };
            let resuming = hello.resume.is_some();
            let bearer = crate::transport::Bearer::new(&config.hub, &config.credentials)
                .map_err(|e| StreamEnd::Broken(e.to_string()))?;
            let mut client = crate::transport::HubChannel { channel, bearer }.client();
            let mut inbound = client
                .subscribe(outbound(hello, ack_rx))
                .await
                .map_err(|s| refusal(&s, resuming))?
                .into_inner();
            let first = inbound.message().await.map_err(|s| refusal(&s, resuming))?;
            match first.and_then(|m| m.kind) {
                Some(Kind::Welcome(w)) => Ok((w, inbound, ack_tx)),
                Some(Kind::Goodbye(g)) => Err(goodbye(&g)),
                Some(_) => Err(StreamEnd::Broken(
                    "hub sent something before its welcome".into(),
                )),
                None => Err(StreamEnd::Unreachable(
                    "stream ended before the welcome".into(),
                )),
            }
        };
        let (welcome, mut inbound, ack_tx) = tokio::select! {
            () = shutdown.cancelled() => return (StreamEnd::Shutdown, false),
            r = timeout(config.connect_timeout, connect) => match r {
                Err(_) => return (StreamEnd::Unreachable("no welcome within the connect timeout".into()), false),
                Ok(Err(end)) => return (end, false),
                Ok(Ok(w)) => w,
            },
        };
        if let Err(end) = self.on_welcome(&welcome).await {
            return (end, true);
        }
        self.acked = None;
        let stale_after = config.stale_after.unwrap_or_else(|| {
            Duration::from_millis(u64::from(welcome.progress_interval_ms) * 4)
                .max(Duration::from_secs(1))
        });
        let mut persist_at: Option<Instant> = None;
        // When acks go out (`freshness::ack`): `SubscriberBuilder::ack_interval`
        // and `lazy_ack_interval`, and whether this hub acks on request.
        let mut pacer = AckPacer::new(
            config.ack_interval,
            config.lazy_ack_interval,
            welcome.acks_on_request,
        );
        let end = loop {
            let stale_at = match self.feed.state() {
                FeedState::Live { .. } => self
                    .feed
                    .staleness()
                    .map(|s| Instant::now() + stale_after.saturating_sub(s)),
                _ => None,
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break StreamEnd::Shutdown,
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => break StreamEnd::Broken("stream ended without a goodbye".into()),
                        Err(s) => break StreamEnd::Broken(format!("stream failed: {}: {}", code_name(s.code()), status_message(&s))),
                    };
                    // Progress is acked even when the cursor did not move:
                    // the ack tells the hub which watermark this node holds,
                    // which is its view of the node's staleness.
                    let progress = matches!(msg.kind, Some(Kind::Progress(_)));
                    let may_wait = pacer.may_wait(&msg);
                    if let Err(end) = self.on_message(msg).await {
                        break end;
                    }
                    let owed = self
                        .position
                        .ack()
                        .is_some_and(|c| progress || self.acked.as_ref() != Some(c));
                    if owed && pacer.owe(Instant::now(), may_wait) {
                        self.send_ack(&ack_tx, &mut persist_at);
                    }
                }
                () = sleep_until_opt(pacer.due()) => {
                    pacer.sent(Instant::now());
                    self.send_ack(&ack_tx, &mut persist_at);
                }
                () = sleep_until_opt(stale_at) => {
                    let staleness = self.feed.staleness().unwrap_or(stale_after);
                    warn!(?staleness, "no watermark within stale_after");
                    self.feed.set(FeedState::Stale { staleness });
                }
                () = sleep_until_opt(persist_at) => {
                    persist_at = None;
                    self.persist().await;
                }
            }
        };
        (end, true)
    }

    /// Hands the applied cursor to the stream (replacing one not yet
    /// written) and schedules its persistence.
    fn send_ack(
        &mut self,
        ack_tx: &watch::Sender<Option<Cursor>>,
        persist_at: &mut Option<Instant>,
    ) {
        let Some(c) = self.position.ack() else {
            return;
        };
        ack_tx.send_replace(Some(c.clone()));
        self.acked = Some(c.clone());
        if persist_at.is_none() && self.config.store != crate::CursorStore::Memory {
            *persist_at = Some(Instant::now() + self.config.persist_interval);
        }
    }

    async fn on_welcome(&mut self, w: &pb::Welcome) -> Result<(), StreamEnd> {
        tracing::Span::current().record("epoch", w.epoch);
        self.feed.new_stream();
        if w.hash != HASH_NAME {
            return Err(StreamEnd::Fatal(SubscriberError::Hash(w.hash.clone())));
        }
        if self.config.shard_count != 0 && w.shard_count != self.config.shard_count {
            return Err(StreamEnd::Fatal(SubscriberError::ShardCount {
                expected: self.config.shard_count,
                hub: w.shard_count,
            }));
        }
        if self.position.applied().is_none() {
            // No cursor: the stream starts at the hub's head and never sends
            // what was appended before, so nothing the handler holds from
            // before now is covered. Before adopting the start, so that a
            // failure retries it on the next stream.
            let handler = self.handler;
            retry(self.config, || handler.on_start_at_head())
                .await
                .map_err(|e| {
                    StreamEnd::Broken(format!(
                        "handler failed to drop what predates the start: {e}"
                    ))
                })?;
        }
        let adopted = self
            .position
            .on_welcome(w)
            .map_err(|e| StreamEnd::Broken(e.to_string()))?;
        info!(
            hub_id = %w.hub_id,
            region = %w.region,
            epoch = w.epoch,
            shards = w.shard_count,
            resumed = w.resumed,
            owed_reset = ?self.position.owed_reset().map(|(_, r)| r),
            "welcomed"
        );
        if adopted {
            // A node without a cursor starts at the head: persist it at once,
            // so that a crash before the first ack does not make the next
            // start skip what arrives meanwhile.
            self.persist().await;
        }
        if !self.feed.state().is_live() {
            self.feed.set(FeedState::Connecting);
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: pb::SubscribeResponse) -> Result<(), StreamEnd> {
        let received = Instant::now();
        match msg.kind {
            Some(Kind::Events(batch)) => {
                self.pay_owed_reset().await?;
                let watermark = hub_time(batch.watermark_us);
                let (batch, bad) = batch_from_wire(batch);
                self.apply_batch(batch).await?;
                if !bad.is_empty() {
                    warn!(shards = ?bad, "hub sent events this client cannot read: resetting their shards");
                    let reset = Reset::shards(
                        bad,
                        ResetReason::MalformedEvent,
                        self.position.shard_count(),
                    );
                    self.apply_reset(&reset).await?;
                }
                if let Some(w) = watermark {
                    self.feed.applied_watermark(w, received);
                }
            }
            Some(Kind::Progress(p)) => {
                self.pay_owed_reset().await?;
                if let Some(c) = &p.cursor {
                    self.position
                        .on_progress(c)
                        .map_err(|e| StreamEnd::Broken(e.to_string()))?;
                }
                if let Some(w) = hub_time(p.watermark_us) {
                    self.feed.applied_watermark(w, received);
                }
            }
            Some(Kind::Reset(r)) => {
                let scope = if r.all {
                    ResetScope::All
                } else {
                    ResetScope::Shards(r.shards.iter().copied().map(ShardId).collect())
                };
                let reason = ResetReason::from_wire(r.reason);
                info!(%reason, all = r.all, shards = ?r.shards, "reset");
                self.reset_and_move(scope, reason, r.cursor.as_ref())
                    .await?;
                metrics::counter!("freshness_subscriber_resets_total", "reason" => reason.as_str())
                    .increment(1);
            }
            Some(Kind::Goodbye(g)) => return Err(goodbye(&g)),
            Some(Kind::Welcome(_)) => return Err(StreamEnd::Broken("second welcome".into())),
            None => return Err(StreamEnd::Broken("empty message from the hub".into())),
        }
        Ok(())
    }

    /// Applies the reset the node owes since the welcome (see
    /// [`Position`]) before anything else of the stream.
    async fn pay_owed_reset(&mut self) -> Result<(), StreamEnd> {
        let Some((scope, reason)) = self.position.owed_reset() else {
            return Ok(());
        };
        warn!(%reason, ?scope, "hub moved past the node's cursor without a reset: resetting locally");
        self.reset_and_move(scope, reason, None).await
    }

    /// Applies a reset to the handler, then moves the position past it (to
    /// `cursor` where the hub gave one).
    async fn reset_and_move(
        &mut self,
        scope: ResetScope,
        reason: ResetReason,
        cursor: Option<&pb::Cursor>,
    ) -> Result<(), StreamEnd> {
        let reset = Reset {
            scope,
            reason,
            shard_count: self.position.shard_count(),
        };
        self.apply_reset(&reset).await?;
        self.position
            .on_reset(&reset.scope, cursor)
            .map_err(|e| StreamEnd::Broken(e.to_string()))
    }

    /// Hands a batch to the handler; if it keeps failing, resets the batch's
    /// shards instead. Either way the events count as applied.
    async fn apply_batch(&mut self, batch: EventBatch) -> Result<(), StreamEnd> {
        if !batch.events.is_empty() {
            let handler = self.handler;
            let span = info_span!(
                "subscriber.apply",
                otel.kind = "consumer",
                node_id = %self.config.node_id,
                events = crate::telemetry::num(batch.events.len()),
                otel.status_description = tracing::field::Empty,
            );
            // Joins the writers' traces: parented on the first event's
            // context, linked to the others.
            let mut adopt = Adopt::new(&span);
            for e in &batch.events {
                let tp = e.traceparent.as_deref().unwrap_or_default();
                if !adopt.wire(tp, e.tracestate.as_deref().unwrap_or_default()) {
                    break;
                }
            }
            adopt.root_unless_joined();
            let applied = retry(self.config, || handler.on_events(&batch))
                .instrument(span.clone())
                .await;
            if let Err(e) = &applied {
                span.record("otel.status_description", tracing::field::display(e));
            }
            drop(span);
            if let Err(e) = applied {
                let shards: BTreeSet<ShardId> = batch.events.iter().map(|e| e.shard).collect();
                warn!(error = %e, ?shards, "handler keeps failing on a batch: resetting its shards");
                let reset = Reset::shards(
                    shards,
                    ResetReason::HandlerFailed,
                    self.position.shard_count(),
                );
                self.apply_reset(&reset).await?;
            }
            metrics::counter!("freshness_subscriber_events_total")
                .increment(batch.events.len() as u64);
        }
        self.position
            .on_events(batch.events.iter().map(|e| (e.shard, e.seq)))
            .map_err(|e| StreamEnd::Broken(e.to_string()))
    }

    /// Hands a reset to the handler. If it keeps failing, nothing is acked:
    /// the stream is closed and the node resumes from its applied cursor, so
    /// the hub sends the same reset (or the events) again.
    async fn apply_reset(&self, reset: &Reset) -> Result<(), StreamEnd> {
        let handler = self.handler;
        retry(self.config, || handler.on_reset(reset))
            .await
            .map_err(|e| StreamEnd::Broken(format!("handler failed to apply a reset: {e}")))
    }

    /// Writes the applied cursor to the store if it moved.
    async fn persist(&mut self) {
        if self.config.store == crate::CursorStore::Memory {
            return;
        }
        let Some(c) = self.position.applied() else {
            return;
        };
        if self.persisted.as_ref() == Some(c) {
            return;
        }
        let c = c.clone();
        match self.config.store.save(&c).await {
            Ok(()) => self.persisted = Some(c),
            Err(e) => warn!(error = %e, "could not persist the cursor; keeping the older one"),
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn goodbye(g: &pb::Goodbye) -> StreamEnd {
    match pb::GoodbyeReason::try_from(g.reason) {
        Ok(pb::GoodbyeReason::Replaced) => {
            StreamEnd::Fatal(SubscriberError::Replaced(g.message.clone()))
        }
        _ => StreamEnd::Goodbye(g.message.clone()),
    }
}

/// Sorts a status the hub answered before its welcome.
fn refusal(s: &tonic::Status, resuming: bool) -> StreamEnd {
    use tonic::Code;
    let line = format!("{}: {}", code_name(s.code()), status_message(s));
    match s.code() {
        Code::InvalidArgument if resuming => StreamEnd::CursorRefused(line),
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => StreamEnd::Fatal(SubscriberError::Refused {
            code: crate::Code::from_tonic(s.code()),
            message: s.message().to_owned(),
        }),
        _ => StreamEnd::Unreachable(line),
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}
