//! One shard's part of the bounded log.
//!
//! Written only by the shard's actor, read by every subscriber session under a
//! read lock. Each entry keeps the event already encoded for the wire
//! ([`freshness::wire::encode_event_entry`]), so fan-out never re-encodes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use freshness::Entity;
use parking_lot::RwLock;

/// Fixed bookkeeping cost charged per entry on top of its encoded bytes.
pub const ENTRY_OVERHEAD: usize = 96;

/// One appended event.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The entity (its namespace drives subscription filters; the actor uses
    /// it to forget versions of entities that left the log).
    pub entity: Entity,
    /// True when the event originated in this hub's region (replication
    /// forwards only those: loop-free).
    pub local: bool,
    /// Hub time the event was accepted at its origin.
    pub publish_time_us: u64,
    /// A replication gap marker rather than an event: events of this shard
    /// from a peer region were lost here, so every node reading past this
    /// entry is reset for the shard (`REPLICATION_GAP`). Never forwarded.
    pub gap: bool,
    /// A publish may wait for nodes to ack this event ([`Incoming::awaited`]).
    ///
    /// [`Incoming::awaited`]: crate::shard::Incoming::awaited
    pub awaited: bool,
    /// The event's version (0 for gap markers): what the shard actor's
    /// newest-version memory is rebuilt from after a restart.
    pub version: u64,
    /// The encoded `EventBatch.events` element.
    pub bytes: Bytes,
}

impl LogEntry {
    fn cost(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// The retained window of one shard: seqs `first_seq ..= head`.
#[derive(Debug)]
pub struct ShardLog {
    entries: VecDeque<LogEntry>,
    /// Seq of `entries[0]`; `head + 1` when nothing is retained.
    first_seq: u64,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
}

/// What an append pushed out of the window.
pub type Evicted = Vec<(u64, LogEntry)>;

impl ShardLog {
    /// An empty log starting at seq 1.
    pub fn new(max_events: usize, max_bytes: usize) -> Self {
        Self::starting_at(1, max_events, max_bytes)
    }

    /// An empty log whose next entry gets `first_seq` (a log recovered
    /// from disk, before its records are appended again).
    pub fn starting_at(first_seq: u64, max_events: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            first_seq: first_seq.max(1),
            bytes: 0,
            max_events: max_events.max(1),
            max_bytes,
        }
    }

    /// Seq of the newest entry; 0 when nothing was ever appended.
    pub fn head(&self) -> u64 {
        self.first_seq + self.entries.len() as u64 - 1
    }

    /// Oldest retained seq (`head + 1` when empty).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Retained entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Retained bytes (encoded plus bookkeeping).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends at `head + 1` and evicts from the front until within bounds.
    /// The newest entry is always kept.
    pub fn append(&mut self, entry: LogEntry, evicted: &mut Evicted) {
        self.bytes += entry.cost();
        self.entries.push_back(entry);
        while self.entries.len() > 1
            && (self.entries.len() > self.max_events || self.bytes > self.max_bytes)
        {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.cost();
                evicted.push((self.first_seq, old));
                self.first_seq += 1;
            }
        }
    }

    /// The entry with this seq, if retained.
    pub fn get(&self, seq: u64) -> Option<&LogEntry> {
        let idx = seq.checked_sub(self.first_seq)?;
        self.entries.get(usize::try_from(idx).ok()?)
    }

    /// Entries with seq > `after`, oldest first, with their seqs. The caller
    /// checks `after + 1 >= first_seq` first (else the range is gone).
    pub fn after(&self, after: u64) -> impl Iterator<Item = (u64, &LogEntry)> {
        let start = after.saturating_add(1).max(self.first_seq);
        let skip = usize::try_from(start - self.first_seq).unwrap_or(usize::MAX);
        self.entries
            .iter()
            .skip(skip)
            .enumerate()
            .map(move |(i, e)| (start + i as u64, e))
    }
}

/// A shard's log plus a lock-free copy of its head, so sessions can tell
/// whether there is anything new without taking the lock.
#[derive(Debug)]
pub struct SharedLog {
    log: RwLock<ShardLog>,
    head: AtomicU64,
    first: AtomicU64,
}

impl SharedLog {
    /// An empty shared log.
    pub fn new(max_events: usize, max_bytes: usize) -> Self {
        Self::starting_at(1, max_events, max_bytes)
    }

    /// An empty shared log whose next entry gets `first_seq`.
    pub fn starting_at(first_seq: u64, max_events: usize, max_bytes: usize) -> Self {
        let log = ShardLog::starting_at(first_seq, max_events, max_bytes);
        Self {
            head: AtomicU64::new(log.head()),
            first: AtomicU64::new(log.first_seq()),
            log: RwLock::new(log),
        }
    }

    /// The oldest retained seq as last published by the actor.
    pub fn first_seq(&self) -> u64 {
        self.first.load(Ordering::Acquire)
    }

    /// The head as last published by the actor.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Read access for sessions and status.
    pub fn read(&self) -> parking_lot::RwLockReadGuard<'_, ShardLog> {
        self.log.read()
    }

    /// Appends a batch under one write lock and publishes the new head.
    pub fn append_all(&self, entries: impl IntoIterator<Item = LogEntry>) -> Evicted {
        let mut evicted = Vec::new();
        let mut log = self.log.write();
        for e in entries {
            log.append(e, &mut evicted);
        }
        self.first.store(log.first_seq(), Ordering::Release);
        self.head.store(log.head(), Ordering::Release);
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> LogEntry {
        LogEntry {
            entity: Entity::parse("user:1").unwrap(),
            local: true,
            publish_time_us: 0,
            gap: false,
            awaited: false,
            version: 1,
            bytes: Bytes::from(vec![0u8; n]),
        }
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let mut log = ShardLog::new(3, 10_000);
        let mut ev = Vec::new();
        assert_eq!((log.head(), log.first_seq()), (0, 1));
        for _ in 0..5 {
            log.append(entry(4), &mut ev);
        }
        assert_eq!((log.head(), log.first_seq(), log.len()), (5, 3, 3));
        assert_eq!(ev.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(log.after(3).map(|(s, _)| s).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(
            log.after(0).map(|(s, _)| s).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert!(log.get(2).is_none() && log.get(5).is_some() && log.get(6).is_none());

        let mut log = ShardLog::new(100, 2 * (ENTRY_OVERHEAD + 10));
        ev.clear();
        for _ in 0..4 {
            log.append(entry(10), &mut ev);
        }
        assert_eq!((log.len(), log.first_seq()), (2, 3));
        // One entry larger than the whole budget is still kept alone.
        log.append(entry(10_000), &mut ev);
        assert_eq!((log.len(), log.head()), (1, 5));
    }
}
