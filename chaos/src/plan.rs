//! The scenario a seed stands for: the world's shape (regions, nodes, cursor
//! stores, key space) and the fault schedule (what, when, for how long, on
//! which target). Everything here is drawn from one `StdRng` seeded with the
//! seed, before anything runs, so a seed (with the same per-seed duration and
//! build) always gives the same plan. Traffic choices are drawn later by each
//! writer and reader task from RNGs derived from the seed ([`task_rng`]).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Every kind of fault the suite injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A node with a cursor file is killed (or stopped) and restarted; its
    /// cache survives, as an on-disk cache outlives a process.
    NodeRestartPersisted,
    /// A node with its cursor in memory is killed (or stopped) and restarted
    /// with an empty cache.
    NodeRestartMemory,
    /// A hub is stopped and started again on the same address and data
    /// directory: the same epoch, so no node may be reset `EPOCH_CHANGED`.
    HubRestart,
    /// Both replication links between two regions are cut.
    RegionPartition,
    /// Both replication links between two regions are delayed.
    RegionDelay,
    /// A node's link to its hub is cut.
    NodePartition,
    /// A node's link to its hub is delayed.
    NodeDelay,
    /// Versions already published are published again.
    DuplicatePublish,
    /// Older versions are published after newer ones.
    ReorderedPublish,
    /// A node's handler blocks until the hub parks the node and resets it.
    NodeStall,
    /// A hub is stopped, its data directory deleted, and started again: a
    /// new epoch, so its nodes are reset `EPOCH_CHANGED`.
    HubDataLost,
    /// Relay world: a `freshness-relay` process is killed with SIGKILL and
    /// started again after the hold.
    RelayKill,
    /// Relay world: the world's PostgreSQL is stopped (fast shutdown) and
    /// started again after the hold.
    PostgresRestart,
    /// Relay world: the hub stops answering (its connections stay open, as
    /// with SIGSTOP) for the hold.
    HubPause,
    /// Agent world: a `freshness-agent` process is killed with SIGKILL and
    /// started again after the hold.
    AgentKill,
    /// Agent world: an agent's Redis is killed (its data is gone) and
    /// started again, empty, after the hold.
    RedisRestart,
    /// Agent world: an agent is stopped with SIGSTOP for the hold.
    AgentPause,
    /// Agent world: an agent's link to its hub is cut for the hold.
    AgentPartition,
}

impl FaultKind {
    /// Every kind of the hub world, in a fixed order.
    pub const ALL: [FaultKind; 11] = [
        Self::NodeRestartPersisted,
        Self::NodeRestartMemory,
        Self::HubRestart,
        Self::RegionPartition,
        Self::RegionDelay,
        Self::NodePartition,
        Self::NodeDelay,
        Self::DuplicatePublish,
        Self::ReorderedPublish,
        Self::NodeStall,
        Self::HubDataLost,
    ];

    /// Every kind of the relay world.
    pub const RELAY_WORLD: [FaultKind; 4] = [
        Self::RelayKill,
        Self::HubRestart,
        Self::PostgresRestart,
        Self::HubPause,
    ];

    /// Every kind of the agent world.
    pub const AGENT_WORLD: [FaultKind; 5] = [
        Self::AgentKill,
        Self::RedisRestart,
        Self::HubRestart,
        Self::AgentPause,
        Self::AgentPartition,
    ];

    /// The snake-case name used in summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeRestartPersisted => "node_restart_persisted",
            Self::NodeRestartMemory => "node_restart_memory",
            Self::HubRestart => "hub_restart",
            Self::RegionPartition => "region_partition",
            Self::RegionDelay => "region_delay",
            Self::NodePartition => "node_partition",
            Self::NodeDelay => "node_delay",
            Self::DuplicatePublish => "duplicate_publish",
            Self::ReorderedPublish => "reordered_publish",
            Self::NodeStall => "node_stall",
            Self::HubDataLost => "hub_data_lost",
            Self::RelayKill => "relay_kill",
            Self::PostgresRestart => "postgres_restart",
            Self::HubPause => "hub_pause",
            Self::AgentKill => "agent_kill",
            Self::RedisRestart => "redis_restart",
            Self::AgentPause => "agent_pause",
            Self::AgentPartition => "agent_partition",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a fault does to which target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Kill (`crash`: abort, no goodbye, no final cursor write) or stop the
    /// node, keep it down for the hold, start it again.
    RestartNode { node: usize, crash: bool },
    /// Stop the region's hub, keep it down for the hold, start it again.
    RestartHub { region: usize, lose_data: bool },
    /// Cut both links between two regions for the hold.
    PartitionRegions { a: usize, b: usize },
    /// Delay both links between two regions for the hold.
    DelayRegions { a: usize, b: usize, delay: Duration },
    /// Cut a node's link to its hub for the hold.
    PartitionNode { node: usize },
    /// Delay a node's link to its hub for the hold.
    DelayNode { node: usize, delay: Duration },
    /// Publish the current version of these entities again, to this
    /// region's hub.
    Duplicate { region: usize, entities: Vec<usize> },
    /// Publish, to this region's hub, a version `back` behind the newest
    /// accepted one of these entities.
    Reorder {
        region: usize,
        entities: Vec<usize>,
        back: u64,
    },
    /// Block the node's handler for the hold.
    StallNode { node: usize },
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// When it starts, from the start of traffic.
    pub at: Duration,
    /// How long it lasts (0 for the publish faults).
    pub hold: Duration,
    /// Its kind.
    pub kind: FaultKind,
    /// What it does.
    pub action: Action,
}

/// One cache node of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// Index of its region.
    pub region: usize,
    /// Its node id (stable across its restarts).
    pub id: String,
    /// Cursor in a file (and a cache that survives restarts) or in memory.
    pub persisted: bool,
    /// In-flight events it asks for (0: the hub's default).
    pub max_in_flight: u32,
}

/// The whole scenario of one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// How long traffic (and the fault schedule) runs.
    pub duration: Duration,
    /// Region names, one hub each.
    pub regions: Vec<String>,
    /// The cache nodes.
    pub nodes: Vec<NodePlan>,
    /// Ids per namespace: the key space is `price:0..n` and `user:0..n`.
    pub ids: usize,
    /// Hubs keep a small log (8 events per shard), so that a stalled node is
    /// reset within a second or two.
    pub small_log: bool,
    /// The fault schedule, by start time.
    pub faults: Vec<Fault>,
}

/// Shards of every hub in the world.
pub const SHARDS: u32 = 16;
/// Events per shard a small log keeps.
pub const SMALL_LOG_PER_SHARD: u64 = 8;
/// In-flight events a node that will stall asks for.
pub const STALL_IN_FLIGHT: u32 = 4;
/// Longest delay injected on any link, one way.
pub const MAX_DELAY: Duration = Duration::from_millis(150);
const REGION_NAMES: [&str; 3] = ["eu", "us", "ap"];

/// An RNG for task `task` of the run of `seed`: each writer and reader draws
/// its own choices, so they do not depend on how tasks interleave.
pub fn task_rng(seed: u64, task: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ task.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

impl Plan {
    /// The plan of `seed` for traffic of `duration`.
    pub fn new(seed: u64, duration: Duration) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let region_count = rng.random_range(1..=3usize);
        let regions: Vec<String> = REGION_NAMES[..region_count]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut nodes = Vec::new();
        for (r, name) in regions.iter().enumerate() {
            let n = if region_count == 3 {
                1
            } else {
                rng.random_range(1..=2usize)
            };
            for i in 0..n {
                nodes.push(NodePlan {
                    region: r,
                    id: format!("{name}-node-{i}"),
                    persisted: rng.random_bool(0.5),
                    max_in_flight: 0,
                });
            }
        }
        let ids = rng.random_range(24..=64usize);
        let mut plan = Self {
            seed,
            duration,
            regions,
            nodes,
            ids,
            small_log: false,
            faults: Vec::new(),
        };
        plan.schedule(&mut rng);
        plan
    }

    /// Draws the fault schedule: a few faults per 3 s of traffic, no two at
    /// once on the same target, each over before traffic ends.
    fn schedule(&mut self, rng: &mut StdRng) {
        let secs = self.duration.as_secs_f64();
        let count = ((secs / 3.0 * 4.0).round() as usize).max(3) + rng.random_range(0..=1usize);
        let mut busy: HashMap<String, Duration> = HashMap::new();
        let end = self.duration.mul_f64(0.85);
        for _ in 0..count * 8 {
            if self.faults.len() >= count {
                break;
            }
            let kinds: Vec<FaultKind> = FaultKind::ALL
                .into_iter()
                .filter(|k| self.applicable(*k))
                .collect();
            let kind = kinds[rng.random_range(0..kinds.len())];
            let at = self.duration.mul_f64(rng.random_range(0.08..0.7));
            let hold = match kind {
                FaultKind::DuplicatePublish | FaultKind::ReorderedPublish => Duration::ZERO,
                FaultKind::NodeStall => ms(rng, 1_500, 2_200),
                _ => ms(rng, 200, 1_200),
            };
            let hold = hold.min(end.saturating_sub(at));
            let Some((target, action)) = self.draw(kind, rng) else {
                continue;
            };
            // A target is busy until its fault ends, plus a little for a
            // restart to finish.
            let free = busy.get(&target).copied().unwrap_or_default();
            if at < free || (kind == FaultKind::NodeStall && hold < Duration::from_millis(1_200)) {
                continue;
            }
            busy.insert(target, at + hold + Duration::from_millis(300));
            if let Action::StallNode { node } = action {
                self.nodes[node].max_in_flight = STALL_IN_FLIGHT;
                self.small_log = true;
            }
            self.faults.push(Fault {
                at,
                hold,
                kind,
                action,
            });
        }
        self.faults.sort_by_key(|f| f.at);
    }

    fn applicable(&self, kind: FaultKind) -> bool {
        match kind {
            FaultKind::RegionPartition | FaultKind::RegionDelay => self.regions.len() > 1,
            FaultKind::NodeRestartPersisted => self.nodes.iter().any(|n| n.persisted),
            FaultKind::NodeRestartMemory => self.nodes.iter().any(|n| !n.persisted),
            _ => true,
        }
    }

    /// Picks the target of a fault of `kind`: its busy key and the action.
    fn draw(&self, kind: FaultKind, rng: &mut StdRng) -> Option<(String, Action)> {
        let node = |rng: &mut StdRng, persisted: Option<bool>| -> Option<usize> {
            let fit: Vec<usize> = (0..self.nodes.len())
                .filter(|i| persisted.is_none_or(|p| self.nodes[*i].persisted == p))
                .collect();
            (!fit.is_empty()).then(|| fit[rng.random_range(0..fit.len())])
        };
        let pair = |rng: &mut StdRng| {
            let a = rng.random_range(0..self.regions.len());
            let b = (a + rng.random_range(1..self.regions.len())) % self.regions.len();
            (a.min(b), a.max(b))
        };
        let entities = |rng: &mut StdRng| -> Vec<usize> {
            (0..rng.random_range(1..=4))
                .map(|_| rng.random_range(0..self.ids * 2))
                .collect()
        };
        let region = rng.random_range(0..self.regions.len());
        Some(match kind {
            FaultKind::NodeRestartPersisted | FaultKind::NodeRestartMemory => {
                let n = node(rng, Some(kind == FaultKind::NodeRestartPersisted))?;
                (
                    format!("node-{n}"),
                    Action::RestartNode {
                        node: n,
                        crash: rng.random_bool(0.5),
                    },
                )
            }
            FaultKind::HubRestart | FaultKind::HubDataLost => (
                format!("hub-{region}"),
                Action::RestartHub {
                    region,
                    lose_data: kind == FaultKind::HubDataLost,
                },
            ),
            FaultKind::RegionPartition => {
                let (a, b) = pair(rng);
                (format!("link-{a}-{b}"), Action::PartitionRegions { a, b })
            }
            FaultKind::RegionDelay => {
                let (a, b) = pair(rng);
                let delay = ms(rng, 20, MAX_DELAY.as_millis() as u64);
                (
                    format!("link-{a}-{b}"),
                    Action::DelayRegions { a, b, delay },
                )
            }
            FaultKind::NodePartition => {
                let n = node(rng, None)?;
                (format!("node-{n}"), Action::PartitionNode { node: n })
            }
            FaultKind::NodeDelay => {
                let n = node(rng, None)?;
                let delay = ms(rng, 20, MAX_DELAY.as_millis() as u64);
                (format!("node-{n}"), Action::DelayNode { node: n, delay })
            }
            FaultKind::NodeStall => {
                let n = node(rng, None)?;
                (format!("node-{n}"), Action::StallNode { node: n })
            }
            FaultKind::DuplicatePublish => (
                format!("publish-{}", self.faults.len()),
                Action::Duplicate {
                    region,
                    entities: entities(rng),
                },
            ),
            FaultKind::ReorderedPublish => (
                format!("publish-{}", self.faults.len()),
                Action::Reorder {
                    region,
                    entities: entities(rng),
                    back: rng.random_range(1..=3),
                },
            ),
            // Faults of the relay and agent worlds.
            FaultKind::RelayKill
            | FaultKind::PostgresRestart
            | FaultKind::HubPause
            | FaultKind::AgentKill
            | FaultKind::RedisRestart
            | FaultKind::AgentPause
            | FaultKind::AgentPartition => return None,
        })
    }

    /// The entity names of the key space, by index: `price:i` then `user:i`.
    pub fn entity_names(&self) -> Vec<String> {
        entity_names(self.ids)
    }

    /// A fault as a line of a schedule: its start, kind, what and hold.
    pub fn describe_fault(&self, f: &Fault) -> String {
        format!("+{:>5}ms {}", f.at.as_millis(), self.fault_text(f))
    }

    /// A fault's kind, what it does and its hold.
    pub fn fault_text(&self, f: &Fault) -> String {
        let node = |n: usize| self.nodes[n].id.clone();
        let region = |r: usize| self.regions[r].clone();
        let what = match &f.action {
            Action::RestartNode { node: n, crash } => format!(
                "{} {} ({} cursor)",
                if *crash { "kill" } else { "stop" },
                node(*n),
                if self.nodes[*n].persisted {
                    "file"
                } else {
                    "memory"
                }
            ),
            Action::RestartHub {
                region: r,
                lose_data: false,
            } => format!("restart hub {}", region(*r)),
            Action::RestartHub {
                region: r,
                lose_data: true,
            } => format!("restart hub {} with its data lost", region(*r)),
            Action::PartitionRegions { a, b } => {
                format!("partition {} <-> {}", region(*a), region(*b))
            }
            Action::DelayRegions { a, b, delay } => {
                format!("delay {} <-> {} by {delay:?}", region(*a), region(*b))
            }
            Action::PartitionNode { node: n } => format!("partition {} from its hub", node(*n)),
            Action::DelayNode { node: n, delay } => format!("delay {} by {delay:?}", node(*n)),
            Action::Duplicate {
                region: r,
                entities,
            } => format!("republish {} entities at {}", entities.len(), region(*r)),
            Action::Reorder {
                region: r,
                entities,
                back,
            } => format!(
                "publish {} entities {back} versions back at {}",
                entities.len(),
                region(*r)
            ),
            Action::StallNode { node: n } => format!("stall {}", node(*n)),
        };
        format!(
            "{:<22} {what} for {}ms",
            f.kind.as_str(),
            f.hold.as_millis()
        )
    }
}

/// The key space of `ids` ids per namespace: `price:i` then `user:i`.
pub fn entity_names(ids: usize) -> Vec<String> {
    (0..ids)
        .map(|i| format!("price:{i}"))
        .chain((0..ids).map(|i| format!("user:{i}")))
        .collect()
}

/// One scheduled fault of the relay or agent world: a kind and the index of
/// its target (a relay or an agent; 0 for the hub and PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcFault {
    /// When it starts, from the start of traffic.
    pub at: Duration,
    /// How long it lasts.
    pub hold: Duration,
    /// Its kind.
    pub kind: FaultKind,
    /// Its target.
    pub target: usize,
}

impl ProcFault {
    /// The fault as a line of a schedule; `target` names the target.
    pub fn describe(&self, target: &str) -> String {
        format!(
            "+{:>5}ms {:<22} {target} for {}ms",
            self.at.as_millis(),
            self.kind.as_str(),
            self.hold.as_millis()
        )
    }
}

/// Draws the schedule of a relay or agent world: `kinds` with the number of
/// targets each can hit and its hold range in ms, a few faults per 3 s of
/// traffic, no two at once on the same target (`busy` names it), each over
/// before 85 % of the traffic time.
pub fn schedule_procs(
    rng: &mut StdRng,
    duration: Duration,
    kinds: &[(FaultKind, usize, (u64, u64))],
    busy_key: impl Fn(FaultKind, usize) -> String,
) -> Vec<ProcFault> {
    let secs = duration.as_secs_f64();
    let count = ((secs / 3.0 * 4.0).round() as usize).max(3) + rng.random_range(0..=1usize);
    let end = duration.mul_f64(0.85);
    let mut busy: HashMap<String, Duration> = HashMap::new();
    let mut faults = Vec::new();
    for _ in 0..count * 32 {
        if faults.len() >= count {
            break;
        }
        let (kind, targets, (lo, hi)) = kinds[rng.random_range(0..kinds.len())];
        let target = rng.random_range(0..targets.max(1));
        let at = duration.mul_f64(rng.random_range(0.08..0.7));
        let hold = ms(rng, lo, hi).min(end.saturating_sub(at));
        let key = busy_key(kind, target);
        if at < busy.get(&key).copied().unwrap_or_default() {
            continue;
        }
        // Busy until the fault ends, plus time for a restart to finish.
        busy.insert(key, at + hold + Duration::from_millis(500));
        faults.push(ProcFault {
            at,
            hold,
            kind,
            target,
        });
    }
    faults.sort_by_key(|f| f.at);
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_plan() {
        for seed in 0..50 {
            let d = Duration::from_secs(4);
            assert_eq!(Plan::new(seed, d), Plan::new(seed, d));
        }
    }

    #[test]
    fn every_kind_is_reachable_and_faults_end_before_traffic_does() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let plan = Plan::new(seed, Duration::from_secs(3));
            for f in &plan.faults {
                assert!(f.at + f.hold <= plan.duration, "{f:?}");
                seen.insert(f.kind);
            }
            assert!(plan.faults.len() >= 3, "seed {seed}: {:?}", plan.faults);
        }
        assert_eq!(seen.len(), FaultKind::ALL.len(), "{seen:?}");
    }
}
