//! One look at the logs: the next frame of what a node's filter wants,
//! within its in-flight budget, from memory or the durable log; the resets
//! when the log has left the node behind; the fan-out spans of traced
//! appends.

use freshness::pb;
use freshness::wire::Frame;
use tokio::time::Instant;

use super::{Fill, PROMPT_ACK_SHARE, Sent, Session};
use crate::log::LogEntry;
use crate::telemetry::{Adopt, num};

impl Session {
    fn wants(&self, e: &LogEntry) -> bool {
        !e.gap && (!self.shared.replication || e.local) && self.shared.wants(e.entity.namespace())
    }

    /// Shards whose unsent entries the log (in memory or on disk) no
    /// longer holds.
    pub(super) fn gaps(&self) -> Vec<u32> {
        self.sent
            .iter()
            .enumerate()
            // Memory first: the disk is only asked about shards that left it.
            .filter(|(s, sent)| {
                **sent + 1 < self.hub.logs.memory(*s).first_seq()
                    && **sent + 1 < self.hub.logs.retained_first(*s)
            })
            .map(|(s, _)| s as u32)
            .collect()
    }

    /// A frame replayed from the durable log for the first shard whose
    /// cursor is older than the in-memory tail but still on disk (one shard
    /// per frame; the next fill takes the next part). `None` when no shard
    /// is there, or what was read held nothing for this node.
    ///
    /// The read is a synchronous file read on this stream's task, bounded
    /// by the segment's marks (at most a MiB scanned, 256 KiB held: see
    /// `DiskReader::read`), usually from the page cache; only nodes that
    /// fell that far behind take this path.
    fn fill_from_disk(&mut self, budget: u32) -> Option<Frame> {
        /// Segment reads one fill may make for a node whose filter skips
        /// what it reads; the progress tick's fill goes on from there.
        const MAX_READS: usize = 16;
        if !self.behind_memory || !self.hub.logs.has_disk() {
            return None;
        }
        let n = self.sent.len();
        let mut reads = 0;
        let mut s = 0;
        while s < n && reads < MAX_READS {
            let mem_first = self.hub.logs.memory(s).first_seq();
            let disk = self.hub.logs.disk(s)?;
            if self.sent[s] + 1 >= mem_first || self.sent[s] + 1 < disk.first_seq() {
                s += 1;
                continue;
            }
            reads += 1;
            let read = disk.read(self.sent[s], mem_first, budget as usize, self.frame_limit);
            let entries = match read {
                Ok(Some(entries)) if !entries.is_empty() => entries,
                // Retention dropped the segment meanwhile: the main fill
                // resets the shard.
                Ok(_) => {
                    s += 1;
                    continue;
                }
                Err(e) => {
                    tracing::error!(node_id = %self.shared.node_id, shard = s, error = %e, "cannot replay from the durable log; the shard is reset");
                    let at = mem_first - 1;
                    return Some(self.reset_to(
                        vec![s as u32],
                        false,
                        pb::ResetReason::CursorExpired,
                        vec![(s as u32, at)],
                    ));
                }
            };
            let mut count = 0u32;
            let mut oldest = u64::MAX;
            let mut last = None;
            for (seq, e) in &entries {
                if e.gap && !self.shared.replication {
                    if count == 0 {
                        return Some(self.reset_to(
                            vec![s as u32],
                            false,
                            pb::ResetReason::ReplicationGap,
                            vec![(s as u32, *seq)],
                        ));
                    }
                    break;
                }
                if self.wants(e) {
                    if count == budget
                        || (count > 0
                            && self.builder.encoded_len() + e.bytes.len() > self.frame_limit)
                    {
                        break;
                    }
                    self.builder.push(&e.bytes);
                    self.flow.on_send(s, *seq);
                    oldest = oldest.min(e.publish_time_us);
                    count += 1;
                    last = Some(*seq);
                }
                self.sent[s] = *seq;
            }
            if count == 0 {
                // Nothing in this part for this node's filter: read on.
                continue;
            }
            let prompt_above = (self.shared.max_in_flight / PROMPT_ACK_SHARE).max(1);
            let ack_requested = self.flow.in_flight() >= prompt_above;
            self.track(Sent {
                positions: last.map(|seq| (s as u32, seq)).into_iter().collect(),
                count,
                watermark_us: 0,
                oldest_publish_us: oldest,
            });
            self.publish_flow();
            self.tally.frame(count);
            self.caught_up = false;
            return Some(self.builder.finish(0, ack_requested));
        }
        if s == n {
            // Every shard looked at: none to replay from disk.
            self.behind_memory = false;
        }
        None
    }

    /// One look at the logs: a reset if the log left the node behind, else
    /// one frame of what the node's filter wants, up to its in-flight budget.
    pub(super) fn fill(&mut self) -> Fill {
        let budget = self.flow.budget();
        if budget == 0 || std::mem::take(&mut self.gaps_pending) {
            let gaps = self.gaps();
            if !gaps.is_empty() {
                return Fill::Frame(self.reset_frame(gaps, false, pb::ResetReason::SlowConsumer));
            }
            if budget == 0 {
                self.publish_flow();
                return Fill::Blocked;
            }
        }
        let looked_on_disk = self.behind_memory;
        if let Some(frame) = self.fill_from_disk(budget) {
            return Fill::Frame(frame);
        }
        let t = self.hub.clock.now_us();
        let mut count = 0u32;
        let mut awaited = false;
        let mut oldest = u64::MAX;
        let mut positions = Vec::new();
        // Shards whose sent range may hold traced appends: (shard, after, upto).
        let mut traced: Vec<(usize, u64, u64)> = Vec::new();
        // Shards the log left behind. Only a shard with unsent entries can
        // have one (its first retained seq is at most its head + 1), so the
        // scan for events finds them too.
        let mut gaps: Vec<u32> = Vec::new();
        let mut complete = true;
        let from = self.scan_from;
        // The shards with something past what was sent, in one tight pass
        // (an atomic load and a compare each, most of them idle), then
        // only those, in turn from `scan_from`. A shard that gets an
        // append after this pass rings the bell, which fills again.
        let mut to_visit = std::mem::take(&mut self.to_visit);
        to_visit.clear();
        to_visit.extend(
            self.hub
                .logs
                .all_memory()
                .zip(&self.sent)
                .enumerate()
                .filter(|(_, (log, sent))| log.head() > **sent)
                .map(|(s, _)| s),
        );
        // At most one position per shard visited: sized once.
        positions.reserve_exact(to_visit.len());
        let split = to_visit.partition_point(|&s| s < from);
        for &s in to_visit[split..].iter().chain(&to_visit[..split]) {
            let log = self.hub.logs.memory(s).read();
            if self.sent[s] + 1 < log.first_seq() {
                // Still on disk: replayed from there, at the end of this
                // fill when it sends nothing else, else by the next.
                // Otherwise the reset goes before any event of this fill,
                // or in the next one.
                self.behind_memory = true;
                if self.sent[s] + 1 < self.hub.logs.retained_first(s) {
                    gaps.push(s as u32);
                }
                complete = false;
                continue;
            }
            let mut last = None;
            let mut gap_at = None;
            let from = self.sent[s];
            for (seq, e) in log.after(from) {
                if e.gap && !self.shared.replication {
                    // A replication gap: everything before it goes out first,
                    // then the reset, as its own frame.
                    if count == 0 {
                        gap_at = Some(seq);
                    } else {
                        complete = false;
                    }
                    break;
                }
                if self.wants(e) {
                    let full = count == budget
                        || (count > 0
                            && self.builder.encoded_len() + e.bytes.len() > self.frame_limit);
                    if full {
                        complete = false;
                        break;
                    }
                    self.builder.push(&e.bytes);
                    self.flow.on_send(s, seq);
                    awaited |= e.awaited;
                    oldest = oldest.min(e.publish_time_us);
                    count += 1;
                    last = Some(seq);
                }
                self.sent[s] = seq;
            }
            if let Some(seq) = last {
                positions.push((s as u32, seq));
                if self.hub.logs.traces(s).any_after(from) {
                    traced.push((s, from, seq));
                }
            }
            if let Some(seq) = gap_at {
                drop(log);
                return Fill::Frame(self.reset_to(
                    vec![s as u32],
                    false,
                    pb::ResetReason::ReplicationGap,
                    vec![(s as u32, seq)],
                ));
            }
            if !complete {
                // Start here next time, so no shard starves.
                self.scan_from = s;
                break;
            }
        }
        self.to_visit = to_visit;
        if count == 0 && self.behind_memory && !looked_on_disk {
            // This fill met a shard whose unsent entries are on disk only:
            // they go now, as they would have had it looked there first.
            if let Some(frame) = self.fill_from_disk(budget) {
                return Fill::Frame(frame);
            }
        }
        if !gaps.is_empty() {
            if count == 0 {
                return Fill::Frame(self.reset_frame(gaps, false, pb::ResetReason::SlowConsumer));
            }
            // Events go first; the reset is the next fill's first frame.
            self.gaps_pending = true;
        }
        if complete {
            self.caught_up = true;
        }
        if count == 0 {
            return if complete {
                Fill::Idle(self.hub.watermark_now())
            } else {
                Fill::Blocked
            };
        }
        let watermark_us = if complete {
            self.hub.watermark_now()
        } else {
            0
        };
        if complete {
            self.last_watermark = Instant::now();
        }
        // From a quarter of the node's budget in flight on, every batch asks
        // for a prompt ack, so that lazy acks never park a node that keeps up.
        let prompt_above = (self.shared.max_in_flight / PROMPT_ACK_SHARE).max(1);
        let ack_requested = awaited || self.flow.in_flight() >= prompt_above;
        self.track(Sent {
            positions,
            count,
            watermark_us,
            oldest_publish_us: oldest,
        });
        self.publish_flow();
        self.tally.frame(count);
        let frame = self.builder.finish(watermark_us, ack_requested);
        if !traced.is_empty() {
            self.record_fanout(&traced, count, frame.len(), t.saturating_sub(oldest));
        }
        Fill::Frame(frame)
    }

    /// Records the `session.fanout` span of a frame that holds events of
    /// traced appends: parented on the first append's span, linked to the
    /// others.
    fn record_fanout(&self, traced: &[(usize, u64, u64)], events: u32, bytes: usize, age_us: u64) {
        let span = tracing::info_span!(
            parent: None,
            "session.fanout",
            otel.kind = "producer",
            region = %self.hub.region,
            node_id = %self.shared.node_id,
            replication = self.shared.replication,
            events = i64::from(events),
            bytes = num(bytes),
            oldest_event_age_us = num(age_us),
        );
        let mut adopt = Adopt::new(&span);
        for &(s, after, upto) in traced {
            let mut more = true;
            self.hub.logs.traces(s).overlapping(after, upto, |sc| {
                more = adopt.context(sc);
                more
            });
            if !more {
                break;
            }
        }
    }
}
