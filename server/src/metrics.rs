//! Metric names and the few helpers that record them, through the `metrics`
//! facade. The binary installs a Prometheus exporter on `metrics_listen`; a
//! hub run without one (tests) records into the no-op recorder.
//!
//! Names follow Prometheus conventions (`_total` counters, base units).
//! Label values come from closed sets (results, reasons, ack levels), so
//! cardinality is bounded; per-node figures live in `Status`, not in labels.

use std::net::SocketAddr;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Events answered by publish, by `result` (applied, duplicate, superseded).
pub const PUBLISH_EVENTS: &str = "freshness_publish_events_total";
/// Publish calls refused, by `code` (invalid_argument, unavailable, resource_exhausted).
pub const PUBLISH_REFUSED: &str = "freshness_publish_refused_total";
/// Events appended to the log.
pub const EVENTS_APPENDED: &str = "freshness_events_appended_total";
/// Event deliveries written to node streams.
pub const EVENTS_DELIVERED: &str = "freshness_events_delivered_total";
/// Events per frame sent to a node.
pub const FRAME_EVENTS: &str = "freshness_frame_events";
/// Commands an actor served per wake-up.
pub const SHARD_DRAIN: &str = "freshness_shard_drain_commands";
/// Connected subscribe streams.
pub const NODES_CONNECTED: &str = "freshness_nodes_connected";
/// Resets sent, by `reason`.
pub const RESETS: &str = "freshness_resets_total";
/// Seconds from an event's publish to a node's ack of it (per delivery; the
/// oldest event of each acked batch stands for the batch).
pub const PROPAGATION: &str = "freshness_propagation_seconds";
/// Consistency SLI: deliveries acked, and acked within 100 ms and 1 s of the
/// publish. `within_100ms / acked` is the fraction of fresh deliveries.
pub const ACKED: &str = "freshness_deliveries_acked_total";
/// See [`ACKED`].
pub const ACKED_100MS: &str = "freshness_deliveries_acked_within_100ms_total";
/// See [`ACKED`].
pub const ACKED_1S: &str = "freshness_deliveries_acked_within_1s_total";
/// Retained log events, sampled by status and by the actors.
pub const LOG_EVENTS: &str = "freshness_log_retained_events";

/// Bucket bounds of [`PROPAGATION`], in seconds.
const PROPAGATION_BUCKETS: [f64; 14] = [
    0.000_25, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];
/// Bucket bounds of [`FRAME_EVENTS`].
const FRAME_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 8192.0];

/// Installs the Prometheus recorder and serves `/metrics` on `addr`. Must be
/// called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PROPAGATION.into()),
            &PROPAGATION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(FRAME_EVENTS.into()),
                &FRAME_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(SHARD_DRAIN.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0],
            )
        })
        .and_then(|b| b.install())
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
}

/// One session's tallies. The per-frame and per-ack paths only add to
/// these plain fields; [`flush`](Self::flush) hands them to the recorder on
/// the session's progress tick and when it ends, so fan-out touches no
/// shared metric state per delivery. Histogram samples are folded into the
/// exported buckets (each recorded at its bucket's upper bound).
#[derive(Debug, Default)]
pub struct SessionTally {
    delivered: u64,
    frames: [u64; FRAME_BUCKETS.len() + 1],
    largest_frame: u32,
    acked: u64,
    within_100ms: u64,
    within_1s: u64,
    propagation: [u64; PROPAGATION_BUCKETS.len() + 1],
    slowest_s: f64,
}

fn bucket(bounds: &[f64], v: f64) -> usize {
    bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len())
}

impl SessionTally {
    /// One frame of `count` events written to the node.
    pub fn frame(&mut self, count: u32) {
        self.delivered += u64::from(count);
        self.frames[bucket(&FRAME_BUCKETS, f64::from(count))] += 1;
        self.largest_frame = self.largest_frame.max(count);
    }

    /// The node acked `count` deliveries whose oldest was published `age_us`
    /// ago (it stands for all of them: conservative).
    pub fn acked(&mut self, count: u32, age_us: u64) {
        if count == 0 {
            return;
        }
        let n = u64::from(count);
        let age_s = age_us as f64 / 1e6;
        self.acked += n;
        if age_us <= 100_000 {
            self.within_100ms += n;
        }
        if age_us <= 1_000_000 {
            self.within_1s += n;
        }
        self.propagation[bucket(&PROPAGATION_BUCKETS, age_s)] += n;
        self.slowest_s = self.slowest_s.max(age_s);
    }

    /// Hands everything tallied since the last flush to the recorder.
    pub fn flush(&mut self) {
        if self.delivered > 0 {
            counter!(EVENTS_DELIVERED).increment(self.delivered);
            let h = histogram!(FRAME_EVENTS);
            for (i, n) in self.frames.iter().enumerate().filter(|(_, n)| **n > 0) {
                let at = FRAME_BUCKETS.get(i).copied().unwrap_or(f64::from(self.largest_frame));
                h.record_many(at, *n as usize);
            }
        }
        if self.acked > 0 {
            counter!(ACKED).increment(self.acked);
            counter!(ACKED_100MS).increment(self.within_100ms);
            counter!(ACKED_1S).increment(self.within_1s);
            let h = histogram!(PROPAGATION);
            for (i, n) in self.propagation.iter().enumerate().filter(|(_, n)| **n > 0) {
                let at = PROPAGATION_BUCKETS.get(i).copied().unwrap_or(self.slowest_s);
                h.record_many(at, *n as usize);
            }
        }
        *self = Self::default();
    }
}

/// Records a reset.
pub fn record_reset(reason: &'static str) {
    counter!(RESETS, "reason" => reason).increment(1);
}

/// Sets the connected-streams gauge.
pub fn set_nodes(n: usize) {
    gauge!(NODES_CONNECTED).set(n as f64);
}
