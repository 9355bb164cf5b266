//! Shard actors: each task owns a set of shards (shard `s` of `S` belongs
//! to actor `s % A`, [`ShardActors`]), the newest accepted version of each
//! of their entities, and is the only writer of their part of the log.
//!
//! A call reaches each actor its events reach with one command (one part
//! per shard) through the actor's bounded queue; the reply comes back on a
//! oneshot. An actor that wakes drains everything waiting (up to
//! [`DRAIN_MAX`] commands): one lock of each shard's log it appends to, one
//! hand-off to the durable log's writer, one wake-up of the sessions,
//! however many publishes and shards it served. `A` is one per core by
//! default: more actors than cores buy no parallelism, and every actor a
//! publish reaches costs a task wake and, durable, a drain for the writer
//! and an answer back (with one actor per shard, a 100-event publish was
//! about 50 of each). A hub replica on JetStream keeps one actor per shard,
//! since each shard appends to its own subject with its own compare-and-set.
//!
//! ## Remembered versions are bounded
//! The actor remembers `(version, seq)` for every entity that has an event in
//! the in-memory log, plus up to `remember_extra` entities whose events have
//! all left it (the most recently retired ones). So the map holds at most
//! `events in memory + remember_extra` entries per shard. `remember_extra`
//! is the shard's share of the whole retained log (`log_max_events / S`), so
//! with a durable log, whose memory holds only its newest part, the map
//! still covers what a node can be replayed from disk.
//!
//! Forgetting is safe for SPEC G3: a forgotten entity's newest event is older
//! than the whole retained log. A publish of an older version of it can only
//! come from a writer that is late by more than the log's horizon; it is then
//! appended once more and fanned out. That event can only *remove* data at a
//! node (an invalidation, or a payload that a node applies only over an older
//! version), and nodes keep their own highest-invalidated version per entity,
//! so no cache goes back in time.
//!
//! ## Traces
//! A wake-up whose commands carry a trace context (the publishing call's
//! span, or the events' own W3C context for events replicated from a peer)
//! records one `shard.append` span, parented on the first context and linked
//! to the others, and remembers its seq range in [`AppendTraces`] for the
//! sessions' fan-out spans (see `telemetry`). Untraced wake-ups record
//! nothing.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use freshness::validate::CheckedEvent;
use freshness::wire::{EventFields, encode_event_entry};
use freshness::{Entity, ShardId, Version};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::clock::Clock;
use crate::jetstream::{AppendError, JsShard, Remote};
use crate::log::{LogEntry, SharedLog};
use crate::store::{Answered, PIPELINE, Run, Wal, WalPort, WriteFailed, encode_record};
use crate::telemetry::{Adopt, AppendTraces, num};

/// Most commands one wake-up of an actor takes from its queue.
pub const DRAIN_MAX: usize = 256;

/// What happened to one published event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New: appended with a seq.
    Applied,
    /// This version was already accepted.
    Duplicate,
    /// A newer version was already accepted.
    Superseded,
}

/// The answer for one event.
#[derive(Debug, Clone, Copy)]
pub struct EventOutcome {
    /// What happened.
    pub outcome: Outcome,
    /// Seq of the entity's newest accepted event.
    pub seq: u64,
    /// Newest accepted version of the entity.
    pub current_version: Version,
}

/// An event on its way into a shard.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The entity.
    pub entity: Entity,
    /// Its version.
    pub version: Version,
    /// Optional payload.
    pub payload: Bytes,
    /// W3C trace context.
    pub traceparent: String,
    /// W3C trace state.
    pub tracestate: String,
    /// Origin region; `None` for events published in this region.
    pub origin: Option<Arc<str>>,
    /// Origin hub time; `None` to stamp it now.
    pub publish_time_us: Option<u64>,
    /// A publish may wait for nodes to ack this event (ack level `REGION`
    /// or `GLOBAL`): the batches that carry it ask for a prompt ack.
    pub awaited: bool,
}

impl Incoming {
    /// An event published in this region: stamped with this hub's time
    /// when appended (whatever origin or time the caller sent).
    pub fn published(e: CheckedEvent, awaited: bool) -> Self {
        Self::new(e, None, None, awaited)
    }

    /// An event a peer region's link brings, with its origin and first
    /// publish time kept.
    pub fn replicated(e: CheckedEvent, awaited: bool) -> Self {
        let origin = Some(Arc::from(e.origin.as_str()));
        let time = Some(e.publish_time_us);
        Self::new(e, origin, time, awaited)
    }

    fn new(
        e: CheckedEvent,
        origin: Option<Arc<str>>,
        publish_time_us: Option<u64>,
        awaited: bool,
    ) -> Self {
        Self {
            entity: e.entity,
            version: e.version,
            payload: e.payload,
            traceparent: e.traceparent,
            tracestate: e.tracestate,
            origin,
            publish_time_us,
            awaited,
        }
    }
}

/// One shard's part of a command.
#[derive(Debug)]
pub struct Part {
    /// The shard.
    pub shard: u32,
    /// Append a replication gap marker before the events.
    pub gap: bool,
    /// The events, in order.
    pub events: Vec<Incoming>,
}

/// A call's events for the shards of one actor, answered in order.
pub struct Append {
    /// One part per shard, each shard at most once.
    pub parts: Vec<Part>,
    /// Where the outcomes go: one per event, the parts' events in order, or
    /// the log write that failed (then nothing of the command was applied).
    pub reply: oneshot::Sender<Result<Vec<EventOutcome>, WriteFailed>>,
    /// The span of the call that sent it (the publish), when traced; without
    /// one the events' own contexts are used.
    pub trace: Option<SpanContext>,
}

/// The actor is gone (the hub is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("shard actor stopped")]
pub struct ShardStopped;

/// What the actors of one hub share.
#[derive(Debug)]
pub struct ShardContext {
    /// This hub's region, the origin of locally published events.
    pub region: Arc<str>,
    /// The hub clock.
    pub clock: Clock,
    /// Rung after every append, to wake the sessions.
    pub appended: Arc<AppendBell>,
    /// Shards whose last log write failed (status and the
    /// `freshness_log_writable` gauge).
    pub failing: parking_lot::Mutex<std::collections::BTreeMap<u32, String>>,
}

impl ShardContext {
    /// Notes the outcome of a log write of `shards`: failing with `error`
    /// (one log line per shard when it starts), or writable again (one line
    /// per shard that was failing); the gauge says whether any shard still
    /// fails. A write of shards that were not failing (every drain's,
    /// normally) changes nothing and touches no gauge.
    fn wrote(&self, shards: impl IntoIterator<Item = u32>, error: Option<&std::io::Error>) {
        let mut failing = self.failing.lock();
        match error {
            None => {
                if failing.is_empty() {
                    return;
                }
                for shard in shards {
                    if failing.remove(&shard).is_some() {
                        tracing::info!(shard, "log writes succeed again");
                    }
                }
                crate::metrics::set_log_writable(failing.is_empty());
            }
            Some(e) => {
                for shard in shards {
                    if failing.insert(shard, e.to_string()).is_none() {
                        tracing::error!(shard, error = %e, "log write failed: publishes to this shard are refused until writes succeed");
                    }
                }
                crate::metrics::log_write_failed();
                crate::metrics::set_log_writable(false);
            }
        }
    }

    /// Stops `shard` on a JetStream log it can no longer follow: its
    /// appends are refused until the replica restarts.
    fn stop_following(&self, shard: u32, error: String) {
        tracing::error!(shard, "{error}");
        self.failing.lock().insert(shard, error);
        crate::metrics::set_log_writable(false);
    }
}

/// Wakes the sessions after appends, once per burst: the actors ring it
/// (an atomic and, for the first ring of a burst, a wake of the ringer on
/// their own runtime), and the ringer bumps the sessions' `watch` counter
/// once every actor woken with it has drained and every caller it answered
/// has run. The sessions are on the stream lane (`lanes.rs`): a wake across
/// the lanes costs a system call and, on a core shared by both, a switch to
/// the stream lane that sends what is appended so far; one per publish
/// (whose events reach up to every shard) instead of one per shard keeps
/// the frames as full as one runtime made them, and the answers first.
#[derive(Debug)]
pub struct AppendBell {
    appended: watch::Sender<u64>,
    rung: std::sync::atomic::AtomicBool,
    ringer: tokio::sync::Notify,
}

impl AppendBell {
    /// A bell over the sessions' counter.
    pub fn new(appended: watch::Sender<u64>) -> Self {
        AppendBell {
            appended,
            rung: std::sync::atomic::AtomicBool::new(false),
            ringer: tokio::sync::Notify::new(),
        }
    }

    /// Something was appended: the sessions are woken soon.
    pub fn ring(&self) {
        if !self.rung.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.ringer.notify_one();
        }
    }

    /// Wakes the sessions after each burst of rings, until `stop`. Runs on
    /// the actors' runtime.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = self.ringer.notified() => {}
                () = stop.cancelled() => return,
            }
            // Behind the actors and the callers woken with this one.
            tokio::task::yield_now().await;
            // Cleared first: a ring from here on is seen by the bump below
            // or rings again.
            self.rung.store(false, std::sync::atomic::Ordering::Release);
            self.appended.send_modify(|g| *g = g.wrapping_add(1));
        }
    }
}

/// The shard actors of one hub, and which of them owns which shard.
///
/// Shard `s` of `S` belongs to actor `s % A`. A memory-only or disk-backed
/// hub runs `A` actors (`shard_actors`, by default one per core the
/// process may use), each owning `S / A` shards: a publish whose events
/// reach every shard is one command per actor, one drain and (durable) one
/// hand-off to the log's writer each, instead of one per shard. A hub
/// replica on JetStream runs one actor per shard: each appends to its
/// shard's own subject with a compare-and-set of its own.
#[derive(Debug)]
pub struct ShardActors {
    actors: Vec<mpsc::Sender<Append>>,
    traces: Vec<Arc<AppendTraces>>,
}

impl ShardActors {
    /// Spawns the actors of `memories` (one per shard, in shard order:
    /// empty, or rebuilt from the durable log) on `tracker`: `actors` of
    /// them (at least one, at most one per shard), or one per shard on a
    /// JetStream log (`js`, one per shard). With a durable log, `wal` is
    /// where their appends go. Each actor queues up to `queue` commands.
    pub fn spawn(
        memories: Vec<ShardMemory>,
        ctx: Arc<ShardContext>,
        actors: usize,
        queue: usize,
        tracker: &TaskTracker,
        wal: Option<&Wal>,
        js: Vec<JsShard>,
    ) -> Self {
        let shards = memories.len();
        let traces: Vec<Arc<AppendTraces>> = (0..shards).map(|_| Arc::default()).collect();
        let states = memories
            .into_iter()
            .enumerate()
            .map(|(id, mem)| ShardState {
                id: id as u32,
                head: mem.log.head(),
                mem,
                traces: traces[id].clone(),
            });
        let mut senders = Vec::new();
        if js.is_empty() {
            let n = actors.clamp(1, shards.max(1));
            let mut owned: Vec<Vec<ShardState>> = (0..n).map(|_| Vec::new()).collect();
            for state in states {
                owned[state.id as usize % n].push(state);
            }
            for shards in owned {
                let (tx, rx) = mpsc::channel(queue);
                let actor = Actor {
                    slots: vec![None; shards.len()],
                    shards,
                    stride: n,
                    ctx: ctx.clone(),
                    wal: wal.map(Wal::port),
                    pending: VecDeque::with_capacity(PIPELINE),
                    bufs: Vec::new(),
                };
                tracker.spawn(actor.run(rx));
                senders.push(tx);
            }
        } else {
            for (state, js) in states.zip(js) {
                let (tx, rx) = mpsc::channel(queue);
                let actor = ReplicaActor {
                    state,
                    ctx: ctx.clone(),
                    js,
                };
                tracker.spawn(actor.run(rx));
                senders.push(tx);
            }
        }
        Self {
            actors: senders,
            traces,
        }
    }

    /// How many actors there are.
    pub fn count(&self) -> usize {
        self.actors.len()
    }

    /// The actor that owns `shard`.
    pub fn actor_of(&self, shard: ShardId) -> usize {
        shard.index() % self.actors.len()
    }

    /// Every shard's recent traced appends, for fan-out spans (the read
    /// side keeps them: `reader::LogReader`).
    pub fn traces(&self) -> Vec<Arc<AppendTraces>> {
        self.traces.clone()
    }

    /// Waits for room for one command in `actor`'s queue.
    pub async fn reserve(&self, actor: usize) -> Result<mpsc::Permit<'_, Append>, ShardStopped> {
        self.actors[actor].reserve().await.map_err(|_| ShardStopped)
    }

    /// Commands waiting in each actor's queue.
    pub fn queue_depths(&self) -> Vec<usize> {
        self.actors
            .iter()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .collect()
    }
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    version: Version,
    seq: u64,
}

/// A caller's answer channel and its events' outcomes.
type Reply = (
    oneshot::Sender<Result<Vec<EventOutcome>, WriteFailed>>,
    Vec<EventOutcome>,
);

/// A shard's log in memory and its newest-version memory: what its actor
/// owns, built before the actor runs (empty, or rebuilt from the durable
/// log by [`ShardMemory::restore`]).
#[derive(Debug)]
pub struct ShardMemory {
    log: Arc<SharedLog>,
    versions: HashMap<Entity, Remembered>,
    /// Entities whose newest event left the in-memory log, oldest first.
    retired: VecDeque<(Entity, u64)>,
    /// Entities remembered beyond those in the in-memory log.
    remember_extra: usize,
}

impl ShardMemory {
    /// An empty shard whose next seq is `first_seq`, with an in-memory log
    /// of these bounds.
    pub fn new(first_seq: u64, max_events: usize, max_bytes: usize, remember_extra: usize) -> Self {
        Self {
            log: Arc::new(SharedLog::starting_at(first_seq, max_events, max_bytes)),
            versions: HashMap::new(),
            retired: VecDeque::new(),
            remember_extra,
        }
    }

    /// The shard's log, shared with the sessions.
    pub fn log(&self) -> &Arc<SharedLog> {
        &self.log
    }

    /// Applies events another hub replica appended (seqs from the head on,
    /// in order), as if this shard's actor had appended them.
    fn apply(&mut self, entries: Vec<(u64, LogEntry)>) {
        let mut log = Vec::with_capacity(entries.len());
        for (seq, entry) in entries {
            if !entry.gap
                && let Some(version) = Version::new(entry.version)
            {
                self.versions
                    .insert(entry.entity.clone(), Remembered { version, seq });
            }
            log.push(entry);
        }
        let evicted = self.log.append_all(log);
        self.forget(evicted);
    }

    /// Takes one record of the durable log back, in seq order, as if it had
    /// just been appended: the in-memory log keeps the newest within its
    /// bounds, the version memory within its own.
    pub fn restore(&mut self, seq: u64, entry: LogEntry) {
        if !entry.gap
            && let Some(version) = Version::new(entry.version)
        {
            self.versions
                .insert(entry.entity.clone(), Remembered { version, seq });
        }
        let evicted = self.log.append_all([entry]);
        self.forget(evicted);
    }

    fn is_newest(&self, entity: &Entity, seq: u64) -> bool {
        self.versions.get(entity).is_some_and(|r| r.seq == seq)
    }

    /// Entities whose newest event left the log become candidates, oldest
    /// first; the oldest are forgotten while the map is over its bound.
    fn forget(&mut self, evicted: Vec<(u64, LogEntry)>) {
        for (seq, entry) in evicted {
            if self.is_newest(&entry.entity, seq) {
                self.retired.push_back((entry.entity, seq));
            }
        }
        let bound = self.log.read().len() + self.remember_extra;
        while self.versions.len() > bound {
            let Some((entity, seq)) = self.retired.pop_front() else {
                break;
            };
            if self.is_newest(&entity, seq) {
                self.versions.remove(&entity);
            }
        }
        // Candidates whose entity was published again since are stale; drop
        // them before they outnumber the map.
        if self.retired.len() > self.versions.len() {
            let versions = &self.versions;
            self.retired
                .retain(|(e, seq)| versions.get(e).is_some_and(|r| r.seq == *seq));
        }
    }
}

/// One shard as its actor holds it: its memory, head and traced appends.
struct ShardState {
    id: u32,
    mem: ShardMemory,
    head: u64,
    traces: Arc<AppendTraces>,
}

/// What one drain appends to one shard of its actor.
struct Drained {
    /// The shard's place in its actor's `shards`.
    local: usize,
    first_seq: u64,
    appended: Vec<LogEntry>,
    /// What each appended event replaced in the version memory, to undo
    /// the drain if the log write fails.
    undo: Vec<Option<Remembered>>,
}

/// The actor of a set of shards, on a memory-only or disk-backed log.
struct Actor {
    /// Its shards: shard `id` is at `id / stride`.
    shards: Vec<ShardState>,
    /// How many actors share the hub's shards.
    stride: usize,
    /// During a drain: each shard's place in the drain's list, when the
    /// drain touched it.
    slots: Vec<Option<usize>>,
    ctx: Arc<ShardContext>,
    /// This actor's way into the durable log; `None` for an ephemeral hub.
    wal: Option<WalPort>,
    /// Drains decided and not yet answered (durable log only), oldest
    /// first, at most [`PIPELINE`]. The oldest is with the log's writer;
    /// a later one is too, or has nothing to store and waits for the
    /// drains before it (its outcomes were decided on top of theirs).
    pending: VecDeque<Decided>,
    /// Record buffers back from the writer, for the next drains.
    bufs: Vec<Vec<u8>>,
}

/// One drain, decided: what it appends to each shard, its callers and
/// their outcomes, its traced shards.
struct Decided {
    drained: Vec<Drained>,
    replies: Vec<Reply>,
    /// Traced shards: place in the actor, first and last seq appended, the
    /// `shard.append` span's context.
    traced: Vec<(usize, u64, u64, SpanContext)>,
    /// The drain's `shard.append` spans, ended when it is answered.
    spans: Vec<(u32, Span)>,
    /// When its records went to the log's writer; `None` when it has none.
    sent: Option<tokio::time::Instant>,
}

/// The actor of one shard of a hub replica on the JetStream log.
struct ReplicaActor {
    state: ShardState,
    ctx: Arc<ShardContext>,
    js: JsShard,
}

/// Splits a drain into parts whose records (estimated generously) stay
/// within `limit` bytes, in order; a command larger than `limit` is a part
/// of its own (its publish fails and is refused, naming the size).
fn split_by_size(batch: &mut Vec<Append>, limit: usize) -> Vec<Vec<Append>> {
    let estimate = |c: &Append| -> usize {
        c.parts
            .iter()
            .flat_map(|p| &p.events)
            .map(|e| {
                // Record header and fixed fields, the event's wire encoding.
                160 + 2 * e.entity.as_str().len()
                    + e.payload.len()
                    + e.traceparent.len()
                    + e.tracestate.len()
                    + e.origin.as_deref().map_or(0, str::len)
            })
            .sum::<usize>()
            + 160
    };
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut size = 0;
    for cmd in batch.drain(..) {
        let n = estimate(&cmd);
        if !part.is_empty() && size + n > limit {
            parts.push(std::mem::take(&mut part));
            size = 0;
        }
        size += n;
        part.push(cmd);
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Longest a drain on the JetStream log spends catching up with other
/// replicas' appends before its publishes are refused `UNAVAILABLE`.
const CATCH_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Entity recorded on gap markers; never matched against versions.
const GAP_ENTITY: &str = "freshness.gap:marker";

static GAP: std::sync::LazyLock<Entity> = std::sync::LazyLock::new(|| {
    Entity::parse(GAP_ENTITY).unwrap_or_else(|_| unreachable!("valid constant"))
});

impl Append {
    /// Whether the command carries a trace context for `part`.
    fn traced(&self, part: &Part) -> bool {
        self.trace.is_some() || part.events.iter().any(|e| !e.traceparent.is_empty())
    }
}

/// The `shard.append` spans of a wake-up: one per shard that any command
/// carrying a trace context reaches, parented on the first such context
/// and linked to the others.
fn append_spans(region: &str, batch: &[Append]) -> Vec<(u32, Span)> {
    if !batch.iter().any(|c| c.parts.iter().any(|p| c.traced(p))) {
        return Vec::new();
    }
    let mut by_shard: std::collections::BTreeMap<u32, Vec<(&Append, &Part)>> =
        std::collections::BTreeMap::new();
    for c in batch {
        for p in &c.parts {
            by_shard.entry(p.shard).or_default().push((c, p));
        }
    }
    by_shard
        .into_iter()
        .filter(|(_, parts)| parts.iter().any(|(c, p)| c.traced(p)))
        .map(|(shard, parts)| {
            let span = tracing::info_span!(
                parent: None,
                "shard.append",
                region = %region,
                shard = i64::from(shard),
                commands = num(parts.len()),
                events = num(parts.iter().map(|(_, p)| p.events.len()).sum::<usize>()),
                appended = Empty,
                first_seq = Empty,
                last_seq = Empty,
            );
            let mut adopt = Adopt::new(&span);
            'commands: for (c, p) in &parts {
                if let Some(sc) = &c.trace {
                    if !adopt.context(sc.clone()) {
                        break;
                    }
                    continue;
                }
                for e in &p.events {
                    if !adopt.wire(&e.traceparent, &e.tracestate) {
                        break 'commands;
                    }
                }
            }
            (shard, span)
        })
        .collect()
}

/// Records what a drain appended to a shard on its `shard.append` span;
/// returns the span's context when it is sampled, for the shard's traced
/// appends once they are stored.
fn record_append(span: &Span, first_seq: u64, appended: usize) -> Option<SpanContext> {
    span.record("appended", num(appended));
    if appended == 0 {
        return None;
    }
    span.record("first_seq", num(first_seq));
    span.record("last_seq", num(first_seq + appended as u64 - 1));
    let sc = span.context().span().span_context().clone();
    sc.is_sampled().then_some(sc)
}

impl ShardState {
    /// A replication gap marker, with the next seq.
    fn gap(&mut self, now: u64, appended: &mut Vec<LogEntry>, undo: &mut Vec<Option<Remembered>>) {
        self.head += 1;
        appended.push(LogEntry {
            entity: GAP.clone(),
            local: false,
            publish_time_us: now,
            gap: true,
            awaited: false,
            version: 0,
            bytes: Bytes::new(),
        });
        undo.push(None);
    }

    /// Decides one event against the version memory and, when it is new,
    /// gives it the next seq and encodes it once.
    fn accept(
        &mut self,
        e: Incoming,
        now: u64,
        region: &str,
        appended: &mut Vec<LogEntry>,
        undo: &mut Vec<Option<Remembered>>,
    ) -> EventOutcome {
        // One look-up in the version memory per event: the entry decides
        // and, when the event is new, takes its seq.
        let slot = match self.mem.versions.entry(e.entity.clone()) {
            Entry::Occupied(o) if o.get().version >= e.version => {
                let r = *o.get();
                let outcome = if r.version == e.version {
                    Outcome::Duplicate
                } else {
                    Outcome::Superseded
                };
                return EventOutcome {
                    outcome,
                    seq: r.seq,
                    current_version: r.version,
                };
            }
            slot => slot,
        };
        self.head += 1;
        let seq = self.head;
        let local = e.origin.is_none();
        let publish_time_us = e.publish_time_us.unwrap_or(now);
        let bytes = encode_event_entry(
            self.id,
            seq,
            EventFields {
                entity: e.entity.as_str(),
                version: e.version.get(),
                origin: e.origin.as_deref().unwrap_or(region),
                publish_time_us,
                payload: &e.payload,
                traceparent: &e.traceparent,
                tracestate: &e.tracestate,
            },
        );
        let now_newest = Remembered {
            version: e.version,
            seq,
        };
        let prev = match slot {
            Entry::Occupied(mut o) => Some(o.insert(now_newest)),
            Entry::Vacant(v) => {
                v.insert(now_newest);
                None
            }
        };
        undo.push(prev);
        appended.push(LogEntry {
            entity: e.entity,
            local,
            publish_time_us,
            gap: false,
            awaited: e.awaited,
            version: e.version.get(),
            bytes,
        });
        EventOutcome {
            outcome: Outcome::Applied,
            seq,
            current_version: e.version,
        }
    }

    /// Undoes the seqs and version memory of a drain that was not stored.
    fn undo(&mut self, first_seq: u64, appended: &[LogEntry], undo: Vec<Option<Remembered>>) {
        self.head = first_seq - 1;
        // An earlier drain made visible after this one was decided may have
        // evicted the event a restored entry names; it becomes a candidate
        // to forget again, as eviction would have made it.
        let first_in_memory = self.mem.log.first_seq();
        for (e, prev) in appended.iter().zip(undo).rev() {
            if e.gap {
                continue;
            }
            match prev {
                Some(r) => {
                    if r.seq < first_in_memory {
                        self.mem.retired.push_back((e.entity.clone(), r.seq));
                    }
                    self.mem.versions.insert(e.entity.clone(), r)
                }
                None => self.mem.versions.remove(&e.entity),
            };
        }
    }

    /// Makes a stored drain's entries visible to the sessions.
    fn make_visible(&mut self, appended: Vec<LogEntry>) {
        let evicted = self.mem.log.append_all(appended);
        self.mem.forget(evicted);
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let mut batch = Vec::with_capacity(DRAIN_MAX);
        loop {
            let Some(wal) = &self.wal else {
                if rx.recv_many(&mut batch, DRAIN_MAX).await == 0 {
                    break;
                }
                self.serve(&mut batch);
                continue;
            };
            // The oldest pending drain is always with the writer.
            let answer = wal.next();
            tokio::select! {
                biased;
                answered = answer, if !self.pending.is_empty() => self.answered(answered).await,
                n = rx.recv_many(&mut batch, DRAIN_MAX), if self.pending.len() < PIPELINE => {
                    if n == 0 {
                        break;
                    }
                    self.serve(&mut batch);
                }
            }
        }
        // Every caller is answered before the actor ends.
        while !self.pending.is_empty() {
            let Some(wal) = &self.wal else { break };
            let answered = wal.next().await;
            self.answered(answered).await;
        }
        tracing::debug!(shards = self.shards.len(), "shard actor stopped");
    }

    /// One drain: every command decided in order, shard by shard; then,
    /// memory-only, the end of the drain at once ([`Actor::stored`]);
    /// durable, every shard's records handed to the log's writer in one
    /// request, and the drain kept pending until the writer answers
    /// ([`Actor::answered`]: written and, with `fsync = always`, flushed
    /// with the others of their group; the hub's completion task, woken
    /// once per group, wakes every actor of the group on this runtime).
    /// With one drain pending the actor may decide and hand over the next
    /// ([`PIPELINE`]), so the writer has it the moment its flush returns.
    fn serve(&mut self, batch: &mut Vec<Append>) {
        let mut decided = self.decide(batch);
        let Some(wal) = self.wal.as_mut() else {
            return self.stored(decided);
        };
        if decided.drained.is_empty() {
            // Nothing to store, but its outcomes stand on the drains still
            // pending: answered after them, or refused with them.
            if self.pending.is_empty() {
                self.stored(decided);
            } else {
                self.pending.push_back(decided);
            }
            return;
        }
        let mut buf = self.bufs.pop().unwrap_or_default();
        buf.clear();
        let mut runs = Vec::with_capacity(decided.drained.len());
        for d in &decided.drained {
            let id = self.shards[d.local].id;
            for (i, e) in d.appended.iter().enumerate() {
                encode_record(&mut buf, id, d.first_seq + i as u64, e);
            }
            runs.push(Run {
                shard: id,
                first_seq: d.first_seq,
                count: d.appended.len() as u64,
            });
        }
        match wal.send(runs, buf) {
            Ok(()) => {
                decided.sent = Some(tokio::time::Instant::now());
                self.pending.push_back(decided);
            }
            Err((buf, e)) => {
                // Not handed over: the newest drain, undone alone.
                self.keep(buf);
                self.refuse(vec![decided], e);
            }
        }
    }

    /// Decides every command of a drain, in order, shard by shard: seqs,
    /// version memory, outcomes; nothing is visible yet.
    fn decide(&mut self, batch: &mut Vec<Append>) -> Decided {
        let spans = append_spans(&self.ctx.region, batch);
        let now = self.ctx.clock.now_us();
        let mut drained: Vec<Drained> = Vec::new();
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        for cmd in batch.drain(..) {
            let mut outcomes = Vec::with_capacity(cmd.parts.iter().map(|p| p.events.len()).sum());
            for part in cmd.parts {
                let local = part.shard as usize / self.stride;
                let at = *self.slots[local].get_or_insert_with(|| {
                    drained.push(Drained {
                        local,
                        first_seq: self.shards[local].head + 1,
                        appended: Vec::new(),
                        undo: Vec::new(),
                    });
                    drained.len() - 1
                });
                let d = &mut drained[at];
                let shard = &mut self.shards[local];
                let more = part.events.len() + usize::from(part.gap);
                d.appended.reserve(more);
                d.undo.reserve(more);
                if part.gap {
                    shard.gap(now, &mut d.appended, &mut d.undo);
                }
                for e in part.events {
                    outcomes.push(shard.accept(
                        e,
                        now,
                        &self.ctx.region,
                        &mut d.appended,
                        &mut d.undo,
                    ));
                }
            }
            replies.push((cmd.reply, outcomes));
        }
        for d in &drained {
            self.slots[d.local] = None;
        }
        // Traced shards: what each appended, noted before the write.
        let traced = spans
            .iter()
            .filter_map(|(shard, span)| {
                let local = *shard as usize / self.stride;
                let d = drained.iter().find(|d| d.local == local)?;
                let sc = record_append(span, d.first_seq, d.appended.len())?;
                Some((
                    local,
                    d.first_seq,
                    d.first_seq + d.appended.len() as u64 - 1,
                    sc,
                ))
            })
            .collect();
        drained.retain(|d| !d.appended.is_empty());
        Decided {
            drained,
            replies,
            traced,
            spans,
            sent: None,
        }
    }

    /// The writer's answer to the oldest pending drain: stored, it ends
    /// (and so do the drains with nothing to store that waited for it);
    /// not stored, it and every drain decided after it are undone.
    async fn answered(&mut self, (buf, result): Answered) {
        self.keep(buf);
        let Some(oldest) = self.pending.pop_front() else {
            return;
        };
        if let Some(sent) = oldest.sent {
            crate::metrics::record_log_append(sent.elapsed().as_secs_f64());
        }
        match result {
            Ok(()) => {
                self.stored(oldest);
                while self.pending.front().is_some_and(|d| d.sent.is_none()) {
                    if let Some(d) = self.pending.pop_front() {
                        self.stored(d);
                    }
                }
            }
            Err(e) => {
                // The later drains were decided on top of this one: the
                // writer refuses those it has (see `WalPort::send`); their
                // answers are waited for, so that none is left owed when
                // the port takes drains again.
                let mut failed = vec![oldest];
                while let Some(d) = self.pending.pop_front() {
                    if d.sent.is_some()
                        && let Some(wal) = &self.wal
                    {
                        let (buf, later) = wal.next().await;
                        debug_assert!(later.is_err(), "a drain after a failed one was stored");
                        self.keep(buf);
                    }
                    failed.push(d);
                }
                if let Some(wal) = &self.wal {
                    wal.recovered();
                }
                self.refuse(failed, e);
            }
        }
    }

    /// Keeps a record buffer back from the writer for a later drain.
    fn keep(&mut self, buf: Vec<u8>) {
        if buf.capacity() > 0 && self.bufs.len() < PIPELINE {
            self.bufs.push(buf);
        }
    }

    /// Undoes drains that were not stored, newest first (their seqs and
    /// versions go back: nothing of them happened), and refuses their
    /// callers.
    fn refuse(&mut self, drains: Vec<Decided>, e: std::io::Error) {
        let ids: std::collections::BTreeSet<u32> = drains
            .iter()
            .flat_map(|d| &d.drained)
            .map(|d| self.shards[d.local].id)
            .collect();
        self.ctx.wrote(ids, Some(&e));
        let failed = WriteFailed(Arc::new(e));
        for decided in drains.into_iter().rev() {
            for d in decided.drained.into_iter().rev() {
                self.shards[d.local].undo(d.first_seq, &d.appended, d.undo);
            }
            for (reply, _) in decided.replies {
                let _ = reply.send(Err(failed.clone()));
            }
        }
    }

    /// The end of a drain whose records are stored (or need not be): they
    /// become visible to the sessions, the callers are answered, the
    /// sessions woken.
    fn stored(&mut self, decided: Decided) {
        let Decided {
            drained,
            replies,
            traced,
            spans,
            sent,
        } = decided;
        if sent.is_some() {
            // Before the answers: a caller that then asks for the status
            // sees the log writable again.
            self.ctx
                .wrote(drained.iter().map(|d| self.shards[d.local].id), None);
        }
        crate::metrics::record_drain(replies.len());
        for (local, first_seq, last_seq, sc) in traced {
            self.shards[local].traces.record(first_seq, last_seq, sc);
        }
        let wake = !drained.is_empty();
        let mut count = 0;
        for d in drained {
            count += d.appended.len() as u64;
            self.shards[d.local].make_visible(d.appended);
        }
        if wake {
            crate::metrics::count_appended(count);
        }
        // The callers first: `ACCEPTED` promises the append, not the
        // fan-out. Their tasks are woken before the bell's ringer, so they
        // hand their answers to HTTP/2 before the sessions are woken.
        for (reply, outcomes) in replies {
            // The caller may have given up (client went away): nothing to do.
            let _ = reply.send(Ok(outcomes));
        }
        if wake {
            self.ctx.appended.ring();
        }
        drop(spans);
    }
}

impl ReplicaActor {
    async fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let mut batch = Vec::with_capacity(DRAIN_MAX);
        // Taken once, here: what other replicas appended first, then the
        // local commands.
        if let Some(mut remote) = self.js.remote.take() {
            loop {
                tokio::select! {
                    biased;
                    m = remote.recv() => match m {
                        Some(m) => self.apply_remote(m),
                        None => break,
                    },
                    n = rx.recv_many(&mut batch, DRAIN_MAX) => {
                        if n == 0 {
                            break;
                        }
                        // One message per part, each within the server's
                        // largest message.
                        let limit = self.js.max_message();
                        for mut part in split_by_size(&mut batch, limit) {
                            self.serve(&mut part, &mut remote).await;
                        }
                    }
                }
            }
        }
        tracing::debug!(shard = self.state.id, "shard actor stopped");
    }

    /// Applies a drain another replica appended (or, when its stream
    /// sequence is not newer than the last applied, skips this replica's
    /// own).
    fn apply_remote(&mut self, m: Remote) {
        let id = self.state.id;
        if m.stream_seq <= self.js.last() {
            return;
        }
        let records = match m.records(id, self.js.shards()) {
            Ok(r) => r,
            Err(e) => {
                // Not a drain a hub wrote: the shard stops, as for a gap.
                self.ctx.stop_following(
                    id,
                    format!(
                        "JetStream log: message {} does not decode: {e}; restart this replica",
                        m.stream_seq
                    ),
                );
                return;
            }
        };
        let Some(first) = records.first() else {
            self.js.applied(m.stream_seq);
            return;
        };
        if first.seq != self.state.head + 1 {
            // Conditional appends make each subject gap-free; a gap here
            // means messages this replica had not read were removed (it fell
            // behind the stream's retention) or the stream was altered. The
            // shard stops here: its appends conflict and are refused, its
            // watermarks stop, and a restart rebuilds it from the stream.
            self.ctx.stop_following(
                id,
                format!(
                    "JetStream log: message {} starts at seq {} after this replica's head {}; restart this replica",
                    m.stream_seq, first.seq, self.state.head
                ),
            );
            return;
        }
        self.js.applied(m.stream_seq);
        let n = records.len();
        self.state.head += n as u64;
        self.state
            .mem
            .apply(records.into_iter().map(|r| (r.seq, r.entry)).collect());
        crate::metrics::count_appended(n as u64);
        self.ctx.appended.ring();
    }

    /// A drain on the JetStream log: decided against everything this
    /// replica has applied, appended only if no other replica appended to
    /// the shard since (expected last subject sequence); on a conflict,
    /// undone, caught up and decided again.
    async fn serve(&mut self, batch: &mut Vec<Append>, remote: &mut mpsc::Receiver<Remote>) {
        let id = self.state.id;
        let span = append_spans(&self.ctx.region, batch).pop().map(|(_, s)| s);
        let deadline = tokio::time::Instant::now() + CATCH_UP_LIMIT;
        // JetStream answered this drain (a conflict, then the catch-up).
        let mut reached = false;
        loop {
            while let Ok(m) = remote.try_recv() {
                self.apply_remote(m);
            }
            let first_seq = self.state.head + 1;
            let now = self.ctx.clock.now_us();
            let mut appended = Vec::new();
            let mut undo: Vec<Option<Remembered>> = Vec::new();
            let mut outcomes = Vec::with_capacity(batch.len());
            for cmd in batch.iter() {
                let mut o = Vec::new();
                for part in &cmd.parts {
                    if part.gap {
                        self.state.gap(now, &mut appended, &mut undo);
                    }
                    for e in &part.events {
                        o.push(self.state.accept(
                            e.clone(),
                            now,
                            &self.ctx.region,
                            &mut appended,
                            &mut undo,
                        ));
                    }
                }
                outcomes.push(o);
            }
            if appended.is_empty() {
                if reached {
                    self.ctx.wrote([id], None);
                }
                for (cmd, o) in batch.drain(..).zip(outcomes) {
                    let _ = cmd.reply.send(Ok(o));
                }
                return;
            }
            let mut buf = Vec::new();
            for (i, e) in appended.iter().enumerate() {
                encode_record(&mut buf, id, first_seq + i as u64, e);
            }
            match self.js.publish(buf).await {
                Ok(stream_seq) => {
                    self.ctx.wrote([id], None);
                    self.js.applied(stream_seq);
                    crate::metrics::record_drain(batch.len());
                    if let Some(sc) = span
                        .as_ref()
                        .and_then(|s| record_append(s, first_seq, appended.len()))
                    {
                        self.state.traces.record(first_seq, self.state.head, sc);
                    }
                    crate::metrics::count_appended(appended.len() as u64);
                    self.state.make_visible(appended);
                    for (cmd, o) in batch.drain(..).zip(outcomes) {
                        let _ = cmd.reply.send(Ok(o));
                    }
                    self.ctx.appended.ring();
                    return;
                }
                Err(AppendError::Conflict) => {
                    self.state.undo(first_seq, &appended, undo);
                    if let Err(e) = self.catch_up(remote, deadline).await {
                        self.refuse(batch, e);
                        return;
                    }
                    reached = true;
                }
                Err(AppendError::Failed(e)) => {
                    self.state.undo(first_seq, &appended, undo);
                    self.refuse(batch, e);
                    return;
                }
            }
        }
    }

    /// Refuses every command of a drain that was not appended.
    fn refuse(&self, batch: &mut Vec<Append>, e: std::io::Error) {
        self.ctx.wrote([self.state.id], Some(&e));
        let failed = WriteFailed(Arc::new(e));
        for cmd in batch.drain(..) {
            let _ = cmd.reply.send(Err(failed.clone()));
        }
    }

    /// After a conflict: applies what the tail brings until this shard has
    /// reached the subject's last message in JetStream.
    async fn catch_up(
        &mut self,
        remote: &mut mpsc::Receiver<Remote>,
        deadline: tokio::time::Instant,
    ) -> Result<(), std::io::Error> {
        let target = self.js.subject_last().await?;
        while self.js.last() < target {
            match tokio::time::timeout_at(deadline, remote.recv()).await {
                Ok(Some(m)) => self.apply_remote(m),
                Ok(None) => return Err(std::io::Error::other("the hub is stopping")),
                Err(_) => {
                    return Err(std::io::Error::other(
                        "JetStream: another replica's appends did not arrive in time",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(entity: &str) -> Incoming {
        Incoming {
            entity: Entity::parse(entity).unwrap(),
            version: Version::new(1).unwrap(),
            payload: Bytes::new(),
            traceparent: String::new(),
            tracestate: String::new(),
            origin: None,
            publish_time_us: None,
            awaited: false,
        }
    }

    /// On one thread, the task that sent an append runs with its answer
    /// before the sessions are told of the append: the answer does not
    /// queue behind the fan-out it causes.
    #[tokio::test]
    async fn the_caller_is_answered_before_the_sessions_are_woken() {
        let (appended, mut sessions) = watch::channel(0u64);
        let bell = Arc::new(AppendBell::new(appended));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(bell.clone().run(stop.clone()));
        let ctx = Arc::new(ShardContext {
            region: Arc::from("local"),
            clock: Clock::new(),
            appended: bell,
            failing: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
        });
        let memory = ShardMemory::new(1, 1024, 1 << 20, 16);
        let log = memory.log().clone();
        let tracker = TaskTracker::new();
        let actors = ShardActors::spawn(vec![memory], ctx, 1, 8, &tracker, None, Vec::new());
        for round in 1..=3u64 {
            let (reply, rx) = oneshot::channel();
            actors.reserve(0).await.unwrap().send(Append {
                parts: vec![Part {
                    shard: 0,
                    gap: false,
                    events: vec![incoming(&format!("user:{round}"))],
                }],
                reply,
                trace: None,
            });
            let outcomes = rx.await.unwrap().unwrap();
            assert_eq!(outcomes[0].seq, round);
            assert_eq!(log.head(), round, "appended before the answer");
            assert!(
                !sessions.has_changed().unwrap(),
                "round {round}: the sessions were woken before the caller ran"
            );
            sessions.changed().await.unwrap();
            assert_eq!(*sessions.borrow_and_update(), round);
        }
        stop.cancel();
    }

    /// Appends to many shards at once wake the sessions once, after every
    /// actor has drained; an actor that owns several shards keeps each
    /// shard's seqs and answers each event in its command's order.
    #[tokio::test]
    async fn a_burst_of_appends_across_shards_rings_once() {
        let (appended, mut sessions) = watch::channel(0u64);
        let bell = Arc::new(AppendBell::new(appended));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(bell.clone().run(stop.clone()));
        let ctx = Arc::new(ShardContext {
            region: Arc::from("local"),
            clock: Clock::new(),
            appended: bell,
            failing: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
        });
        let tracker = TaskTracker::new();
        let memories: Vec<ShardMemory> = (0..8)
            .map(|_| ShardMemory::new(1, 1024, 1 << 20, 16))
            .collect();
        let logs: Vec<_> = memories.iter().map(|m| m.log().clone()).collect();
        let actors = ShardActors::spawn(memories, ctx, 3, 8, &tracker, None, Vec::new());
        assert_eq!(actors.count(), 3);
        let mut answers = Vec::new();
        for actor in 0..actors.count() {
            // Two events for each of the actor's shards, one command.
            let parts: Vec<Part> = (0..8u32)
                .filter(|s| actors.actor_of(ShardId(*s)) == actor)
                .map(|s| Part {
                    shard: s,
                    gap: false,
                    events: vec![
                        incoming(&format!("user:{s}-a")),
                        incoming(&format!("user:{s}-b")),
                    ],
                })
                .collect();
            let (reply, rx) = oneshot::channel();
            actors.reserve(actor).await.unwrap().send(Append {
                parts,
                reply,
                trace: None,
            });
            answers.push(rx);
        }
        for rx in answers {
            let seqs: Vec<u64> = rx.await.unwrap().unwrap().iter().map(|o| o.seq).collect();
            assert!(
                seqs.chunks(2).all(|c| c == [1, 2]),
                "each shard's events in order from seq 1: {seqs:?}"
            );
        }
        sessions.changed().await.unwrap();
        assert_eq!(*sessions.borrow_and_update(), 1, "one wake for the burst");
        assert!(
            logs.iter().all(|l| l.head() == 2),
            "every shard appended first"
        );
        stop.cancel();
    }

    /// Two drains with the log's writer when the first fails: both are
    /// undone, newest first, and refused; the shard's seqs and versions are
    /// as before them, so the same events are then taken from the same
    /// seqs, and a version stored before them is still a duplicate.
    #[tokio::test]
    async fn a_failed_drain_undoes_the_drain_decided_on_top_of_it() {
        struct Nothing;
        impl crate::store::Restore for Nothing {
            fn record(&mut self, _: u32, _: crate::store::Recovered) {}
        }
        let tmp = tempfile::tempdir().unwrap();
        let retention = crate::store::Retention {
            max_events: 10_000,
            max_bytes: 1 << 20,
            // Smaller than a drain: every drain starts a segment.
            segment_bytes: 1024,
            fsync: crate::store::FsyncPolicy::Always,
            fsync_interval: std::time::Duration::from_millis(10),
        };
        let opened = crate::store::open(tmp.path(), 1, retention, false, &mut Nothing).unwrap();
        let (appended, _sessions) = watch::channel(0u64);
        let mut actor = Actor {
            shards: vec![ShardState {
                id: 0,
                head: 0,
                mem: ShardMemory::new(1, 1024, 1 << 20, 16),
                traces: Arc::default(),
            }],
            stride: 1,
            slots: vec![None],
            ctx: Arc::new(ShardContext {
                region: Arc::from("local"),
                clock: Clock::new(),
                appended: Arc::new(AppendBell::new(appended)),
                failing: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            }),
            wal: Some(opened.wal.port()),
            pending: VecDeque::new(),
            bufs: Vec::new(),
        };
        // A drain of 30 events, all at `version`.
        let command = |version: u64| {
            let (reply, rx) = oneshot::channel();
            let events = (0..30)
                .map(|i| Incoming {
                    version: Version::new(version).unwrap(),
                    ..incoming(&format!("user:{i}"))
                })
                .collect();
            let append = Append {
                parts: vec![Part {
                    shard: 0,
                    gap: false,
                    events,
                }],
                reply,
                trace: None,
            };
            (vec![append], rx)
        };
        fn next(actor: &Actor) -> impl Future<Output = Answered> + use<> {
            actor.wal.as_ref().unwrap().next()
        }

        let (mut first, rx) = command(1);
        actor.serve(&mut first);
        let answer = next(&actor).await;
        actor.answered(answer).await;
        assert_eq!(rx.await.unwrap().unwrap()[29].seq, 30);

        let blocker = crate::store::block_next_segment(tmp.path());
        let (mut failing, failing_rx) = command(2);
        actor.serve(&mut failing);
        let (mut on_top, on_top_rx) = command(3);
        actor.serve(&mut on_top);
        assert_eq!(actor.pending.len(), PIPELINE, "both with the writer");
        let answer = next(&actor).await;
        actor.answered(answer).await;
        assert!(actor.pending.is_empty());
        assert!(failing_rx.await.unwrap().is_err());
        assert!(on_top_rx.await.unwrap().is_err());
        assert_eq!(actor.shards[0].head, 30, "both drains' seqs given back");
        assert!(
            actor.ctx.failing.lock().contains_key(&0),
            "the status says so"
        );

        std::fs::remove_dir(&blocker).unwrap();
        let (mut again, rx) = command(2);
        actor.serve(&mut again);
        let answer = next(&actor).await;
        actor.answered(answer).await;
        let outcomes = rx.await.unwrap().unwrap();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o.outcome, Outcome::Applied))
        );
        assert_eq!(outcomes[0].seq, 31, "from the first undone seq on");
        assert!(actor.ctx.failing.lock().is_empty(), "writable again");
        let (mut stored_before, rx) = command(1);
        actor.serve(&mut stored_before);
        let outcomes = rx.await.unwrap().unwrap();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o.outcome, Outcome::Superseded)),
            "versions as the stored drains left them"
        );
    }
}
