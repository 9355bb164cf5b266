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
//!
//! Here: the session as its stream's body (polling, closing, the frames
//! in flight and their resets). `open.rs` opens it (hello, resume);
//! `acks.rs` takes what the node sends; `fill.rs` looks at the logs for
//! the next frame; `wakers.rs` holds the per-source wakers; the pure
//! in-flight arithmetic is `crate::flow`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use freshness::pb;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::wire::{self, BatchBuilder, Frame};
use futures::{Stream, StreamExt};
use tokio::time::{Instant, Interval};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;

use crate::error::{HubError, map_decode_status};
use crate::flow::FlowState;
use crate::hub::{EndReason, Hub, SessionShared};

mod acks;
mod fill;
mod open;
mod wakers;

pub use open::open;
use wakers::{APPENDED, CANCEL, INBOUND, SourceWakers, TICK};

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
/// The session is the body of the `Subscribe` response
/// (`transport::SessionBody` hands its messages to hyper as they are): the
/// HTTP/2 stream's own task polls it when the stream has send capacity, so
/// there is no session task and no queue between a session and its stream.
/// Every poll handles what is ready first (cancellation, the acks already
/// received, appends, the progress tick), then hands out at most one
/// message. A stream without room is not polled: it sends nothing, its
/// watermark stops, so its node sees its staleness grow, and status shows it
/// `blocked`. When hyper drops the stream (the node went away or reset it)
/// the session unregisters in `Drop`.
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
    /// The shards a fill visits, reused from fill to fill (see `fill`).
    to_visit: Vec<usize>,
    /// A fill found shards the log left behind but sent events first: the
    /// next fill starts with their reset.
    gaps_pending: bool,
    /// Some shard's unsent entries may have left the in-memory log (a
    /// cursor resumed from, or a node the log outran): the next fill looks
    /// on disk first. Set at opening and by a fill that meets such a
    /// shard; cleared by a look on disk that finds none, so a node that
    /// keeps up does not look at every shard's disk bounds on every fill.
    behind_memory: bool,
    builder: BatchBuilder,
    frame_limit: usize,
    last_watermark: Instant,
    tally: crate::metrics::SessionTally,
    /// A message was handed out and the stream has not asked for the next
    /// one since (`SessionShared::unpolled_since_us`).
    handed_out: bool,
    /// The caller's rights, rechecked at each tick when the auth files
    /// were reloaded (`None`: a hub without authentication).
    access: Option<Box<crate::auth::Access>>,
}

/// Where a session's stream is.
enum State {
    Open,
    /// Ending: the pending frames go out, then the status (an error), or
    /// the stream ends with OK.
    Closing(Option<Status>),
    Done,
}

impl Stream for Session {
    type Item = Result<Frame, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Asked again: what was handed out last has gone to HTTP/2.
        if this.handed_out {
            this.handed_out = false;
            this.shared.unpolled_since_us.store(0, Ordering::Relaxed);
        }
        let item = this.poll_message(cx);
        if let Poll::Ready(Some(_)) = item {
            this.handed_out = true;
            this.shared
                .unpolled_since_us
                .store(this.hub.clock.now_us().max(1), Ordering::Relaxed);
        }
        item
    }
}

impl Session {
    /// Keeps the caller's rights: the stream ends with `PERMISSION_DENIED`
    /// at the first tick after a reload that took them away.
    pub fn set_access(&mut self, access: crate::auth::Access) {
        self.access = Some(Box::new(access));
    }

    /// The next message: what is pending, else one fill; then the status.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, Status>>> {
        let this = self;
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
                        self.on_request(req)
                            .map_err(|e| Err(Status::from(HubError::from(e))))?;
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
            if let Some(access) = &mut self.access {
                access.recheck().map_err(Err)?;
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

    /// Moves the given shards to their head and builds the reset for them.
    fn reset_frame(&mut self, shards: Vec<u32>, all: bool, reason: pb::ResetReason) -> Frame {
        let covered: Vec<u32> = if all {
            (0..self.sent.len() as u32).collect()
        } else {
            shards.clone()
        };
        let positions = covered
            .into_iter()
            .map(|s| (s, self.hub.logs.head(s as usize)))
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
}
