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
/// Events per frame sent to a node (`_sum` is exact: see `SessionTally`).
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

/// A histogram folded into the exported buckets: per bucket, how many
/// samples and their sum. On flush each bucket is recorded as its count of
/// samples at their mean, which lands in the same bucket and keeps the
/// exported `_sum` exact.
#[derive(Debug, Clone, Copy)]
struct Folded<const N: usize> {
    count: [u64; N],
    sum: [f64; N],
}

impl<const N: usize> Default for Folded<N> {
    fn default() -> Self {
        Self {
            count: [0; N],
            sum: [0.0; N],
        }
    }
}

impl<const N: usize> Folded<N> {
    fn add(&mut self, bounds: &[f64], value: f64, n: u64) {
        let i = bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(bounds.len())
            .min(N - 1);
        self.count[i] += n;
        self.sum[i] += value * n as f64;
    }

    fn flush(&self, h: &metrics::Histogram) {
        for (count, sum) in self.count.iter().zip(&self.sum).filter(|(c, _)| **c > 0) {
            h.record_many(sum / *count as f64, *count as usize);
        }
    }
}

/// One session's tallies. The per-frame and per-ack paths only add to
/// these plain fields; [`flush`](Self::flush) hands them to the recorder on
/// the session's progress tick and when it ends, so fan-out touches no
/// shared metric state per delivery.
#[derive(Debug, Default)]
pub struct SessionTally {
    delivered: u64,
    frames: Folded<{ FRAME_BUCKETS.len() + 1 }>,
    acked: u64,
    within_100ms: u64,
    within_1s: u64,
    propagation: Folded<{ PROPAGATION_BUCKETS.len() + 1 }>,
}

impl SessionTally {
    /// One frame of `count` events written to the node.
    pub fn frame(&mut self, count: u32) {
        self.delivered += u64::from(count);
        self.frames.add(&FRAME_BUCKETS, f64::from(count), 1);
    }

    /// The node acked `count` deliveries whose oldest was published `age_us`
    /// ago (it stands for all of them: conservative).
    pub fn acked(&mut self, count: u32, age_us: u64) {
        if count == 0 {
            return;
        }
        let n = u64::from(count);
        self.acked += n;
        if age_us <= 100_000 {
            self.within_100ms += n;
        }
        if age_us <= 1_000_000 {
            self.within_1s += n;
        }
        self.propagation
            .add(&PROPAGATION_BUCKETS, age_us as f64 / 1e6, n);
    }

    /// Hands everything tallied since the last flush to the recorder.
    pub fn flush(&mut self) {
        if self.delivered > 0 {
            counter!(EVENTS_DELIVERED).increment(self.delivered);
            self.frames.flush(&histogram!(FRAME_EVENTS));
        }
        if self.acked > 0 {
            counter!(ACKED).increment(self.acked);
            counter!(ACKED_100MS).increment(self.within_100ms);
            counter!(ACKED_1S).increment(self.within_1s);
            self.propagation.flush(&histogram!(PROPAGATION));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_keeps_sums_and_buckets() {
        let mut f = Folded::<{ FRAME_BUCKETS.len() + 1 }>::default();
        f.add(&FRAME_BUCKETS, 3.0, 1);
        f.add(&FRAME_BUCKETS, 4.0, 1);
        f.add(&FRAME_BUCKETS, 10_000.0, 2);
        // 3 and 4 share the (2, 4] bucket; their mean 3.5 stays inside it.
        assert_eq!(f.count[2], 2);
        assert_eq!(f.sum[2] / f.count[2] as f64, 3.5);
        assert_eq!((f.count[9], f.sum[9]), (2, 20_000.0));
    }
}
