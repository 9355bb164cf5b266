//! Shard actors: one task per shard owns the newest accepted version of each
//! of its entities and is the only writer of its part of the log.
//!
//! The handle is the only public type. Commands go through a bounded queue
//! and replies come back on a oneshot. An actor that wakes drains everything
//! waiting (up to [`DRAIN_MAX`] commands): one lock of the log, one wake-up of
//! the sessions, however many publishes it served.
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
use freshness::{Entity, Version};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::clock::Clock;
use crate::jetstream::{AppendError, JsShard, Remote};
use crate::log::{LogEntry, SharedLog};
use crate::store::{Wal, WalPort, WriteFailed, encode_record};
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

/// A batch of events for one shard, answered in order.
pub struct Append {
    /// Append a replication gap marker before the events.
    pub gap: bool,
    /// The events.
    pub events: Vec<Incoming>,
    /// Where the outcomes go: one per event, or the log write that failed
    /// (then nothing of the command was applied).
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
    /// Notes the outcome of a log write of `shard`'s: failing with `error`
    /// (one log line when it starts), or writable again (one line when it
    /// was failing); the gauge says whether any shard still fails. A write
    /// of a shard that was not failing (every drain's, normally) changes
    /// nothing and touches no gauge.
    fn set_failing(&self, shard: u32, error: Option<&std::io::Error>) {
        let mut failing = self.failing.lock();
        match error {
            None => {
                if failing.remove(&shard).is_some() {
                    tracing::info!(shard, "log writes succeed again");
                    crate::metrics::set_log_writable(failing.is_empty());
                }
            }
            Some(e) => {
                if failing.insert(shard, e.to_string()).is_none() {
                    tracing::error!(shard, error = %e, "log write failed: publishes to this shard are refused until writes succeed");
                }
                crate::metrics::log_write_failed();
                crate::metrics::set_log_writable(false);
            }
        }
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

/// Handle to one shard actor.
#[derive(Debug, Clone)]
pub struct ShardHandle {
    tx: mpsc::Sender<Append>,
    traces: Arc<AppendTraces>,
}

impl ShardHandle {
    /// Spawns the actor of shard `id` on `tracker`, starting from `memory`
    /// (empty, or rebuilt from the durable log). With a durable log, `store`
    /// is where its appends go.
    pub fn spawn(
        id: u32,
        memory: ShardMemory,
        ctx: Arc<ShardContext>,
        queue: usize,
        tracker: &TaskTracker,
        wal: Option<Wal>,
        js: Option<JsShard>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue);
        let traces = Arc::new(AppendTraces::default());
        let actor = Actor {
            id,
            head: memory.log.head(),
            mem: memory,
            ctx,
            traces: traces.clone(),
            gap_entity: Entity::parse(GAP_ENTITY)
                .unwrap_or_else(|_| unreachable!("valid constant")),
            wal: wal.map(|w| w.port()),
            js,
            record_buf: Vec::new(),
        };
        tracker.spawn(actor.run(rx));
        Self { tx, traces }
    }

    /// The shard's recent traced appends, for fan-out spans (the read side
    /// keeps a handle: `reader::LogReader`).
    pub fn traces_shared(&self) -> Arc<AppendTraces> {
        self.traces.clone()
    }

    /// Reserves room for one command; `None` while the queue is full.
    pub fn try_reserve(&self) -> Result<mpsc::Permit<'_, Append>, mpsc::error::TrySendError<()>> {
        self.tx.try_reserve()
    }

    /// Waits for room for one command.
    pub async fn reserve(&self) -> Result<mpsc::Permit<'_, Append>, ShardStopped> {
        self.tx.reserve().await.map_err(|_| ShardStopped)
    }

    /// Commands waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
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

struct Actor {
    id: u32,
    mem: ShardMemory,
    ctx: Arc<ShardContext>,
    traces: Arc<AppendTraces>,
    head: u64,
    /// Placeholder entity of gap markers (they concern a shard, not an entity).
    gap_entity: Entity,
    /// This actor's way into the durable log; `None` for an ephemeral hub.
    wal: Option<WalPort>,
    /// The JetStream log's side of this shard (`log = "jetstream"`).
    js: Option<JsShard>,
    /// The records of one drain, reused.
    record_buf: Vec<u8>,
}

/// Splits a drain into parts whose records (estimated generously) stay
/// within `limit` bytes, in order; a command larger than `limit` is a part
/// of its own (its publish fails and is refused, naming the size).
fn split_by_size(batch: &mut Vec<Append>, limit: usize) -> Vec<Vec<Append>> {
    let estimate = |c: &Append| -> usize {
        c.events
            .iter()
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

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let mut batch = Vec::with_capacity(DRAIN_MAX);
        if let Some(mut remote) = self.js.as_mut().and_then(|j| j.remote.take()) {
            // A hub replica: what other replicas appended first, then the
            // local commands.
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
                        let limit = self.js.as_ref().map_or(usize::MAX, JsShard::max_message);
                        for mut part in split_by_size(&mut batch, limit) {
                            self.serve_replicated(&mut part, &mut remote).await;
                        }
                    }
                }
            }
        } else {
            while rx.recv_many(&mut batch, DRAIN_MAX).await > 0 {
                self.serve(&mut batch).await;
            }
        }
        tracing::debug!(shard = self.id, "shard actor stopped");
    }

    /// Applies a drain another replica appended (or, when its stream
    /// sequence is not newer than the last applied, skips this replica's
    /// own).
    fn apply_remote(&mut self, m: Remote) {
        let Some(js) = &mut self.js else {
            return;
        };
        if m.stream_seq <= js.last() {
            return;
        }
        let records = match m.records(self.id, js.shards()) {
            Ok(r) => r,
            Err(e) => {
                // Not a drain a hub wrote: the shard stops, as for a gap.
                let error = format!(
                    "JetStream log: message {} does not decode: {e}; restart this replica",
                    m.stream_seq
                );
                tracing::error!(shard = self.id, "{error}");
                self.ctx.failing.lock().insert(self.id, error);
                crate::metrics::set_log_writable(false);
                return;
            }
        };
        let Some(first) = records.first() else {
            js.applied(m.stream_seq);
            return;
        };
        if first.seq != self.head + 1 {
            // Conditional appends make each subject gap-free; a gap here
            // means messages this replica had not read were removed (it fell
            // behind the stream's retention) or the stream was altered. The
            // shard stops here: its appends conflict and are refused, its
            // watermarks stop, and a restart rebuilds it from the stream.
            let error = format!(
                "JetStream log: message {} starts at seq {} after this replica's head {}; restart this replica",
                m.stream_seq, first.seq, self.head
            );
            tracing::error!(shard = self.id, "{error}");
            self.ctx.failing.lock().insert(self.id, error);
            crate::metrics::set_log_writable(false);
            return;
        }
        js.applied(m.stream_seq);
        let n = records.len();
        self.head += n as u64;
        self.mem
            .apply(records.into_iter().map(|r| (r.seq, r.entry)).collect());
        crate::metrics::count_appended(n as u64);
        self.ctx.appended.ring();
    }

    /// Undoes the seqs and version memory of a drain that was not stored.
    fn undo(&mut self, first_seq: u64, appended: &[LogEntry], undo: Vec<Option<Remembered>>) {
        self.head = first_seq - 1;
        for (e, prev) in appended.iter().zip(undo).rev() {
            if e.gap {
                continue;
            }
            match prev {
                Some(r) => self.mem.versions.insert(e.entity.clone(), r),
                None => self.mem.versions.remove(&e.entity),
            };
        }
    }

    fn set_failing(&self, error: Option<&std::io::Error>) {
        self.ctx.set_failing(self.id, error);
    }

    /// A drain on the JetStream log: decided against everything this
    /// replica has applied, appended only if no other replica appended to
    /// the shard since (expected last subject sequence); on a conflict,
    /// undone, caught up and decided again.
    async fn serve_replicated(
        &mut self,
        batch: &mut Vec<Append>,
        remote: &mut mpsc::Receiver<Remote>,
    ) {
        let span = self.append_span(batch);
        let deadline = tokio::time::Instant::now() + CATCH_UP_LIMIT;
        // JetStream answered this drain (a conflict, then the catch-up).
        let mut reached = false;
        loop {
            while let Ok(m) = remote.try_recv() {
                self.apply_remote(m);
            }
            let first_seq = self.head + 1;
            let now = self.ctx.clock.now_us();
            let mut appended = Vec::new();
            let mut undo: Vec<Option<Remembered>> = Vec::new();
            let mut outcomes = Vec::with_capacity(batch.len());
            for cmd in batch.iter() {
                if cmd.gap {
                    self.head += 1;
                    appended.push(LogEntry {
                        entity: self.gap_entity.clone(),
                        local: false,
                        publish_time_us: now,
                        gap: true,
                        awaited: false,
                        version: 0,
                        bytes: Bytes::new(),
                    });
                    undo.push(None);
                }
                let o: Vec<EventOutcome> = cmd
                    .events
                    .iter()
                    .map(|e| self.accept(e.clone(), now, &mut appended, &mut undo))
                    .collect();
                outcomes.push(o);
            }
            if appended.is_empty() {
                if reached {
                    self.set_failing(None);
                }
                for (cmd, o) in batch.drain(..).zip(outcomes) {
                    let _ = cmd.reply.send(Ok(o));
                }
                return;
            }
            let mut buf = Vec::new();
            for (i, e) in appended.iter().enumerate() {
                encode_record(&mut buf, self.id, first_seq + i as u64, e);
            }
            let Some(js) = &self.js else { return };
            let result = js.publish(buf).await;
            match result {
                Ok(stream_seq) => {
                    self.set_failing(None);
                    if let Some(js) = &mut self.js {
                        js.applied(stream_seq);
                    }
                    crate::metrics::record_drain(batch.len());
                    if let Some(span) = &span {
                        span.record("appended", num(appended.len()));
                        span.record("first_seq", num(first_seq));
                        span.record("last_seq", num(self.head));
                        let sc = span.context().span().span_context().clone();
                        if sc.is_sampled() {
                            self.traces.record(first_seq, self.head, sc);
                        }
                    }
                    crate::metrics::count_appended(appended.len() as u64);
                    let evicted = self.mem.log.append_all(appended);
                    self.mem.forget(evicted);
                    for (cmd, o) in batch.drain(..).zip(outcomes) {
                        let _ = cmd.reply.send(Ok(o));
                    }
                    self.ctx.appended.ring();
                    return;
                }
                Err(AppendError::Conflict) => {
                    self.undo(first_seq, &appended, undo);
                    if let Err(e) = self.catch_up(remote, deadline).await {
                        self.set_failing(Some(&e));
                        let failed = WriteFailed(Arc::new(e));
                        for cmd in batch.drain(..) {
                            let _ = cmd.reply.send(Err(failed.clone()));
                        }
                        return;
                    }
                    reached = true;
                }
                Err(AppendError::Failed(e)) => {
                    self.undo(first_seq, &appended, undo);
                    self.set_failing(Some(&e));
                    let failed = WriteFailed(Arc::new(e));
                    for cmd in batch.drain(..) {
                        let _ = cmd.reply.send(Err(failed.clone()));
                    }
                    return;
                }
            }
        }
    }

    /// After a conflict: applies what the tail brings until this shard has
    /// reached the subject's last message in JetStream.
    async fn catch_up(
        &mut self,
        remote: &mut mpsc::Receiver<Remote>,
        deadline: tokio::time::Instant,
    ) -> Result<(), std::io::Error> {
        let target = match &self.js {
            Some(js) => js.subject_last().await?,
            None => return Ok(()),
        };
        while self.js.as_ref().is_some_and(|j| j.last() < target) {
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

    async fn serve(&mut self, batch: &mut Vec<Append>) {
        let span = self.append_span(batch);
        let first_seq = self.head + 1;
        let now = self.ctx.clock.now_us();
        // At most one entry per event and gap marker: sized once.
        let most = batch
            .iter()
            .map(|c| c.events.len() + usize::from(c.gap))
            .sum();
        let mut appended = Vec::with_capacity(most);
        let mut replies = Vec::with_capacity(batch.len());
        // What each appended event replaced in the version memory, to undo
        // the drain if the log write fails.
        let mut undo: Vec<Option<Remembered>> = Vec::with_capacity(most);
        for cmd in batch.drain(..) {
            if cmd.gap {
                self.head += 1;
                appended.push(LogEntry {
                    entity: self.gap_entity.clone(),
                    local: false,
                    publish_time_us: now,
                    gap: true,
                    awaited: false,
                    version: 0,
                    bytes: Bytes::new(),
                });
                undo.push(None);
            }
            let outcomes = cmd
                .events
                .into_iter()
                .map(|e| self.accept(e, now, &mut appended, &mut undo))
                .collect();
            replies.push((cmd.reply, outcomes));
        }
        if !appended.is_empty()
            && let Some(mut wal) = self.wal.take()
        {
            self.serve_durable(&mut wal, first_seq, appended, undo, replies, span)
                .await;
            self.wal = Some(wal);
            return;
        }
        crate::metrics::record_drain(replies.len());
        if let Some(span) = &span {
            span.record("appended", num(appended.len()));
            if !appended.is_empty() {
                span.record("first_seq", num(first_seq));
                span.record("last_seq", num(self.head));
                let sc = span.context().span().span_context().clone();
                if sc.is_sampled() {
                    self.traces.record(first_seq, self.head, sc);
                }
            }
        }
        self.finish(appended, replies);
    }

    /// The end of a drain whose records are stored (or need not be): they
    /// become visible to the sessions, the callers are answered, the
    /// sessions woken.
    fn finish(&mut self, appended: Vec<LogEntry>, replies: Vec<Reply>) {
        let wake = !appended.is_empty();
        if wake {
            crate::metrics::count_appended(appended.len() as u64);
            let evicted = self.mem.log.append_all(appended);
            self.mem.forget(evicted);
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
    }

    /// The rest of a drain with a durable log: its records go to the log's
    /// writer, and the drain waits for them to be written (and flushed)
    /// with the others of their group. The hub's completion task, woken
    /// once per group, wakes every actor of the group on this runtime; each
    /// then ends its drain as a memory-only hub does ([`Actor::finish`]),
    /// or, when the write failed, undoes it. Every actor woken rings the
    /// same bell, whose ringer runs behind them all: the sessions are
    /// woken once per group.
    async fn serve_durable(
        &mut self,
        wal: &mut WalPort,
        first_seq: u64,
        appended: Vec<LogEntry>,
        undo: Vec<Option<Remembered>>,
        replies: Vec<Reply>,
        span: Option<Span>,
    ) {
        let count = appended.len() as u64;
        let traced = span.as_ref().and_then(|span| {
            span.record("appended", num(appended.len()));
            span.record("first_seq", num(first_seq));
            span.record("last_seq", num(self.head));
            let sc = span.context().span().span_context().clone();
            sc.is_sampled().then_some(sc)
        });
        let mut buf = std::mem::take(&mut self.record_buf);
        buf.clear();
        for (i, e) in appended.iter().enumerate() {
            encode_record(&mut buf, self.id, first_seq + i as u64, e);
        }
        let started = tokio::time::Instant::now();
        let (buf, result) = wal.append(self.id, first_seq, count, buf).await;
        crate::metrics::record_log_append(started.elapsed().as_secs_f64());
        self.record_buf = buf;
        match result {
            Ok(()) => {
                // Before the answers: a caller that then asks for the
                // status sees the log writable again.
                self.set_failing(None);
                crate::metrics::record_drain(replies.len());
                if let Some(sc) = traced {
                    self.traces.record(first_seq, self.head, sc);
                }
                self.finish(appended, replies);
            }
            Err(e) => {
                // Nothing of this drain happened: the seqs and versions go back.
                self.set_failing(Some(&e));
                self.undo(first_seq, &appended, undo);
                let failed = WriteFailed(Arc::new(e));
                for (reply, _) in replies {
                    let _ = reply.send(Err(failed.clone()));
                }
            }
        }
    }

    /// The `shard.append` span of a wake-up, when any command carries a
    /// trace context: parented on the first, linked to the others.
    fn append_span(&self, batch: &[Append]) -> Option<Span> {
        let traced = batch
            .iter()
            .any(|c| c.trace.is_some() || c.events.iter().any(|e| !e.traceparent.is_empty()));
        if !traced {
            return None;
        }
        let span = tracing::info_span!(
            parent: None,
            "shard.append",
            region = %self.ctx.region,
            shard = i64::from(self.id),
            commands = num(batch.len()),
            events = num(batch.iter().map(|c| c.events.len()).sum::<usize>()),
            appended = Empty,
            first_seq = Empty,
            last_seq = Empty,
        );
        let mut adopt = Adopt::new(&span);
        'commands: for c in batch {
            if let Some(sc) = &c.trace {
                if !adopt.context(sc.clone()) {
                    break;
                }
                continue;
            }
            for e in &c.events {
                if !adopt.wire(&e.traceparent, &e.tracestate) {
                    break 'commands;
                }
            }
        }
        Some(span)
    }

    fn accept(
        &mut self,
        e: Incoming,
        now: u64,
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
                origin: e.origin.as_deref().unwrap_or(&self.ctx.region),
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
        let shard = ShardHandle::spawn(0, memory, ctx, 8, &tracker, None, None);
        for round in 1..=3u64 {
            let (reply, rx) = oneshot::channel();
            shard.reserve().await.unwrap().send(Append {
                gap: false,
                events: vec![incoming(&format!("user:{round}"))],
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
    /// actor has drained.
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
        let mut logs = Vec::new();
        let mut answers = Vec::new();
        for id in 0..8 {
            let memory = ShardMemory::new(1, 1024, 1 << 20, 16);
            logs.push(memory.log().clone());
            let shard = ShardHandle::spawn(id, memory, ctx.clone(), 8, &tracker, None, None);
            let (reply, rx) = oneshot::channel();
            shard.reserve().await.unwrap().send(Append {
                gap: false,
                events: vec![incoming(&format!("user:{id}"))],
                reply,
                trace: None,
            });
            answers.push(rx);
        }
        for rx in answers {
            rx.await.unwrap().unwrap();
        }
        sessions.changed().await.unwrap();
        assert_eq!(*sessions.borrow_and_update(), 1, "one wake for the burst");
        assert!(
            logs.iter().all(|l| l.head() == 1),
            "every shard appended first"
        );
        stop.cancel();
    }
}
