//! The systems under test, seen from the load generator: how a node
//! subscribes and how the publisher sends, for the hub (raw protocol), NATS
//! core pub/sub and Redis pub/sub.
//!
//! Every target carries the same message: a `freshness.v1.Event` with only
//! `entity` and `version` set. The hub receives it inside a `Publish` call
//! and delivers it inside an `EventBatch`; NATS and Redis carry its protobuf
//! encoding as the message body. Nodes decode it the same way and feed the
//! same [`Recorder`].
//!
//! Connections: by default every node has its own connection (its own HTTP/2
//! connection to the hub, its own NATS or Redis connection), as separate
//! cache nodes would. `--nodes-per-conn K` lets K hub nodes share one HTTP/2
//! connection (one stream each), for node counts beyond the file-descriptor
//! limit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use freshness::AckPacer;
use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::pb::{self, hub_client::HubClient};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::tracker::{Recorder, Tracker, entity, key_of};

/// Which system is under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The Freshness hub.
    Hub,
    /// The Freshness hub with TLS and token authentication on every call
    /// ([`crate::secure`]).
    #[value(name = "hub-tls")]
    #[serde(rename = "hub-tls")]
    HubTls,
    /// NATS core pub/sub.
    Nats,
    /// Redis pub/sub.
    Redis,
}

impl Kind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hub => "hub",
            Kind::HubTls => "hub-tls",
            Kind::Nats => "nats",
            Kind::Redis => "redis",
        }
    }

    /// A Freshness hub, secured or not.
    pub fn is_hub(self) -> bool {
        matches!(self, Kind::Hub | Kind::HubTls)
    }
}

/// Where one run's nodes and publisher connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// The system.
    pub kind: Kind,
    /// `http://…` for the hub, `nats://…`, `redis://…`.
    pub url: String,
    /// NATS subject or Redis channel of this run (a fresh one per run, so
    /// nothing of an earlier run arrives).
    pub topic: String,
    /// The hub's publishes wait for this ack level (`ACCEPTED` by default;
    /// `REGION` makes every batch ask its nodes for a prompt ack).
    pub ack_level: pb::AckLevel,
}

/// How long connecting one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node task is told.
#[derive(Debug, Clone)]
pub struct NodeCtl {
    /// End of the run: stop and hand the recorder back.
    pub stop: CancellationToken,
    /// Reconnect storm (B6): drop the stream now...
    pub down: CancellationToken,
    /// ... and open it again, from the cursor, when this fires.
    pub up: CancellationToken,
    /// Least time between two acks of a hub node (the client library's
    /// delayed-ack rule, `freshness::ack`): an ack goes out at once if the
    /// last one is older, else when this much time has passed since it.
    pub ack_interval: Duration,
    /// Longest wait before acking a batch the hub did not ask to have acked
    /// at once (acks on request, `freshness::ack`).
    pub lazy_ack_interval: Duration,
}

impl NodeCtl {
    /// Controls with no storm planned.
    pub fn new(ack_interval: Duration, lazy_ack_interval: Duration) -> Self {
        Self {
            stop: CancellationToken::new(),
            down: CancellationToken::new(),
            up: CancellationToken::new(),
            ack_interval,
            lazy_ack_interval,
        }
    }
}

/// A hub connection, shared by a few nodes or opened per node.
#[derive(Clone)]
pub enum HubConn {
    /// One HTTP/2 connection shared with other nodes.
    Shared(Client),
    /// Every stream (and every reconnect) opens its own connection to the
    /// hub at this address.
    Own(Box<Endpoint>, String),
}

impl HubConn {
    /// The connection to the hub at `url`: shared, or one per stream.
    pub async fn new(url: &str, shared: bool) -> Result<Self> {
        let endpoint = hub_endpoint(url)?;
        Ok(if shared {
            HubConn::Shared(hub_client(url, endpoint.connect().await?)?)
        } else {
            HubConn::Own(Box::new(endpoint), url.to_owned())
        })
    }

    async fn client(&self) -> Result<Client> {
        match self {
            HubConn::Shared(c) => Ok(c.clone()),
            HubConn::Own(e, url) => {
                let channel = tokio::time::timeout(CONNECT_TIMEOUT, e.connect())
                    .await
                    .context("connect timed out")??;
                hub_client(url, channel)
            }
        }
    }
}

/// An endpoint for the hub at `url`: TLS trusting the bench's CA for an
/// `https://` one (a `hub-tls` hub).
pub fn hub_endpoint(url: &str) -> Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT);
    if endpoint.uri().scheme_str() == Some("https") {
        // The provider the client crate installs, as a real node's process.
        freshness_telemetry::install_crypto_provider();
        return Ok(endpoint.tls_config(crate::secure::material()?.client_tls())?);
    }
    Ok(endpoint)
}

/// Adds the bench's token to every call to a `hub-tls` hub.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of the hub.
pub type Client = HubClient<InterceptedService<Channel, Bearer>>;

/// A client of the hub at `url` over `channel`, with generous message
/// limits, sending the token to a `hub-tls` hub.
pub fn hub_client(url: &str, channel: Channel) -> Result<Client> {
    let bearer = if url.starts_with("https://") {
        Bearer(Some(crate::secure::material()?.bearer.clone()))
    } else {
        Bearer(None)
    };
    Ok(HubClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// One node's life: subscribe, record, ack; once more after a storm; hand
/// the recorder back at the end of the run. A stalled node subscribes and
/// then never reads again.
pub async fn run_node(
    target: Target,
    hub: Option<HubConn>,
    node_id: String,
    mut rec: Recorder,
    stalled: bool,
    ctl: NodeCtl,
) -> Recorder {
    let result = match target.kind {
        Kind::Hub | Kind::HubTls => {
            let Some(conn) = hub else {
                return rec;
            };
            let mut cursor = None;
            let first =
                hub_session(&conn, &node_id, &mut cursor, &mut rec, stalled, &ctl, true).await;
            if first.is_ok() && !ctl.stop.is_cancelled() && ctl.down.is_cancelled() {
                tokio::select! {
                    () = ctl.up.cancelled() => {}
                    () = ctl.stop.cancelled() => return rec,
                }
                hub_session(&conn, &node_id, &mut cursor, &mut rec, stalled, &ctl, false).await
            } else {
                first
            }
        }
        Kind::Nats => nats_node(&target, &mut rec, stalled, &ctl).await,
        Kind::Redis => redis_node(&target, &mut rec, stalled, &ctl).await,
    };
    if let Err(e) = result {
        rec.errors += 1;
        if rec.errors == 1 && !ctl.stop.is_cancelled() {
            eprintln!("node {node_id}: {e:#}");
        }
    }
    rec
}

/// Merges a cursor the hub sent into the node's own.
fn merge(into: &mut pb::Cursor, from: &pb::Cursor) {
    into.epoch = from.epoch;
    if into.seqs.len() < from.seqs.len() {
        into.seqs.resize(from.seqs.len(), 0);
    }
    for (a, b) in into.seqs.iter_mut().zip(&from.seqs) {
        *a = (*a).max(*b);
    }
}

fn ack(cursor: &pb::Cursor) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        kind: Some(ReqKind::Ack(pb::Ack {
            cursor: Some(cursor.clone()),
            ..Default::default()
        })),
    }
}

/// One Subscribe stream, until the run stops (or, on the first stream, the
/// storm takes it down). `cursor` is where to resume and ends where the node
/// got to.
async fn hub_session(
    conn: &HubConn,
    node_id: &str,
    cursor: &mut Option<pb::Cursor>,
    rec: &mut Recorder,
    stalled: bool,
    ctl: &NodeCtl,
    first: bool,
) -> Result<()> {
    let mut client = conn.client().await?;
    let hello = pb::SubscribeRequest {
        kind: Some(ReqKind::Hello(pb::Hello {
            node_id: node_id.to_owned(),
            resume: cursor.clone(),
            ..Default::default()
        })),
    };
    // Acks go through a watch, as in the client library: they are
    // cumulative, so a newer one replaces one not yet written.
    let (ack_tx, ack_rx) = watch::channel::<Option<pb::Cursor>>(None);
    let acks = futures::stream::unfold(ack_rx, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            let next = rx.borrow_and_update().clone();
            if let Some(c) = next {
                return Some((ack(&c), rx));
            }
        }
    });
    let outbound = futures::stream::iter([hello]).chain(acks);
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, client.subscribe(outbound))
        .await
        .context("subscribe timed out")??
        .into_inner();
    let welcome = match tokio::time::timeout(CONNECT_TIMEOUT, stream.message())
        .await
        .context("welcome timed out")??
        .and_then(|m| m.kind)
    {
        Some(RespKind::Welcome(w)) => w,
        other => bail!("expected a welcome, got {other:?}"),
    };
    let mut cur = welcome.cursor.unwrap_or_default();
    if !first && !welcome.resumed {
        rec.not_resumed += 1;
    }
    let _live = LiveGuard::enter(rec.tracker());
    let stop_now = || async {
        tokio::select! {
            () = ctl.stop.cancelled() => {}
            () = ctl.down.cancelled(), if first => {}
        }
    };
    if stalled {
        // Hold the stream open and never read: the hub must park this node
        // without holding the others back.
        stop_now().await;
        return Ok(());
    }
    // The client library's rule (`freshness::ack`): delayed acks, and acks
    // on request when the hub's welcome says so.
    let mut pacer = AckPacer::new(
        ctl.ack_interval,
        ctl.lazy_ack_interval,
        welcome.acks_on_request,
    );
    let mut received = Vec::new();
    let end = loop {
        let msg = tokio::select! {
            biased;
            () = stop_now() => break Ok(()),
            () = sleep_until_opt(pacer.due()) => {
                pacer.sent(Instant::now());
                ack_tx.send_replace(Some(cur.clone()));
                rec.on_acked();
                continue;
            }
            m = stream.message() => m,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break Err(anyhow!("stream ended")),
            Err(s) => break Err(anyhow!("stream failed: {s}")),
        };
        let may_wait = pacer.may_wait(&msg);
        match msg.kind {
            Some(RespKind::Events(b)) => {
                received.clear();
                for d in b.events {
                    if let Some(s) = cur.seqs.get_mut(d.shard as usize) {
                        *s = (*s).max(d.seq);
                    }
                    if let Some(e) = d.event {
                        received.push((key_of(&e.entity), e.version));
                    }
                }
                rec.on_events(&received);
            }
            Some(RespKind::Progress(p)) => {
                if let Some(c) = &p.cursor {
                    merge(&mut cur, c);
                }
            }
            Some(RespKind::Reset(r)) => {
                rec.resets += 1;
                if let Some(c) = &r.cursor {
                    let shards: Vec<usize> = if r.all {
                        (0..c.seqs.len()).collect()
                    } else {
                        r.shards.iter().map(|s| *s as usize).collect()
                    };
                    cur.epoch = c.epoch;
                    for s in shards {
                        if let (Some(a), Some(b)) = (cur.seqs.get_mut(s), c.seqs.get(s)) {
                            *a = *b;
                        }
                    }
                }
            }
            Some(RespKind::Goodbye(g)) => break Err(anyhow!("goodbye: {}", g.message)),
            Some(RespKind::Welcome(_)) | None => continue,
        }
        if pacer.owe(Instant::now(), may_wait) {
            ack_tx.send_replace(Some(cur.clone()));
            rec.on_acked();
        }
    };
    *cursor = Some(cur);
    end
}

/// Decrements the live-node count when a stream ends.
pub(crate) struct LiveGuard(Arc<Tracker>);

impl LiveGuard {
    /// Counts one more live node until the guard is dropped.
    pub(crate) fn enter(tracker: &Arc<Tracker>) -> Self {
        tracker
            .live
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(tracker.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The bench message, as NATS and Redis carry it.
#[cfg(test)]
pub fn encode_event(key: u32, version: u64) -> bytes::Bytes {
    prost::Message::encode_to_vec(&pb::Event {
        entity: entity(key),
        version,
        ..Default::default()
    })
    .into()
}

async fn nats_node(
    target: &Target,
    rec: &mut Recorder,
    stalled: bool,
    ctl: &NodeCtl,
) -> Result<()> {
    crate::peers::nats_node(&target.url, &target.topic, rec, stalled, &ctl.stop).await
}

async fn redis_node(
    target: &Target,
    rec: &mut Recorder,
    stalled: bool,
    ctl: &NodeCtl,
) -> Result<()> {
    crate::peers::redis_node(&target.url, &target.topic, rec, stalled, &ctl.stop).await
}

/// The writer side of a target.
#[derive(Clone)]
pub enum Publisher {
    /// `Publish` calls at the target's ack level.
    Hub(Client, pb::AckLevel),
    /// Core NATS publishes on one connection, one write per call.
    Nats(crate::peers::NatsPublisher),
    /// `PUBLISH` commands, pipelined per call, on one connection.
    Redis(crate::peers::RedisPublisher),
}

/// A publish the system refused (overload), or a transport failure.
#[derive(Debug)]
pub struct Refused(pub String);

impl Publisher {
    /// Connects the publisher of `target`.
    pub async fn connect(target: &Target) -> Result<Self> {
        Ok(match target.kind {
            Kind::Hub | Kind::HubTls => {
                // Connected at its first call, as the client crate's
                // publisher does: the hub reads a connection's first call
                // to choose its lane (server/src/lanes.rs).
                let channel = hub_endpoint(&target.url)?.connect_lazy();
                Publisher::Hub(hub_client(&target.url, channel)?, target.ack_level)
            }
            Kind::Nats => Publisher::Nats(
                crate::peers::NatsPublisher::connect(&target.url, &target.topic).await?,
            ),
            Kind::Redis => Publisher::Redis(
                crate::peers::RedisPublisher::connect(&target.url, &target.topic).await?,
            ),
        })
    }

    /// Publishes `(key, version)` events; per event, whether it is applied
    /// (a delivery to every node is due).
    pub async fn send(&mut self, events: &[(u32, u64)]) -> Result<Vec<bool>, Refused> {
        match self {
            Publisher::Hub(client, ack) => {
                let req = pb::PublishRequest {
                    events: events
                        .iter()
                        .map(|(k, v)| pb::Event {
                            entity: entity(*k),
                            version: *v,
                            ..Default::default()
                        })
                        .collect(),
                    ack: *ack as i32,
                    // The default (2 s): a publish that waits longer still
                    // succeeds, its nodes counted by the ack histogram.
                    timeout_ms: 0,
                };
                let resp = client
                    .publish(req)
                    .await
                    .map_err(|s| Refused(format!("{:?}: {}", s.code(), s.message())))?
                    .into_inner();
                Ok(resp
                    .results
                    .iter()
                    .map(|r| r.outcome == pb::PublishOutcome::Applied as i32)
                    .collect())
            }
            Publisher::Nats(p) => {
                p.send(events)
                    .await
                    .map_err(|e| Refused(format!("{e:#}")))?;
                Ok(vec![true; events.len()])
            }
            Publisher::Redis(p) => {
                p.send(events)
                    .await
                    .map_err(|e| Refused(format!("{e:#}")))?;
                Ok(vec![true; events.len()])
            }
        }
    }
}
/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
