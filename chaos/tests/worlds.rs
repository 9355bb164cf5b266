//! The relay and agent worlds in CI: a few fixed seeds each, which together
//! inject every kind of fault of their world, with zero violations; and a
//! broken world of each kind is caught. They run the real `freshness-relay`
//! and `freshness-agent` binaries (`cargo test --workspace` builds them; for
//! this crate alone, `cargo build -p freshness-relay -p freshness-agent`
//! first), a PostgreSQL cluster and Redis servers of their own.

use std::collections::BTreeSet;
use std::time::Duration;

use freshness_chaos::report::violation_text;
use freshness_chaos::{
    FaultKind, Flaw, Options, SeedReport, Summary, WorldKind, run_flawed, run_world_seed_with,
};

/// Traffic and faults per seed.
const PER_SEED: Duration = Duration::from_secs(3);

/// Seed 0: one relay, the hub paused, PostgreSQL restarted, kills; seed 1:
/// two relays, the hub restarted, PostgreSQL restarted, kills.
const RELAY_SEEDS: [u64; 2] = [0, 1];

/// Seed 17: two agents, a kill, a SIGSTOP, a Redis restart, the hub
/// restarted; seed 6: one agent cut from the hub, its Redis restarted, the
/// hub restarted.
const AGENT_SEEDS: [u64; 2] = [17, 6];

async fn run(world: WorldKind, seeds: &[u64], kinds: &[FaultKind]) -> Summary {
    let mut summary = Summary {
        world: world.as_str(),
        ..Summary::default()
    };
    let mut injected = BTreeSet::new();
    let mut failures = Vec::new();
    for &seed in seeds {
        let report = run_world_seed_with(
            world,
            seed,
            Options {
                duration: PER_SEED,
                drop_one_in: None,
                secure: false,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{} world, seed {seed}: {e:#}", world.as_str()));
        eprintln!(
            "seed {seed}: {} commits, {} reads ({} hits), {} violations, faults {:?}, {:?}",
            report.commits,
            report.reads,
            report.hits,
            report.violations,
            report.faults,
            report.counters
        );
        for v in &report.violation_reports {
            eprint!("{}", violation_text(v));
        }
        if report.violations > 0 {
            failures.push(format!("seed {seed}: {} violations", report.violations));
        }
        if report.commits == 0 {
            failures.push(format!("seed {seed}: nothing committed"));
        }
        injected.extend(report.faults.keys().copied());
        summary.add(report);
    }
    eprint!("{}", summary.text());
    let missing: Vec<&FaultKind> = kinds.iter().filter(|k| !injected.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "fault kinds never injected: {missing:?}"
    );
    assert!(failures.is_empty(), "{failures:#?}");
    summary
}

fn counter(s: &Summary, name: &str) -> u64 {
    s.total.counters.get(name).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_world_loses_nothing_and_leaks_no_rollback() {
    let s = run(WorldKind::Relay, &RELAY_SEEDS, &FaultKind::RELAY_WORLD).await;
    // The faults proved something: rows rolled back and abandoned, writers
    // crashed after their commit, relays started again after kills.
    for name in [
        "transactions_rolled_back",
        "transactions_abandoned",
        "writers_crashed_after_commit",
    ] {
        assert!(counter(&s, name) > 0, "no {name}");
    }
    assert!(
        counter(&s, "relay_starts") > 3,
        "{} relay starts",
        counter(&s, "relay_starts")
    );
    assert!(s.total.entries_checked > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_world_keeps_redis_fresh_and_fails_closed() {
    let s = run(WorldKind::Agent, &AGENT_SEEDS, &FaultKind::AGENT_WORLD).await;
    let t = &s.total;
    assert!(
        t.hits > 0 && t.fail_closed_hits > 0,
        "{} reads, {} hits",
        t.reads,
        t.hits
    );
    assert!(counter(&s, "fills_stored") > 0, "no fill stored");
    // The hub restarts and the stopped agents were long enough for `price`
    // to close: its fills were refused.
    assert!(
        counter(&s, "fills_refused_fail_closed") > 0,
        "no fill refused by fail-closed: {:?}",
        t.counters
    );
}

fn caught(world: WorldKind, r: &SeedReport, kinds: &[&str]) {
    eprintln!(
        "{} world, seed {}: {} reads ({} hits, {} of the fail-closed namespace), {} entries checked at quiescence, faults {:?}",
        world.as_str(),
        r.seed,
        r.reads,
        r.hits,
        r.fail_closed_hits,
        r.entries_checked,
        r.faults
    );
    for v in &r.violation_reports {
        eprint!("{}", violation_text(v));
    }
    assert!(
        r.violations > 0 && !r.violation_reports.is_empty(),
        "{} world: nothing caught ({:?})",
        world.as_str(),
        r.counters
    );
    assert!(
        r.violation_reports.iter().any(|v| kinds.contains(&v.kind)),
        "no {kinds:?} violation: {:#?}",
        r.violation_reports
    );
}

/// The relay world's checker has teeth: nodes that lose one event in ten
/// are caught at quiescence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_outbox_events_is_caught() {
    let r = run_flawed(WorldKind::Relay, 0, PER_SEED, Some(Flaw::NodesDrop(10)))
        .await
        .expect("seed 0 runs");
    caught(WorldKind::Relay, &r, &["lost"]);
}

/// A writer that publishes before it knows its transaction's outcome leaks
/// rolled-back versions to the nodes: caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_publishes_before_rollback_is_caught() {
    let r = run_flawed(
        WorldKind::Relay,
        1,
        PER_SEED,
        Some(Flaw::PublishBeforeRollback(5)),
    )
    .await
    .expect("seed 1 runs");
    caught(WorldKind::Relay, &r, &["uncommitted"]);
}

/// The agent world's checker has teeth: agents that subscribe to `price`
/// only never delete a `user` key, and are caught (reads of `user` late
/// while `freshness:feed` says fresh, and stale keys at quiescence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_deaf_to_a_namespace_is_caught() {
    let r = run_flawed(WorldKind::Agent, 17, PER_SEED, Some(Flaw::AgentsDeafToUser))
        .await
        .expect("seed 17 runs");
    // Late reads while the feed says fresh, and stale keys at the end.
    caught(WorldKind::Agent, &r, &["read", "quiescence"]);
    assert!(
        r.violation_reports
            .iter()
            .all(|v| v.entity.starts_with("user:")),
        "{:#?}",
        r.violation_reports
    );
}

/// Agents without `--fail-closed` keep serving and storing `price` through
/// the 1.6 s hub restart of seed 24: caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_fails_closed_is_caught() {
    let r = run_flawed(
        WorldKind::Agent,
        24,
        PER_SEED,
        Some(Flaw::AgentsNeverFailClosed),
    )
    .await
    .expect("seed 24 runs");
    caught(WorldKind::Agent, &r, &["fail_closed"]);
}
