//! The read side of the logs: what sessions (and status) read of every
//! shard, and nothing else of the hub's shards. Each shard's events in
//! memory, the older part still on disk for a durable hub, and the trace
//! contexts of recent appends (for fan-out spans); the shard actors are
//! the only writers.

use std::sync::Arc;

use crate::log::SharedLog;
use crate::store::DiskReader;
use crate::telemetry::AppendTraces;

/// Every shard's log, read-only, indexed by shard.
#[derive(Debug)]
pub struct LogReader {
    memory: Vec<Arc<SharedLog>>,
    /// Empty for an ephemeral hub (or one on JetStream).
    disk: Vec<DiskReader>,
    traces: Vec<Arc<AppendTraces>>,
}

impl LogReader {
    /// The logs of `memory.len()` shards; `disk` empty or one per shard,
    /// `traces` one per shard.
    pub fn new(
        memory: Vec<Arc<SharedLog>>,
        disk: Vec<DiskReader>,
        traces: Vec<Arc<AppendTraces>>,
    ) -> Self {
        debug_assert!(disk.is_empty() || disk.len() == memory.len());
        debug_assert_eq!(traces.len(), memory.len());
        Self {
            memory,
            disk,
            traces,
        }
    }

    /// Shard `s`'s events in memory.
    pub fn memory(&self, s: usize) -> &SharedLog {
        &self.memory[s]
    }

    /// Every shard's events in memory, by shard.
    pub fn all_memory(&self) -> impl Iterator<Item = &SharedLog> {
        self.memory.iter().map(|l| &**l)
    }

    /// Head seq of shard `s`.
    pub fn head(&self, s: usize) -> u64 {
        self.memory[s].head()
    }

    /// Head seq of every shard.
    pub fn heads(&self) -> Vec<u64> {
        self.memory.iter().map(|l| l.head()).collect()
    }

    /// Shard `s`'s events on disk, for a durable hub.
    pub fn disk(&self, s: usize) -> Option<&DiskReader> {
        self.disk.get(s)
    }

    /// True when older events may be replayed from disk.
    pub fn has_disk(&self) -> bool {
        !self.disk.is_empty()
    }

    /// The oldest seq of shard `s` a session can still send: on disk for a
    /// durable hub, in memory otherwise.
    pub fn retained_first(&self, s: usize) -> u64 {
        let memory = self.memory[s].first_seq();
        match self.disk.get(s) {
            Some(d) => d.first_seq().min(memory),
            None => memory,
        }
    }

    /// Shard `s`'s recent traced appends.
    pub fn traces(&self, s: usize) -> &AppendTraces {
        &self.traces[s]
    }
}
