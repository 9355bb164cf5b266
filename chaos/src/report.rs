//! What a run reports: one [`SeedReport`] per seed, folded into a
//! [`Summary`] (counters and a staleness histogram, so a long soak keeps
//! bounded memory), printed readable or as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::check::{ALLOWANCE, BOUND, MAX_STALENESS};
use crate::plan::FaultKind;

/// Violations kept in full in a summary (all are counted).
const KEPT_VIOLATIONS: usize = 20;

/// A staleness histogram: microseconds, up to an hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// One violation, with the trace that led to it.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// The seed that reproduces the schedule.
    pub seed: u64,
    /// `read` (a late read during the run) or `quiescence` (a cached entry
    /// still behind the source of truth after everything healed).
    pub kind: &'static str,
    /// The node.
    pub node: String,
    /// The entity.
    pub entity: String,
    /// The entity's commits and publishes, the node's invalidations, resets
    /// and restarts, the faults, and the read, by time since the seed's
    /// start.
    pub trace: Vec<String>,
}

/// What one seed's run measured.
#[derive(Debug, Clone)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Regions (hubs) in the world.
    pub regions: usize,
    /// Cache nodes in the world.
    pub nodes: usize,
    /// Wall time of the whole seed, set-up and quiescence included.
    pub wall_ms: u64,
    /// Versions committed to the source of truth.
    pub commits: u64,
    /// Publishes accepted by hubs (writers' and faults').
    pub events: u64,
    /// Invalidations applied by node handlers (replays counted again).
    pub events_applied: u64,
    /// Publish calls that failed and were retried by the writer.
    pub publish_errors: u64,
    /// Reads through the caches.
    pub reads: u64,
    /// Reads served from a cache.
    pub hits: u64,
    /// Reads of the fail-closed namespace.
    pub fail_closed_reads: u64,
    /// Those served from a cache.
    pub fail_closed_hits: u64,
    /// Late reads that break the contract, plus entries still stale after
    /// quiescence.
    pub violations: u64,
    /// Late reads of the serve-stale namespace while the node knew its feed
    /// was behind.
    pub stale_served_by_policy: u64,
    /// Reads late from the commit but not from when it was due.
    pub stale_excused: u64,
    /// Cached entries compared with the source of truth after quiescence.
    pub entries_checked: u64,
    /// Resets applied by nodes, by reason.
    pub resets: BTreeMap<String, u64>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<FaultKind, u64>,
    /// What a world counts besides the above (the relay world: transactions
    /// rolled back, abandoned, in doubt; the agent world: fills refused), by
    /// name.
    pub counters: BTreeMap<String, u64>,
    /// Staleness of every read, µs (the relay world, which has no readers:
    /// commit to node applied, per node and committed row).
    pub staleness: Histogram<u64>,
    /// The first violations, in full.
    pub violation_reports: Vec<Violation>,
    /// The fault schedule.
    pub schedule: Vec<String>,
}

/// Seeds folded together.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The world the seeds ran in: `hub`, `relay` or `agent`.
    pub world: &'static str,
    /// Seeds run, in order.
    pub seeds: Vec<u64>,
    /// Seeds whose run failed (the harness gave up: a node never went live,
    /// a hub did not restart, the seed overran its time), with why; the
    /// first few in full.
    pub errors: Vec<String>,
    /// How many seeds failed.
    pub error_count: u64,
    /// Sums over the seeds (`seed`, `regions`, `nodes`, `schedule` unused).
    pub total: SeedReport,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            world: "hub",
            seeds: Vec::new(),
            errors: Vec::new(),
            error_count: 0,
            total: SeedReport {
                seed: 0,
                regions: 0,
                nodes: 0,
                wall_ms: 0,
                commits: 0,
                events: 0,
                events_applied: 0,
                publish_errors: 0,
                reads: 0,
                hits: 0,
                fail_closed_reads: 0,
                fail_closed_hits: 0,
                violations: 0,
                stale_served_by_policy: 0,
                stale_excused: 0,
                entries_checked: 0,
                resets: BTreeMap::new(),
                faults: BTreeMap::new(),
                counters: BTreeMap::new(),
                staleness: new_histogram(),
                violation_reports: Vec::new(),
                schedule: Vec::new(),
            },
        }
    }
}

/// The summary as JSON.
#[derive(Debug, Serialize)]
struct Json<'a> {
    world: &'a str,
    seeds: &'a [u64],
    failed_seeds: u64,
    errors: &'a [String],
    wall_ms: u64,
    commits: u64,
    events: u64,
    events_applied: u64,
    publish_errors: u64,
    reads: u64,
    hits: u64,
    fail_closed_reads: u64,
    fail_closed_hits: u64,
    violations: u64,
    stale_served_by_policy: u64,
    stale_excused: u64,
    entries_checked: u64,
    staleness_p50_ms: f64,
    staleness_p99_ms: f64,
    staleness_max_ms: f64,
    resets: &'a BTreeMap<String, u64>,
    faults: BTreeMap<&'static str, u64>,
    counters: &'a BTreeMap<String, u64>,
    nines: f64,
    nines_is_lower_bound: bool,
    bound_ms: u128,
    max_staleness_ms: u128,
    allowance_ms: u128,
    violation_reports: &'a [Violation],
}

fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

impl Summary {
    /// Records a seed whose run failed.
    pub fn add_error(&mut self, seed: u64, error: &anyhow::Error) {
        self.seeds.push(seed);
        self.error_count += 1;
        if self.errors.len() < KEPT_VIOLATIONS {
            self.errors.push(format!("seed {seed}: {error:#}"));
        }
    }

    /// Adds one seed.
    pub fn add(&mut self, r: SeedReport) {
        self.seeds.push(r.seed);
        let t = &mut self.total;
        t.wall_ms += r.wall_ms;
        t.commits += r.commits;
        t.events += r.events;
        t.events_applied += r.events_applied;
        t.publish_errors += r.publish_errors;
        t.reads += r.reads;
        t.hits += r.hits;
        t.fail_closed_reads += r.fail_closed_reads;
        t.fail_closed_hits += r.fail_closed_hits;
        t.violations += r.violations;
        t.stale_served_by_policy += r.stale_served_by_policy;
        t.stale_excused += r.stale_excused;
        t.entries_checked += r.entries_checked;
        for (k, v) in r.resets {
            *t.resets.entry(k).or_default() += v;
        }
        for (k, v) in r.faults {
            *t.faults.entry(k).or_default() += v;
        }
        for (k, v) in r.counters {
            *t.counters.entry(k).or_default() += v;
        }
        // Both have the same bounds, so adding cannot fail.
        let _ = t.staleness.add(&r.staleness);
        let room = KEPT_VIOLATIONS.saturating_sub(t.violation_reports.len());
        t.violation_reports
            .extend(r.violation_reports.into_iter().take(room));
    }

    /// Consistency in nines: `-log10(violations / reads)`; with no
    /// violation, the lower bound `log10(reads)` (and `true`).
    pub fn nines(&self) -> (f64, bool) {
        let t = &self.total;
        if t.reads == 0 {
            return (0.0, true);
        }
        if t.violations == 0 {
            ((t.reads as f64).log10(), true)
        } else {
            (-(t.violations as f64 / t.reads as f64).log10(), false)
        }
    }

    /// The summary as one JSON object.
    pub fn json(&self) -> String {
        let t = &self.total;
        let (nines, lower) = self.nines();
        let json = Json {
            world: self.world,
            seeds: &self.seeds,
            failed_seeds: self.error_count,
            errors: &self.errors,
            wall_ms: t.wall_ms,
            commits: t.commits,
            events: t.events,
            events_applied: t.events_applied,
            publish_errors: t.publish_errors,
            reads: t.reads,
            hits: t.hits,
            fail_closed_reads: t.fail_closed_reads,
            fail_closed_hits: t.fail_closed_hits,
            violations: t.violations,
            stale_served_by_policy: t.stale_served_by_policy,
            stale_excused: t.stale_excused,
            entries_checked: t.entries_checked,
            staleness_p50_ms: ms(t.staleness.value_at_quantile(0.5)),
            staleness_p99_ms: ms(t.staleness.value_at_quantile(0.99)),
            staleness_max_ms: ms(t.staleness.max()),
            resets: &t.resets,
            faults: t.faults.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
            counters: &t.counters,
            nines: (nines * 100.0).round() / 100.0,
            nines_is_lower_bound: lower,
            bound_ms: BOUND.as_millis(),
            max_staleness_ms: MAX_STALENESS.as_millis(),
            allowance_ms: ALLOWANCE.as_millis(),
            violation_reports: &t.violation_reports,
        };
        serde_json::to_string(&json).expect("the summary serializes")
    }

    /// The summary for people.
    pub fn text(&self) -> String {
        let t = &self.total;
        let (nines, lower) = self.nines();
        let mut out = String::new();
        let seeds = match self.seeds.as_slice() {
            [] => "none".to_owned(),
            [one] => one.to_string(),
            many if many.len() <= 12 => many
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            many => format!("{} seeds", many.len()),
        };
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                a as f64 * 100.0 / b as f64
            }
        };
        let _ = writeln!(
            out,
            "seeds      {seeds} ({} world, {:.1} s)",
            self.world,
            t.wall_ms as f64 / 1e3
        );
        if self.error_count > 0 {
            let _ = writeln!(
                out,
                "FAILED     {} seeds did not run to the end: {}",
                self.error_count,
                self.errors.join("; ")
            );
        }
        if self.world == "relay" {
            self.relay_lines(&mut out);
        } else {
            let _ = writeln!(
                out,
                "events     {} published ({} commits), {} applied by nodes, {} failed publish calls retried by writers",
                t.events, t.commits, t.events_applied, t.publish_errors
            );
            let _ = writeln!(
                out,
                "reads      {} ({} hits, {:.1}%); fail-closed namespace {} ({} hits)",
                t.reads,
                t.hits,
                pct(t.hits, t.reads),
                t.fail_closed_reads,
                t.fail_closed_hits
            );
            let _ = writeln!(
                out,
                "violations {}   (bound {} ms = max staleness {} ms + allowance {} ms)",
                t.violations,
                BOUND.as_millis(),
                MAX_STALENESS.as_millis(),
                ALLOWANCE.as_millis()
            );
            let _ = writeln!(
                out,
                "stale      {} served by policy (serve-stale namespace, feed not fresh), {} excused (publish held or region link down)",
                t.stale_served_by_policy, t.stale_excused
            );
            let _ = writeln!(
                out,
                "staleness  p50 {} ms, p99 {} ms, max {} ms",
                ms(t.staleness.value_at_quantile(0.5)),
                ms(t.staleness.value_at_quantile(0.99)),
                ms(t.staleness.max())
            );
        }
        let list = |m: &mut dyn Iterator<Item = (String, u64)>| {
            let s: Vec<String> = m.map(|(k, v)| format!("{k} {v}")).collect();
            if s.is_empty() {
                "none".to_owned()
            } else {
                s.join(", ")
            }
        };
        let _ = writeln!(
            out,
            "resets     {}",
            list(&mut t.resets.iter().map(|(k, v)| (k.clone(), *v)))
        );
        let _ = writeln!(
            out,
            "faults     {}",
            list(&mut t.faults.iter().map(|(k, v)| (k.as_str().to_owned(), *v)))
        );
        if !t.counters.is_empty() {
            let _ = writeln!(
                out,
                "counters   {}",
                list(&mut t.counters.iter().map(|(k, v)| (k.clone(), *v)))
            );
        }
        let _ = writeln!(
            out,
            "converged  {} {} after quiescence",
            t.entries_checked,
            if self.world == "relay" {
                "node and entity pairs at the newest committed version"
            } else {
                "cached entries equal to the source of truth"
            }
        );
        if self.world == "relay" {
            // No readers: nothing to count nines over.
        } else if lower {
            let _ = writeln!(
                out,
                "nines      >= {nines:.2} (no violation in {} reads: the lower bound log10(reads))",
                t.reads
            );
        } else {
            let _ = writeln!(out, "nines      {nines:.2} (-log10(violations / reads))");
        }
        out
    }
}

impl Summary {
    /// The relay world's lines: rows, delivery time, violations.
    fn relay_lines(&self, out: &mut String) {
        let t = &self.total;
        let _ = writeln!(
            out,
            "rows       {} committed, {} events applied by nodes, {} writer transactions failed by faults",
            t.commits, t.events_applied, t.publish_errors
        );
        let _ = writeln!(
            out,
            "violations {}   (uncommitted version seen, out of order, lost, left in the outbox or dead-lettered, epoch reset)",
            t.violations
        );
        let _ = writeln!(
            out,
            "delivery   commit to node applied p50 {} ms, p99 {} ms, max {} ms",
            ms(t.staleness.value_at_quantile(0.5)),
            ms(t.staleness.value_at_quantile(0.99)),
            ms(t.staleness.max())
        );
    }
}

/// Prints a violation for people.
pub fn violation_text(v: &Violation) -> String {
    let mut out = format!(
        "VIOLATION seed {} ({}) at {} on {}; reproduce the schedule with --seed {}\n",
        v.seed, v.kind, v.node, v.entity, v.seed
    );
    for line in &v.trace {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}
