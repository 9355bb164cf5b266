//! What a node sends on its open stream: acks, checked against what was
//! sent, which free its in-flight budget, credit watermarks and wake REGION
//! publishers; anything else ends the stream.

use std::sync::atomic::Ordering;

use freshness::pb;
use freshness::pb::subscribe_request::Kind as ReqKind;

use super::Session;
use crate::error::{HubError, InvalidMessage, ProtocolError};

/// Why a message on an open stream ends it.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl From<StreamError> for HubError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Invalid(e) => e.into(),
            StreamError::Protocol(e) => e.into(),
        }
    }
}

impl Session {
    pub(super) fn on_request(&mut self, req: pb::SubscribeRequest) -> Result<(), StreamError> {
        match req.kind {
            Some(ReqKind::Ack(ack)) => Ok(self.on_ack(ack)?),
            Some(ReqKind::Hello(_)) => Err(ProtocolError::SecondHello.into()),
            None => Err(InvalidMessage::Empty.into()),
        }
    }

    fn on_ack(&mut self, ack: pb::Ack) -> Result<(), InvalidMessage> {
        let c = ack.cursor.ok_or(InvalidMessage::AckWithoutCursor)?;
        if c.epoch != self.hub.epoch {
            return Err(InvalidMessage::AckEpoch {
                got: c.epoch,
                want: self.hub.epoch,
            });
        }
        if c.seqs.len() != self.sent.len() {
            return Err(InvalidMessage::AckShards {
                got: c.seqs.len(),
                want: self.sent.len(),
            });
        }
        if let Some((s, (a, sent))) = c
            .seqs
            .iter()
            .zip(&self.sent)
            .enumerate()
            .find(|(_, (a, sent))| a > sent)
        {
            return Err(InvalidMessage::AckBeyondSent {
                shard: s,
                acked: *a,
                sent: *sent,
            });
        }
        let mut advanced = false;
        if let Some(applied) = ack.applied {
            if !self.shared.replication
                || applied.epoch != self.hub.epoch
                || applied.seqs.len() != self.sent.len()
                || applied.seqs.iter().zip(&self.sent).any(|(a, s)| a > s)
            {
                return Err(InvalidMessage::Applied);
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
}
