//! The Freshness chaos suite: scenarios deterministic from a seed, run on
//! loopback against real hubs and the real client library, with a freshness
//! checker.
//!
//! A seed ([`plan::Plan`]) fixes the world — one to three regions of hubs in
//! full mesh (replication links through fault proxies), cache nodes running
//! a `Subscriber` with a `VersionedCache` as its handler (cursor in a file or
//! in memory) behind a fault proxy each — and the fault schedule: node kill
//! and restart, hub restart (a new epoch on the same address), partitions and
//! delays between regions and between nodes and hubs, duplicated and
//! reordered publishes, stalled nodes. Writers commit to a simulated source
//! of truth ([`truth::Truth`]), then publish; readers read through the caches
//! with `get` and `get_or_load`, whose loads take a few milliseconds so that
//! fills race invalidations.
//!
//! Every read is judged ([`check`], where the bound and every term are
//! defined); after the schedule, everything heals, writers stop, and every
//! cached entry at every node must converge on the source of truth.
//!
//! A seed reproduces the plan: the world, the fault schedule and every
//! writer's and reader's sequence of choices. Timing is real, so it does not
//! reproduce the interleaving of those tasks.
#![forbid(unsafe_code)]

pub mod check;
pub mod plan;
pub mod report;
pub mod truth;
mod world;

use std::time::Duration;

pub use plan::{FaultKind, Plan};
pub use report::{SeedReport, Summary, Violation};

/// Most a seed may take beyond its traffic duration (set-up, quiescence,
/// tear-down) before the run counts as failed.
const SEED_OVERHEAD: Duration = Duration::from_secs(120);

/// How to run a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Traffic and faults.
    pub duration: Duration,
    /// Makes every node's handler skip one in this many invalidations (a
    /// deliberately broken node), to show that the checker catches it.
    pub drop_one_in: Option<u64>,
    /// Every link over TLS with authentication on: hubs with client
    /// certificates required (mTLS), peers granted `replicate` by their
    /// certificate, nodes and writers by theirs and a policy.
    pub secure: bool,
}

/// Runs the scenario of `seed` with `duration` of traffic and faults.
pub async fn run_seed(seed: u64, duration: Duration) -> anyhow::Result<SeedReport> {
    run_seed_with(
        seed,
        Options {
            duration,
            drop_one_in: None,
            secure: false,
        },
    )
    .await
}

/// Runs the scenario of `seed` with these options.
pub async fn run_seed_with(seed: u64, options: Options) -> anyhow::Result<SeedReport> {
    let plan = Plan::new(seed, options.duration);
    let limit = options.duration + SEED_OVERHEAD;
    match tokio::time::timeout(limit, world::run(plan, options.drop_one_in, options.secure)).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("seed {seed} did not finish within {limit:?}"),
    }
}
