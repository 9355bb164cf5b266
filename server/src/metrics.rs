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

/// Installs the Prometheus recorder and serves `/metrics` on `addr`. Must be
/// called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PROPAGATION.into()),
            &[
                0.000_25, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
                5.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(FRAME_EVENTS.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 8192.0],
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

/// Records a node's ack of `count` deliveries whose oldest was published
/// `age_us` ago.
pub fn record_acked(count: u32, age_us: u64) {
    if count == 0 {
        return;
    }
    let n = u64::from(count);
    histogram!(PROPAGATION).record_many(age_us as f64 / 1e6, count as usize);
    counter!(ACKED).increment(n);
    if age_us <= 100_000 {
        counter!(ACKED_100MS).increment(n);
    }
    if age_us <= 1_000_000 {
        counter!(ACKED_1S).increment(n);
    }
}

/// Records one frame of `count` events written to a node.
pub fn record_frame(count: u32) {
    counter!(EVENTS_DELIVERED).increment(u64::from(count));
    histogram!(FRAME_EVENTS).record(f64::from(count));
}

/// Records a reset.
pub fn record_reset(reason: &'static str) {
    counter!(RESETS, "reason" => reason).increment(1);
}

/// Sets the connected-streams gauge.
pub fn set_nodes(n: usize) {
    gauge!(NODES_CONNECTED).set(n as f64);
}
