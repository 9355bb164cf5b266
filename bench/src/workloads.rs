//! The workloads B1–B7 of the benchmark, each a list of [`Spec`]s run
//! against one or more targets, interleaved (hub, nats, redis, hub, ...).

use std::time::Duration;

use anyhow::Result;

use crate::run::{Dist, Env, RunResult, Spec, Storm, run};
use crate::stats::RateSearch;
use crate::target::Kind;

/// Options shared by every workload (from the command line).
#[derive(Debug, Clone)]
pub struct Opts {
    /// Node counts; empty means the workload's defaults.
    pub nodes: Vec<usize>,
    /// Events per second; `None` means the workload's default.
    pub rate: Option<u64>,
    /// Publishing time per run; `None` means the workload's default.
    pub duration: Option<Duration>,
    /// Targets, in interleaving order.
    pub targets: Vec<Kind>,
    /// Each configuration this many times.
    pub repeat: usize,
    /// Unmeasured start of each run.
    pub warmup: Duration,
    /// Length of one step of the B2 search.
    pub step: Duration,
    /// B2 completion p99 objective, overriding the defaults.
    pub objective_us: Option<u64>,
    /// Precision of the B2 search (see [`RateSearch::new`]).
    pub precision: f64,
    /// Entities, overriding the workload's default.
    pub entities: Option<u32>,
    /// Events per publish call (0: all owed at each tick).
    pub batch: usize,
    /// Measure the disk's flush before every B1 run of a hub, this long
    /// per file (`crate::probe`).
    pub fsync_probe: Option<Duration>,
}

/// Where results go as they come.
pub trait Sink {
    /// One finished run.
    fn emit(&mut self, r: &RunResult);
    /// A progress line (stderr).
    fn note(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

fn base(workload: &str, kind: Kind, nodes: usize, rate: u64, duration: Duration, o: &Opts) -> Spec {
    Spec {
        workload: workload.into(),
        kind,
        nodes,
        stalled: 0,
        rate,
        duration,
        warmup: o.warmup.min(duration / 2),
        entities: o.entities.unwrap_or(10_000),
        dist: Dist::RoundRobin,
        check_order: false,
        retry_refused: false,
        drain: Duration::from_secs(5),
        storm: None,
        idle: Duration::ZERO,
        batch: o.batch,
    }
}

fn nodes_or(o: &Opts, default: &[usize]) -> Vec<usize> {
    if o.nodes.is_empty() {
        default.to_vec()
    } else {
        o.nodes.clone()
    }
}

/// B1: light-load latency.
pub async fn b1(env: &Env, o: &Opts, sink: &mut dyn Sink) -> Result<()> {
    let duration = o.duration.unwrap_or(Duration::from_secs(3));
    for n in nodes_or(o, &[16, 64, 256, 1000]) {
        let rates = match o.rate {
            Some(r) => vec![r],
            None if n >= 256 => vec![1000, 100],
            None => vec![1000],
        };
        for rate in rates {
            for _ in 0..o.repeat {
                for &kind in &o.targets {
                    let mut spec = base("b1", kind, n, rate, duration, o);
                    // Where the generator cannot keep up (1,000 nodes at
                    // 1,000 events/s) deliveries arrive late: wait for them,
                    // so that `lost` counts only what never arrives.
                    spec.drain = Duration::from_secs(30);
                    let flush = match o.fsync_probe {
                        Some(each) if kind.is_hub() => Some(
                            crate::probe::measure_pinned(env.launcher.cpus.as_deref(), each)
                                .await?,
                        ),
                        _ => None,
                    };
                    let mut r = run(env, &spec).await?;
                    if let Some(f) = flush {
                        r.put("fsync_p50_us", f.p50_us);
                        r.put("fsync_p99_us", f.p99_us);
                        r.put("fsync_extended_p50_us", f.extended_p50_us);
                        r.put("fsync_extended_p99_us", f.extended_p99_us);
                        if let Some(call) = r.publish_call_p99_us
                            && !env.launcher.ephemeral()
                        {
                            let ratio = call as f64 / f.p99_us.max(1) as f64;
                            r.put("call_p99_over_fsync_p99", (ratio * 100.0).round() / 100.0);
                        }
                    }
                    sink.emit(&r);
                }
            }
        }
    }
    Ok(())
}

/// The completion p99 objective of B2 at `n` nodes.
pub fn objective_us(n: usize, o: &Opts) -> u64 {
    o.objective_us
        .unwrap_or(if n <= 64 { 5_000 } else { 25_000 })
}

/// Whether a step of the B2 search met the objective.
pub fn passes(r: &RunResult, objective_us: u64) -> bool {
    let planned = r.rate as f64 * r.duration_s;
    r.lost == 0
        && r.refused == 0
        && r.errors == 0
        && !r.extra.contains_key("drained")
        && r.published as f64 >= planned * 0.97
        && r.completion_p99_us <= objective_us
}

/// A failed step that lost nothing, was refused nothing and published its
/// rate: only its latency missed.
fn only_latency_missed(r: &RunResult, objective_us: u64) -> bool {
    !passes(r, objective_us) && passes(r, u64::MAX)
}

/// Searches the highest rate meeting the objective; returns its run.
async fn search(
    env: &Env,
    o: &Opts,
    kind: Kind,
    n: usize,
    sink: &mut dyn Sink,
) -> Result<Option<RunResult>> {
    let objective = objective_us(n, o);
    let start = (64_000 / n as u64).max(50);
    // Twelve steps reach 10 %; each halving of the precision costs one more.
    let extra = (0.1 / o.precision).log2().ceil().max(0.0) as u32;
    let mut s = RateSearch::new(start, 2_000_000, 12 + extra, o.precision);
    let mut best: Option<RunResult> = None;
    let mut steps = Vec::new();
    while let Some(rate) = s.next_rate() {
        let mut spec = base("b2", kind, n, rate, o.step, o);
        spec.warmup = o.warmup.min(o.step / 4);
        spec.drain = Duration::from_secs(3);
        let mut r = run(env, &spec).await?;
        let mut ok = passes(&r, objective);
        let mut tries = 1;
        // A step that lost nothing and kept up but missed the objective is
        // run once more: one scheduling stall of the VM (5-10 ms, a few
        // times a minute in a noisy hour) puts a 2 s step's p99 over the
        // objective whatever the server; a saturated server fails twice.
        if !ok && only_latency_missed(&r, objective) {
            let again = run(env, &spec).await?;
            tries = 2;
            ok = passes(&again, objective);
            if ok {
                r = again;
            }
        }
        sink.note(&format!(
            "  b2 {} n={n} rate={rate}: p99={}us lost={} refused={} tries={tries} -> {}",
            kind.name(),
            r.completion_p99_us,
            r.lost,
            r.refused,
            if ok { "pass" } else { "fail" }
        ));
        steps.push(serde_json::json!({"rate": rate, "pass": ok, "tries": tries, "completion_p99_us": r.completion_p99_us, "lost": r.lost}));
        s.record(rate, ok);
        if ok && best.as_ref().is_none_or(|b| b.rate < rate) {
            best = Some(r);
        }
    }
    if let Some(b) = best.as_mut() {
        b.put("objective_us", objective);
        b.put("search_steps", steps);
    }
    Ok(best)
}

/// B2: throughput at a latency objective.
pub async fn b2(env: &Env, o: &Opts, sink: &mut dyn Sink) -> Result<()> {
    for n in nodes_or(o, &[16, 64, 256]) {
        for _ in 0..o.repeat {
            for &kind in &o.targets {
                match search(env, o, kind, n, sink).await? {
                    Some(r) => sink.emit(&r),
                    None => {
                        let mut r = RunResult {
                            workload: "b2".into(),
                            target: kind.name().into(),
                            nodes: n,
                            placement: env.placement.clone(),
                            ..Default::default()
                        };
                        r.put("objective_us", objective_us(n, o));
                        r.put("note", "no rate met the objective");
                        sink.emit(&r);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The sustainable rate at `n` nodes: `--rate` if given, else a B2 search.
async fn sustainable(
    env: &Env,
    o: &Opts,
    kind: Kind,
    n: usize,
    sink: &mut dyn Sink,
) -> Result<u64> {
    if let Some(r) = o.rate {
        return Ok(r);
    }
    sink.note(&format!(
        "  searching the sustainable rate of {} at n={n}",
        kind.name()
    ));
    Ok(search(env, o, kind, n, sink)
        .await?
        .map_or(1000, |r| r.rate))
}

/// B3: a burst at twice the sustainable rate over 100,000 entities; every
/// node must end on the newest version of every entity.
pub async fn b3(env: &Env, o: &Opts, sink: &mut dyn Sink) -> Result<()> {
    let duration = o.duration.unwrap_or(Duration::from_secs(5));
    for n in nodes_or(o, &[16]) {
        for &kind in &o.targets {
            // With --rate, that is the sustainable rate; the burst doubles it.
            let rate = sustainable(env, o, kind, n, sink).await? * 2;
            for _ in 0..o.repeat {
                let mut spec = base("b3", kind, n, rate, duration, o);
                spec.entities = o.entities.unwrap_or(100_000);
                spec.dist = Dist::Uniform;
                spec.check_order = true;
                spec.retry_refused = true;
                spec.drain = Duration::from_secs(30);
                let mut r = run(env, &spec).await?;
                r.put("sustainable_rate", rate / 2);
                sink.emit(&r);
            }
        }
    }
    Ok(())
}

/// B4: Zipf-distributed hot entities; per-entity order must hold.
pub async fn b4(env: &Env, o: &Opts, sink: &mut dyn Sink) -> Result<()> {
    let duration = o.duration.unwrap_or(Duration::from_secs(3));
    for n in nodes_or(o, &[16]) {
        for _ in 0..o.repeat {
            for &kind in &o.targets {
                let mut spec = base("b4", kind, n, o.rate.unwrap_or(10_000), duration, o);
                spec.dist = Dist::Zipf(1.1);
                spec.check_order = true;
                let mut r = run(env, &spec).await?;
                r.put("zipf_s", 1.1);
                r.put("entities", spec.entities);
                sink.emit(&r);
            }
        }
    }
    Ok(())
}

/// B5: one stalled node at full rate; the others' completion p99 within
/// 10 % of the same run without it, hub memory bounded.
///
/// At the B2 rate one run's p99 moves by more than the 10 % being judged
/// (the same baseline gave 3,957 and 4,931 µs back to back), so with
/// `--repeat K` the pairs alternate their order (baseline first, then the
/// stalled run first, ...), which cancels a drift of the machine, and the
/// last stalled run also carries every pair's ratio and their median,
/// which is the verdict.
pub async fn b5(env: &Env, o: &Opts, sink: &mut dyn Sink) -> Result<()> {
    let duration = o.duration.unwrap_or(Duration::from_secs(5));
    for n in nodes_or(o, &[16]) {
        for &kind in &o.targets {
            let rate = sustainable(env, o, kind, n, sink).await?;
            let mut ratios = Vec::with_capacity(o.repeat);
            for pair in 0..o.repeat {
                let spec = base("b5", kind, n, rate, duration, o);
                let stalled_spec = Spec {
                    stalled: 1,
                    ..spec.clone()
                };
                let (baseline, mut stalled) = if pair % 2 == 0 {
                    let b = run(env, &spec).await?;
                    (b, run(env, &stalled_spec).await?)
                } else {
                    let s = run(env, &stalled_spec).await?;
                    (run(env, &spec).await?, s)
                };
                sink.emit(&baseline);
                let ratio =
                    stalled.completion_p99_us as f64 / baseline.completion_p99_us.max(1) as f64;
                ratios.push(ratio);
                stalled.put("pair", pair + 1);
                stalled.put("baseline_completion_p99_us", baseline.completion_p99_us);
                stalled.put("p99_ratio", ratio);
                stalled.put("isolation_met", ratio <= 1.10);
                stalled.put("baseline_peak_rss_bytes", baseline.hub_peak_rss_bytes);
                if pair + 1 == o.repeat && o.repeat > 1 {
                    let median = median(&ratios);
                    stalled.put("p99_ratios", ratios.clone());
                    stalled.put("median_p99_ratio", median);
                    stalled.put("median_isolation_met", median <= 1.10);
                }
                sink.emit(&stalled);
            }
        }
    }
    Ok(())
}

/// The median of a non-empty list (the mean of the middle two for an even
/// count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// B6: every node drops its stream and all reconnect at once from their
/// cursors; time until all are live, and until all have every event
/// published before the reconnect. Hubs only (the peers have no cursors):
/// `hub` and `hub-tls` when both are targets.
pub async fn b6(env: &Env, o: &Opts, sink: &mut dyn Sink) -> Result<()> {
    let duration = o.duration.unwrap_or(Duration::from_secs(6));
    for n in nodes_or(o, &[1000]) {
        for _ in 0..o.repeat {
            for kind in hub_kinds(o) {
                let mut spec = base("b6", kind, n, o.rate.unwrap_or(1000), duration, o);
                spec.storm = Some(Storm {
                    down: duration / 3,
                    up: duration / 2,
                });
                spec.drain = Duration::from_secs(30);
                sink.emit(&run(env, &spec).await?);
            }
        }
    }
    Ok(())
}

/// The hub targets asked for (`hub`, `hub-tls`), plain hub if none.
fn hub_kinds(o: &Opts) -> impl Iterator<Item = Kind> + '_ {
    let any = o.targets.iter().any(|k| k.is_hub());
    o.targets
        .iter()
        .copied()
        .filter(|k| k.is_hub())
        .chain((!any).then_some(Kind::Hub))
}

/// B7: many connected idle nodes; hub memory per node. A trickle of events
/// (10/s by default) checks that every node is live.
pub async fn b7(env: &Env, o: &Opts, sink: &mut dyn Sink) -> Result<()> {
    let duration = o.duration.unwrap_or(Duration::from_secs(3));
    for n in nodes_or(o, &[10_000]) {
        for _ in 0..o.repeat {
            let mut spec = base("b7", Kind::Hub, n, o.rate.unwrap_or(10), duration, o);
            spec.drain = Duration::from_secs(30);
            spec.idle = Duration::from_secs(2);
            let mut r = run(env, &spec).await?;
            if let (Some(a), Some(b)) = (r.rss_before_nodes_bytes, r.rss_nodes_connected_bytes) {
                r.put(
                    "hub_bytes_per_idle_node",
                    b.saturating_sub(a) / n.max(1) as u64,
                );
            }
            r.put("nodes_per_conn", env.nodes_per_conn);
            // The trickle shares the generator's one core with every node
            // it holds; at 10,000 nodes that core is full, and the publisher
            // can be starved for the whole run. Memory is still measured,
            // but then no event showed the nodes live.
            let live_checked = r.published > 0;
            if !live_checked {
                eprintln!(
                    "b7: no event was published (the generator was starved by its {n} nodes): \
                     the memory figure stands, the nodes' liveness was not checked"
                );
            }
            r.put("liveness_checked", live_checked);
            sink.emit(&r);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_step_that_kept_up_and_lost_nothing_is_tried_again() {
        let step = |p99, lost, published| RunResult {
            rate: 1000,
            duration_s: 2.0,
            published,
            lost,
            completion_p99_us: p99,
            ..Default::default()
        };
        assert!(passes(&step(4_000, 0, 2_000), 5_000));
        assert!(!only_latency_missed(&step(4_000, 0, 2_000), 5_000));
        assert!(only_latency_missed(&step(9_000, 0, 2_000), 5_000));
        // A loss, or a publisher that fell behind, is a real failure.
        assert!(!only_latency_missed(&step(9_000, 1, 2_000), 5_000));
        assert!(!only_latency_missed(&step(9_000, 0, 1_000), 5_000));
    }
}
