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

pub mod agent_world;
pub mod check;
pub mod plan;
pub mod procs;
pub mod relay_world;
pub mod report;
mod traffic;
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

/// Which world a seed builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorldKind {
    /// Hubs of one to three regions, nodes running the client library,
    /// writers that publish (the faults of [`FaultKind::ALL`]).
    #[default]
    Hub,
    /// PostgreSQL as the source of truth, the outbox and `freshness-relay`
    /// processes ([`relay_world`]).
    Relay,
    /// Redis servers kept fresh by `freshness-agent` processes
    /// ([`agent_world`]).
    Agent,
}

impl WorldKind {
    /// `hub`, `relay` or `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hub => "hub",
            Self::Relay => "relay",
            Self::Agent => "agent",
        }
    }

    /// The world's plan of `seed` in a line, and its fault schedule.
    pub fn describe(self, seed: u64, duration: Duration) -> (String, Vec<String>) {
        match self {
            Self::Hub => {
                let plan = Plan::new(seed, duration);
                (
                    format!(
                        "hub world: regions {:?}, nodes {:?}",
                        plan.regions,
                        plan.nodes.iter().map(|n| &n.id).collect::<Vec<_>>()
                    ),
                    plan.faults.iter().map(|f| plan.describe_fault(f)).collect(),
                )
            }
            Self::Relay => {
                let plan = relay_world::RelayPlan::new(seed, duration);
                (plan.describe(), plan.schedule())
            }
            Self::Agent => {
                let plan = agent_world::AgentPlan::new(seed, duration);
                (plan.describe(), plan.schedule())
            }
        }
    }
}

impl std::str::FromStr for WorldKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hub" => Ok(Self::Hub),
            "relay" => Ok(Self::Relay),
            "agent" => Ok(Self::Agent),
            other => Err(format!("{other:?} is not a world: hub, relay or agent")),
        }
    }
}

/// Runs the scenario of `seed` in `world` with `duration` of traffic and
/// faults.
pub async fn run_world_seed(
    world: WorldKind,
    seed: u64,
    duration: Duration,
) -> anyhow::Result<SeedReport> {
    run_world_seed_with(
        world,
        seed,
        Options {
            duration,
            drop_one_in: None,
            secure: false,
        },
    )
    .await
}

/// Runs the scenario of `seed` in `world` with these options;
/// `drop_one_in` stands for [`Flaw::NodesDrop`] in the hub and relay
/// worlds and for [`Flaw::AgentsDeafToUser`] in the agent world.
pub async fn run_world_seed_with(
    world: WorldKind,
    seed: u64,
    options: Options,
) -> anyhow::Result<SeedReport> {
    let flaw = options.drop_one_in.map(|n| match world {
        WorldKind::Agent => Flaw::AgentsDeafToUser,
        WorldKind::Hub | WorldKind::Relay => Flaw::NodesDrop(n),
    });
    run_world(world, seed, options.duration, flaw, options.secure).await
}

/// A world broken on purpose, to show that its checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    /// Hub and relay worlds: nodes lose one event in this many.
    NodesDrop(u64),
    /// Relay world: one rolled-back transaction in this many is published
    /// straight to the hub before its rollback (a writer that publishes
    /// before it knows the outcome).
    PublishBeforeRollback(u64),
    /// Agent world: agents subscribe to `price` only, deaf to `user`.
    AgentsDeafToUser,
    /// Agent world: agents run without `--fail-closed`.
    AgentsNeverFailClosed,
}

/// Runs the scenario of `seed` in `world` for `duration`, broken by `flaw`.
pub async fn run_flawed(
    world: WorldKind,
    seed: u64,
    duration: Duration,
    flaw: Option<Flaw>,
) -> anyhow::Result<SeedReport> {
    run_world(world, seed, duration, flaw, false).await
}

async fn run_world(
    world: WorldKind,
    seed: u64,
    duration: Duration,
    flaw: Option<Flaw>,
    secure: bool,
) -> anyhow::Result<SeedReport> {
    if secure && world != WorldKind::Hub {
        anyhow::bail!(
            "--secure runs the hub world only: the relay and the agent take no credentials yet"
        );
    }
    let limit = duration + SEED_OVERHEAD;
    let run = async {
        match world {
            WorldKind::Hub => {
                let drop_one_in = match flaw {
                    Some(Flaw::NodesDrop(n)) => Some(n),
                    None => None,
                    Some(f) => anyhow::bail!("{f:?} is not a flaw of the hub world"),
                };
                world::run(Plan::new(seed, duration), drop_one_in, secure).await
            }
            WorldKind::Relay => relay_world::run(seed, duration, flaw).await,
            WorldKind::Agent => agent_world::run(seed, duration, flaw).await,
        }
    };
    match tokio::time::timeout(limit, run).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("seed {seed} did not finish within {limit:?}"),
    }
}

/// Runs the scenario of `seed` with these options.
pub async fn run_seed_with(seed: u64, options: Options) -> anyhow::Result<SeedReport> {
    run_world_seed_with(WorldKind::Hub, seed, options).await
}
