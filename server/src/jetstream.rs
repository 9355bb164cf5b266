//! The JetStream log backend (`log = "jetstream"`): hub replicas of one
//! region sharing one JetStream stream (ARCHITECTURE.md, "Hub replicas on
//! NATS JetStream").
//!
//! - [`open`] connects, creates or finds the region's stream and its epoch,
//!   and reads the stream into every shard's memory, as recovery from disk
//!   does.
//! - Each shard actor appends one message per drain with
//!   `Nats-Expected-Last-Subject-Sequence` ([`JsShard::publish`]); a
//!   conflict means another replica appended first, and the actor catches
//!   up and decides again (`shard.rs`).
//! - [`Replica::spawn`] starts the tail (one ordered consumer handing every
//!   message to its shard's actor) and the watermark probe.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::Config;
use crate::shard::ShardMemory;
use crate::store::{OpenError, Recovered};

/// How long a JetStream request (an append's acknowledgement, stream info)
/// may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting at start may take before the hub gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the start's steps after connecting (the stream, the epoch,
/// reading the log) may keep failing for a reason that may pass before the
/// hub gives up: a replica started while JetStream is busy or electing a
/// stream leader waits that out instead of exiting.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Longest pull of the tail's consumer (heartbeats at half of it).
const TAIL_EXPIRES: Duration = Duration::from_secs(2);
/// Messages queued from the tail to one shard actor.
const REMOTE_QUEUE: usize = 64;

/// One message of a shard subject, decoded: a drain appended by some
/// replica (this one's own included).
#[derive(Debug)]
pub struct Remote {
    /// Its stream sequence.
    pub stream_seq: u64,
    /// Its records as stored, decoded by the actor only when it applies
    /// them (a replica's own messages come back and are skipped).
    pub payload: Bytes,
}

impl Remote {
    /// The records of the message, in seq order, all of `shard`.
    pub fn records(
        &self,
        shard: u32,
        shards: u32,
    ) -> Result<Vec<Recovered>, crate::store::Corruption> {
        crate::store::decode_records(&self.payload, shards)?
            .into_iter()
            .map(|(s, r)| {
                if s == shard {
                    Ok(r)
                } else {
                    Err(crate::store::Corruption::OtherShard {
                        found: s,
                        subject: shard,
                    })
                }
            })
            .collect()
    }
}

/// Why an append was not stored.
#[derive(Debug)]
pub enum AppendError {
    /// Another message reached the subject first: catch up and decide again.
    Conflict,
    /// JetStream failed or did not answer in time.
    Failed(std::io::Error),
}

/// What the replica's parts share: the stream, and how far the tail and
/// the actors got (for the watermark).
#[derive(Debug)]
pub struct Replica {
    js: jetstream::Context,
    client: async_nats::Client,
    hub_id: String,
    /// The nodes of the region's other replicas and their acked cursors,
    /// by replica (`REGION` acks cover them too).
    others: parking_lot::Mutex<HashMap<String, OtherReplica>>,
    stream: String,
    prefix: String,
    /// Per shard: stream sequence of the last message the tail handed to
    /// its actor.
    delivered: Vec<AtomicU64>,
    /// Per shard: stream sequence of the last message its actor applied
    /// (its own appends included).
    applied: Vec<AtomicU64>,
    /// Stream sequence of the last message the tail read (any subject).
    read: AtomicU64,
    /// Hub time at which this replica had provably applied every message
    /// then in the stream; sessions' watermarks never pass it.
    caught_up_us: AtomicU64,
    /// Largest message the NATS server takes (its `max_payload`), less
    /// room for headers.
    max_message: usize,
    /// When this replica started listening to the others' acks.
    started: tokio::time::Instant,
    /// The record of the region's link lease (`crate::link_lease`); made
    /// only for a region with peers.
    links: Option<LeaseRecord>,
}

impl Replica {
    /// The newest watermark a session may send.
    pub fn watermark_cap(&self) -> u64 {
        self.caught_up_us.load(Ordering::Acquire)
    }

    /// Largest drain message this replica publishes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// This replica's hub id.
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// The record of the region's link lease (a region with peers only).
    pub fn link_lease(&self) -> Option<&LeaseRecord> {
        self.links.as_ref()
    }

    fn caught_up_to(&self, last: u64) -> bool {
        self.read.load(Ordering::Acquire) >= last
            && self
                .delivered
                .iter()
                .zip(&self.applied)
                .all(|(d, a)| a.load(Ordering::Acquire) >= d.load(Ordering::Acquire))
    }

    /// Starts the tail and the watermark probe on `tracker`, until `stop`.
    pub fn spawn(
        self: &Arc<Self>,
        tail: Tail,
        clock: Clock,
        probe_every: Duration,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) {
        tracker.spawn(run_tail(self.clone(), tail, stop.clone()));
        tracker.spawn(run_probe(self.clone(), clock, probe_every, stop));
    }
}

/// A shard actor's side of the replica.
#[derive(Debug)]
pub struct JsShard {
    replica: Arc<Replica>,
    shard: u32,
    subject: String,
    /// Stream sequence of the last message of this subject applied.
    last: u64,
    /// What the tail hands this shard.
    pub remote: Option<mpsc::Receiver<Remote>>,
}

impl JsShard {
    /// The hub's shard count.
    pub fn shards(&self) -> u32 {
        self.replica.delivered.len() as u32
    }

    /// Largest drain message to publish (the server's `max_payload`).
    pub fn max_message(&self) -> usize {
        self.replica.max_message
    }

    /// Stream sequence of the last message of this subject applied.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Records that the message at `stream_seq` was applied.
    pub fn applied(&mut self, stream_seq: u64) {
        self.last = self.last.max(stream_seq);
        self.replica.applied[self.shard as usize].fetch_max(stream_seq, Ordering::AcqRel);
    }

    /// Appends one drain's records, stored only if the subject's last
    /// message is still the last one this replica applied. Returns the
    /// message's stream sequence.
    pub async fn publish(&self, records: Vec<u8>) -> Result<u64, AppendError> {
        publish_after(&self.replica.js, &self.subject, records.into(), self.last).await
    }

    /// Stream sequence of the subject's last message in JetStream (0 when
    /// it has none).
    pub async fn subject_last(&self) -> Result<u64, std::io::Error> {
        let stream = self
            .replica
            .js
            .get_stream_no_info(&self.replica.stream)
            .await
            .map_err(|e| std::io::Error::other(format!("JetStream: {e}")))?;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(std::io::Error::other(format!("JetStream: {e}"))),
        }
    }
}

/// The tail's state after recovery: where it goes on reading.
#[derive(Debug)]
pub struct Tail {
    next_seq: u64,
    senders: Vec<mpsc::Sender<Remote>>,
}

/// The log as opened from JetStream.
#[derive(Debug)]
pub struct Opened {
    /// The region's epoch.
    pub epoch: u64,
    /// Every shard's memory, rebuilt from the stream.
    pub memories: Vec<ShardMemory>,
    /// Every shard actor's side, by index.
    pub shards: Vec<JsShard>,
    /// What the parts share.
    pub replica: Arc<Replica>,
    /// The tail, to start with [`Replica::spawn`].
    pub tail: Tail,
}

fn refuse(what: impl std::fmt::Display) -> OpenError {
    OpenError::JetStream(what.to_string())
}

/// Why a step of the start after connecting failed.
#[derive(Debug)]
enum Start {
    /// JetStream did not answer, or failed in a way that may pass (a
    /// server busy or restarting, a stream leader being elected): the
    /// start tries again until [`START_LIMIT`].
    Unanswered(String),
    /// What the region's log holds, or how JetStream is set up, refuses
    /// this start: no retry changes it.
    Refused(String),
}

fn unanswered(what: impl std::fmt::Display) -> Start {
    Start::Unanswered(what.to_string())
}

fn refused(what: impl std::fmt::Display) -> Start {
    Start::Refused(what.to_string())
}

/// A failure to create or find a stream, `what` saying which: retried when
/// JetStream did not answer or answered that it cannot now (503); refused
/// on an answer about the stream itself (another configuration under its
/// name, no permission).
fn create_failed(e: &jetstream::context::CreateStreamError, what: String) -> Start {
    use jetstream::context::CreateStreamErrorKind as K;
    match e.kind() {
        K::TimedOut | K::JetStreamUnavailable | K::Response | K::NotFound => {
            Start::Unanswered(what)
        }
        K::JetStream(api) if api.code() == 503 => Start::Unanswered(what),
        _ => Start::Refused(what),
    }
}

/// The stream of `region`: JetStream names allow letters, digits, `-`, `_`.
fn stream_name(region: &str) -> String {
    let name: String = region
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("FRESHNESS_{name}")
}

/// Subject prefix of `region` (a subject token has no `.`, `*`, `>`).
fn subject_prefix(region: &str) -> String {
    format!("freshness.{}", region.replace(['.', '*', '>', ' '], "_"))
}

/// Connects to JetStream, finds or creates the region's stream and epoch,
/// and reads the stream into every shard's memory. A step after connecting
/// that fails for a reason that may pass (no answer in time, no JetStream
/// responder yet) is tried again, with a WARN line each time, for up to
/// [`START_LIMIT`]. Every refusal is one line (exit 64): NATS unreachable,
/// JetStream still not answering after the limit, a stream of another
/// shard count or configuration.
pub async fn open(config: &Config) -> Result<Opened, OpenError> {
    let urls: Vec<String> = config.nats_urls();
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("freshness-hub {}", config.hub_id))
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None);
    if let Some(creds) = &config.nats_creds {
        options = options.credentials_file(creds).await.map_err(|e| {
            refuse(format!(
                "nats_creds = {}: cannot read the credentials: {e}",
                creds.display()
            ))
        })?;
    }
    let client = tokio::time::timeout(CONNECT_TIMEOUT, options.connect(urls.clone()))
        .await
        .map_err(|_| {
            refuse(format!(
                "cannot reach NATS at {} within {CONNECT_TIMEOUT:?}",
                urls.join(",")
            ))
        })?
        .map_err(|e| refuse(format!("cannot reach NATS at {}: {e}", urls.join(","))))?;
    let max_message = client
        .server_info()
        .max_payload
        .saturating_sub(4096)
        .max(4096);
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client.clone());
    let deadline = tokio::time::Instant::now() + START_LIMIT;
    let mut wait = Duration::from_millis(100);
    loop {
        match open_stream(config, &js, &client, max_message).await {
            Ok(opened) => return Ok(opened),
            Err(Start::Refused(what)) => return Err(refuse(what)),
            Err(Start::Unanswered(what)) => {
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(refuse(format!(
                        "{what} (still failing after {START_LIMIT:?} of retries)"
                    )));
                }
                tracing::warn!(error = %what, retry_in = ?wait, "JetStream log not opened yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The steps of [`open`] after connecting, tried again while they fail
/// for a reason that may pass.
async fn open_stream(
    config: &Config,
    js: &jetstream::Context,
    client: &async_nats::Client,
    max_message: usize,
) -> Result<Opened, Start> {
    let name = stream_name(&config.region);
    let prefix = subject_prefix(&config.region);
    let per_subject = i64::try_from(config.log_events_per_shard().max(1)).unwrap_or(i64::MAX);
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::File,
            num_replicas: config.jetstream_replicas,
            max_messages_per_subject: per_subject,
            allow_direct: false,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            let what = format!(
                "JetStream at {}: cannot create or find stream {name} ({} replicas): {e}",
                config.nats_urls().join(","),
                config.jetstream_replicas
            );
            create_failed(&e, what)
        })?;
    let epoch = region_epoch(js, &stream, &prefix, config.shards).await?;
    let links = if config.peers.is_empty() {
        None
    } else {
        Some(link_lease(js, &name, &config.region, config.jetstream_replicas).await?)
    };
    let info = stream
        .info()
        .await
        .map_err(|e| unanswered(format!("JetStream stream {name}: {e}")))?
        .clone();
    let last = info.state.last_sequence;

    let shards = config.shards as usize;
    let mut memories: Vec<Option<ShardMemory>> = (0..shards).map(|_| None).collect();
    let mut lasts = vec![0u64; shards];
    let mut next_seq = 1;
    let mut records = 0u64;
    if last > 0 && info.state.messages > 0 {
        let mut messages = ordered(&stream, 1).await.map_err(unanswered)?;
        while next_seq <= last {
            let m = match tokio::time::timeout(REQUEST_TIMEOUT * 5, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    return Err(unanswered(format!("JetStream stream {name}: reading: {e}")));
                }
                Ok(None) | Err(_) => {
                    return Err(unanswered(format!(
                        "JetStream stream {name}: reading stopped at {next_seq} of {last}"
                    )));
                }
            };
            let Ok(seq) = m.info().map(|i| i.stream_sequence) else {
                continue;
            };
            next_seq = seq + 1;
            let Some(shard) = shard_of(&prefix, m.subject.as_str(), config.shards) else {
                continue;
            };
            let decoded = crate::store::decode_records(&m.payload, config.shards)
                .map_err(|e| refused(format!("JetStream stream {name}, message {seq}: {e}")))?;
            for (s, r) in decoded {
                if s != shard {
                    let e = crate::store::Corruption::OtherShard {
                        found: s,
                        subject: shard,
                    };
                    return Err(refused(format!(
                        "JetStream stream {name}, message {seq}: {e}"
                    )));
                }
                records += 1;
                let mem =
                    memories[shard as usize].get_or_insert_with(|| config.shard_memory(r.seq));
                if r.seq != mem.log().head() + 1 {
                    return Err(refused(format!(
                        "JetStream stream {name}, message {seq}: shard {shard} seq {} after {}",
                        r.seq,
                        mem.log().head()
                    )));
                }
                mem.restore(r.seq, r.entry);
            }
            lasts[shard as usize] = seq;
        }
    }
    let replica = Arc::new(Replica {
        js: js.clone(),
        client: client.clone(),
        hub_id: config.hub_id.clone(),
        others: parking_lot::Mutex::new(HashMap::new()),
        stream: name.clone(),
        prefix: prefix.clone(),
        delivered: lasts.iter().map(|l| AtomicU64::new(*l)).collect(),
        applied: lasts.iter().map(|l| AtomicU64::new(*l)).collect(),
        read: AtomicU64::new(next_seq - 1),
        caught_up_us: AtomicU64::new(0),
        started: tokio::time::Instant::now(),
        max_message,
        links,
    });
    let mut senders = Vec::with_capacity(shards);
    let mut actor_sides = Vec::with_capacity(shards);
    for (i, l) in lasts.iter().enumerate() {
        let (tx, rx) = mpsc::channel(REMOTE_QUEUE);
        senders.push(tx);
        actor_sides.push(JsShard {
            replica: replica.clone(),
            shard: i as u32,
            subject: format!("{prefix}.s.{i}"),
            last: *l,
            remote: Some(rx),
        });
    }
    tracing::info!(
        stream = %name,
        epoch,
        records,
        messages = info.state.messages,
        replicas = config.jetstream_replicas,
        "JetStream log opened"
    );
    Ok(Opened {
        epoch,
        memories: memories
            .into_iter()
            .map(|m| m.unwrap_or_else(|| config.shard_memory(1)))
            .collect(),
        shards: actor_sides,
        replica,
        tail: Tail { next_seq, senders },
    })
}

/// The region's epoch from the meta subject, written by the first replica
/// that finds none (expected subject sequence 0: one writer wins).
async fn region_epoch(
    js: &jetstream::Context,
    stream: &stream::Stream,
    prefix: &str,
    shards: u32,
) -> Result<u64, Start> {
    let subject = format!("{prefix}.meta");
    for _ in 0..3 {
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => {
                let text = String::from_utf8_lossy(&m.payload);
                let (epoch, theirs) = parse_meta(&text)
                    .ok_or_else(|| refused(format!("JetStream {subject}: unreadable {text:?}")))?;
                if theirs != shards {
                    return Err(refused(format!(
                        "shards = {shards}: the region's JetStream log has {theirs} shards"
                    )));
                }
                return Ok(epoch);
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                let epoch = crate::store::new_epoch_value();
                let msg = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(format!("epoch={epoch} shards={shards}")))
                    .expected_last_subject_sequence(0);
                let ack = js
                    .send_publish(subject.clone(), msg)
                    .await
                    .map_err(|e| unanswered(format!("JetStream {subject}: {e}")))?
                    .await;
                match ack {
                    Ok(_) => {
                        tracing::info!(epoch, "new epoch: the region's JetStream log was empty");
                        return Ok(epoch);
                    }
                    // Another replica wrote it first: read theirs.
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                    Err(e) => return Err(unanswered(format!("JetStream {subject}: {e}"))),
                }
            }
            Err(e) => return Err(unanswered(format!("JetStream {subject}: {e}"))),
        }
    }
    Err(unanswered(format!(
        "JetStream {subject}: no epoch could be read"
    )))
}

/// The record of the region's link lease (`crate::link_lease`): the last
/// message of a subject in a stream of its own that keeps one message, written
/// only with an expected-last-subject-sequence condition, so the message's
/// stream sequence is the lease's revision and of two writers with the same
/// revision one wins (a key-value bucket's update, with the primitives the
/// log uses).
#[derive(Debug, Clone)]
pub struct LeaseRecord {
    js: jetstream::Context,
    stream: String,
    subject: String,
}

impl LeaseRecord {
    /// The record's revision and value; `None` before anyone wrote it.
    pub async fn read(&self) -> Result<Option<(u64, Bytes)>, std::io::Error> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| std::io::Error::other(format!("JetStream: {e}")))?;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(m) => Ok(Some((m.sequence, m.payload))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(std::io::Error::other(format!("JetStream: {e}"))),
        }
    }

    /// Writes `value` if the revision is still `revision` (0: never
    /// written); returns the new revision.
    pub async fn write(&self, value: Bytes, revision: u64) -> Result<u64, AppendError> {
        publish_after(&self.js, &self.subject, value, revision).await
    }
}

/// Publishes `payload` on `subject` only if the subject's last message is
/// still at stream sequence `last` (0: none); returns the new message's
/// stream sequence, or [`AppendError::Conflict`] when another writer came
/// first.
async fn publish_after(
    js: &jetstream::Context,
    subject: &str,
    payload: Bytes,
    last: u64,
) -> Result<u64, AppendError> {
    let failed = |e: &dyn std::fmt::Display| {
        AppendError::Failed(std::io::Error::other(format!("JetStream: {e}")))
    };
    let msg = jetstream::message::PublishMessage::build()
        .payload(payload)
        .expected_last_subject_sequence(last);
    let sent = js
        .send_publish(subject.to_owned(), msg)
        .await
        .map_err(|e| failed(&e))?;
    match sent.await {
        Ok(ack) => Ok(ack.sequence),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(AppendError::Conflict),
        Err(e) => Err(failed(&e)),
    }
}

/// Finds or makes the stream of the region's link lease (`<stream>_LINKS`,
/// one message kept, as many copies as the log's stream).
async fn link_lease(
    js: &jetstream::Context,
    stream: &str,
    region: &str,
    replicas: usize,
) -> Result<LeaseRecord, Start> {
    let name = format!("{stream}_LINKS");
    let subject = format!(
        "freshness-links.{}.lease",
        region.replace(['.', '*', '>', ' '], "_")
    );
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await
    .map_err(|e| {
        let what = format!(
            "JetStream: cannot create or find the link lease stream {name} ({replicas} replicas): {e}"
        );
        create_failed(&e, what)
    })?;
    Ok(LeaseRecord {
        js: js.clone(),
        stream: name,
        subject,
    })
}

fn parse_meta(text: &str) -> Option<(u64, u32)> {
    let mut epoch = None;
    let mut shards = None;
    for part in text.split_whitespace() {
        match part.split_once('=') {
            Some(("epoch", v)) => epoch = v.parse().ok(),
            Some(("shards", v)) => shards = v.parse().ok(),
            _ => {}
        }
    }
    Some((epoch?, shards?))
}

fn shard_of(prefix: &str, subject: &str, shards: u32) -> Option<u32> {
    let s: u32 = subject
        .strip_prefix(prefix)?
        .strip_prefix(".s.")?
        .parse()
        .ok()?;
    (s < shards).then_some(s)
}

async fn ordered<I>(
    stream: &stream::Stream<I>,
    from: u64,
) -> Result<consumer::pull::Ordered, String> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            // Pulls that expire after 2 s carry heartbeats every second, so
            // a consumer lost with a restarted server is noticed and made
            // again within seconds, not the default half minute.
            max_expires: TAIL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("JetStream consumer: {e}"))?;
    consumer
        .messages()
        .await
        .map_err(|e| format!("JetStream consumer: {e}"))
}

/// Reads the stream from where recovery stopped and hands every shard
/// message to its actor; reconnects (from the next unread sequence) when
/// the consumer fails.
async fn run_tail(replica: Arc<Replica>, mut tail: Tail, stop: CancellationToken) {
    let shards = tail.senders.len() as u32;
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let stream = match replica.js.get_stream_no_info(&replica.stream).await {
            Ok(s) => s,
            Err(e) => {
                tail_failed(&mut failures, &e.to_string(), &stop).await;
                continue;
            }
        };
        let mut messages = match ordered(&stream, tail.next_seq).await {
            Ok(m) => m,
            Err(e) => {
                tail_failed(&mut failures, &e, &stop).await;
                continue;
            }
        };
        loop {
            let m = tokio::select! {
                m = messages.next() => m,
                () = stop.cancelled() => return,
            };
            let m = match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    // Made again from the next unread message.
                    tracing::debug!(error = %e, "JetStream tail: consumer error");
                    break;
                }
                None => break,
            };
            failures = 0;
            let Ok(seq) = m.info().map(|i| i.stream_sequence) else {
                continue;
            };
            if seq < tail.next_seq {
                continue;
            }
            if let Some(shard) = shard_of(&replica.prefix, m.subject.as_str(), shards) {
                replica.delivered[shard as usize].fetch_max(seq, Ordering::AcqRel);
                let remote = Remote {
                    stream_seq: seq,
                    payload: m.payload.clone(),
                };
                tokio::select! {
                    r = tail.senders[shard as usize].send(remote) => if r.is_err() { return },
                    () = stop.cancelled() => return,
                }
            }
            tail.next_seq = seq + 1;
            replica.read.fetch_max(seq, Ordering::AcqRel);
        }
    }
}

async fn tail_failed(failures: &mut u32, error: &str, stop: &CancellationToken) {
    *failures += 1;
    if *failures == 1 {
        tracing::warn!(error, "JetStream tail stopped; retrying");
    }
    let wait = Duration::from_millis(100 * u64::from((*failures).min(20)));
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = stop.cancelled() => {}
    }
}

/// Moves the watermark cap: asks JetStream for the stream's last sequence
/// at hub time `t`, waits until the tail and the actors applied it, then
/// lets watermarks reach `t`. While JetStream does not answer, the cap
/// stays where it is, so nodes' watermarks stop (G1, G4).
async fn run_probe(replica: Arc<Replica>, clock: Clock, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let t = clock.now_us();
        let stream = match replica.js.get_stream_no_info(&replica.stream).await {
            Ok(s) => s,
            Err(_) => continue,
        };
        let Ok(info) = stream.get_info().await else {
            continue;
        };
        let last = info.state.last_sequence;
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        while !replica.caught_up_to(last) && tokio::time::Instant::now() < deadline {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
                () = stop.cancelled() => return,
            }
        }
        if replica.caught_up_to(last) {
            replica.caught_up_us.fetch_max(t, Ordering::AcqRel);
        }
    }
}

/// One other replica's nodes, as its last messages said.
#[derive(Debug)]
struct OtherReplica {
    /// When its last full list arrived; silent for [`OTHERS_EXPIRE`], it
    /// is forgotten (it died, or lost NATS).
    seen: tokio::time::Instant,
    nodes: HashMap<String, SharedNode>,
}

/// A node's acked cursor as one replica shares it with the others.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SharedNode {
    /// Its node id.
    pub id: String,
    /// Namespaces, sorted; empty means all.
    pub filter: Vec<String>,
    /// Its acked cursor, in the region's seqs.
    pub acked: Vec<u64>,
    /// For a peer region's replication link: that region, and how far its
    /// nodes applied this region's events (GLOBAL acks at any replica wait
    /// on it). `None` for a cache node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<SharedLink>,
}

/// What a peer region's link reported of its nodes (SPEC §3.3, GLOBAL).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SharedLink {
    /// The peer region.
    pub region: String,
    /// Per shard, the highest seq of this region every node there applied.
    pub applied: Vec<u64>,
}

/// What one replica sends on `<prefix>.acks.<hub_id>`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AckShare {
    hub: String,
    /// Every node of the replica (else only those that changed).
    full: bool,
    nodes: Vec<SharedNode>,
    /// Nodes that left it.
    gone: Vec<String>,
}

/// True when `cursor` reaches every (shard index, seq) of `need`.
fn covers(cursor: &[u64], need: &[(usize, u64)]) -> bool {
    need.iter()
        .all(|(s, seq)| cursor.get(*s).is_some_and(|a| a >= seq))
}

/// How often a replica sends its nodes' changed acks.
const SHARE_EVERY: Duration = Duration::from_millis(5);
/// How often it sends the full list (also its sign of life).
const SHARE_FULL_EVERY: Duration = Duration::from_secs(1);
/// A replica not heard from for this long is forgotten.
const OTHERS_EXPIRE: Duration = Duration::from_secs(3);

impl Replica {
    /// True once this replica has listened long enough to have every live
    /// replica's full list of nodes (each sends one every second): before,
    /// what the region applied cannot be told.
    pub fn knows_the_region(&self) -> bool {
        self.started.elapsed() >= OTHERS_EXPIRE
    }

    /// Calls `f` with every node the region's other live replicas reported.
    fn each_other_node(&self, mut f: impl FnMut(&SharedNode)) {
        let now = tokio::time::Instant::now();
        for r in self.others.lock().values() {
            if now.duration_since(r.seen) < OTHERS_EXPIRE {
                r.nodes.values().for_each(&mut f);
            }
        }
    }

    /// True when another replica's cache node `id` has acked `need` (shard
    /// index, seq) in the region's seqs.
    pub fn other_node_acked(&self, id: &str, need: &[(usize, u64)]) -> bool {
        let mut acked = false;
        self.each_other_node(|n| {
            acked |= n.link.is_none() && n.id == id && covers(&n.acked, need);
        });
        acked
    }

    /// True when peer `region`'s link, at another replica, reported that the
    /// peer's nodes applied `need` (GLOBAL acks).
    pub fn other_link_applied(&self, region: &str, need: &[(usize, u64)]) -> bool {
        let mut applied = false;
        self.each_other_node(|n| {
            applied |= n
                .link
                .as_ref()
                .is_some_and(|l| l.region == region && covers(&l.applied, need));
        });
        applied
    }

    /// Lowers `min` (per shard) to what every cache node of the other
    /// replicas acked: with this replica's own nodes, what the region applied.
    pub fn lower_to_other_nodes(&self, min: &mut [u64]) {
        self.each_other_node(|n| {
            if n.link.is_none() {
                for (m, a) in min.iter_mut().zip(&n.acked) {
                    *m = (*m).min(*a);
                }
            }
        });
    }

    /// The cache nodes of the other replicas: id and namespace filter.
    pub fn other_nodes(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        self.each_other_node(|n| {
            if n.link.is_none() {
                out.push((n.id.clone(), n.filter.clone()));
            }
        });
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }

    fn take_share(&self, share: AckShare) {
        if share.hub == self.hub_id {
            return;
        }
        let mut others = self.others.lock();
        let now = tokio::time::Instant::now();
        // Changes from a replica not known yet say nothing of its other
        // nodes: wait for its full list (within a second).
        if !share.full && !others.contains_key(&share.hub) {
            return;
        }
        let r = others.entry(share.hub).or_insert_with(|| OtherReplica {
            seen: now,
            nodes: HashMap::new(),
        });
        if share.full {
            r.seen = now;
            r.nodes.clear();
        }
        for id in share.gone {
            r.nodes.remove(&id);
        }
        for n in share.nodes {
            r.nodes.insert(n.id.clone(), n);
        }
        others.retain(|_, r| now.duration_since(r.seen) < OTHERS_EXPIRE);
    }
}

/// Shares this replica's nodes' acked cursors with the region's other
/// replicas over core NATS (not the stream: they are soft state), and takes
/// theirs, so that a `REGION` publish at any replica waits for the nodes
/// of all of them, and a `GLOBAL` one for the peer regions' reports,
/// whichever replica their links reached. `local` lists this replica's
/// nodes and links; `changed` is called when another replica's acks arrive
/// (to wake waiters).
pub async fn share_acks<L, C>(replica: Arc<Replica>, local: L, changed: C, stop: CancellationToken)
where
    L: Fn() -> Option<Vec<SharedNode>>,
    C: Fn(),
{
    let prefix = &replica.prefix;
    let mine = format!(
        "{prefix}.acks.{}",
        replica.hub_id.replace(['.', '*', '>', ' '], "_")
    );
    let mut sub = match replica.client.subscribe(format!("{prefix}.acks.*")).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot share REGION acks with the other replicas");
            return;
        }
    };
    let mut sent: HashMap<String, SharedNode> = HashMap::new();
    let mut tick = tokio::time::interval(SHARE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = tokio::time::Instant::now() - SHARE_FULL_EVERY;
    loop {
        tokio::select! {
            m = sub.next() => {
                let Some(m) = m else { return };
                if let Ok(share) = serde_json::from_slice::<AckShare>(&m.payload) {
                    replica.take_share(share);
                    changed();
                }
            }
            _ = tick.tick() => {
                let Some(nodes) = local() else { return };
                let full = last_full.elapsed() >= SHARE_FULL_EVERY;
                let now: HashMap<String, SharedNode> =
                    nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
                let gone: Vec<String> =
                    sent.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
                let nodes: Vec<SharedNode> = now
                    .values()
                    .filter(|n| full || sent.get(&n.id) != Some(*n))
                    .cloned()
                    .collect();
                if !full && nodes.is_empty() && gone.is_empty() {
                    continue;
                }
                let share = AckShare { hub: replica.hub_id.clone(), full, nodes, gone };
                let Ok(payload) = serde_json::to_vec(&share) else { continue };
                // Soft state: a share lost while NATS is away is sent again
                // in full within a second.
                if replica.client.publish(mine.clone(), payload.into()).await.is_ok() {
                    sent = now;
                    if full {
                        last_full = tokio::time::Instant::now();
                    }
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_subjects() {
        assert_eq!(stream_name("eu-west.1"), "FRESHNESS_EU-WEST_1");
        assert_eq!(subject_prefix("eu.west"), "freshness.eu_west");
        assert_eq!(shard_of("freshness.r", "freshness.r.s.7", 8), Some(7));
        assert_eq!(shard_of("freshness.r", "freshness.r.s.8", 8), None);
        assert_eq!(shard_of("freshness.r", "freshness.r.meta", 8), None);
        assert_eq!(parse_meta("epoch=5 shards=64"), Some((5, 64)));
        assert_eq!(parse_meta("epoch=5"), None);
    }
}
