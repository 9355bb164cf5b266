//! The node's cursor as a pure state machine: what the node has applied, what
//! it may ack and persist, and which resets it still owes its cache.
//!
//! The rules (SPEC §3.2): after a batch, `cursor[shard] = max(cursor[shard],
//! seq)`; after progress, the elementwise max; after a reset,
//! `cursor[s] = reset.cursor[s]` for each covered shard. One more rule keeps
//! a crash from losing invalidations: the position the hub starts a stream
//! from (the welcome's cursor) is adopted only where it does not skip
//! anything the node has not applied. Where it does (another epoch, or
//! shards whose retained log no longer reaches the node's cursor), the node
//! keeps its old cursor for those shards until it has dropped what depends
//! on them: the hub announces that with a reset right after the welcome, and
//! if anything else arrives first the subscriber resets those shards itself.

use std::collections::BTreeSet;

use freshness::{Cursor, ShardId, pb};

use crate::event::{ResetReason, ResetScope};

/// Resets the node owes its cache since the welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    None,
    /// These shards start past the node's cursor.
    Shards(BTreeSet<ShardId>),
    /// Another log (or another shard count): everything goes.
    All {
        reason: ResetReason,
    },
}

/// The hub broke the protocol; the session ends and reconnects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PositionError {
    #[error("welcome carries no usable cursor: {0}")]
    Welcome(String),
    #[error("{0} carries a cursor of {1} shards, the hub has {2}")]
    Shards(&'static str, usize, u32),
    #[error("{0} before the welcome")]
    BeforeWelcome(&'static str),
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Position {
    /// Everything at or below is applied: safe to persist and resume from.
    applied: Option<Cursor>,
    /// The current stream's welcome cursor (its epoch is the stream's).
    start: Option<Cursor>,
    pending: Pending,
}

impl Position {
    pub(crate) fn new(saved: Option<Cursor>) -> Self {
        Self {
            applied: saved,
            start: None,
            pending: Pending::None,
        }
    }

    /// Where to resume the next stream from.
    pub(crate) fn resume(&self) -> Option<&Cursor> {
        self.applied.as_ref()
    }

    /// Forgets the cursor (the hub refused it).
    pub(crate) fn forget(&mut self) {
        *self = Self::new(None);
    }

    /// The stream's shard count, once welcomed.
    pub(crate) fn shard_count(&self) -> u32 {
        self.start
            .as_ref()
            .map_or(0, |c| u32::try_from(c.seqs.len()).unwrap_or(u32::MAX))
    }

    /// Adopts the welcome of a new stream. Returns true when the applied
    /// cursor changed (a node that had none adopts the hub's head and should
    /// persist it at once).
    pub(crate) fn on_welcome(&mut self, welcome: &pb::Welcome) -> Result<bool, PositionError> {
        let start = welcome
            .cursor
            .as_ref()
            .ok_or_else(|| PositionError::Welcome("missing".into()))
            .and_then(|c| {
                Cursor::from_wire(c, welcome.shard_count)
                    .map_err(|e| PositionError::Welcome(e.to_string()))
            })?;
        if start.epoch != welcome.epoch {
            return Err(PositionError::Welcome(format!(
                "cursor epoch {} but welcome epoch {}",
                start.epoch, welcome.epoch
            )));
        }
        self.pending = Pending::None;
        let changed = match &mut self.applied {
            None => {
                self.applied = Some(start.clone());
                true
            }
            Some(old) if old.epoch == start.epoch && old.seqs.len() == start.seqs.len() => {
                let mut ahead = BTreeSet::new();
                for (i, (mine, theirs)) in old.seqs.iter_mut().zip(&start.seqs).enumerate() {
                    if *theirs > *mine {
                        // `i` indexes a cursor of `shard_count` (a u32) entries.
                        ahead.insert(ShardId(i as u32));
                    } else {
                        // Never ack past where the hub starts sending.
                        *mine = *theirs;
                    }
                }
                if !ahead.is_empty() {
                    self.pending = Pending::Shards(ahead);
                }
                false
            }
            Some(old) => {
                self.pending = Pending::All {
                    reason: if old.seqs.len() == start.seqs.len() {
                        ResetReason::EpochChanged
                    } else {
                        ResetReason::CursorLost
                    },
                };
                false
            }
        };
        self.start = Some(start);
        Ok(changed)
    }

    /// The reset the node still owes before it may apply anything else of
    /// this stream, if any.
    pub(crate) fn owed_reset(&self) -> Option<(ResetScope, ResetReason)> {
        match &self.pending {
            Pending::None => None,
            Pending::Shards(s) => Some((ResetScope::Shards(s.clone()), ResetReason::CursorExpired)),
            Pending::All { reason } => Some((ResetScope::All, *reason)),
        }
    }

    /// Records a reset applied to the cache. `cursor` is the hub's (absent for
    /// a reset the node owed itself: the shards then continue from the
    /// welcome's position).
    pub(crate) fn on_reset(
        &mut self,
        scope: &ResetScope,
        cursor: Option<&pb::Cursor>,
    ) -> Result<(), PositionError> {
        let start = self
            .start
            .as_ref()
            .ok_or(PositionError::BeforeWelcome("reset"))?;
        let n = start.seqs.len();
        let target: &[u64] = match cursor {
            Some(c) if c.seqs.len() == n => &c.seqs,
            Some(c) => {
                return Err(PositionError::Shards(
                    "reset",
                    c.seqs.len(),
                    self.shard_count(),
                ));
            }
            None => &start.seqs,
        };
        match scope {
            ResetScope::All => {
                self.applied = Some(Cursor {
                    epoch: start.epoch,
                    seqs: target.to_vec(),
                });
                self.pending = Pending::None;
            }
            ResetScope::Shards(shards) => {
                if matches!(self.pending, Pending::All { .. }) {
                    // The node's cursor is of another log; only a full reset
                    // can bring it into this one.
                    return Ok(());
                }
                let applied = self.applied.get_or_insert_with(|| start.clone());
                for s in shards {
                    if let (Some(a), Some(t)) =
                        (applied.seqs.get_mut(s.index()), target.get(s.index()))
                    {
                        *a = *t;
                    }
                }
                if let Pending::Shards(p) = &mut self.pending {
                    p.retain(|s| !shards.contains(s));
                    if p.is_empty() {
                        self.pending = Pending::None;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records applied events `(shard, seq)`.
    pub(crate) fn on_events(
        &mut self,
        events: impl IntoIterator<Item = (ShardId, u64)>,
    ) -> Result<(), PositionError> {
        if self.start.is_none() {
            return Err(PositionError::BeforeWelcome("event batch"));
        }
        if let Some(applied) = self
            .applied
            .as_mut()
            .filter(|_| self.pending == Pending::None)
        {
            for (shard, seq) in events {
                if let Some(a) = applied.seqs.get_mut(shard.index()) {
                    *a = (*a).max(seq);
                }
            }
        }
        Ok(())
    }

    /// Records progress.
    pub(crate) fn on_progress(&mut self, cursor: &pb::Cursor) -> Result<(), PositionError> {
        let n = self
            .start
            .as_ref()
            .ok_or(PositionError::BeforeWelcome("progress"))?
            .seqs
            .len();
        if cursor.seqs.len() != n {
            return Err(PositionError::Shards(
                "progress",
                cursor.seqs.len(),
                self.shard_count(),
            ));
        }
        if let Some(applied) = self
            .applied
            .as_mut()
            .filter(|_| self.pending == Pending::None)
        {
            applied.merge_max(&cursor.seqs);
        }
        Ok(())
    }

    /// What the node may ack on this stream: its applied cursor, once it is
    /// in the stream's epoch and owes no reset.
    pub(crate) fn ack(&self) -> Option<&Cursor> {
        let start = self.start.as_ref()?;
        self.applied
            .as_ref()
            .filter(|a| a.epoch == start.epoch && self.pending == Pending::None)
    }

    /// The cursor safe to persist (everything at or below applied).
    pub(crate) fn applied(&self) -> Option<&Cursor> {
        self.applied.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn welcome(epoch: u64, seqs: &[u64]) -> pb::Welcome {
        pb::Welcome {
            epoch,
            shard_count: seqs.len() as u32,
            cursor: Some(pb::Cursor {
                epoch,
                seqs: seqs.to_vec(),
            }),
            ..Default::default()
        }
    }

    fn cursor(epoch: u64, seqs: &[u64]) -> Cursor {
        Cursor {
            epoch,
            seqs: seqs.to_vec(),
        }
    }

    fn wire(epoch: u64, seqs: &[u64]) -> pb::Cursor {
        cursor(epoch, seqs).to_wire()
    }

    #[test]
    fn fresh_node_adopts_the_head() {
        let mut p = Position::new(None);
        assert_eq!(p.ack(), None);
        assert!(p.on_welcome(&welcome(7, &[3, 4])).unwrap());
        assert_eq!(p.owed_reset(), None);
        assert_eq!(p.ack(), Some(&cursor(7, &[3, 4])));
        p.on_events([(ShardId(1), 6), (ShardId(1), 5)]).unwrap();
        assert_eq!(p.ack(), Some(&cursor(7, &[3, 6])));
        p.on_progress(&wire(7, &[9, 2])).unwrap();
        assert_eq!(p.ack(), Some(&cursor(7, &[9, 6])));
    }

    #[test]
    fn same_epoch_resume_replays_without_reset() {
        let mut p = Position::new(Some(cursor(7, &[3, 4])));
        assert!(!p.on_welcome(&welcome(7, &[3, 4])).unwrap());
        assert_eq!(p.owed_reset(), None);
        assert_eq!(p.ack(), Some(&cursor(7, &[3, 4])));
    }

    #[test]
    fn shards_the_hub_skips_are_held_until_reset() {
        let mut p = Position::new(Some(cursor(7, &[3, 4, 5])));
        p.on_welcome(&welcome(7, &[3, 10, 5])).unwrap();
        assert_eq!(
            p.owed_reset(),
            Some((
                ResetScope::Shards([ShardId(1)].into()),
                ResetReason::CursorExpired
            ))
        );
        // Nothing is acked or persisted past the old position meanwhile.
        assert_eq!(p.ack(), None);
        assert_eq!(p.applied(), Some(&cursor(7, &[3, 4, 5])));
        p.on_reset(
            &ResetScope::Shards([ShardId(1)].into()),
            Some(&wire(7, &[0, 12, 0])),
        )
        .unwrap();
        assert_eq!(p.owed_reset(), None);
        assert_eq!(p.ack(), Some(&cursor(7, &[3, 12, 5])));
    }

    #[test]
    fn a_welcome_behind_the_cursor_lowers_it() {
        let mut p = Position::new(Some(cursor(7, &[8, 4])));
        p.on_welcome(&welcome(7, &[5, 4])).unwrap();
        assert_eq!(p.ack(), Some(&cursor(7, &[5, 4])));
    }

    #[test]
    fn another_epoch_keeps_the_old_cursor_until_a_full_reset() {
        let mut p = Position::new(Some(cursor(7, &[3, 4])));
        p.on_welcome(&welcome(8, &[1, 1])).unwrap();
        assert_eq!(
            p.owed_reset(),
            Some((ResetScope::All, ResetReason::EpochChanged))
        );
        assert_eq!(p.ack(), None);
        // Events and progress before the reset are not recorded.
        p.on_events([(ShardId(0), 2)]).unwrap();
        p.on_progress(&wire(8, &[2, 2])).unwrap();
        assert_eq!(p.applied(), Some(&cursor(7, &[3, 4])));
        // A scoped reset cannot bring the cursor into the new log.
        p.on_reset(
            &ResetScope::Shards([ShardId(0)].into()),
            Some(&wire(8, &[1, 1])),
        )
        .unwrap();
        assert_eq!(p.applied(), Some(&cursor(7, &[3, 4])));
        p.on_reset(&ResetScope::All, Some(&wire(8, &[1, 2])))
            .unwrap();
        assert_eq!(p.ack(), Some(&cursor(8, &[1, 2])));
        // A session that breaks now resumes in the new epoch.
        assert_eq!(p.resume(), Some(&cursor(8, &[1, 2])));
    }

    #[test]
    fn owed_reset_applied_locally_continues_from_the_welcome() {
        let mut p = Position::new(Some(cursor(7, &[3, 4])));
        p.on_welcome(&welcome(8, &[5, 6])).unwrap();
        let (scope, _) = p.owed_reset().unwrap();
        p.on_reset(&scope, None).unwrap();
        assert_eq!(p.ack(), Some(&cursor(8, &[5, 6])));
    }

    #[test]
    fn other_shard_count_is_a_lost_cursor() {
        let mut p = Position::new(Some(cursor(7, &[3, 4])));
        p.on_welcome(&welcome(7, &[1, 1, 1])).unwrap();
        assert_eq!(
            p.owed_reset(),
            Some((ResetScope::All, ResetReason::CursorLost))
        );
    }

    #[test]
    fn protocol_errors() {
        let mut p = Position::new(None);
        assert!(p.on_progress(&wire(1, &[1])).is_err());
        assert!(p.on_events([(ShardId(0), 1)]).is_err());
        let mut w = welcome(7, &[1, 2]);
        w.cursor = None;
        assert!(p.on_welcome(&w).is_err());
        let mut w = welcome(7, &[1, 2]);
        w.shard_count = 3;
        assert!(p.on_welcome(&w).is_err());
        p.on_welcome(&welcome(7, &[1, 2])).unwrap();
        assert!(p.on_progress(&wire(7, &[1])).is_err());
        assert!(p.on_reset(&ResetScope::All, Some(&wire(7, &[1]))).is_err());
    }
}

#[cfg(test)]
// Shards are indexes into several parallel vectors of the model.
#[allow(clippy::needless_range_loop)]
mod properties {
    //! A model hub that resumes nodes the way SPEC §3.2.3 says, and a node
    //! that drives [`Position`] the way the session does. Whatever the hub
    //! sends (including a reset that never comes), the node never acks past
    //! what was sent and never records as applied a seq it neither received
    //! nor had covered by a reset.

    use proptest::prelude::*;

    use super::*;

    const S: usize = 3;
    const EPOCH: u64 = 7;

    struct Model {
        position: Position,
        /// Per shard: the hub's head and what it has sent this stream.
        head: Vec<u64>,
        sent: Vec<u64>,
        start: Vec<u64>,
        /// Per shard of this epoch: the highest seq the node has received,
        /// or had covered by a reset, without a gap.
        covered: Vec<u64>,
    }

    impl Model {
        fn pay_owed(&mut self) {
            if let Some((scope, _)) = self.position.owed_reset() {
                for s in 0..S {
                    if matches!(&scope, ResetScope::All)
                        || matches!(&scope, ResetScope::Shards(x) if x.contains(&ShardId(s as u32)))
                    {
                        self.covered[s] = self.covered[s].max(self.start[s]);
                    }
                }
                self.position.on_reset(&scope, None).unwrap();
            }
        }

        fn check(&self) {
            if let Some(ack) = self.position.ack() {
                assert_eq!(ack.epoch, EPOCH);
                for s in 0..S {
                    assert!(ack.seqs[s] <= self.sent[s], "acked past what was sent");
                }
            }
            if let Some(a) = self.position.applied().filter(|a| a.epoch == EPOCH) {
                for s in 0..S {
                    assert!(
                        a.seqs[s] <= self.covered[s],
                        "shard {s}: applied {} but only {} received or reset",
                        a.seqs[s],
                        self.covered[s]
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn never_skips_and_never_over_acks(
            same_epoch in any::<bool>(),
            saved in prop::collection::vec(0u64..6, S),
            extra in prop::collection::vec(0u64..6, S),
            retained_from in prop::collection::vec(0u64..12, S),
            hub_sends_reset in any::<bool>(),
            steps in prop::collection::vec((0usize..S, 0u8..3), 0..24),
        ) {
            let saved = Cursor { epoch: if same_epoch { EPOCH } else { EPOCH - 1 }, seqs: saved };
            let head: Vec<u64> = (0..S).map(|s| saved.seqs[s] + extra[s]).collect();
            let first: Vec<u64> = (0..S).map(|s| retained_from[s].min(head[s]) + 1).collect();
            // The hub's resume rules.
            let mut start = head.clone();
            let mut reset: Option<ResetScope> = None;
            if same_epoch {
                let mut expired = BTreeSet::new();
                for s in 0..S {
                    if saved.seqs[s] + 1 < first[s] {
                        expired.insert(ShardId(s as u32));
                    } else {
                        start[s] = saved.seqs[s];
                    }
                }
                if !expired.is_empty() {
                    reset = Some(ResetScope::Shards(expired));
                }
            } else {
                reset = Some(ResetScope::All);
            }
            let mut m = Model {
                position: Position::new(Some(saved.clone())),
                head,
                sent: start.clone(),
                start: start.clone(),
                covered: if same_epoch { saved.seqs.clone() } else { vec![0; S] },
            };
            let welcome = pb::Welcome {
                epoch: EPOCH,
                shard_count: S as u32,
                cursor: Some(pb::Cursor { epoch: EPOCH, seqs: start.clone() }),
                ..Default::default()
            };
            m.position.on_welcome(&welcome).unwrap();
            m.check();
            if let (true, Some(scope)) = (hub_sends_reset, &reset) {
                for s in 0..S {
                    if matches!(scope, ResetScope::All)
                        || matches!(scope, ResetScope::Shards(x) if x.contains(&ShardId(s as u32)))
                    {
                        m.covered[s] = m.covered[s].max(start[s]);
                    }
                }
                let cursor = pb::Cursor { epoch: EPOCH, seqs: start.clone() };
                m.position.on_reset(scope, Some(&cursor)).unwrap();
                m.check();
            }
            for (s, kind) in steps {
                match kind {
                    // The next event of shard s.
                    0 if m.sent[s] < m.head[s] => {
                        m.pay_owed();
                        m.sent[s] += 1;
                        let seq = m.sent[s];
                        if m.covered[s] + 1 >= seq {
                            m.covered[s] = m.covered[s].max(seq);
                        }
                        m.position.on_events([(ShardId(s as u32), seq)]).unwrap();
                    }
                    // Progress at what was sent.
                    1 => {
                        m.pay_owed();
                        let cursor = pb::Cursor { epoch: EPOCH, seqs: m.sent.clone() };
                        m.position.on_progress(&cursor).unwrap();
                    }
                    // A publish appends to shard s.
                    _ => m.head[s] += 1,
                }
                m.check();
            }
        }
    }
}
