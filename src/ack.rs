//! When a node acks: the delayed-ack rule and acks on request.
//!
//! Acks are cumulative cursors (SPEC §3.2.4), so one ack can cover many
//! messages; each one costs the hub a read, a decode and a wake-up. A node
//! therefore paces them:
//!
//! - **Delayed acks.** After a quiet spell an ack goes out as soon as the
//!   message is applied; under a steady stream at most one ack per
//!   `interval` covers everything applied since.
//! - **Acks on request.** A hub whose welcome says `acks_on_request` marks
//!   the batches it needs acked promptly (`EventBatch.ack_requested`: a
//!   `REGION` or `GLOBAL` publish waits on one of their events, or the
//!   node's in-flight budget is filling up). Every other batch may wait up
//!   to `lazy_interval`; a later message that is to be acked promptly brings
//!   the pending ack forward. Progress, resets and every message from a hub
//!   that does not ack on request are acked promptly.
//!
//! [`AckPacer`] is that rule, shared by the client library and the
//! benchmark's nodes. It is generic over the instant type (this crate has no
//! clock): the callers use tokio's, the tests count from zero.

use std::ops::Add;
use std::time::Duration;

use crate::pb;

/// Decides when a node's next ack goes out, for one stream.
#[derive(Debug, Clone)]
pub struct AckPacer<Instant> {
    interval: Duration,
    lazy_interval: Duration,
    on_request: bool,
    last: Option<Instant>,
    due: Option<Instant>,
}

impl<Instant> AckPacer<Instant>
where
    Instant: Copy + Ord + Add<Duration, Output = Instant>,
{
    /// A stream's pacer: least time between two acks, longest wait for a
    /// batch nobody waits on, and whether the hub's welcome said it acks on
    /// request.
    pub fn new(interval: Duration, lazy_interval: Duration, acks_on_request: bool) -> Self {
        Self {
            interval,
            lazy_interval,
            on_request: acks_on_request,
            last: None,
            due: None,
        }
    }

    /// Whether this message's ack may wait up to the lazy interval: an event
    /// batch the hub did not ask to have acked at once.
    pub fn may_wait(&self, msg: &pb::SubscribeResponse) -> bool {
        use pb::subscribe_response::Kind;
        self.on_request && matches!(&msg.kind, Some(Kind::Events(b)) if !b.ack_requested)
    }

    /// Something new was applied at `now`; `may_wait` as [`AckPacer::may_wait`]
    /// said of its message. True when the ack is to go out now (the caller
    /// sends it; the pacer counts it as sent), else it is due at
    /// [`AckPacer::due`].
    pub fn owe(&mut self, now: Instant, may_wait: bool) -> bool {
        let prompt = self.last.map_or(now, |t| (t + self.interval).max(now));
        let at = if may_wait {
            prompt.max(now + self.lazy_interval)
        } else {
            prompt
        };
        let at = self.due.map_or(at, |d| d.min(at));
        if at <= now {
            self.sent(now);
            true
        } else {
            self.due = Some(at);
            false
        }
    }

    /// When the ack owed is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The ack owed went out at `now` (its [`AckPacer::due`] time came).
    pub fn sent(&mut self, now: Instant) {
        self.last = Some(now);
        self.due = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    /// Instants as time since the test began.
    const T0: Duration = Duration::ZERO;

    fn batch(ack_requested: bool) -> pb::SubscribeResponse {
        pb::SubscribeResponse {
            kind: Some(pb::subscribe_response::Kind::Events(pb::EventBatch {
                ack_requested,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn acks_at_once_after_a_quiet_spell_then_at_most_once_per_interval() {
        let t0 = T0;
        let mut p = AckPacer::new(2 * MS, 50 * MS, false);
        assert!(p.owe(t0, false));
        assert!(!p.owe(t0 + MS, false));
        assert_eq!(p.due(), Some(t0 + 2 * MS));
        // A second message before it is due does not move it.
        assert!(!p.owe(t0 + MS, false));
        assert_eq!(p.due(), Some(t0 + 2 * MS));
        p.sent(t0 + 2 * MS);
        assert_eq!(p.due(), None);
        assert!(p.owe(t0 + 10 * MS, false));
    }

    #[test]
    fn only_unrequested_batches_of_a_hub_that_acks_on_request_may_wait() {
        let on = AckPacer::<Duration>::new(2 * MS, 50 * MS, true);
        let off = AckPacer::<Duration>::new(2 * MS, 50 * MS, false);
        assert!(on.may_wait(&batch(false)));
        assert!(!on.may_wait(&batch(true)));
        assert!(!off.may_wait(&batch(false)));
        let progress = pb::SubscribeResponse {
            kind: Some(pb::subscribe_response::Kind::Progress(
                pb::Progress::default(),
            )),
        };
        assert!(!on.may_wait(&progress));
    }

    #[test]
    fn a_lazy_ack_waits_until_a_prompt_one_brings_it_forward() {
        let t0 = T0;
        let mut p = AckPacer::new(2 * MS, 50 * MS, true);
        assert!(!p.owe(t0, true));
        assert_eq!(p.due(), Some(t0 + 50 * MS));
        // More lazy batches keep the first deadline.
        assert!(!p.owe(t0 + 10 * MS, true));
        assert_eq!(p.due(), Some(t0 + 50 * MS));
        // A requested one goes out at once (no ack for over the interval).
        assert!(p.owe(t0 + 20 * MS, false));
        assert_eq!(p.due(), None);
        // Right after an ack, a requested one waits out the interval only.
        assert!(!p.owe(t0 + 21 * MS, true));
        assert!(!p.owe(t0 + 21 * MS, false));
        assert_eq!(p.due(), Some(t0 + 22 * MS));
    }

    #[test]
    fn a_zero_lazy_interval_acks_as_promptly_as_the_interval_allows() {
        let t0 = T0;
        let mut p = AckPacer::new(2 * MS, Duration::ZERO, true);
        assert!(p.owe(t0, true));
        assert!(!p.owe(t0 + MS, true));
        assert_eq!(p.due(), Some(t0 + 2 * MS));
    }
}
