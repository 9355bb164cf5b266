//! Cursors: how far a node has applied, one seq per shard within an epoch.

use crate::{ShardId, pb};

/// Why a wire cursor is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// The cursor has a different number of shards than the hub.
    #[error("cursor has {got} shards, the hub has {want}")]
    ShardCount {
        /// Shards in the cursor.
        got: usize,
        /// Shards of the hub.
        want: usize,
    },
    /// Epoch 0 never names a log.
    #[error("cursor epoch is 0")]
    ZeroEpoch,
}

/// `(epoch, seq per shard)`. A seq of 0 means "nothing of this shard yet".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The log incarnation the seqs belong to.
    pub epoch: u64,
    /// One entry per shard: the highest seq applied.
    pub seqs: Vec<u64>,
}

impl Cursor {
    /// A cursor at seq 0 of every shard.
    pub fn zero(epoch: u64, shards: u32) -> Self {
        Self {
            epoch,
            seqs: vec![0; shards as usize],
        }
    }

    /// Validates a wire cursor against the hub's shard count.
    pub fn from_wire(c: &pb::Cursor, shards: u32) -> Result<Self, CursorError> {
        if c.epoch == 0 {
            return Err(CursorError::ZeroEpoch);
        }
        if c.seqs.len() != shards as usize {
            return Err(CursorError::ShardCount {
                got: c.seqs.len(),
                want: shards as usize,
            });
        }
        Ok(Self {
            epoch: c.epoch,
            seqs: c.seqs.clone(),
        })
    }

    /// The wire form.
    pub fn to_wire(&self) -> pb::Cursor {
        pb::Cursor {
            epoch: self.epoch,
            seqs: self.seqs.clone(),
        }
    }

    /// The seq of one shard (0 when out of range).
    pub fn get(&self, shard: ShardId) -> u64 {
        self.seqs.get(shard.index()).copied().unwrap_or(0)
    }

    /// Raises every shard to at least `other`'s seq (same epoch assumed).
    pub fn merge_max(&mut self, other: &[u64]) {
        for (a, b) in self.seqs.iter_mut().zip(other) {
            *a = (*a).max(*b);
        }
    }

    /// True when every shard is at least at `other`'s seq.
    pub fn dominates(&self, other: &[u64]) -> bool {
        self.seqs.len() == other.len() && self.seqs.iter().zip(other).all(|(a, b)| a >= b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_validation() {
        let c = Cursor {
            epoch: 7,
            seqs: vec![1, 2, 3],
        };
        assert_eq!(Cursor::from_wire(&c.to_wire(), 3).unwrap(), c);
        assert_eq!(
            Cursor::from_wire(&c.to_wire(), 4),
            Err(CursorError::ShardCount { got: 3, want: 4 })
        );
        let zero = pb::Cursor {
            epoch: 0,
            seqs: vec![0; 3],
        };
        assert_eq!(Cursor::from_wire(&zero, 3), Err(CursorError::ZeroEpoch));
    }

    #[test]
    fn merge_and_dominate() {
        let mut c = Cursor::zero(1, 3);
        c.merge_max(&[3, 0, 5]);
        c.merge_max(&[1, 4, 2]);
        assert_eq!(c.seqs, vec![3, 4, 5]);
        assert!(c.dominates(&[3, 4, 5]));
        assert!(!c.dominates(&[3, 4, 6]));
        assert!(!c.dominates(&[3, 4]));
    }
}
