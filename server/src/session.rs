//! One subscriber session: the hub side of one node's Subscribe stream.
//!
//! A session reads the shard logs directly (no hop through the actors),
//! gathers what the node's filter wants into one frame of pre-encoded events,
//! and hands it to the stream. It tracks what it sent and what the node
//! acked, never has more than the node's in-flight limit unacked, and when
//! the log has moved past what it still had to send, it resets the node for
//! exactly those shards (SPEC §3.2.7, G5).
//!
//! A frame that carries events of traced appends records one
//! `session.fanout` span, parented on the first such `shard.append` span and
//! linked to the others (`telemetry::AppendTraces`); events are never
//! decoded for it, and an untraced frame records nothing.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::wire::{self, BatchBuilder, Frame};
use freshness::{Cursor, pb, validate};
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;

use crate::error::{HubError, map_decode_status};
use crate::flow::FlowState;
use crate::hub::{EndReason, Hub, SessionShared};
use crate::log::LogEntry;
use crate::telemetry::{Adopt, num};

/// Largest event frame a session builds; well under the 4 MiB a default
/// gRPC client accepts.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Frames made outside a fill (welcome, resets, progress, goodbye) that
/// wait for the stream to ask for its next message. Progress and parked
/// resets are only made when this is empty, so it never holds more than
/// three.
pub const PENDING_FRAMES: usize = 3;

/// Acks on request (`Welcome.acks_on_request`): a batch asks its node for a
/// prompt ack (`EventBatch.ack_requested`) when a publish waits on one of
/// its events, or when the node's unacked events reach this share of its
/// in-flight budget (1/4); the node acks every other batch lazily. At light
/// load that is one ack per node every few tens of milliseconds instead of
/// one per frame (BENCHMARKS.md, "Acks on request").
const PROMPT_ACK_SHARE: u32 = 4;

/// A frame sent and not yet wholly acked: what its ack credits (the
/// watermark, the SLI tallies). The in-flight budget is not kept here but
/// in [`FlowState`], per event: a frame acked in part frees that part.
#[derive(Debug)]
struct Sent {
    /// Highest seq per shard in it; acked once the node's cursor covers all.
    positions: Vec<(u32, u64)>,
    /// Events in it (0 for progress and resets).
    count: u32,
    /// Its watermark, if it carried one.
    watermark_us: u64,
    /// Publish time of its oldest event (0 without events).
    oldest_publish_us: u64,
}

/// The result of one look at the logs.
enum Fill {
    /// A frame to send.
    Frame(Frame),
    /// Nothing to send and caught up: everything appended before this time
    /// was sent.
    Idle(u64),
    /// The in-flight limit is reached, or a frame is full.
    Blocked,
}

/// A stream after its hello was accepted: the response stream itself.
///
/// The session is what tonic encodes and hyper writes: the HTTP/2 stream's
/// own task polls it when the stream has room, so there is no session task
/// and no queue between a session and its stream (one task hop and one
/// channel less per frame and node). Every poll handles what is ready first
/// (cancellation, the acks already received, appends, the progress tick),
/// then hands out at most one frame. A stream without room is not polled:
/// it sends nothing, and its watermark stops, so its node sees its
/// staleness grow. When hyper drops the stream (the node went away) the
/// session unregisters in `Drop`.
///
/// The same holds for its end: a replaced stream, or every stream at
/// shutdown, sends its goodbye when HTTP/2 next asks for a message. A node
/// that has stopped reading with a full receive window never asks, so its
/// session (a cursor and a few vectors per shard) lives on with its
/// connection; it has left the registry already (a replacement took its
/// place, and `Hub::unregister` only removes the entry it registered), and
/// at shutdown the hub's grace period bounds the wait.
pub struct Session {
    hub: Arc<Hub>,
    shared: Arc<SessionShared>,
    inbound: tonic::Streaming<wire::Request>,
    appended: WatchStream<u64>,
    tick: Interval,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    wakers: SourceWakers,
    /// Frames to send before the next fill ([`PENDING_FRAMES`]).
    pending: VecDeque<Frame>,
    state: State,
    /// Per shard: every entry up to here was sent or skipped by the filter.
    sent: Vec<u64>,
    /// What is in flight per shard, the node's acked cursor, parked or not.
    flow: FlowState,
    /// Frames not wholly acked, for their watermarks and tallies.
    unacked: VecDeque<Sent>,
    /// Where the resets sent and not yet acked move each shard to: the
    /// node is `resetting` until its cursor covers them.
    resets: Vec<(u32, u64)>,
    caught_up: bool,
    scan_from: usize,
    /// A fill found shards the log left behind but sent events first: the
    /// next fill starts with their reset.
    gaps_pending: bool,
    builder: BatchBuilder,
    frame_limit: usize,
    last_watermark: Instant,
    tally: crate::metrics::SessionTally,
}

/// Where a session's stream is.
enum State {
    Open,
    /// Ending: the pending frames go out, then the status (an error), or
    /// the stream ends with OK.
    Closing(Option<Status>),
    Done,
}

/// One bit per source a session polls.
const CANCEL: u8 = 1;
const INBOUND: u8 = 2;
const APPENDED: u8 = 4;
const TICK: u8 = 8;

/// Per-source wakers of a session: each records that its source fired,
/// then wakes the stream's task, so that a wake-up polls only the sources
/// that have something (a frame's wake-up does not poll the inbound
/// stream, an ack's does not look at the watch or the timer).
struct SourceWakers {
    flags: Arc<Flags>,
    wakers: [Waker; 4],
}

/// What fired since the session last looked, and the task to wake.
struct Flags {
    fired: AtomicU8,
    task: AtomicWaker,
}

struct SourceWaker {
    flags: Arc<Flags>,
    bit: u8,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flags.fired.fetch_or(self.bit, Ordering::AcqRel);
        self.flags.task.wake();
    }
}

impl SourceWakers {
    fn new() -> Self {
        let flags = Arc::new(Flags {
            // Every source is polled once at the start.
            fired: AtomicU8::new(CANCEL | INBOUND | APPENDED | TICK),
            task: AtomicWaker::new(),
        });
        let waker = |bit| {
            Waker::from(Arc::new(SourceWaker {
                flags: flags.clone(),
                bit,
            }))
        };
        let wakers = [waker(CANCEL), waker(INBOUND), waker(APPENDED), waker(TICK)];
        Self { flags, wakers }
    }

    /// Registers the task to wake and takes the sources that fired. The
    /// task is registered first, so a source that fires after the take
    /// wakes it again.
    fn fired(&self, cx: &Context<'_>) -> u8 {
        self.flags.task.register(cx.waker());
        self.flags.fired.swap(0, Ordering::AcqRel)
    }

    /// The waker to poll one source with.
    fn waker(&self, bit: u8) -> &Waker {
        &self.wakers[bit.trailing_zeros() as usize]
    }
}

/// Accepts a hello: validates it, works out where the stream resumes (SPEC
/// §3.2.3), registers the node and queues the welcome (and reset, if any).
/// Returns the session, which is the stream to hand to tonic.
pub fn open(
    hub: Arc<Hub>,
    hello: pb::Hello,
    peer: String,
    inbound: tonic::Streaming<wire::Request>,
) -> Result<Session, HubError> {
    let filter = validate::hello_filter(&hello)?;
    let shards = hub.shard_count();
    if hello.shard_count != 0 && hello.shard_count != shards {
        return Err(HubError::FailedPrecondition(format!(
            "shard count mismatch: the subscriber has {}, this hub has {shards}",
            hello.shard_count
        )));
    }
    let max_in_flight = match hello.max_in_flight {
        0 => hub.config.max_in_flight,
        n => n.min(hub.config.max_in_flight.saturating_mul(8)),
    };

    let mut sent = hub.heads();
    let mut reset: Option<(Vec<u32>, bool, pb::ResetReason)> = None;
    let mut resumed = false;
    if let Some(c) = &hello.resume {
        // Another epoch is reset whatever its shape (SPEC §3.2.3); only a
        // cursor of this epoch must match the hub's shards.
        if c.epoch == hub.epoch {
            let cursor = Cursor::from_wire(c, shards)
                .map_err(|e| HubError::InvalidArgument(format!("field `resume`: {e}")))?;
            resumed = true;
            let mut expired = Vec::new();
            for (s, log) in hub.logs.iter().enumerate() {
                let log = log.read();
                let at = cursor.seqs[s];
                if at > log.head() {
                    return Err(HubError::InvalidArgument(format!(
                        "field `resume`: shard {s} is at seq {at}, beyond the hub's head {}",
                        log.head()
                    )));
                }
                // Retained on disk counts: the session replays from there.
                if at + 1 < hub.retained_first(s) {
                    expired.push(s as u32);
                    sent[s] = log.head();
                } else {
                    sent[s] = at;
                }
            }
            if !expired.is_empty() {
                reset = Some((expired, false, pb::ResetReason::CursorExpired));
            }
        } else {
            reset = Some((Vec::new(), true, pb::ResetReason::EpochChanged));
        }
    }

    let shared = hub.register(
        hello.node_id.clone(),
        filter,
        hello.replication,
        hello.region.clone(),
        peer,
        sent.clone(),
        max_in_flight,
    )?;
    tracing::info!(
        node_id = %shared.node_id,
        namespaces = ?shared.filter,
        resumed,
        reset = ?reset.as_ref().map(|r| r.2),
        max_in_flight,
        "node subscribed"
    );

    let welcome = pb::SubscribeResponse {
        kind: Some(RespKind::Welcome(pb::Welcome {
            hub_id: hub.config.hub_id.clone(),
            region: hub.config.region.clone(),
            epoch: hub.epoch,
            shard_count: shards,
            hash: freshness::HASH_NAME.into(),
            resumed,
            progress_interval_ms: u32::try_from(hub.config.progress_interval.as_millis())
                .unwrap_or(u32::MAX),
            max_in_flight,
            cursor: Some(pb::Cursor {
                epoch: hub.epoch,
                seqs: sent.clone(),
            }),
            acks_on_request: true,
        })),
    };
    let mut pending = VecDeque::with_capacity(PENDING_FRAMES);
    pending.push_back(Frame::from_message(&welcome));
    let mut tick = tokio::time::interval(hub.config.progress_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut session = Session {
        frame_limit: MAX_FRAME_BYTES.min(hub.config.max_message_bytes / 2),
        flow: FlowState::new(sent.clone(), max_in_flight),
        appended: WatchStream::from_changes(hub.appended.subscribe()),
        cancelled: Box::pin(shared.cancel.clone().cancelled_owned()),
        wakers: SourceWakers::new(),
        tick,
        pending,
        state: State::Open,
        hub,
        shared,
        inbound,
        sent,
        unacked: VecDeque::new(),
        resets: Vec::new(),
        caught_up: false,
        scan_from: 0,
        gaps_pending: false,
        builder: BatchBuilder::new(),
        last_watermark: Instant::now(),
        tally: crate::metrics::SessionTally::default(),
    };
    if let Some((shards, all, reason)) = reset {
        let frame = session.reset_frame(shards, all, reason);
        session.pending.push_back(frame);
    }
    Ok(session)
}

impl Stream for Session {
    type Item = Result<Frame, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let State::Open = this.state {
            if let Err(end) = this.poll_sources(cx) {
                this.close(end);
            } else {
                if let Some(frame) = this.pending.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if !this.caught_up
                    && !this.flow.parked()
                    && let Fill::Frame(frame) = this.fill()
                {
                    return Poll::Ready(Some(Ok(frame)));
                }
                return Poll::Pending;
            }
        }
        if let Some(frame) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match std::mem::replace(&mut this.state, State::Done) {
            State::Closing(Some(status)) => Poll::Ready(Some(Err(status))),
            _ => Poll::Ready(None),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.tally.flush(&self.hub.stats);
        if let State::Open = self.state {
            tracing::info!(node_id = %self.shared.node_id, "stream ended: the node went away");
        }
        self.hub.unregister(&self.shared);
    }
}

impl Session {
    /// Handles every source that woke the stream since it last looked:
    /// cancellation, every ack already received, appends, the progress
    /// tick. Each is polled until it is pending, which registers its
    /// [`SourceWakers`] waker for the next wake-up; a source that did not
    /// fire is not polled at all (the inbound stream alone goes through
    /// eight layers of HTTP bodies and locks the connection's stream store).
    /// `Err` ends the stream: `Ok(())` with OK, else the status.
    fn poll_sources(&mut self, cx: &mut Context<'_>) -> Result<(), Result<(), Status>> {
        let fired = self.wakers.fired(cx);
        if fired & CANCEL != 0
            && self
                .cancelled
                .as_mut()
                .poll(&mut Context::from_waker(self.wakers.waker(CANCEL)))
                .is_ready()
        {
            return Err(Ok(()));
        }
        if fired & INBOUND != 0 {
            let waker = self.wakers.waker(INBOUND).clone();
            let mut cx = Context::from_waker(&waker);
            loop {
                match self.inbound.poll_next_unpin(&mut cx) {
                    Poll::Ready(Some(Ok(wire::Request(req)))) => {
                        self.on_request(req).map_err(Err)?;
                    }
                    Poll::Ready(Some(Err(s))) => return Err(Err(map_decode_status(s))),
                    Poll::Ready(None) => return Err(Ok(())),
                    Poll::Pending => break,
                }
            }
        }
        if fired & APPENDED != 0 {
            let waker = self.wakers.waker(APPENDED).clone();
            let mut cx = Context::from_waker(&waker);
            while let Poll::Ready(changed) = self.appended.poll_next_unpin(&mut cx) {
                if changed.is_none() {
                    return Err(Ok(()));
                }
                self.caught_up = false;
                if self.flow.parked() {
                    self.reset_gaps_now();
                }
            }
        }
        if fired & TICK != 0 {
            let waker = self.wakers.waker(TICK).clone();
            let mut cx = Context::from_waker(&waker);
            while self.tick.poll_tick(&mut cx).is_ready() {
                self.on_tick();
            }
        }
        Ok(())
    }

    /// Starts ending the stream: a goodbye first when the hub ended it.
    fn close(&mut self, end: Result<(), Status>) {
        self.tally.flush(&self.hub.stats);
        if self.shared.cancel.is_cancelled() {
            let replaced = *self.shared.end_reason.lock() == Some(EndReason::Replaced);
            let (reason, message) = if replaced {
                (
                    pb::GoodbyeReason::Replaced,
                    "a newer stream with the same node_id took over",
                )
            } else {
                (pb::GoodbyeReason::Shutdown, "hub is shutting down")
            };
            self.pending
                .push_back(Frame::from_message(&pb::SubscribeResponse {
                    kind: Some(RespKind::Goodbye(pb::Goodbye {
                        reason: reason as i32,
                        message: message.into(),
                    })),
                }));
        }
        match &end {
            Ok(()) => tracing::info!(node_id = %self.shared.node_id, "stream ended"),
            Err(s) => {
                tracing::warn!(node_id = %self.shared.node_id, code = ?s.code(), error = %s.message(), "stream closed")
            }
        }
        self.state = State::Closing(end.err());
    }

    fn on_request(&mut self, req: pb::SubscribeRequest) -> Result<(), Status> {
        match req.kind {
            Some(ReqKind::Ack(ack)) => self.on_ack(ack),
            Some(ReqKind::Hello(_)) => Err(Status::failed_precondition(
                "a second hello on the same stream; open a new stream instead",
            )),
            None => Err(Status::invalid_argument(
                "empty subscribe request (neither hello nor ack)",
            )),
        }
    }

    fn on_ack(&mut self, ack: pb::Ack) -> Result<(), Status> {
        let c = ack
            .cursor
            .ok_or_else(|| Status::invalid_argument("ack without a cursor"))?;
        if c.epoch != self.hub.epoch {
            return Err(Status::invalid_argument(format!(
                "ack for epoch {}, this stream is in epoch {}",
                c.epoch, self.hub.epoch
            )));
        }
        if c.seqs.len() != self.sent.len() {
            return Err(Status::invalid_argument(format!(
                "ack cursor has {} shards, the hub has {}",
                c.seqs.len(),
                self.sent.len()
            )));
        }
        if let Some((s, (a, sent))) = c
            .seqs
            .iter()
            .zip(&self.sent)
            .enumerate()
            .find(|(_, (a, sent))| a > sent)
        {
            return Err(Status::invalid_argument(format!(
                "ack beyond what was sent: shard {s} acked seq {a}, only {sent} was sent"
            )));
        }
        let mut advanced = false;
        if let Some(applied) = ack.applied {
            if !self.shared.replication
                || applied.epoch != self.hub.epoch
                || applied.seqs.len() != self.sent.len()
                || applied.seqs.iter().zip(&self.sent).any(|(a, s)| a > s)
            {
                return Err(Status::invalid_argument(
                    "`applied` is for replicating hubs, in this stream's epoch, within what was sent",
                ));
            }
            let mut mine = self.shared.applied.lock();
            for (m, a) in mine.iter_mut().zip(&applied.seqs) {
                if a > m {
                    *m = *a;
                    advanced = true;
                }
            }
        }
        advanced |= c.seqs.iter().zip(self.flow.acked()).any(|(t, m)| t > m);
        // Frees exactly the events the cursor covers, shard by shard.
        self.flow.on_ack(&c.seqs);
        let acked = self.flow.acked();
        self.resets.retain(|(s, at)| acked[*s as usize] < *at);
        let mut watermark = 0;
        let now = self.hub.clock.now_us();
        while let Some(front) = self.unacked.front() {
            if !front
                .positions
                .iter()
                .all(|(s, q)| acked[*s as usize] >= *q)
            {
                break;
            }
            self.tally
                .acked(front.count, now.saturating_sub(front.oldest_publish_us));
            watermark = watermark.max(front.watermark_us);
            self.unacked.pop_front();
        }
        self.publish_flow();
        if watermark != 0 {
            self.shared
                .acked_watermark_us
                .fetch_max(watermark, Ordering::Relaxed);
        }
        if advanced {
            self.shared.acked.lock().clone_from_slice(self.flow.acked());
            self.hub.acks_changed();
        }
        Ok(())
    }

    fn wants(&self, e: &LogEntry) -> bool {
        !e.gap && (!self.shared.replication || e.local) && self.shared.wants(e.entity.namespace())
    }

    /// Shards whose unsent entries the log (in memory or on disk) no
    /// longer holds.
    fn gaps(&self) -> Vec<u32> {
        self.sent
            .iter()
            .enumerate()
            // Memory first: the disk is only asked about shards that left it.
            .filter(|(s, sent)| {
                **sent + 1 < self.hub.logs[*s].first_seq()
                    && **sent + 1 < self.hub.retained_first(*s)
            })
            .map(|(s, _)| s as u32)
            .collect()
    }

    /// A frame replayed from the durable log for the first shard whose
    /// cursor is older than the in-memory tail but still on disk (one shard
    /// per frame; the next fill takes the next part). `None` when no shard
    /// is there, or what was read held nothing for this node.
    ///
    /// The read is a synchronous file read on this stream's task: segments
    /// are small and usually in the page cache, and only nodes that fell
    /// that far behind take this path.
    fn fill_from_disk(&mut self, budget: u32) -> Option<Frame> {
        /// Segment reads one fill may make for a node whose filter skips
        /// what it reads; the progress tick's fill goes on from there.
        const MAX_READS: usize = 16;
        if self.hub.disk.is_empty() {
            return None;
        }
        let n = self.sent.len();
        let mut reads = 0;
        let mut s = 0;
        while s < n && reads < MAX_READS {
            let mem_first = self.hub.logs[s].first_seq();
            if self.sent[s] + 1 >= mem_first || self.sent[s] + 1 < self.hub.disk[s].first_seq() {
                s += 1;
                continue;
            }
            reads += 1;
            let read =
                self.hub.disk[s].read(self.sent[s], mem_first, budget as usize, self.frame_limit);
            let entries = match read {
                Ok(Some(entries)) if !entries.is_empty() => entries,
                // Retention dropped the segment meanwhile: the main fill
                // resets the shard.
                Ok(_) => {
                    s += 1;
                    continue;
                }
                Err(e) => {
                    tracing::error!(node_id = %self.shared.node_id, shard = s, error = %e, "cannot replay from the durable log; the shard is reset");
                    let at = mem_first - 1;
                    return Some(self.reset_to(
                        vec![s as u32],
                        false,
                        pb::ResetReason::CursorExpired,
                        vec![(s as u32, at)],
                    ));
                }
            };
            let mut count = 0u32;
            let mut oldest = u64::MAX;
            let mut last = None;
            for (seq, e) in &entries {
                if e.gap && !self.shared.replication {
                    if count == 0 {
                        return Some(self.reset_to(
                            vec![s as u32],
                            false,
                            pb::ResetReason::ReplicationGap,
                            vec![(s as u32, *seq)],
                        ));
                    }
                    break;
                }
                if self.wants(e) {
                    if count == budget
                        || (count > 0
                            && self.builder.encoded_len() + e.bytes.len() > self.frame_limit)
                    {
                        break;
                    }
                    self.builder.push(&e.bytes);
                    self.flow.on_send(s, *seq);
                    oldest = oldest.min(e.publish_time_us);
                    count += 1;
                    last = Some(*seq);
                }
                self.sent[s] = *seq;
            }
            if count == 0 {
                // Nothing in this part for this node's filter: read on.
                continue;
            }
            let prompt_above = (self.shared.max_in_flight / PROMPT_ACK_SHARE).max(1);
            let ack_requested = self.flow.in_flight() >= prompt_above;
            self.track(Sent {
                positions: last.map(|seq| (s as u32, seq)).into_iter().collect(),
                count,
                watermark_us: 0,
                oldest_publish_us: oldest,
            });
            self.publish_flow();
            self.tally.frame(count);
            self.caught_up = false;
            return Some(self.builder.finish(0, ack_requested));
        }
        None
    }

    /// Moves the given shards to their head and builds the reset for them.
    fn reset_frame(&mut self, shards: Vec<u32>, all: bool, reason: pb::ResetReason) -> Frame {
        let covered: Vec<u32> = if all {
            (0..self.sent.len() as u32).collect()
        } else {
            shards.clone()
        };
        let positions = covered
            .into_iter()
            .map(|s| (s, self.hub.logs[s as usize].head()))
            .collect();
        self.reset_to(shards, all, reason, positions)
    }

    /// Builds a reset that moves each covered shard to the given seq.
    fn reset_to(
        &mut self,
        shards: Vec<u32>,
        all: bool,
        reason: pb::ResetReason,
        mut positions: Vec<(u32, u64)>,
    ) -> Frame {
        for (s, at) in &mut positions {
            let sent = &mut self.sent[*s as usize];
            *sent = (*sent).max(*at);
            *at = *sent;
        }
        for &(s, at) in &positions {
            match self.resets.iter_mut().find(|(rs, _)| *rs == s) {
                Some(r) => r.1 = r.1.max(at),
                None => self.resets.push((s, at)),
            }
        }
        tracing::info!(node_id = %self.shared.node_id, ?reason, shards = ?shards, all, "reset");
        crate::metrics::record_reset(reason.as_str_name());
        self.hub.stats.reset(reason);
        self.track(Sent {
            positions,
            count: 0,
            watermark_us: 0,
            oldest_publish_us: 0,
        });
        self.publish_flow();
        Frame::from_message(&pb::SubscribeResponse {
            kind: Some(RespKind::Reset(pb::Reset {
                shards,
                all,
                reason: reason as i32,
                cursor: Some(self.sent_cursor()),
            })),
        })
    }

    fn sent_cursor(&self) -> pb::Cursor {
        pb::Cursor {
            epoch: self.hub.epoch,
            seqs: self.sent.clone(),
        }
    }

    /// Shows the flow state to status: events in flight, parked,
    /// resetting.
    fn publish_flow(&self) {
        let shared = &self.shared;
        shared
            .in_flight
            .store(self.flow.in_flight(), Ordering::Relaxed);
        shared.parked.store(self.flow.parked(), Ordering::Relaxed);
        shared
            .resetting
            .store(!self.resets.is_empty(), Ordering::Relaxed);
        shared.refresh_state(self.hub.clock.now_us());
    }

    /// The transport found the stream without send capacity (`true`: the
    /// node does not read, so it is not polled) or with room again.
    pub fn set_blocked(&self, blocked: bool) {
        self.shared.blocked.store(blocked, Ordering::Relaxed);
        self.shared.refresh_state(self.hub.clock.now_us());
    }

    /// Remembers a frame sent; progress and resets (count 0) at the back
    /// are merged, so a node that never acks costs a bounded queue (frames
    /// with events are at most its in-flight limit: each holds one unacked
    /// event at least).
    fn track(&mut self, sent: Sent) {
        if sent.count == 0
            && let Some(back) = self.unacked.back_mut().filter(|b| b.count == 0)
        {
            for (s, q) in sent.positions {
                match back.positions.iter_mut().find(|(bs, _)| *bs == s) {
                    Some(p) => p.1 = p.1.max(q),
                    None => back.positions.push((s, q)),
                }
            }
            back.watermark_us = back.watermark_us.max(sent.watermark_us);
            return;
        }
        self.unacked.push_back(sent);
    }

    /// While parked, resets are still sent as soon as the log leaves the
    /// node behind (the stream is being polled, so it has room).
    fn reset_gaps_now(&mut self) {
        if !self.pending.is_empty() {
            return;
        }
        let gaps = self.gaps();
        if !gaps.is_empty() {
            let frame = self.reset_frame(gaps, false, pb::ResetReason::SlowConsumer);
            self.pending.push_back(frame);
        }
    }

    fn on_tick(&mut self) {
        self.tally.flush(&self.hub.stats);
        if self.flow.parked() || !self.pending.is_empty() {
            return;
        }
        match self.fill() {
            Fill::Frame(frame) => self.pending.push_back(frame),
            Fill::Idle(watermark_us) => {
                if self.last_watermark.elapsed() * 2 < self.hub.config.progress_interval {
                    return;
                }
                let positions = self
                    .sent
                    .iter()
                    .zip(self.flow.acked())
                    .enumerate()
                    .filter(|(_, (s, a))| s > a)
                    .map(|(i, (s, _))| (i as u32, *s))
                    .collect();
                self.track(Sent {
                    positions,
                    count: 0,
                    watermark_us,
                    oldest_publish_us: 0,
                });
                self.last_watermark = Instant::now();
                let progress = Frame::from_message(&pb::SubscribeResponse {
                    kind: Some(RespKind::Progress(pb::Progress {
                        cursor: Some(self.sent_cursor()),
                        watermark_us,
                    })),
                });
                self.pending.push_back(progress);
            }
            Fill::Blocked => {}
        }
    }

    /// One look at the logs: a reset if the log left the node behind, else
    /// one frame of what the node's filter wants, up to its in-flight budget.
    fn fill(&mut self) -> Fill {
        let budget = self.flow.budget();
        if budget == 0 || std::mem::take(&mut self.gaps_pending) {
            let gaps = self.gaps();
            if !gaps.is_empty() {
                return Fill::Frame(self.reset_frame(gaps, false, pb::ResetReason::SlowConsumer));
            }
            if budget == 0 {
                self.publish_flow();
                return Fill::Blocked;
            }
        }
        if let Some(frame) = self.fill_from_disk(budget) {
            return Fill::Frame(frame);
        }
        let t = self.hub.clock.now_us();
        let n = self.sent.len();
        let mut count = 0u32;
        let mut awaited = false;
        let mut oldest = u64::MAX;
        let mut positions = Vec::new();
        // Shards whose sent range may hold traced appends: (shard, after, upto).
        let mut traced: Vec<(usize, u64, u64)> = Vec::new();
        // Shards the log left behind. Only a shard with unsent entries can
        // have one (its first retained seq is at most its head + 1), so the
        // scan for events finds them too.
        let mut gaps: Vec<u32> = Vec::new();
        let mut complete = true;
        let from = self.scan_from;
        for s in (from..n).chain(0..from) {
            let shared_log = &self.hub.logs[s];
            if shared_log.head() <= self.sent[s] {
                continue;
            }
            let log = shared_log.read();
            if self.sent[s] + 1 < log.first_seq() {
                // Still on disk: the next fill replays it from there.
                // Otherwise the reset goes before any event of this fill,
                // or in the next one.
                if self.sent[s] + 1 < self.hub.retained_first(s) {
                    gaps.push(s as u32);
                }
                complete = false;
                continue;
            }
            let mut last = None;
            let mut gap_at = None;
            let from = self.sent[s];
            for (seq, e) in log.after(from) {
                if e.gap && !self.shared.replication {
                    // A replication gap: everything before it goes out first,
                    // then the reset, as its own frame.
                    if count == 0 {
                        gap_at = Some(seq);
                    } else {
                        complete = false;
                    }
                    break;
                }
                if self.wants(e) {
                    let full = count == budget
                        || (count > 0
                            && self.builder.encoded_len() + e.bytes.len() > self.frame_limit);
                    if full {
                        complete = false;
                        break;
                    }
                    self.builder.push(&e.bytes);
                    self.flow.on_send(s, seq);
                    awaited |= e.awaited;
                    oldest = oldest.min(e.publish_time_us);
                    count += 1;
                    last = Some(seq);
                }
                self.sent[s] = seq;
            }
            if let Some(seq) = last {
                positions.push((s as u32, seq));
                if self.hub.shards[s].traces().any_after(from) {
                    traced.push((s, from, seq));
                }
            }
            if let Some(seq) = gap_at {
                drop(log);
                return Fill::Frame(self.reset_to(
                    vec![s as u32],
                    false,
                    pb::ResetReason::ReplicationGap,
                    vec![(s as u32, seq)],
                ));
            }
            if !complete {
                // Start here next time, so no shard starves.
                self.scan_from = s;
                break;
            }
        }
        if !gaps.is_empty() {
            if count == 0 {
                return Fill::Frame(self.reset_frame(gaps, false, pb::ResetReason::SlowConsumer));
            }
            // Events go first; the reset is the next fill's first frame.
            self.gaps_pending = true;
        }
        if complete {
            self.caught_up = true;
        }
        if count == 0 {
            return if complete {
                Fill::Idle(self.hub.watermark_now())
            } else {
                Fill::Blocked
            };
        }
        let watermark_us = if complete {
            self.hub.watermark_now()
        } else {
            0
        };
        if complete {
            self.last_watermark = Instant::now();
        }
        // From a quarter of the node's budget in flight on, every batch asks
        // for a prompt ack, so that lazy acks never park a node that keeps up.
        let prompt_above = (self.shared.max_in_flight / PROMPT_ACK_SHARE).max(1);
        let ack_requested = awaited || self.flow.in_flight() >= prompt_above;
        self.track(Sent {
            positions,
            count,
            watermark_us,
            oldest_publish_us: oldest,
        });
        self.publish_flow();
        self.tally.frame(count);
        let frame = self.builder.finish(watermark_us, ack_requested);
        if !traced.is_empty() {
            self.record_fanout(&traced, count, frame.len(), t.saturating_sub(oldest));
        }
        Fill::Frame(frame)
    }

    /// Records the `session.fanout` span of a frame that holds events of
    /// traced appends: parented on the first append's span, linked to the
    /// others.
    fn record_fanout(&self, traced: &[(usize, u64, u64)], events: u32, bytes: usize, age_us: u64) {
        let span = tracing::info_span!(
            parent: None,
            "session.fanout",
            otel.kind = "producer",
            region = %self.hub.region,
            node_id = %self.shared.node_id,
            replication = self.shared.replication,
            events = i64::from(events),
            bytes = num(bytes),
            oldest_event_age_us = num(age_us),
        );
        let mut adopt = Adopt::new(&span);
        for &(s, after, upto) in traced {
            let mut more = true;
            self.hub.shards[s].traces().overlapping(after, upto, |sc| {
                more = adopt.context(sc);
                more
            });
            if !more {
                break;
            }
        }
    }
}
