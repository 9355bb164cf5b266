//! A node's flow control (SPEC §3.2.7), as a pure type: what is in flight
//! to it, shard by shard, and whether it is parked.
//!
//! In flight means the events sent and not yet covered by the node's acked
//! cursor, counted per event: an ack that covers part of a frame (some of
//! its shards, or the first events of one shard) frees exactly that part.
//! Per shard the state is the runs of consecutive seqs sent as events and
//! not acked yet. A node without a filter is sent every event of a shard,
//! so its runs merge into one per shard whatever the number of frames; a
//! filter that skips entries splits them (at most one run per event in
//! flight, so the memory is bounded by the node's in-flight limit). An ack
//! drops the runs it covers whole and trims the one it covers in part.

use std::collections::VecDeque;

/// One run of consecutive seqs of one shard, all sent as events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u64,
    last: u64,
}

impl Run {
    fn len(self) -> u64 {
        self.last - self.first + 1
    }
}

/// What is in flight to one node and its limit.
#[derive(Debug, Clone)]
pub struct FlowState {
    /// Per shard, unacked runs in seq order.
    runs: Vec<VecDeque<Run>>,
    /// Per shard, the node's acked cursor.
    acked: Vec<u64>,
    in_flight: u32,
    limit: u32,
}

impl FlowState {
    /// Nothing in flight; the node acked `acked` (its start cursor) and
    /// accepts `limit` unacked events.
    pub fn new(acked: Vec<u64>, limit: u32) -> Self {
        Self {
            runs: vec![VecDeque::new(); acked.len()],
            acked,
            in_flight: 0,
            limit,
        }
    }

    /// Event `seq` of `shard` was sent. Seqs of one shard are sent in
    /// increasing order and above the acked cursor.
    pub fn on_send(&mut self, shard: usize, seq: u64) {
        if seq <= self.acked[shard] {
            // Already covered (cannot happen with a well-behaved sender; it
            // would otherwise never be released).
            return;
        }
        let runs = &mut self.runs[shard];
        match runs.back_mut() {
            Some(r) if r.last + 1 == seq => r.last = seq,
            Some(r) if r.last >= seq => return,
            _ => runs.push_back(Run {
                first: seq,
                last: seq,
            }),
        }
        self.in_flight = self.in_flight.saturating_add(1);
    }

    /// The node's cumulative cursor: frees every event it covers. Shards
    /// whose cursor went back are left as they are (acks are cumulative).
    /// Returns how many events it freed.
    pub fn on_ack(&mut self, cursor: &[u64]) -> u32 {
        let mut freed = 0u64;
        for ((runs, acked), &a) in self.runs.iter_mut().zip(&mut self.acked).zip(cursor) {
            if a <= *acked {
                continue;
            }
            *acked = a;
            while let Some(front) = runs.front_mut() {
                if front.last <= a {
                    freed += front.len();
                    runs.pop_front();
                } else {
                    if front.first <= a {
                        freed += a - front.first + 1;
                        front.first = a + 1;
                    }
                    break;
                }
            }
        }
        // Every freed event was counted in when it was sent.
        let freed = u32::try_from(freed).unwrap_or(u32::MAX).min(self.in_flight);
        self.in_flight -= freed;
        freed
    }

    /// Events sent and not yet covered by the acked cursor.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The node's limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// How many more events may be sent now.
    pub fn budget(&self) -> u32 {
        self.limit.saturating_sub(self.in_flight)
    }

    /// At the limit: nothing more is sent until an ack frees some.
    pub fn parked(&self) -> bool {
        self.in_flight >= self.limit
    }

    /// The acked cursor as this state knows it.
    pub fn acked(&self) -> &[u64] {
        &self.acked
    }

    /// Runs kept, over all shards (memory, for tests).
    pub fn runs(&self) -> usize {
        self.runs.iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_partial_cumulative_ack_frees_what_it_covers() {
        // SPEC §3.2.7, issue case 1: 20 events, 5 per shard, acked [5,5,0,0].
        let mut f = FlowState::new(vec![0; 4], 20);
        for s in 0..4 {
            for q in 1..=5 {
                f.on_send(s, q);
            }
        }
        assert!(f.parked());
        assert_eq!(f.on_ack(&[5, 5, 0, 0]), 10);
        assert_eq!((f.in_flight(), f.parked(), f.budget()), (10, false, 10));
        // Part of one shard's run.
        assert_eq!(f.on_ack(&[5, 5, 2, 0]), 2);
        assert_eq!(f.in_flight(), 8);
    }

    #[test]
    fn runs_merge_across_frames_and_split_on_skipped_entries() {
        let mut f = FlowState::new(vec![0], 100);
        for q in 1..=50 {
            f.on_send(0, q);
        }
        assert_eq!(f.runs(), 1);
        f.on_send(0, 52);
        assert_eq!((f.runs(), f.in_flight()), (2, 51));
        // Acking the skipped seq 51 frees nothing more than 1..=50.
        assert_eq!(f.on_ack(&[51]), 50);
        assert_eq!(f.on_ack(&[52]), 1);
        assert_eq!((f.runs(), f.in_flight()), (0, 0));
    }

    /// A model: every event sent, one by one.
    #[derive(Debug, Clone)]
    enum Op {
        /// Send `n` events on a shard, skipping `skip` seqs first (a filter).
        Send { shard: usize, skip: u64, n: u64 },
        /// Ack, per shard, this fraction (in 1/8) of what was sent.
        Ack { eighths: Vec<u8> },
    }

    fn op(shards: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..shards, 0u64..3, 1u64..12).prop_map(|(shard, skip, n)| Op::Send { shard, skip, n }),
            proptest::collection::vec(0u8..=8, shards).prop_map(|eighths| Op::Ack { eighths }),
        ]
    }

    proptest! {
        /// For any sends and cumulative acks: in flight = sent − acked,
        /// counted per event, and parked iff in flight ≥ the limit.
        #[test]
        fn in_flight_is_sent_minus_acked(
            limit in 1u32..64,
            ops in proptest::collection::vec(op(4), 0..80),
        ) {
            let shards = 4;
            let mut f = FlowState::new(vec![0; shards], limit);
            // The model: per shard, the seqs sent as events, and the acked seq.
            let mut sent: Vec<Vec<u64>> = vec![Vec::new(); shards];
            let mut head = vec![0u64; shards];
            let mut acked = vec![0u64; shards];
            for op in ops {
                match op {
                    Op::Send { shard, skip, n } => {
                        // A sender never exceeds the budget.
                        let n = n.min(u64::from(f.budget()));
                        head[shard] += skip;
                        for _ in 0..n {
                            head[shard] += 1;
                            sent[shard].push(head[shard]);
                            f.on_send(shard, head[shard]);
                        }
                    }
                    Op::Ack { eighths } => {
                        let cursor: Vec<u64> = head
                            .iter()
                            .zip(&acked)
                            .zip(&eighths)
                            // Cumulative: never behind the last ack, never past what was sent.
                            .map(|((h, a), e)| (*a).max(h * u64::from(*e) / 8))
                            .collect();
                        f.on_ack(&cursor);
                        acked = cursor;
                    }
                }
                let model: usize = sent
                    .iter()
                    .zip(&acked)
                    .map(|(seqs, a)| seqs.iter().filter(|q| *q > a).count())
                    .sum();
                prop_assert_eq!(f.in_flight() as usize, model);
                prop_assert_eq!(f.parked(), f.in_flight() >= limit);
                prop_assert!(f.runs() <= model);
            }
        }
    }
}
