//! The chaos suite in CI: a fixed set of seeds that together inject every
//! kind of fault, each with a few seconds of traffic. Every read must keep
//! the bound, every cache must converge after quiescence, and every scenario
//! must really have read through its caches and hit them.

use std::collections::BTreeSet;
use std::time::Duration;

use freshness_chaos::report::violation_text;
use freshness_chaos::{FaultKind, Options, Summary, run_seed, run_seed_with};

/// Traffic and faults per seed.
const PER_SEED: Duration = Duration::from_secs(3);

/// Together they inject every kind of fault (see `chaos/README.md` for how
/// to find such a set): 3 adds the stall, 497, 428, 0 and 9 lose a hub's
/// data; the others add multi-node regions and persisted restarts.
const SEEDS: [u64; 8] = [370, 497, 428, 0, 1, 7, 9, 3];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seeds_cover_every_fault_and_keep_caches_fresh() {
    let mut summary = Summary::default();
    let mut injected = BTreeSet::new();
    let mut failures = Vec::new();
    for seed in SEEDS {
        let report = run_seed(seed, PER_SEED)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
        eprintln!(
            "seed {seed}: {} reads, {} hits ({} fail-closed), {} events, {} violations, faults {:?}",
            report.reads,
            report.hits,
            report.fail_closed_hits,
            report.events,
            report.violations,
            report.faults
        );
        for v in &report.violation_reports {
            eprint!("{}", violation_text(v));
        }
        if report.violations > 0 {
            failures.push(format!("seed {seed}: {} violations", report.violations));
        }
        if report.reads == 0 || report.hits == 0 || report.fail_closed_hits == 0 {
            failures.push(format!(
                "seed {seed}: {} reads, {} hits, {} fail-closed hits",
                report.reads, report.hits, report.fail_closed_hits
            ));
        }
        injected.extend(report.faults.keys().copied());
        summary.add(report);
    }
    eprint!("{}", summary.text());
    let missing: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| !injected.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "fault kinds never injected: {missing:?}"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The checker has teeth: nodes that lose one invalidation in ten are
/// caught, during the run or at quiescence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_invalidations_is_caught() {
    let report = run_seed_with(
        2,
        Options {
            duration: PER_SEED,
            drop_one_in: Some(10),
            secure: false,
        },
    )
    .await
    .expect("seed 2 runs");
    for v in &report.violation_reports {
        eprint!("{}", violation_text(v));
    }
    assert!(
        report.violations > 0 && !report.violation_reports.is_empty(),
        "{} reads, no violation found",
        report.reads
    );
    let v = &report.violation_reports[0];
    assert!(
        v.trace.iter().any(|l| l.contains("commit v")),
        "the trace shows the commits: {:#?}",
        v.trace
    );
}

/// Seeds with every link over TLS and authentication on (mTLS between hubs,
/// the nodes' and writers' certificates checked against a policy): the same
/// freshness, through the secured stack and a hub restarted on its
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_over_tls_with_authentication_keep_caches_fresh() {
    for seed in [497, 1] {
        let report = run_seed_with(
            seed,
            Options {
                duration: PER_SEED,
                drop_one_in: None,
                secure: true,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("seed {seed} over TLS: {e:#}"));
        eprintln!(
            "seed {seed} over TLS: {} reads, {} hits, {} events, {} violations, faults {:?}",
            report.reads, report.hits, report.events, report.violations, report.faults
        );
        for v in &report.violation_reports {
            eprint!("{}", violation_text(v));
        }
        assert_eq!(report.violations, 0, "seed {seed} over TLS");
        assert!(
            report.reads > 0 && report.hits > 0 && report.events > 0,
            "seed {seed} over TLS: {} reads, {} hits, {} events",
            report.reads,
            report.hits,
            report.events
        );
    }
}
