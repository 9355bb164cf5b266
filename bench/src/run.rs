//! One measured run: start (or reach) the server, connect the nodes, publish
//! open-loop at a fixed rate, let the deliveries drain, and summarise.
//!
//! The publisher wakes every millisecond and sends, in one call (one
//! `Publish`, one pipeline of `PUBLISH`es, one burst of NATS publishes),
//! every event owed by the clock since the run began. It never waits for an
//! answer before the next call (up to [`MAX_PUBLISH_CALLS`] in flight), so a
//! slow server shows up as latency and refusals, not as a lower offered
//! rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};

use crate::procfs;
use crate::server::{HubLauncher, Server};
use crate::stats::{Summary, XorShift, Zipf, due, histogram, record};
use crate::target::{self, HubConn, Kind, NodeCtl, Publisher, Target};
use crate::tracker::{Recorder, Tracker};

/// Publish calls in flight at once.
pub const MAX_PUBLISH_CALLS: usize = 64;
/// Most events in one publish call (the hub's default limit).
pub const MAX_BATCH: usize = 10_000;
/// Nodes connecting at once.
const CONNECT_WAVE: usize = 250;

/// Where the servers are and how to reach them.
#[derive(Debug, Clone)]
pub struct Env {
    /// Start a fresh hub per run with this, unless `hub_url` is set.
    pub launcher: HubLauncher,
    /// An external hub.
    pub hub_url: Option<String>,
    /// Its pid, to measure it.
    pub hub_pids: Vec<u32>,
    /// NATS server.
    pub nats_url: String,
    /// Its pid.
    pub nats_pid: Option<u32>,
    /// Redis server.
    pub redis_url: String,
    /// Its pid.
    pub redis_pid: Option<u32>,
    /// Hub nodes sharing one HTTP/2 connection (1 = own connection each).
    pub nodes_per_conn: usize,
    /// Least time between two acks of a hub node.
    pub ack_interval: Duration,
    /// Longest wait before a hub node acks a batch the hub did not ask to
    /// have acked at once.
    pub lazy_ack_interval: Duration,
    /// Ack level of the hub's publishes.
    pub ack_level: freshness::pb::AckLevel,
    /// Written into every result: how server and generator were placed.
    pub placement: String,
}

impl Env {
    async fn server(&self, kind: Kind) -> Result<Server> {
        Ok(match kind {
            Kind::Hub | Kind::HubTls => match &self.hub_url {
                Some(url) => Server::external(url.clone(), self.hub_pids.clone()),
                None => Server::spawn_hub(&self.launcher, kind == Kind::HubTls).await?,
            },
            Kind::Nats => {
                Server::external(self.nats_url.clone(), self.nats_pid.into_iter().collect())
            }
            Kind::Redis => {
                Server::external(self.redis_url.clone(), self.redis_pid.into_iter().collect())
            }
        })
    }
}

/// How entities are picked.
#[derive(Debug, Clone, Copy)]
pub enum Dist {
    /// Event `i` goes to entity `i mod entities`.
    RoundRobin,
    /// Uniformly at random.
    Uniform,
    /// Zipf with this exponent (rank 0 hottest).
    Zipf(f64),
}

/// The reconnect storm of B6: every node drops its stream at `down`, and
/// all reconnect at once, from their cursors, at `up` (both from the start
/// of publishing).
#[derive(Debug, Clone, Copy)]
pub struct Storm {
    /// When the streams drop.
    pub down: Duration,
    /// When every node reconnects.
    pub up: Duration,
}

/// Share of its cores above which the load generator, not the server, is
/// taken to bound a run.
pub const GENERATOR_BOUND: f64 = 0.9;

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Workload name, e.g. `b1`.
    pub workload: String,
    /// System under test.
    pub kind: Kind,
    /// Nodes that read and count.
    pub nodes: usize,
    /// Extra nodes that subscribe and never read.
    pub stalled: usize,
    /// Events per second offered.
    pub rate: u64,
    /// Publishing time.
    pub duration: Duration,
    /// Start of publishing to start of latency measurement.
    pub warmup: Duration,
    /// Entities events are spread over.
    pub entities: u32,
    /// How they are picked.
    pub dist: Dist,
    /// Check per-entity order and final versions at every node.
    pub check_order: bool,
    /// Retry refused publishes until accepted (B3), instead of counting them.
    pub retry_refused: bool,
    /// Longest wait for stragglers after publishing.
    pub drain: Duration,
    /// B6.
    pub storm: Option<Storm>,
    /// Before publishing, measure the server's CPU with every node
    /// connected and nothing published for this long (B7).
    pub idle: Duration,
    /// Events per publish call (one `Publish`, one write of that many NATS
    /// `PUB`s or pipelined Redis `PUBLISH`es); 0: every event owed at the
    /// millisecond tick, in one call.
    pub batch: usize,
}

/// One run's results: one JSON object, one table row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunResult {
    /// Workload name.
    pub workload: String,
    /// `hub`, `nats` or `redis`.
    pub target: String,
    /// Counted nodes.
    pub nodes: usize,
    /// Stalled nodes on top.
    pub stalled_nodes: usize,
    /// Offered events per second.
    pub rate: u64,
    /// Publishing time in seconds.
    pub duration_s: f64,
    /// Events accepted with a delivery due to every node.
    pub published: u64,
    /// Events the server refused (overload), not retried.
    pub refused: u64,
    /// Unique (event, node) deliveries to counted nodes.
    pub delivered: u64,
    /// (event, node) deliveries owed and never seen.
    pub lost: u64,
    /// Deliveries seen twice.
    pub duplicates: u64,
    /// Events older than one already seen for the same entity, at a node.
    pub order_violations: u64,
    /// Resets received (hub).
    pub resets: u64,
    /// Node streams that failed.
    pub errors: u64,
    /// Publish → the last counted node received it.
    pub completion_p50_us: u64,
    /// See `completion_p50_us`.
    pub completion_p99_us: u64,
    /// See `completion_p50_us`.
    pub completion_p999_us: u64,
    /// See `completion_p50_us`.
    pub completion_max_us: u64,
    /// Events whose completion was measured.
    pub completion_count: u64,
    /// Publish → one node received it, over every delivery.
    pub delivery_p99_us: u64,
    /// Publish → the last counted node wrote its ack (hub only: peers have
    /// no acks).
    pub ack_p99_us: Option<u64>,
    /// Unique deliveries per second of publishing.
    pub deliveries_per_s: f64,
    /// Server CPU time per delivery, over publishing and drain.
    pub hub_cpu_ns_per_delivery: Option<f64>,
    /// Server CPU use over the same window, in cores.
    pub server_cpu_cores: Option<f64>,
    /// Server peak RSS (the run's own for a fresh hub; the highest sample
    /// during the run for an external server).
    pub hub_peak_rss_bytes: Option<u64>,
    /// Server RSS before the nodes connected.
    pub rss_before_nodes_bytes: Option<u64>,
    /// Server RSS once every node was connected.
    pub rss_nodes_connected_bytes: Option<u64>,
    /// Load generator CPU use, in cores (2 would mean it was the limit on
    /// this machine; 1 when pinned to one core).
    pub loadgen_cpu_cores: Option<f64>,
    /// The generator used at least [`GENERATOR_BOUND`] of the cores it may
    /// run on, or its subscribers or its publisher alone did of theirs: the
    /// run measured the client as much as the server.
    pub generator_bound: bool,
    /// CPU of the subscribers (the runtime's worker threads, where every
    /// node runs), in cores, over publishing and drain.
    pub subscriber_cpu_cores: Option<f64>,
    /// CPU of the publisher (its own thread), in cores, over publishing.
    pub publisher_cpu_cores: Option<f64>,
    /// Events per publish call (absent: all owed at each 1 ms tick).
    pub events_per_publish: Option<usize>,
    /// Publish call → its answer (hub: the `Publish` reply at the run's ack
    /// level; Redis: the call's last `PUBLISH` reply; NATS, which answers
    /// nothing: the write).
    pub publish_call_p50_us: Option<u64>,
    /// See `publish_call_p50_us`.
    pub publish_call_p99_us: Option<u64>,
    /// How server and generator were placed.
    pub placement: String,
    /// Workload-specific figures.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl RunResult {
    /// Adds a workload-specific figure.
    pub fn put(&mut self, key: &str, value: impl Serialize) {
        if let Ok(v) = serde_json::to_value(value) {
            self.extra.insert(key.to_owned(), v);
        }
    }
}

/// Runs one spec.
pub async fn run(env: &Env, spec: &Spec) -> Result<RunResult> {
    let server = env.server(spec.kind).await?;
    let result = run_on(env, spec, &server).await;
    server.stop().await;
    result
}

fn secs_f(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn run_on(env: &Env, spec: &Spec, server: &Server) -> Result<RunResult> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run_no = RUN.fetch_add(1, Ordering::Relaxed);
    let target = Target {
        kind: spec.kind,
        url: server.url().to_owned(),
        topic: format!("fresh.bench.{}.{run_no}", std::process::id()),
        ack_level: env.ack_level,
    };
    let capacity = (spec.rate as f64 * secs_f(spec.duration)).ceil() as usize + 16;
    let tracker = Tracker::new(capacity, spec.nodes as u32);
    let entities = if spec.check_order {
        spec.entities as usize
    } else {
        0
    };
    let rss_before = procfs::rss_all(&server.pids).map(|r| r.0);

    // Nodes, in waves so the listen backlog never overflows.
    let ctl = NodeCtl::new(env.ack_interval, env.lazy_ack_interval);
    let total = spec.nodes + spec.stalled;
    let mut shared: Option<HubConn> = None;
    let mut handles = Vec::with_capacity(total);
    for i in 0..total {
        let hub = match spec.kind {
            k if k.is_hub() && env.nodes_per_conn > 1 => {
                if i % env.nodes_per_conn == 0 || shared.is_none() {
                    shared = Some(HubConn::new(server.node_url(i), true).await?);
                }
                shared.clone()
            }
            k if k.is_hub() => Some(HubConn::new(server.node_url(i), false).await?),
            _ => None,
        };
        let counted = i < spec.nodes;
        let rec = Recorder::new(tracker.clone(), counted, entities);
        let node_id = format!("bench-{run_no}-{i}");
        handles.push(tokio::spawn(target::run_node(
            target.clone(),
            hub,
            node_id,
            rec,
            !counted,
            ctl.clone(),
        )));
        if (i + 1) % CONNECT_WAVE == 0 || i + 1 == total {
            wait_live(&tracker, i + 1, &handles).await?;
        }
    }
    // A moment for the server to settle (first progress ticks) before the
    // idle footprint is read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_connected = procfs::rss_all(&server.pids).map(|r| r.0);
    let idle_cores = if spec.idle.is_zero() {
        None
    } else {
        let a = procfs::cpu_ns_all(&server.pids);
        let t = Instant::now();
        tokio::time::sleep(spec.idle).await;
        let b = procfs::cpu_ns_all(&server.pids);
        a.zip(b)
            .map(|(a, b)| b.saturating_sub(a) as f64 / 1e9 / secs_f(t.elapsed()))
    };

    let peak = Arc::new(AtomicU64::new(0));
    let sampler = (!server.pids.is_empty()).then(|| {
        let (peak, pids) = (peak.clone(), server.pids.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                match procfs::rss_all(&pids) {
                    Some((rss, _)) => peak.fetch_max(rss, Ordering::Relaxed),
                    None => return,
                };
            }
        })
    });

    let cpu0 = procfs::cpu_ns_all(&server.pids);
    let threads0 = procfs::cpu_ns_by_thread(&server.pids);
    let self0 = procfs::self_cpu_ns();
    let subs0 = procfs::self_threads_cpu_ns(crate::WORKER_THREAD);
    let t0 = Instant::now();
    tracker.measure_from_us.store(
        tracker.now_us() + spec.warmup.as_micros() as u64,
        Ordering::Relaxed,
    );

    let published = publish_on_own_thread(spec, &target, &tracker, &ctl).await?;
    let publish_end = Instant::now();

    // Drain: wait for every delivery (and, on the hub, every ack) owed.
    let owed_acks = spec.kind.is_hub();
    let deadline = Instant::now() + spec.drain;
    let mut drained = false;
    while Instant::now() < deadline {
        let applied = published.applied.load(Ordering::Acquire);
        let want = applied * spec.nodes as u64;
        if published.calls_done()
            && tracker.delivered.load(Ordering::Acquire) >= want
            && (!owed_acks || tracker.acked.load(Ordering::Acquire) >= want)
        {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t1 = Instant::now();
    let cpu1 = procfs::cpu_ns_all(&server.pids);
    let threads1 = procfs::cpu_ns_by_thread(&server.pids);
    let self1 = procfs::self_cpu_ns();
    let subs1 = procfs::self_threads_cpu_ns(crate::WORKER_THREAD);
    let wall = secs_f(t1 - t0);

    let status = if spec.kind.is_hub() && spec.stalled > 0 {
        server.hub_status().await
    } else {
        None
    };

    ctl.stop.cancel();
    let mut recs = Vec::with_capacity(total);
    for h in handles {
        if let Ok(r) = h.await {
            recs.push(r);
        }
    }
    if let Some(s) = sampler {
        s.abort();
    }
    let peak_sampled = Some(peak.load(Ordering::Relaxed)).filter(|p| *p > 0);
    let hwm = procfs::rss_all(&server.pids).map(|r| r.1);
    let rss_now = procfs::rss_all(&server.pids).map(|r| r.0);

    let tally = tracker.tally();
    let mut completion = histogram();
    let mut ack = histogram();
    let mut delivery = histogram();
    let mut r = RunResult {
        workload: spec.workload.clone(),
        target: spec.kind.name().into(),
        nodes: spec.nodes,
        stalled_nodes: spec.stalled,
        rate: spec.rate,
        duration_s: secs_f(spec.duration),
        published: tally.applied,
        refused: published.refused.load(Ordering::Acquire),
        lost: tally.missing,
        placement: env.placement.clone(),
        ..Default::default()
    };
    if spec.kind.is_hub() {
        r.put("ack_interval_us", env.ack_interval.as_micros() as u64);
        r.put(
            "lazy_ack_interval_us",
            env.lazy_ack_interval.as_micros() as u64,
        );
        r.put("ack_level", env.ack_level.as_str_name());
    }
    for rec in recs.iter().take(spec.nodes) {
        add(&mut completion, &rec.completion);
        add(&mut ack, &rec.ack);
        add(&mut delivery, &rec.delivery);
        r.delivered += rec.delivered;
        r.duplicates += rec.duplicates;
        r.order_violations += rec.order_violations;
        r.resets += rec.resets;
    }
    r.errors = recs.iter().map(|x| x.errors).sum();
    let c = Summary::of(&completion);
    r.completion_p50_us = c.p50;
    r.completion_p99_us = c.p99;
    r.completion_p999_us = c.p999;
    r.completion_max_us = c.max;
    r.completion_count = c.count;
    r.delivery_p99_us = Summary::of(&delivery).p99;
    if spec.kind.is_hub() {
        r.ack_p99_us = Some(Summary::of(&ack).p99);
    }
    r.deliveries_per_s = r.delivered as f64 / secs_f(spec.duration).max(1e-9);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let ns = b.saturating_sub(a) as f64;
        r.server_cpu_cores = Some(ns / 1e9 / wall);
        if r.delivered > 0 {
            r.hub_cpu_ns_per_delivery = Some(ns / r.delivered as f64);
        }
    }
    if r.delivered > 0 && !threads1.is_empty() {
        // Where the server's CPU went, by thread name (a thread started
        // during the run counts from zero).
        let by: std::collections::BTreeMap<&str, f64> = threads1
            .iter()
            .map(|(name, &b)| {
                let a = threads0.get(name).copied().unwrap_or(0);
                (
                    name.as_str(),
                    b.saturating_sub(a) as f64 / r.delivered as f64,
                )
            })
            .filter(|(_, ns)| *ns >= 1.0)
            .collect();
        r.put("cpu_ns_per_delivery_by_thread", by);
    }
    // Cores this process may run on (its affinity, e.g. one under taskset);
    // the runtime has as many worker threads.
    let allowed = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    if let (Some(a), Some(b)) = (self0, self1) {
        let cores = b.saturating_sub(a) as f64 / 1e9 / wall;
        r.loadgen_cpu_cores = Some(cores);
        r.generator_bound = cores >= GENERATOR_BOUND * allowed;
    }
    if let (Some(a), Some(b)) = (subs0, subs1) {
        let cores = b.saturating_sub(a) as f64 / 1e9 / wall;
        r.subscriber_cpu_cores = Some(cores);
        r.generator_bound |= cores >= GENERATOR_BOUND * allowed;
    }
    r.put("publisher_fifo", published.fifo);
    if let Some(cores) = published.cpu_cores {
        r.publisher_cpu_cores = Some(cores);
        r.generator_bound |= cores >= GENERATOR_BOUND;
    }
    r.events_per_publish = (spec.batch > 0).then_some(spec.batch);
    r.hub_peak_rss_bytes = if server.fresh {
        hwm
    } else {
        peak_sampled.or(rss_now)
    };
    r.rss_before_nodes_bytes = rss_before;
    r.rss_nodes_connected_bytes = rss_connected;
    if !drained {
        r.put("drained", false);
    }
    if let Some(c) = idle_cores {
        r.put("idle_server_cpu_cores", c);
    }
    if tally.unsettled > 0 {
        r.put("unsettled_publishes", tally.unsettled);
    }
    if tally.not_applied > 0 {
        r.put("not_applied", tally.not_applied);
    }
    let retries = published.retries.load(Ordering::Relaxed);
    if retries > 0 {
        r.put("publish_retries", retries);
    }
    let calls = Summary::of(&published.call_latency.lock());
    if calls.count > 0 {
        r.publish_call_p50_us = Some(calls.p50);
        r.publish_call_p99_us = Some(calls.p99);
    }
    r.put("publish_tail_ms", secs_f(t1 - publish_end) * 1e3);
    if let Some(status) = status {
        let stalled: Vec<_> = status
            .nodes
            .iter()
            .filter(|n| {
                n.node_id
                    .rsplit('-')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i >= spec.nodes)
            })
            .map(|n| serde_json::json!({"parked": n.parked, "in_flight": n.in_flight, "lag_events": n.lag_events}))
            .collect();
        r.put("stalled_status", stalled);
        r.put("hub_retained_events", status.retained_events);
    }
    if spec.check_order {
        convergence(&mut r, &tracker, &published);
    }
    if let Some(storm) = published.storm {
        r.put("storm_live_ms", storm.live_ms);
        r.put("storm_caught_up_ms", storm.caught_up_ms);
        r.put(
            "storm_not_resumed",
            recs.iter().map(|x| x.not_resumed).sum::<u64>(),
        );
    }
    Ok(r)
}

fn add(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Same bounds everywhere: adding cannot fail.
    let _ = into.add(from);
}

/// Waits until `n` node streams are live; fails if a node task ended.
async fn wait_live(
    tracker: &Tracker,
    n: usize,
    handles: &[tokio::task::JoinHandle<Recorder>],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tracker.live.load(Ordering::Acquire) >= n {
            return Ok(());
        }
        if let Some(i) = handles.iter().position(|h| h.is_finished()) {
            bail!("node {i} failed to connect");
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} nodes connected within 60 s",
                tracker.live.load(Ordering::Acquire)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Convergence of B3: every node must hold the newest accepted version of
/// every entity; the time from the end of the burst (the last event handed
/// to the server) until the last such event reached the last node.
fn convergence(r: &mut RunResult, tracker: &Tracker, p: &Published) {
    let end_us = p.last_sent_us;
    let mut last = 0u64;
    let mut stale = 0u64;
    let mut entities = 0u64;
    for v in p.final_versions.iter() {
        let v = v.load(Ordering::Acquire);
        if v == 0 {
            continue;
        }
        entities += 1;
        match tracker.completed_at(v as usize - 1) {
            Some(t) => last = last.max(t),
            None => stale += 1,
        }
    }
    r.put("entities_touched", entities);
    r.put("entities_not_converged", stale);
    if stale == 0 {
        r.put(
            "convergence_after_end_ms",
            last.saturating_sub(end_us) as f64 / 1e3,
        );
    }
}

/// What the publisher did.
struct Published {
    applied: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    calls: Arc<Semaphore>,
    final_versions: Arc<Vec<AtomicU64>>,
    storm: Option<StormResult>,
    /// Publish call → its answer.
    call_latency: Arc<parking_lot::Mutex<Histogram<u64>>>,
    /// When the last event was handed to the server (µs since origin): the
    /// end of the burst.
    last_sent_us: u64,
    /// CPU of the publisher's thread over its life, in cores.
    cpu_cores: Option<f64>,
    /// Whether the publisher's thread ran under SCHED_FIFO.
    fifo: bool,
}

impl Published {
    fn calls_done(&self) -> bool {
        self.calls.available_permits() == MAX_PUBLISH_CALLS
    }
}

#[derive(Debug, Clone, Copy)]
struct StormResult {
    live_ms: Option<f64>,
    caught_up_ms: Option<f64>,
}

/// Runs [`publish`] on a thread of its own (a current-thread runtime), so
/// that its CPU is measured apart from the subscribers', for every target
/// alike. The thread runs under SCHED_FIFO where the bench may set it
/// (`publisher_fifo` in the results): a writer has a machine of its own,
/// and on the bench's one core a publisher that waits for the simulated
/// nodes' worker to yield adds that wait to every call it measures. Its
/// work is small (a few hundredths of a core), so it takes little from them.
async fn publish_on_own_thread(
    spec: &Spec,
    target: &Target,
    tracker: &Arc<Tracker>,
    ctl: &NodeCtl,
) -> Result<Published> {
    let (spec, target, tracker, ctl) = (spec.clone(), target.clone(), tracker.clone(), ctl.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(PUBLISHER_THREAD.into())
        .spawn(move || {
            let fifo = procfs::run_this_thread_fifo();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let result = match rt {
                Ok(rt) => {
                    let cpu0 = procfs::thread_self_cpu_ns();
                    let t0 = Instant::now();
                    let mut result = rt.block_on(publish(&spec, &target, &tracker, &ctl));
                    if let Ok(p) = result.as_mut() {
                        p.fifo = fifo;
                    }
                    let cpu1 = procfs::thread_self_cpu_ns();
                    if let (Ok(p), Some(a), Some(b)) = (result.as_mut(), cpu0, cpu1) {
                        p.cpu_cores =
                            Some(b.saturating_sub(a) as f64 / 1e9 / secs_f(t0.elapsed()).max(1e-9));
                    }
                    result
                }
                Err(e) => Err(e.into()),
            };
            let _ = tx.send(result);
        })?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the publisher thread ended without a result"))?
}

/// Name of the publisher's thread.
const PUBLISHER_THREAD: &str = "bench-publisher";

/// The open-loop publisher (see the module docs).
async fn publish(
    spec: &Spec,
    target: &Target,
    tracker: &Arc<Tracker>,
    ctl: &NodeCtl,
) -> Result<Published> {
    let publisher = Publisher::connect(target).await?;
    let p = Published {
        applied: Arc::new(AtomicU64::new(0)),
        refused: Arc::new(AtomicU64::new(0)),
        retries: Arc::new(AtomicU64::new(0)),
        calls: Arc::new(Semaphore::new(MAX_PUBLISH_CALLS)),
        final_versions: Arc::new(if spec.check_order {
            (0..spec.entities).map(|_| AtomicU64::new(0)).collect()
        } else {
            Vec::new()
        }),
        storm: None,
        call_latency: Arc::new(parking_lot::Mutex::new(histogram())),
        last_sent_us: 0,
        cpu_cores: None,
        fifo: false,
    };
    let mut last_sent_us = 0;
    let zipf = match spec.dist {
        Dist::Zipf(s) => Some(Zipf::new(spec.entities as usize, s)),
        _ => None,
    };
    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
    let entities = u64::from(spec.entities.max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut storm_monitor = None;
    let (mut downed, mut upped) = (false, false);
    'ticks: loop {
        tick.tick().await;
        let el = start.elapsed();
        // The last tick sends what the whole duration owes, a short call
        // included, so a batch size loses no event of the plan.
        let last = el >= spec.duration;
        if let Some(storm) = spec.storm {
            if !downed && el >= storm.down {
                downed = true;
                ctl.down.cancel();
            }
            if !upped && el >= storm.up {
                upped = true;
                // Everything published before now must reach every node.
                let owed = tracker.taken();
                ctl.up.cancel();
                storm_monitor = Some(tokio::spawn(watch_storm(tracker.clone(), spec.nodes, owed)));
            }
        }
        let mut owed = due(spec.rate, el.min(spec.duration).as_secs_f64()).saturating_sub(sent);
        // One call of everything owed, or (with a batch size) as many calls
        // of exactly that many events as are owed.
        loop {
            let want = match spec.batch {
                0 => (owed as usize).min(MAX_BATCH),
                b if owed >= b as u64 => b,
                _ if last => owed as usize,
                _ => 0,
            };
            if want == 0 {
                break;
            }
            // At the limit of calls in flight the owed events wait for the
            // next tick: the server is not keeping up.
            let Ok(permit) = p.calls.clone().try_acquire_owned() else {
                break;
            };
            let (first, n) = tracker.take(want);
            if n == 0 {
                break 'ticks;
            }
            owed = owed.saturating_sub(n as u64);
            last_sent_us = tracker.now_us();
            sent += n as u64;
            let events: Vec<(u32, u64)> = (first..first + n)
                .map(|i| {
                    let k = match (spec.dist, &zipf) {
                        (Dist::Zipf(_), Some(z)) => z.sample(rng.next_f64()) as u64,
                        (Dist::Uniform, _) => rng.next_u64() % entities,
                        _ => i as u64 % entities,
                    };
                    (k as u32, i as u64 + 1)
                })
                .collect();
            let mut publisher = publisher.clone();
            let tracker = tracker.clone();
            let applied = p.applied.clone();
            let refused = p.refused.clone();
            let retries = p.retries.clone();
            let finals = p.final_versions.clone();
            let call_latency = p.call_latency.clone();
            let retry = spec.retry_refused;
            tokio::spawn(async move {
                let _permit = permit;
                let sent_at = tracker.now_us();
                loop {
                    match publisher.send(&events).await {
                        Ok(outcomes) => {
                            record(
                                &mut call_latency.lock(),
                                tracker.now_us().saturating_sub(sent_at),
                            );
                            let mut a = 0;
                            for (j, ok) in outcomes.iter().enumerate() {
                                tracker.settle(first + j, *ok);
                                if *ok {
                                    a += 1;
                                    if let Some(f) = finals.get(events[j].0 as usize) {
                                        f.fetch_max(events[j].1, Ordering::AcqRel);
                                    }
                                }
                            }
                            applied.fetch_add(a, Ordering::AcqRel);
                            return;
                        }
                        Err(_) if retry => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => {
                            if refused.fetch_add(n as u64, Ordering::AcqRel) == 0 {
                                eprintln!("publish refused: {}", e.0);
                            }
                            for j in 0..n {
                                tracker.settle(first + j, false);
                            }
                            return;
                        }
                    }
                }
            });
            if spec.batch == 0 {
                break;
            }
        }
        if last {
            break;
        }
    }
    // Wait for the calls still in flight (bounded: they fail or answer).
    let _all = tokio::time::timeout(
        Duration::from_secs(30),
        p.calls.clone().acquire_many_owned(MAX_PUBLISH_CALLS as u32),
    )
    .await;
    drop(_all);
    let storm = match storm_monitor {
        Some(h) => h.await.ok(),
        None => None,
    };
    Ok(Published {
        storm,
        last_sent_us,
        ..p
    })
}

/// After the storm's reconnect: how long until every node is live again,
/// and until every node has every event published before the reconnect.
async fn watch_storm(tracker: Arc<Tracker>, nodes: usize, owed: usize) -> StormResult {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let mut live_ms = None;
    let mut scanned = 0;
    while Instant::now() < deadline {
        if live_ms.is_none() && tracker.live.load(Ordering::Acquire) >= nodes {
            live_ms = Some(secs_f(start.elapsed()) * 1e3);
        }
        while scanned < owed && tracker.completed_at(scanned).is_some() {
            scanned += 1;
        }
        if live_ms.is_some() && scanned >= owed {
            return StormResult {
                live_ms,
                caught_up_ms: Some(secs_f(start.elapsed()) * 1e3),
            };
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    StormResult {
        live_ms,
        caught_up_ms: None,
    }
}
