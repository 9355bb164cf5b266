//! Metric names and the few helpers that record them, through the `metrics`
//! facade. The binary installs a Prometheus recorder, whose text the hub's
//! HTTP listener (`web.rs`) serves at `/metrics` on `metrics_listen`; a hub
//! run without one (tests) records into the no-op recorder.
//!
//! The histograms of the hot paths (propagation per acked delivery,
//! events per frame, commands per actor wake-up, the durable log's flush and
//! a drain's wait for it) are kept by the hub itself
//! as bucket counters ([`Histogram`]) and appended to the exporter's text;
//! so are the counters bumped per actor drain or per publish (events
//! appended, publish results: [`count_appended`], [`count_published`]),
//! handed to the recorder when the page is rendered. A `counter!` call
//! looks its series up in the recorder's registry (a hash and an
//! allocation) each time; an atomic add does not.
//! The `metrics` facade's Prometheus histogram stores every sample and sorts
//! them into buckets on upkeep: at half a million deliveries a second that
//! was a pushed sample per delivery and, every five seconds, tens of
//! milliseconds of draining on a runtime worker (a latency tail for every
//! node).
//!
//! Names follow Prometheus conventions (`_total` counters, base units).
//! Label values come from closed sets (results, reasons, ack levels), so
//! cardinality is bounded; per-node figures live in `Status`, not in labels.
//!
//! Every family is on the page from the first scrape, with `# HELP` and
//! `# TYPE`: [`install_recorder`] describes the recorder's families and sets each
//! of their series (every value of a closed label set) to zero, so that an
//! alert on the freshness SLI sees zero on a quiet hub, not "no data". Per
//! peer series start when the hub starts ([`sample`]). The page also
//! carries the standard process metrics (read from `/proc`) and
//! `freshness_build_info{version, revision}`.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
/// Seconds the durable log's writer took to write one group of drains and,
/// under `fsync = always`, flush it (etcd's `wal_fsync_duration_seconds`).
pub const LOG_FLUSH: &str = "freshness_log_flush_seconds";
/// Seconds a shard actor waited for one drain to be in the durable log:
/// the flush and the hand-offs to the writer and back. What a durable
/// `Publish` waits beyond an ephemeral one.
pub const LOG_APPEND: &str = "freshness_log_append_seconds";
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
/// Retained log events, sampled every second.
pub const LOG_EVENTS: &str = "freshness_log_retained_events";
/// Commands waiting in all shard queues, sampled every second.
pub const SHARD_QUEUE_DEPTH: &str = "freshness_shard_queue_depth";
/// The fullest shard queue, sampled every second.
pub const SHARD_QUEUE_MAX: &str = "freshness_shard_queue_depth_max";
/// Events appended but not acked, per connected node, as a histogram over
/// the nodes (bounded cardinality: no node label), sampled every second.
pub const NODE_LAG: &str = "freshness_node_lag_events";
/// The largest lag of any connected node, sampled every second.
pub const NODE_LAG_MAX: &str = "freshness_node_lag_events_max";
/// Connected nodes parked at their in-flight limit, sampled every second.
pub const NODES_PARKED: &str = "freshness_nodes_parked";
/// Age of the newest watermark the slowest node acked, sampled every second.
pub const NODE_STALENESS_MAX: &str = "freshness_node_staleness_seconds_max";
/// Replication lag per peer region, in events (from the peer's heads).
pub const PEER_LAG_EVENTS: &str = "freshness_peer_lag_events";
/// Replication lag per peer region, in seconds (age of its last watermark).
pub const PEER_LAG_SECONDS: &str = "freshness_peer_lag_seconds";
/// 1 while a peer's link is up, per peer region.
pub const PEER_CONNECTED: &str = "freshness_peer_connected";
/// 1 where this hub runs its region's link to the peer; 0 on a replica
/// whose link another replica holds (status `linked_by`): the link gauges
/// above speak for the region only where this is 1.
pub const PEER_LINK_HELD: &str = "freshness_peer_link_held";

/// Log writes (one per shard-actor drain) that failed, refusing the
/// drain's publishes.
pub const LOG_WRITE_ERRORS: &str = "freshness_log_write_errors_total";
/// 1 while every shard of the durable log can be written (always 1 for an
/// ephemeral hub).
pub const LOG_WRITABLE: &str = "freshness_log_writable";

/// TLS handshakes that failed (a plain-text client, an untrusted or
/// expired certificate, garbage on the port).
pub const TLS_HANDSHAKE_FAILURES: &str = "freshness_tls_handshake_failures_total";

/// Connections accepted, by the lane they are served on (`lanes.rs`):
/// `calls` (writers, status) or `streams` (nodes, peer hubs).
pub const CONNECTIONS: &str = "freshness_connections_total";
/// Lane label values of [`CONNECTIONS`].
const LANES: [&str; 2] = ["calls", "streams"];

/// Build information: always 1, labelled with the version and the git
/// revision the binary was built from.
pub const BUILD_INFO: &str = "freshness_build_info";

/// Result label values of [`PUBLISH_EVENTS`].
const PUBLISH_RESULTS: [&str; 3] = ["applied", "duplicate", "superseded"];
/// Code label values of [`PUBLISH_REFUSED`] (see `grpc::refused`).
const REFUSED_CODES: [&str; 4] = [
    "invalid_argument",
    "unavailable",
    "resource_exhausted",
    "other",
];
/// Reason label values of [`RESETS`].
const RESET_REASONS: [freshness::pb::ResetReason; 4] = [
    freshness::pb::ResetReason::CursorExpired,
    freshness::pb::ResetReason::EpochChanged,
    freshness::pb::ResetReason::SlowConsumer,
    freshness::pb::ResetReason::ReplicationGap,
];

/// A label and every value it takes.
type LabelSet = (&'static str, &'static [&'static str]);

/// Every counter the recorder keeps, with its help, and the label and its
/// values if it has one.
const COUNTERS: [(&str, &str, Option<LabelSet>); 11] = [
    (
        crate::auth::AUTH_DENIED,
        "Calls and streams refused by authentication or authorization, by reason.",
        Some(("reason", &crate::auth::DENIAL_REASONS)),
    ),
    (TLS_HANDSHAKE_FAILURES, "TLS handshakes that failed.", None),
    (
        CONNECTIONS,
        "Connections accepted, by the lane that serves them.",
        Some(("lane", &LANES)),
    ),
    (
        PUBLISH_EVENTS,
        "Events answered by publish calls, by result.",
        Some(("result", &PUBLISH_RESULTS)),
    ),
    (
        PUBLISH_REFUSED,
        "Publish calls refused, by gRPC code.",
        Some(("code", &REFUSED_CODES)),
    ),
    (EVENTS_APPENDED, "Events appended to the log.", None),
    (
        EVENTS_DELIVERED,
        "Event deliveries written to node streams.",
        None,
    ),
    (
        ACKED,
        "Deliveries acked by nodes (the freshness SLI's denominator).",
        None,
    ),
    (
        ACKED_100MS,
        "Deliveries acked within 100 ms of their publish.",
        None,
    ),
    (
        ACKED_1S,
        "Deliveries acked within 1 s of their publish.",
        None,
    ),
    (
        LOG_WRITE_ERRORS,
        "Durable log writes that failed, refusing their publishes.",
        None,
    ),
];

/// Every gauge the recorder keeps without labels, with its help.
const GAUGES: [(&str, &str); 9] = [
    (NODES_CONNECTED, "Connected subscribe streams."),
    (LOG_EVENTS, "Events retained in the log."),
    (
        SHARD_QUEUE_DEPTH,
        "Commands waiting in all shard actors' queues.",
    ),
    (
        SHARD_QUEUE_MAX,
        "Commands waiting in the fullest shard actor's queue.",
    ),
    (NODE_LAG_MAX, "Largest lag of a connected node, in events."),
    (
        NODES_PARKED,
        "Connected nodes parked at their in-flight limit.",
    ),
    (
        NODE_STALENESS_MAX,
        "Age of the newest watermark the slowest node acked.",
    ),
    (
        LOG_WRITABLE,
        "1 while every shard of the log can be written.",
    ),
    (
        BUILD_INFO,
        "Version and git revision of this build; always 1.",
    ),
];

/// Per-peer gauges, with their help.
const PEER_GAUGES: [(&str, &str); 4] = [
    (
        PEER_LAG_EVENTS,
        "Replication lag per peer region, in events.",
    ),
    (
        PEER_LAG_SECONDS,
        "Replication lag per peer region: age of its last watermark.",
    ),
    (
        PEER_CONNECTED,
        "1 while the replication link to the peer is up.",
    ),
    (
        PEER_LINK_HELD,
        "1 where this hub runs its region's link to the peer, 0 where another replica does.",
    ),
];

/// Every family on the page and its type, for checks of the page: the
/// recorder's, the hub's own histograms and the process metrics.
pub fn families() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = COUNTERS.iter().map(|c| (c.0, "counter")).collect();
    out.extend(GAUGES.iter().map(|g| (g.0, "gauge")));
    out.extend(PEER_GAUGES.iter().map(|g| (g.0, "gauge")));
    out.extend(histograms().iter().map(|h| (h.name, "histogram")));
    out.extend(PROCESS.iter().map(|p| (p.0, p.1)));
    out
}

/// The version and revision `freshness_build_info` carries.
pub fn build_info() -> (&'static str, &'static str) {
    (env!("CARGO_PKG_VERSION"), env!("FRESHNESS_REVISION"))
}

/// Describes every family of the recorder and sets each series to zero
/// (build info to 1), so the first scrape shows them all.
fn register_families() {
    for (name, help, labels) in COUNTERS {
        describe_counter!(name, help);
        match labels {
            Some((label, values)) => {
                for v in values {
                    counter!(name, label => *v).increment(0);
                }
            }
            None => counter!(name).increment(0),
        }
    }
    for reason in RESET_REASONS {
        counter!(RESETS, "reason" => reason.as_str_name()).increment(0);
    }
    describe_counter!(RESETS, "Resets sent to nodes, by reason.");
    for (name, help) in GAUGES {
        describe_gauge!(name, help);
        if name != BUILD_INFO {
            // Gauges a hub sets when it starts keep their value.
            gauge!(name).increment(0.0);
        }
    }
    for (name, help) in PEER_GAUGES {
        describe_gauge!(name, help);
    }
    let (version, revision) = build_info();
    gauge!(BUILD_INFO, "version" => version, "revision" => revision).set(1.0);
}

/// How often [`sample`] runs.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the sampler reads once a second, handed to it by whoever owns the
/// hub's state (`server.rs`), so that this module knows no `Hub`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Commands waiting in each shard queue.
    pub queue_depths: Vec<usize>,
    /// The hub's status.
    pub status: crate::status::HubStatus,
}

/// Samples the gauges that describe state rather than events: queue depths,
/// per-node lag (folded over the nodes), per-peer replication lag, the log.
/// `peers` are the configured peer regions (their series exist from the
/// start); `snapshot` is taken once a second, until `shutdown`.
pub async fn sample(
    peers: Vec<String>,
    mut snapshot: impl FnMut() -> Snapshot,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // Every configured peer's series exist before its link reports.
    for region in &peers {
        for (name, _) in PEER_GAUGES {
            gauge!(name, "peer" => region.clone()).increment(0.0);
        }
    }
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Snapshot {
            queue_depths: depths,
            status,
        } = snapshot();
        gauge!(SHARD_QUEUE_DEPTH).set(depths.iter().sum::<usize>() as f64);
        gauge!(SHARD_QUEUE_MAX).set(depths.iter().copied().max().unwrap_or(0) as f64);
        let (mut max_lag, mut max_stale, mut parked) = (0u64, 0u64, 0usize);
        for n in status.nodes.iter().filter(|n| !n.replication) {
            parked += usize::from(n.parked);
            NODE_LAG_HISTOGRAM.observe(n.lag_events as f64);
            max_lag = max_lag.max(n.lag_events);
            max_stale = max_stale.max(n.staleness_ms);
        }
        gauge!(NODE_LAG_MAX).set(max_lag as f64);
        gauge!(NODES_PARKED).set(parked as f64);
        gauge!(NODE_STALENESS_MAX).set(max_stale as f64 / 1000.0);
        for p in &status.peers {
            let region = p.region.clone();
            gauge!(PEER_LAG_EVENTS, "peer" => region.clone()).set(p.lag_events as f64);
            gauge!(PEER_LAG_SECONDS, "peer" => region.clone()).set(p.lag_ms as f64 / 1000.0);
            gauge!(PEER_CONNECTED, "peer" => region.clone()).set(if p.connected {
                1.0
            } else {
                0.0
            });
            // `linked_by` names the lease holder, this hub included; a hub
            // without replicas has none and runs its links itself.
            let held = p.linked_by.as_deref().is_none_or(|by| by == status.hub_id);
            let held = if held { 1.0 } else { 0.0 };
            gauge!(PEER_LINK_HELD, "peer" => region).set(held);
        }
    }
}

/// Bucket bounds of [`PROPAGATION`], in seconds.
const PROPAGATION_BUCKETS: [f64; 14] = [
    0.000_25, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];
/// Bucket bounds of [`FRAME_EVENTS`].
const FRAME_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 8192.0];

/// The metrics recorder could not be installed (one is already).
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct RecorderError(#[source] metrics_exporter_prometheus::BuildError);

/// The process-wide recorder's handle, once [`install_recorder`] ran.
static PROMETHEUS: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the process-wide Prometheus recorder, whose text the hub's
/// HTTP listener serves at `/metrics` (see `web.rs`), with every family
/// registered at zero. Must be called inside a tokio runtime; a second call
/// fails.
pub fn install_recorder() -> Result<(), RecorderError> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(RecorderError)?;
    register_families();
    tokio::spawn(upkeep(handle.clone()));
    // The recorder install above succeeds once per process, so this slot
    // is still empty.
    let _ = PROMETHEUS.set(handle);
    Ok(())
}

/// How often the recorder runs its upkeep (it keeps no histogram: every
/// histogram is the hub's own).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Events appended to the log since start ([`EVENTS_APPENDED`]).
static APPENDED: AtomicU64 = AtomicU64::new(0);
/// Events answered by publish, by result in [`PUBLISH_RESULTS`] order
/// ([`PUBLISH_EVENTS`]).
static PUBLISHED: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Counts `n` events appended to the log (once per actor drain).
pub fn count_appended(n: u64) {
    APPENDED.fetch_add(n, Ordering::Relaxed);
}

/// Counts one publish call's events by result, in `Outcome` order
/// (applied, duplicate, superseded: `Published::by_outcome`).
pub fn count_published(by_result: [u64; 3]) {
    for (total, n) in PUBLISHED.iter().zip(by_result) {
        if n > 0 {
            total.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Hands the hub's own counters to the recorder, whose page then carries
/// their totals.
fn hand_over_counts() {
    counter!(EVENTS_APPENDED).absolute(APPENDED.load(Ordering::Relaxed));
    for (result, total) in PUBLISH_RESULTS.into_iter().zip(&PUBLISHED) {
        counter!(PUBLISH_EVENTS, "result" => result).absolute(total.load(Ordering::Relaxed));
    }
}

/// The `/metrics` text: the recorder's, the hub's own histograms, the
/// process metrics. `None` when no recorder is installed (a hub run by a
/// test).
pub fn render() -> Option<String> {
    let prometheus = PROMETHEUS.get()?;
    hand_over_counts();
    let mut text = prometheus.render();
    for h in histograms() {
        h.render(&mut text);
    }
    render_process(&mut text);
    Some(text)
}

/// A Prometheus histogram the hub keeps itself: a counter per bucket, a
/// count and a sum, a few atomic adds per observation or per folded batch
/// of them, whatever their number.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one above every bound.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Self {
        Self {
            name,
            help,
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// The bucket a value falls in.
    fn bucket(&self, value: f64) -> usize {
        self.bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len())
    }

    /// One observation.
    pub fn observe(&self, value: f64) {
        self.add(self.bucket(value), 1, value);
    }

    /// `n` observations in bucket `i` that sum to `sum`.
    fn add(&self, i: usize, n: u64, sum: f64) {
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + sum).to_bits())
            });
    }

    /// Appends the histogram in the Prometheus text format.
    fn render(&self, out: &mut String) {
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// [`PROPAGATION`].
static PROPAGATION_HISTOGRAM: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::new(
        PROPAGATION,
        "Seconds from an event's publish to a node's ack of it.",
        &PROPAGATION_BUCKETS,
    )
});
/// [`FRAME_EVENTS`].
static FRAME_HISTOGRAM: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::new(
        FRAME_EVENTS,
        "Events per frame sent to a node.",
        &FRAME_BUCKETS,
    )
});
/// [`SHARD_DRAIN`].
static DRAIN_HISTOGRAM: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::new(
        SHARD_DRAIN,
        "Commands a shard actor served per wake-up.",
        &DRAIN_BUCKETS,
    )
});
/// [`NODE_LAG`].
static NODE_LAG_HISTOGRAM: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::new(
        NODE_LAG,
        "Lag of each connected node in events, sampled every second.",
        &NODE_LAG_BUCKETS,
    )
});
/// [`LOG_FLUSH`].
static LOG_FLUSH_HISTOGRAM: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::new(
        LOG_FLUSH,
        "Seconds to write (and, with fsync = always, flush) one group of drains to the durable log.",
        &LOG_BUCKETS,
    )
});
/// [`LOG_APPEND`].
static LOG_APPEND_HISTOGRAM: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::new(
        LOG_APPEND,
        "Seconds a shard actor waited for one drain to be in the durable log.",
        &LOG_BUCKETS,
    )
});
/// Bucket bounds of [`LOG_FLUSH`] and [`LOG_APPEND`]: a flush of this
/// machine's kind takes a few hundred microseconds.
const LOG_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0,
];

/// Records one group written by the log's writer.
pub fn record_log_flush(seconds: f64) {
    LOG_FLUSH_HISTOGRAM.observe(seconds);
}

/// Records one drain's wait for the durable log.
pub fn record_log_append(seconds: f64) {
    LOG_APPEND_HISTOGRAM.observe(seconds);
}

/// Bucket bounds of [`NODE_LAG`].
const NODE_LAG_BUCKETS: [f64; 8] = [
    0.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
    10_000_000.0,
];

/// The hub's own histograms, in page order.
fn histograms() -> [&'static Histogram; 6] {
    [
        &PROPAGATION_HISTOGRAM,
        &FRAME_HISTOGRAM,
        &DRAIN_HISTOGRAM,
        &NODE_LAG_HISTOGRAM,
        &LOG_FLUSH_HISTOGRAM,
        &LOG_APPEND_HISTOGRAM,
    ]
}

/// The standard process metrics: name, type, help.
const PROCESS: [(&str, &str, &str); 6] = [
    (
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    ),
    (
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    ),
    (
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
    ),
    (
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
    ),
    (
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
    ),
    (
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    ),
];

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on every
/// Linux architecture the hub builds for).
const TICKS_PER_SECOND: f64 = 100.0;

/// The process metrics' values from `/proc` (Linux); a figure that cannot
/// be read is 0, so that every family is always on the page.
fn process_values() -> [f64; 6] {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let stat = read("/proc/self/stat");
    // Fields after the command name, which may hold spaces: field 3 first.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> f64 {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (field(14) + field(15)) / TICKS_PER_SECOND;
    let kib = |status: &str, key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |k| k * 1024.0)
    };
    let status = read("/proc/self/status");
    let boot = read("/proc/stat")
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let start = if boot > 0.0 {
        boot + field(22) / TICKS_PER_SECOND
    } else {
        0.0
    };
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count) as f64;
    let max_fds = read("/proc/self/limits")
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    [
        cpu,
        kib(&status, "VmRSS:"),
        kib(&status, "VmSize:"),
        open_fds,
        max_fds,
        start,
    ]
}

/// Appends the process metrics in the Prometheus text format.
fn render_process(out: &mut String) {
    for ((name, kind, help), value) in PROCESS.iter().zip(process_values()) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
}

/// Bucket bounds of [`SHARD_DRAIN`].
const DRAIN_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0];

/// Records how many commands a shard actor served in one wake-up.
pub fn record_drain(commands: usize) {
    DRAIN_HISTOGRAM.observe(commands as f64);
}

/// A histogram folded into [`Histogram`] buckets: per bucket, how many
/// samples and their sum, added to the shared histogram on flush.
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

    fn flush(&self, h: &Histogram) {
        for (i, (count, sum)) in self.count.iter().zip(&self.sum).enumerate() {
            if *count > 0 {
                h.add(i, *count, *sum);
            }
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

    /// Hands everything tallied since the last flush to the recorder and
    /// to the hub's own totals (its status page).
    pub fn flush(&mut self, stats: &crate::stats::HubStats) {
        stats.flushed(
            self.delivered,
            self.acked,
            self.within_100ms,
            self.within_1s,
        );
        if self.delivered > 0 {
            counter!(EVENTS_DELIVERED).increment(self.delivered);
            self.frames.flush(&FRAME_HISTOGRAM);
        }
        if self.acked > 0 {
            counter!(ACKED).increment(self.acked);
            counter!(ACKED_100MS).increment(self.within_100ms);
            counter!(ACKED_1S).increment(self.within_1s);
            self.propagation.flush(&PROPAGATION_HISTOGRAM);
        }
        *self = Self::default();
    }
}

/// Records a reset.
pub fn record_reset(reason: &'static str) {
    counter!(RESETS, "reason" => reason).increment(1);
}

/// Counts a failed log write.
pub fn log_write_failed() {
    counter!(LOG_WRITE_ERRORS).increment(1);
}

/// Sets the log-writable gauge.
pub fn set_log_writable(ok: bool) {
    gauge!(LOG_WRITABLE).set(if ok { 1.0 } else { 0.0 });
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
