//! Replication links: this hub pulls, from each peer region's hub, the events
//! that originated there (SPEC §3.3).
//!
//! A link is a Subscribe stream with `replication: true`, so the peer sends
//! only its own region's events (loop-free in a full mesh). Each batch is
//! appended to this hub's log through the shard actors with origin, version
//! and publish time kept, and acked to the peer only after the append. The
//! actors' version check makes the newest version win across regions.
//!
//! When the link cannot prove continuity — first contact, the peer's epoch
//! changed, or the peer reset shards — this hub appends replication gap
//! markers for those shards, and every local node reading past a marker is
//! reset (`REPLICATION_GAP`). For GLOBAL acks the link reports back, with
//! each ack, how far this region's nodes have applied the peer's events.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use freshness::backoff::{Attempts, Backoff};
use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::pb::{self, hub_client::HubClient};
use freshness::validate::CheckedEvent;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Endpoint;

use crate::error::HubError;
use crate::hub::Hub;
use crate::link_lease::LinkCursors;
use crate::shard::Incoming;

/// Most (peer seq, local seq) pairs a link remembers per shard for GLOBAL
/// acks; past it, the newest pairs are merged (conservatively).
const APPLIED_TRACK: usize = 4096;
/// How often a link reports what this region applied.
const APPLIED_EVERY: Duration = Duration::from_millis(5);
/// In-flight events a link accepts from its peer.
const LINK_IN_FLIGHT: u32 = 65_536;
/// How often a link reads its peer's heads for status.
const HEADS_EVERY: Duration = Duration::from_secs(1);
/// How often a link's cursor is written to the data directory (when it
/// moved): a restart resumes from at most this far back, and what comes
/// again is answered as duplicates by the shard actors.
const PERSIST_EVERY: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts the replication links on `tracker`: one per configured peer for a
/// single hub, until it shuts down; with hub replicas, the region's link
/// lease (`crate::link_lease`) starts them at the one replica that holds it.
pub fn spawn_links(hub: &Arc<Hub>, tracker: &TaskTracker) {
    if hub.config.peers.is_empty() {
        return;
    }
    if let Some(replica) = &hub.replica {
        tracker.spawn(crate::link_lease::run(
            hub.clone(),
            replica.clone(),
            tracker.clone(),
        ));
        return;
    }
    // A durable hub resumes each link where it stood before a restart, so
    // neither side sees a gap.
    let cursors = hub
        .config
        .peers
        .keys()
        .filter_map(|region| {
            let (epoch, seqs) = hub.data_dir.as_ref()?.peer_cursor(region)?;
            Some((region.clone(), pb::Cursor { epoch, seqs }))
        })
        .collect();
    start_links(hub, cursors, None, hub.shutdown.clone(), tracker);
}

/// Starts one link per configured peer, each from its cursor in `start`
/// (none: first contact), until `stop`. With `lease`, the links keep their
/// cursors there (the link lease carries them); else in the data directory.
pub fn start_links(
    hub: &Arc<Hub>,
    start: BTreeMap<String, pb::Cursor>,
    lease: Option<Arc<LinkCursors>>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    for region in hub.config.peers.keys() {
        let cursor = start
            .get(region)
            .filter(|c| c.seqs.len() == hub.shard_count() as usize)
            .cloned();
        let link = Link {
            hub: hub.clone(),
            region: region.clone(),
            urls: hub.config.peer_urls(region),
            at: 0,
            stop: stop.clone(),
            lease: lease.clone(),
            jumped: false,
            persisted: cursor.clone(),
            cursor,
            pending: vec![VecDeque::new(); hub.shard_count() as usize],
            reported: Vec::new(),
            persisted_at: None,
        };
        tracker.spawn(link.run());
    }
}

struct Link {
    hub: Arc<Hub>,
    region: String,
    /// The peer's hub URLs (several for a region of replicas), tried in
    /// turn; `at` is the one in use.
    urls: Vec<String>,
    at: usize,
    /// Ends the link: the hub's shutdown, or the loss of the link lease.
    stop: CancellationToken,
    /// With hub replicas: where the link lease reads the cursor from.
    lease: Option<Arc<LinkCursors>>,
    /// The cursor jumped (first contact, a reset): the lease is renewed at
    /// once rather than within the second.
    jumped: bool,
    /// The peer's epoch and how far this hub has appended its events.
    cursor: Option<pb::Cursor>,
    /// Per shard: (peer seq, local seq) of appended events not yet applied
    /// by every local node.
    pending: Vec<VecDeque<(u64, u64)>>,
    /// The `applied` cursor last sent.
    reported: Vec<u64>,
    /// The cursor last written to the data directory.
    persisted: Option<pb::Cursor>,
    persisted_at: Option<tokio::time::Instant>,
}

/// Why a link's stream ended.
enum LinkEnd {
    Shutdown,
    /// Worth retrying; `connected` says whether it got as far as a welcome.
    Failed {
        error: LinkError,
        connected: bool,
    },
}

/// Why a replication link failed (shown in status as the peer's
/// `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The configured URL is not one.
    #[error("invalid peer address: {0}")]
    Address(#[source] tonic::transport::Error),
    /// No connection.
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// The peer answered the stream with an error (its code shows in
    /// status: `PermissionDenied` for a hub not granted `replicate`).
    #[error("peer refused the link: {:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    /// This hub's side of the peer's TLS cannot be set up.
    #[error("peer TLS: {0}")]
    Tls(#[source] crate::tls::PeerTlsError),
    /// The peer's first message was not a welcome.
    #[error("peer did not send a welcome")]
    NoWelcome,
    /// The welcome carries no cursor.
    #[error("welcome without a cursor")]
    WelcomeWithoutCursor,
    /// The peer has another shard count.
    #[error("shard count mismatch: peer has {peer}, this hub {ours}; link not used")]
    ShardCount {
        /// The peer's.
        peer: u32,
        /// This hub's.
        ours: u32,
    },
    /// The stream failed.
    #[error("stream error: {}", .0.message())]
    Stream(tonic::Status),
    /// The peer ended the stream.
    #[error("peer ended the stream")]
    Ended,
    /// The peer said goodbye.
    #[error("peer said goodbye: {0}")]
    Goodbye(String),
    /// A welcome in the middle of the stream, or an empty message.
    #[error("unexpected message from peer")]
    Unexpected,
    /// An event without its body.
    #[error("replicated event without a body")]
    EventWithoutBody,
    /// An event that is not one.
    #[error("peer sent a bad event: {0}")]
    BadEvent(#[from] freshness::validate::InvalidEvent),
    /// A reset without the cursor it moves to.
    #[error("reset without a cursor")]
    ResetWithoutCursor,
    /// This hub could not append what the peer sent.
    #[error(transparent)]
    Append(#[from] HubError),
    /// This side of the stream closed.
    #[error("peer stream closed")]
    Closed,
}

impl Link {
    async fn run(mut self) {
        let mut attempts = Attempts::new(Backoff::new(BACKOFF_MIN, BACKOFF_MAX));
        loop {
            let end = self.stream().await;
            self.persist(true);
            self.hub.update_peer(&self.region, |p| p.connected = false);
            match end {
                LinkEnd::Shutdown => return,
                LinkEnd::Failed { error, connected } => {
                    tracing::warn!(peer = %self.region, url = %self.url(), %error, "replication link down");
                    self.hub
                        .update_peer(&self.region, |p| p.last_error = error.to_string());
                    if connected {
                        attempts.reset();
                    }
                    // The next of the peer's replicas, if it has several:
                    // they share one log, so the cursor means the same there.
                    self.at = (self.at + 1) % self.urls.len().max(1);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(attempts.next_delay()) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// The peer URL in use.
    fn url(&self) -> String {
        self.urls.get(self.at).cloned().unwrap_or_default()
    }

    fn failed(error: LinkError, connected: bool) -> LinkEnd {
        LinkEnd::Failed { error, connected }
    }

    async fn stream(&mut self) -> LinkEnd {
        let url = self.url();
        self.hub
            .update_peer(&self.region, |p| p.address = url.clone());
        let endpoint = match Endpoint::from_shared(url.clone()) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10)),
            Err(e) => return Self::failed(LinkError::Address(e), false),
        };
        // An https:// peer: its CA, and this hub's certificate as the
        // client certificate (read at each connect: a rotated one is used
        // from the next connection on).
        let endpoint = if url.starts_with("https://") {
            let host = endpoint.uri().host().unwrap_or_default().to_owned();
            let config = &self.hub.config;
            let tls = crate::tls::peer_client_config(
                config.peer_ca.as_deref(),
                config.tls_files().as_ref(),
                &host,
            )
            .and_then(|tls| {
                endpoint
                    .tls_config(tls)
                    .map_err(crate::tls::PeerTlsError::Config)
            });
            match tls {
                Ok(e) => e,
                Err(e) => return Self::failed(LinkError::Tls(e), false),
            }
        } else {
            endpoint
        };
        let channel = tokio::select! {
            c = endpoint.connect() => match c {
                Ok(c) => c,
                Err(e) => return Self::failed(LinkError::Connect(e), false),
            },
            () = self.stop.cancelled() => return LinkEnd::Shutdown,
        };
        let mut client = HubClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            node_id: format!("hub/{}/{}", self.hub.config.region, self.hub.config.hub_id),
            namespaces: Vec::new(),
            resume: self.cursor.clone(),
            max_in_flight: LINK_IN_FLIGHT,
            replication: true,
            shard_count: self.hub.shard_count(),
            region: self.hub.config.region.clone(),
        };
        let _ = tx
            .send(pb::SubscribeRequest {
                kind: Some(ReqKind::Hello(hello)),
            })
            .await;
        let opened = tokio::select! {
            r = client.subscribe(ReceiverStream::new(rx)) => r,
            () = self.stop.cancelled() => return LinkEnd::Shutdown,
        };
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(s) => return Self::failed(LinkError::Refused(s), false),
        };
        let welcome = match inbound.message().await {
            Ok(Some(pb::SubscribeResponse {
                kind: Some(RespKind::Welcome(w)),
            })) => w,
            Ok(_) => return Self::failed(LinkError::NoWelcome, false),
            Err(s) => return Self::failed(LinkError::Refused(s), false),
        };
        if welcome.shard_count != self.hub.shard_count() {
            return Self::failed(
                LinkError::ShardCount {
                    peer: welcome.shard_count,
                    ours: self.hub.shard_count(),
                },
                false,
            );
        }
        let Some(start) = welcome.cursor.clone() else {
            return Self::failed(LinkError::WelcomeWithoutCursor, false);
        };
        if !welcome.resumed {
            // No proof of continuity with this peer: reset every shard here.
            tracing::info!(peer = %self.region, epoch = welcome.epoch, "replication starts without resume: gap on every shard");
            let all: Vec<u32> = (0..self.hub.shard_count()).collect();
            // A log that refuses the markers (JetStream away, disk full):
            // retry the link, never end it while the hub runs.
            if let Err(e) = self.hub.append(Vec::new(), &all, None).await {
                if self.stop.is_cancelled() {
                    return LinkEnd::Shutdown;
                }
                return Self::failed(LinkError::Append(e), false);
            }
            self.pending.iter_mut().for_each(VecDeque::clear);
            self.jumped = true;
        }
        self.reported = start.seqs.clone();
        self.cursor = Some(start);
        self.hub.update_peer(&self.region, |p| {
            p.connected = true;
            p.last_error.clear();
        });
        tracing::info!(peer = %self.region, resumed = welcome.resumed, "replication link up");

        let mut tick = tokio::time::interval(APPLIED_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (heads_tx, mut heads) = watch::channel(Vec::new());
        let poll = tokio::spawn(poll_heads(HubClient::new(channel), heads_tx));
        let _stop_poll = AbortOnDrop(poll);
        loop {
            let msg = tokio::select! {
                () = self.stop.cancelled() => return LinkEnd::Shutdown,
                Ok(()) = heads.changed() => {
                    let lag = self.lag_events(&heads.borrow_and_update());
                    self.hub.update_peer(&self.region, |p| p.lag_events = lag);
                    continue;
                }
                m = inbound.message() => m,
                _ = tick.tick() => {
                    self.persist(false);
                    if self.report_applied() && !self.send_ack(&tx).await {
                        return Self::failed(LinkError::Closed, true);
                    }
                    continue;
                }
            };
            let kind = match msg {
                Ok(Some(m)) => m.kind,
                Ok(None) => return Self::failed(LinkError::Ended, true),
                Err(s) => return Self::failed(LinkError::Stream(s), true),
            };
            let handled = match kind {
                Some(RespKind::Events(batch)) => self.on_events(batch).await,
                Some(RespKind::Progress(p)) => {
                    self.advance(p.cursor.as_ref(), None);
                    self.hub
                        .update_peer(&self.region, |i| i.watermark_us = p.watermark_us);
                    Ok(())
                }
                Some(RespKind::Reset(r)) => self.on_reset(r, welcome.resumed).await,
                Some(RespKind::Goodbye(g)) => Err(LinkError::Goodbye(g.message)),
                Some(RespKind::Welcome(_)) | None => Err(LinkError::Unexpected),
            };
            if let Err(e) = handled {
                return Self::failed(e, true);
            }
            self.report_applied();
            if !self.send_ack(&tx).await {
                return Self::failed(LinkError::Closed, true);
            }
        }
    }

    async fn on_events(&mut self, batch: pb::EventBatch) -> Result<(), LinkError> {
        let mut seqs = Vec::with_capacity(batch.events.len());
        let mut incoming = Vec::with_capacity(batch.events.len());
        for d in batch.events {
            let e = CheckedEvent::try_from(d.event.ok_or(LinkError::EventWithoutBody)?)?;
            seqs.push((d.shard, d.seq));
            // The peer asks for a prompt ack of a batch a publish waits on
            // (or when this link's in-flight budget fills up); a GLOBAL
            // publish there also waits on this region's nodes, so they are
            // asked to ack these events promptly too.
            incoming.push(Incoming::replicated(e, batch.ack_requested));
        }
        let outcomes = self.hub.append(incoming, &[], None).await?;
        for ((shard, peer_seq), (outcome, _)) in seqs.iter().zip(outcomes) {
            if let Some(q) = self.pending.get_mut(*shard as usize) {
                let full = q.len() >= APPLIED_TRACK;
                match q.back_mut() {
                    Some(back) if full => *back = (*peer_seq, back.1.max(outcome.seq)),
                    _ => q.push_back((*peer_seq, outcome.seq)),
                }
            }
        }
        let mut seen = self
            .cursor
            .as_ref()
            .map(|c| c.seqs.clone())
            .unwrap_or_default();
        for (shard, seq) in seqs {
            if let Some(s) = seen.get_mut(shard as usize) {
                *s = (*s).max(seq);
            }
        }
        self.advance(None, Some(&seen));
        if batch.watermark_us != 0 {
            self.hub
                .update_peer(&self.region, |p| p.watermark_us = batch.watermark_us);
        }
        Ok(())
    }

    async fn on_reset(&mut self, r: pb::Reset, resumed: bool) -> Result<(), LinkError> {
        let shards: Vec<u32> = if r.all {
            (0..self.hub.shard_count()).collect()
        } else {
            r.shards.clone()
        };
        // After a fresh start every shard already got its gap marker.
        if resumed {
            tracing::info!(peer = %self.region, reason = ?r.reason(), ?shards, "peer reset the link: replication gap");
            self.hub.append(Vec::new(), &shards, None).await?;
        }
        let target = r.cursor.ok_or(LinkError::ResetWithoutCursor)?;
        self.jumped = true;
        if let Some(c) = &mut self.cursor {
            c.epoch = target.epoch;
            for s in shards {
                if let (Some(mine), Some(t)) =
                    (c.seqs.get_mut(s as usize), target.seqs.get(s as usize))
                {
                    *mine = *t;
                }
                if let Some(q) = self.pending.get_mut(s as usize) {
                    q.clear();
                }
            }
        }
        Ok(())
    }

    /// Keeps the cursor when it moved: in the link lease's map (replicas),
    /// or in the data directory at most every [`PERSIST_EVERY`] unless
    /// `now`. Every event it covers is in the log already (the cursor moves
    /// only after the append was answered).
    fn persist(&mut self, now: bool) {
        if self.cursor == self.persisted {
            return;
        }
        if let Some(lease) = &self.lease {
            // Renewals of the link lease carry it (every second).
            if let Some(c) = &self.cursor {
                lease.set(&self.region, c.clone(), std::mem::take(&mut self.jumped));
            }
            self.persisted = self.cursor.clone();
            return;
        }
        let Some(dir) = &self.hub.data_dir else {
            return;
        };
        let t = tokio::time::Instant::now();
        if !now && self.persisted_at.is_some_and(|at| t < at + PERSIST_EVERY) {
            return;
        }
        let Some(c) = &self.cursor else { return };
        match dir.save_peer_cursor(&self.region, c.epoch, &c.seqs) {
            Ok(()) => {
                self.persisted = self.cursor.clone();
                self.persisted_at = Some(t);
            }
            Err(e) => {
                tracing::warn!(peer = %self.region, error = %e, "cannot save the link's cursor");
                self.persisted_at = Some(t);
            }
        }
    }

    /// Events in the peer's log this link has not passed yet.
    fn lag_events(&self, peer_heads: &[u64]) -> u64 {
        let Some(c) = &self.cursor else { return 0 };
        peer_heads
            .iter()
            .zip(&c.seqs)
            .map(|(h, at)| h.saturating_sub(*at))
            .sum()
    }

    /// Raises the cursor to `progress` (a wire cursor) or `seqs`.
    fn advance(&mut self, progress: Option<&pb::Cursor>, seqs: Option<&[u64]>) {
        let Some(c) = &mut self.cursor else { return };
        let other = progress.map(|p| p.seqs.as_slice()).or(seqs).unwrap_or(&[]);
        for (a, b) in c.seqs.iter_mut().zip(other) {
            *a = (*a).max(*b);
        }
    }

    /// Recomputes how far this region's nodes applied the peer's events;
    /// true when it moved since the last report.
    fn report_applied(&mut self) -> bool {
        let Some(cursor) = &self.cursor else {
            return false;
        };
        // A replica that does not yet know the other replicas' nodes would
        // report only its own: nothing until it does (GLOBAL, SPEC §3.3).
        if self
            .hub
            .replica
            .as_ref()
            .is_some_and(|r| !r.knows_the_region())
        {
            return false;
        }
        let applied_here = self.hub.min_node_acked();
        let mut moved = false;
        for (s, q) in self.pending.iter_mut().enumerate() {
            while q
                .front()
                .is_some_and(|(_, local)| *local <= applied_here[s])
            {
                q.pop_front();
            }
            let applied = match q.front() {
                Some((peer_seq, _)) => peer_seq - 1,
                None => cursor.seqs[s],
            };
            if self.reported.get(s).is_some_and(|r| applied > *r) {
                self.reported[s] = applied;
                moved = true;
            }
        }
        moved
    }

    async fn send_ack(&self, tx: &mpsc::Sender<pb::SubscribeRequest>) -> bool {
        let Some(cursor) = self.cursor.clone() else {
            return true;
        };
        let applied = pb::Cursor {
            epoch: cursor.epoch,
            seqs: self.reported.clone(),
        };
        tx.send(pb::SubscribeRequest {
            kind: Some(ReqKind::Ack(pb::Ack {
                cursor: Some(cursor),
                applied: Some(applied),
            })),
        })
        .await
        .is_ok()
    }
}

/// Aborts a task when dropped (the link's stream ended).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the peer's log heads once a second, for the link's lag in events.
async fn poll_heads(
    mut client: HubClient<tonic::transport::Channel>,
    heads: watch::Sender<Vec<u64>>,
) {
    let mut tick = tokio::time::interval(HEADS_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Ok(s) = client.status(pb::StatusRequest {}).await {
            let s = s.into_inner();
            heads.send_replace(s.shards.iter().map(|sh| sh.head_seq).collect());
        }
    }
}
