//! Opening a session: the hello checked, where the stream resumes (SPEC
//! §3.2.3), the node registered, the welcome (and a reset, if any) queued.

use std::collections::VecDeque;
use std::sync::Arc;

use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::wire::{self, BatchBuilder, Frame};
use freshness::{Cursor, pb, validate};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::WatchStream;

use super::wakers::SourceWakers;
use super::{MAX_FRAME_BYTES, PENDING_FRAMES, Session, State};
use crate::error::{HubError, InvalidResume, ProtocolError};
use crate::flow::FlowState;
use crate::hub::Hub;

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
        return Err(ProtocolError::ShardCount {
            theirs: hello.shard_count,
            ours: shards,
        }
        .into());
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
            let cursor = Cursor::from_wire(c, shards).map_err(InvalidResume::from)?;
            resumed = true;
            let mut expired = Vec::new();
            for (s, log) in hub.logs.all_memory().enumerate() {
                let log = log.read();
                let at = cursor.seqs[s];
                if at > log.head() {
                    return Err(InvalidResume::BeyondHead {
                        shard: s,
                        at,
                        head: log.head(),
                    }
                    .into());
                }
                // Retained on disk counts: the session replays from there.
                if at + 1 < hub.logs.retained_first(s) {
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
        to_visit: Vec::new(),
        gaps_pending: false,
        behind_memory: true,
        builder: BatchBuilder::new(),
        last_watermark: Instant::now(),
        tally: crate::metrics::SessionTally::default(),
        handed_out: false,
        access: None,
    };
    if let Some((shards, all, reason)) = reset {
        let frame = session.reset_frame(shards, all, reason);
        session.pending.push_back(frame);
    }
    Ok(session)
}
