//! Shared bookkeeping of one run: one slot per published event, and one
//! [`Recorder`] per node.
//!
//! Every event's version is its index in the run plus one (strictly
//! increasing per entity, as the protocol asks), so a node that receives
//! `(entity, version)` finds the event's slot without a lookup. The publisher
//! stamps the slot with the publish instant before it sends, on the one
//! monotonic clock of the process (`tokio::time::Instant`), so no wall clock
//! and no timestamp in the payload is needed.
//!
//! Completion ("the last of N nodes received it") is found without a
//! central collector: each node raises the slot's last-receive time, then
//! counts itself in; the node whose count makes N reads the final maximum
//! and records the latency. The same is done for acks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::stats::{Bitset, histogram, record};

/// Slot states.
const SENT: u32 = 1;
/// Accepted and appended (hub: `APPLIED`; peers: the publish call returned).
const APPLIED: u32 = 2;
/// Refused, or accepted without a new delivery (duplicate, superseded).
const NOT_APPLIED: u32 = 3;

/// One published event.
#[derive(Debug, Default)]
pub struct Slot {
    state: AtomicU32,
    publish_us: AtomicU64,
    recv_last_us: AtomicU64,
    ack_last_us: AtomicU64,
    recv: AtomicU32,
    acked: AtomicU32,
}

/// What one run shares between the publisher and the nodes.
#[derive(Debug)]
pub struct Tracker {
    origin: Instant,
    slots: Box<[Slot]>,
    /// Nodes whose receipts count towards completion (stalled ones do not).
    pub expected: u32,
    /// Measurement starts here: events published earlier are delivered and
    /// counted, but not put in the latency histograms.
    pub measure_from_us: AtomicU64,
    /// Unique deliveries to counted nodes.
    pub delivered: AtomicU64,
    /// Unique acks by counted nodes.
    pub acked: AtomicU64,
    /// Nodes with a live stream (welcome received, or subscribed).
    pub live: AtomicUsize,
    /// Events handed to the publisher so far (the next index).
    pub next: AtomicUsize,
}

impl Tracker {
    /// Room for `capacity` events, completion over `expected` nodes.
    pub fn new(capacity: usize, expected: u32) -> Arc<Self> {
        let slots = (0..capacity).map(|_| Slot::default()).collect();
        Arc::new(Self {
            origin: Instant::now(),
            slots,
            expected,
            measure_from_us: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
        })
    }

    /// Microseconds since the run's origin, on the monotonic clock.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Events the tracker has room for.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Takes `n` fresh indexes (fewer at capacity) and stamps them as sent
    /// now; returns the first index and how many were taken.
    pub fn take(&self, n: usize) -> (usize, usize) {
        let first = self.next.load(Ordering::Relaxed);
        let n = n.min(self.slots.len().saturating_sub(first));
        let now = self.now_us();
        for s in &self.slots[first..first + n] {
            s.publish_us.store(now, Ordering::Relaxed);
            s.state.store(SENT, Ordering::Release);
        }
        // Only the publisher takes indexes, so a plain store is enough.
        self.next.store(first + n, Ordering::Release);
        (first, n)
    }

    /// Marks an event accepted with a delivery due (`true`) or not.
    pub fn settle(&self, idx: usize, applied: bool) {
        if let Some(s) = self.slots.get(idx) {
            s.state.store(
                if applied { APPLIED } else { NOT_APPLIED },
                Ordering::Release,
            );
        }
    }

    /// The slot of event `idx`.
    pub fn slot(&self, idx: usize) -> Option<&Slot> {
        self.slots.get(idx)
    }

    /// Events taken so far.
    pub fn taken(&self) -> usize {
        self.next.load(Ordering::Acquire)
    }

    /// Counts over the events taken so far: (applied, not applied, still
    /// unsettled, receipts owed but missing, acks owed but missing).
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        let n = u64::from(self.expected);
        for s in &self.slots[..self.taken()] {
            match s.state.load(Ordering::Acquire) {
                APPLIED => {
                    t.applied += 1;
                    t.missing += n.saturating_sub(u64::from(s.recv.load(Ordering::Acquire)));
                    t.unacked += n.saturating_sub(u64::from(s.acked.load(Ordering::Acquire)));
                }
                NOT_APPLIED => t.not_applied += 1,
                _ => t.unsettled += 1,
            }
        }
        t
    }

    /// Completion instant (µs since origin) of event `idx`, if every
    /// counted node received it.
    pub fn completed_at(&self, idx: usize) -> Option<u64> {
        let s = self.slots.get(idx)?;
        (s.recv.load(Ordering::Acquire) >= self.expected)
            .then(|| s.recv_last_us.load(Ordering::Acquire))
    }
}

/// See [`Tracker::tally`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Events accepted with deliveries due.
    pub applied: u64,
    /// Events refused or accepted without a delivery.
    pub not_applied: u64,
    /// Events whose publish call has not answered.
    pub unsettled: u64,
    /// (event, node) receipts owed and not seen.
    pub missing: u64,
    /// (event, node) acks owed and not seen.
    pub unacked: u64,
}

/// One node's view: what it received, in which order, how late.
#[derive(Debug)]
pub struct Recorder {
    tracker: Arc<Tracker>,
    counted: bool,
    seen: Bitset,
    /// Newest version received per entity key, when order is checked.
    last: Option<Vec<u64>>,
    /// Indexes received since the last ack.
    pending_ack: Vec<usize>,
    /// Scratch of [`Recorder::on_events`]: new events and their publish
    /// instants.
    fresh: Vec<(usize, u64)>,
    /// Unique events received.
    pub delivered: u64,
    /// Events received again (allowed across reconnects).
    pub duplicates: u64,
    /// Events older than one already received for the same entity.
    pub order_violations: u64,
    /// Events that are not from this run.
    pub foreign: u64,
    /// Resets received.
    pub resets: u64,
    /// Streams that failed (connect, or broke mid-run).
    pub errors: u64,
    /// Reconnects the hub answered without resuming from the cursor.
    pub not_resumed: u64,
    /// Publish → this node received it.
    pub delivery: Histogram<u64>,
    /// Publish → the last counted node received it (recorded by that node).
    pub completion: Histogram<u64>,
    /// Publish → the last counted node acked it.
    pub ack: Histogram<u64>,
}

impl Recorder {
    /// A recorder for one node; `entities` > 0 turns on the order check.
    pub fn new(tracker: Arc<Tracker>, counted: bool, entities: usize) -> Self {
        let cap = tracker.capacity();
        Self {
            tracker,
            counted,
            seen: Bitset::new(cap),
            last: (entities > 0).then(|| vec![0; entities]),
            pending_ack: Vec::new(),
            fresh: Vec::new(),
            delivered: 0,
            duplicates: 0,
            order_violations: 0,
            foreign: 0,
            resets: 0,
            errors: 0,
            not_resumed: 0,
            delivery: histogram(),
            completion: histogram(),
            ack: histogram(),
        }
    }

    /// The run's tracker.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// One message received, carrying these events: (entity key, version
    /// = index + 1) each, in the order the message holds them.
    ///
    /// The receive instant is read once per message (every event of a
    /// message arrived together), and the shared counters are touched in a
    /// second pass: the first reads every event's slot with plain loads,
    /// which the CPU overlaps, where an atomic read-modify-write per event
    /// would wait on each cache miss in turn (a node that is behind reads
    /// slots far apart, and with the order check one entry per entity).
    pub fn on_events(&mut self, events: &[(Option<u32>, u64)]) {
        let from = self.tracker.measure_from_us.load(Ordering::Relaxed);
        self.fresh.clear();
        for &(key, version) in events {
            let Some(idx) = version.checked_sub(1).map(|i| i as usize) else {
                self.foreign += 1;
                continue;
            };
            let Some(slot) = self.tracker.slot(idx) else {
                self.foreign += 1;
                continue;
            };
            if let (Some(last), Some(k)) = (self.last.as_mut(), key)
                && let Some(l) = last.get_mut(k as usize)
            {
                if version < *l {
                    self.order_violations += 1;
                }
                *l = (*l).max(version);
            }
            if !self.seen.insert(idx) {
                self.duplicates += 1;
                continue;
            }
            self.delivered += 1;
            if self.counted {
                self.fresh
                    .push((idx, slot.publish_us.load(Ordering::Relaxed)));
            }
        }
        if self.fresh.is_empty() {
            return;
        }
        let now = self.tracker.now_us();
        for &(idx, published) in &self.fresh {
            let Some(slot) = self.tracker.slot(idx) else {
                continue;
            };
            let measured = published >= from;
            if measured {
                record(&mut self.delivery, now.saturating_sub(published));
            }
            slot.recv_last_us.fetch_max(now, Ordering::AcqRel);
            let n = slot.recv.fetch_add(1, Ordering::AcqRel) + 1;
            if n == self.tracker.expected && measured {
                let last = slot.recv_last_us.load(Ordering::Acquire);
                record(&mut self.completion, last.saturating_sub(published));
            }
            self.pending_ack.push(idx);
        }
        self.tracker
            .delivered
            .fetch_add(self.fresh.len() as u64, Ordering::Relaxed);
    }

    /// The node has just written an ack covering everything received.
    pub fn on_acked(&mut self) {
        if self.pending_ack.is_empty() {
            return;
        }
        let now = self.tracker.now_us();
        let from = self.tracker.measure_from_us.load(Ordering::Relaxed);
        self.tracker
            .acked
            .fetch_add(self.pending_ack.len() as u64, Ordering::Relaxed);
        for idx in self.pending_ack.drain(..) {
            let Some(slot) = self.tracker.slot(idx) else {
                continue;
            };
            slot.ack_last_us.fetch_max(now, Ordering::AcqRel);
            let n = slot.acked.fetch_add(1, Ordering::AcqRel) + 1;
            if n == self.tracker.expected {
                let published = slot.publish_us.load(Ordering::Relaxed);
                if published >= from {
                    let last = slot.ack_last_us.load(Ordering::Acquire);
                    record(&mut self.ack, last.saturating_sub(published));
                }
            }
        }
    }

    /// Forgets received events not yet acked (a node without acks).
    pub fn no_acks(&mut self) {
        self.pending_ack.clear();
    }
}

/// Entity names of the bench: `bench:<key>`.
pub const NAMESPACE: &str = "bench";

/// The entity of key `k`.
pub fn entity(k: u32) -> String {
    format!("{NAMESPACE}:{k}")
}

/// The key of a bench entity, if it is one.
pub fn key_of(entity: &str) -> Option<u32> {
    entity.strip_prefix("bench:")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn completion_is_recorded_once_by_the_last_node() {
        let t = Tracker::new(4, 2);
        let (first, n) = t.take(3);
        assert_eq!((first, n), (0, 3));
        for i in 0..3 {
            t.settle(i, true);
        }
        let mut a = Recorder::new(t.clone(), true, 10);
        let mut b = Recorder::new(t.clone(), true, 10);
        a.on_events(&[(Some(1), 1)]);
        a.on_events(&[(Some(1), 1)]);
        assert_eq!((a.delivered, a.duplicates), (1, 1));
        assert_eq!(a.completion.len(), 0);
        b.on_events(&[(Some(1), 1)]);
        assert_eq!(b.completion.len(), 1);
        assert!(t.completed_at(0).is_some() && t.completed_at(1).is_none());
        b.on_events(&[(Some(1), 3), (Some(1), 2)]);
        assert_eq!(b.order_violations, 1);
        let tally = t.tally();
        assert_eq!((tally.applied, tally.missing), (3, 2));
        a.on_acked();
        b.on_acked();
        assert_eq!(b.ack.len(), 1);
        assert_eq!(entity(7), "bench:7");
        assert_eq!(key_of("bench:7"), Some(7));
        assert_eq!(key_of("user:7"), None);
        // At capacity, fewer indexes are handed out.
        assert_eq!(t.take(5), (3, 1));
    }
}
