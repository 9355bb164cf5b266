//! The hub's core, free of gRPC: the shard actors and their logs, the node
//! registry, publishing with ack levels, and status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use freshness::validate::{AckLevel, ValidPublish};
use freshness::{Cursor, ShardId};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Exhausted, HubError};
use crate::reader::LogReader;
use crate::shard::{Append, EventOutcome, Incoming, Part, ShardActors, ShardContext, ShardMemory};
use crate::status::{HubStatus, NodeStatus, PeerStatus, ShardStatus};
use crate::store::{DataDir, Opened};

/// A durable log as opened at start-up: its writer and readers, and every
/// shard's memory rebuilt from what the disk held; or the region's
/// JetStream log.
#[derive(Debug)]
pub enum Durable {
    /// The embedded write-ahead log.
    Disk {
        /// The data directory's log writer and readers.
        opened: Opened,
        /// Every shard's in-memory log and version memory, by index.
        memories: Vec<ShardMemory>,
    },
    /// The JetStream log shared by the region's hub replicas.
    JetStream(crate::jetstream::Opened),
}

/// Why a session ended on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// A newer stream with the same node id took over.
    Replaced,
}

/// What the hub and the status call know of one connected stream. Written by
/// its session, read by publishers waiting for acks and by status.
#[derive(Debug)]
pub struct SessionShared {
    /// Unique per stream, to tell a replaced session from its successor.
    pub session_id: u64,
    /// The node's stable id.
    pub node_id: String,
    /// Namespaces, sorted; empty means all.
    pub filter: Vec<String>,
    /// A replicating hub rather than a cache node.
    pub replication: bool,
    /// Region of a replicating hub.
    pub region: String,
    /// Remote address.
    pub peer: String,
    /// Hub time of the hello.
    pub connected_at_us: u64,
    /// Cumulative acked cursor (seqs per shard, this hub's epoch).
    pub acked: Mutex<Vec<u64>>,
    /// For a replicating hub: how far its own nodes have applied this hub's
    /// events (GLOBAL acks).
    pub applied: Mutex<Vec<u64>>,
    /// Unacked events in flight.
    pub in_flight: AtomicU32,
    /// The node's in-flight limit.
    pub max_in_flight: u32,
    /// True while the in-flight limit holds the session back.
    pub parked: AtomicBool,
    /// Hub time at which the session last handed its stream a message and
    /// was not asked for the next one since (0: it was asked, or has
    /// nothing to send). HTTP/2 asks again as soon as the stream has send
    /// capacity, so a message left waiting for longer than
    /// [`BLOCKED_AFTER_US`] means the node does not read.
    pub unpolled_since_us: AtomicU64,
    /// True while a reset is sent or waiting to go and not acked yet.
    pub resetting: AtomicBool,
    /// The last [`NodeState`] computed, as its wire number.
    state: AtomicU8,
    /// Hub time since which the node is in that state.
    state_since_us: AtomicU64,
    /// Newest watermark the node has acked.
    pub acked_watermark_us: AtomicU64,
    /// Ends the session.
    pub cancel: CancellationToken,
    /// Set before `cancel` when the end is deliberate.
    pub end_reason: Mutex<Option<EndReason>>,
}

// What a node is doing, for status (SPEC §3.4): the most telling state
// wins, in `NodeState`'s order. The session sets the last three from its
// flags; `Blocked` (the stream has no send capacity: the node does not
// read) status finds out itself ([`SessionShared::state_since`]).
pub use crate::status::NodeState;

/// The state a session stored as its number.
fn node_state_from_u8(v: u8) -> NodeState {
    match v {
        1 => NodeState::Blocked,
        2 => NodeState::Resetting,
        3 => NodeState::Parked,
        _ => NodeState::Live,
    }
}

/// A stream not asked for its next message for this long shows `blocked`:
/// HTTP/2 asks within microseconds while the stream has send capacity.
pub const BLOCKED_AFTER_US: u64 = 500_000;

impl SessionShared {
    /// The state its session's flags say now (status adds `blocked`, which
    /// the session cannot see: see [`Self::state_since`]).
    pub fn state(&self) -> NodeState {
        if self.resetting.load(Ordering::Relaxed) {
            NodeState::Resetting
        } else if self.parked.load(Ordering::Relaxed) {
            NodeState::Parked
        } else {
            NodeState::Live
        }
    }

    /// Recomputes the state after a flag changed; a new state starts its
    /// clock at `now_us`. Only the stream's own task calls it.
    pub fn refresh_state(&self, now_us: u64) {
        let state = self.state() as u8;
        if self.state.swap(state, Ordering::Relaxed) != state {
            self.state_since_us.store(now_us, Ordering::Relaxed);
        }
    }

    /// The state at `now_us` and since when: `blocked` when the stream has
    /// not asked for a message handed out [`BLOCKED_AFTER_US`] ago, else as
    /// the session's last refresh left it.
    pub fn state_since(&self, now_us: u64) -> (NodeState, u64) {
        let unpolled = self.unpolled_since_us.load(Ordering::Relaxed);
        if unpolled != 0 && now_us.saturating_sub(unpolled) >= BLOCKED_AFTER_US {
            return (NodeState::Blocked, unpolled);
        }
        let state = node_state_from_u8(self.state.load(Ordering::Relaxed));
        (state, self.state_since_us.load(Ordering::Relaxed))
    }

    /// True when the node's filter lets this namespace through.
    pub fn wants(&self, namespace: &str) -> bool {
        self.filter.is_empty()
            || self
                .filter
                .binary_search_by(|f| f.as_str().cmp(namespace))
                .is_ok()
    }
}

/// The answer to a publish.
#[derive(Debug)]
pub struct Published {
    /// Per event, in call order: outcome and shard.
    pub results: Vec<(EventOutcome, ShardId)>,
    /// How many events had each outcome, indexed by [`Outcome`] (applied,
    /// duplicate, superseded).
    pub by_outcome: [u64; 3],
    /// Every node concerned acked (always true for ACCEPTED).
    pub complete: bool,
    /// Nodes that had not acked at the timeout.
    pub pending_nodes: Vec<String>,
    /// Peer regions that had not confirmed at the timeout (GLOBAL).
    pub pending_regions: Vec<String>,
    /// The level actually applied.
    pub applied: AckLevel,
    /// Why it differs from the request, if it does.
    pub note: String,
}

/// One hub: shared by the gRPC adapter and every session.
pub struct Hub {
    /// The configuration it runs with.
    pub config: Config,
    /// This incarnation of the log.
    pub epoch: u64,
    /// The one clock.
    pub clock: Clock,
    /// Region as a shared string (origin of local events).
    pub region: Arc<str>,
    /// The shard actors, and which owns which shard.
    pub(crate) actors: ShardActors,
    /// What sessions read of every shard: memory, disk, traces.
    pub(crate) logs: LogReader,
    /// Bumped after every append.
    pub(crate) appended: watch::Sender<u64>,
    /// Bumped after every ack, for REGION waiters.
    acks_changed: watch::Sender<u64>,
    /// Connected streams by node id.
    nodes: RwLock<HashMap<String, Arc<SessionShared>>>,
    /// Told when the last stream leaves (shutdown waits for it).
    nodes_gone: tokio::sync::Notify,
    next_session: AtomicU64,
    ack_waiters: Semaphore,
    /// Cancelled when the hub shuts down; sessions say goodbye.
    pub shutdown: CancellationToken,
    /// What the replication links report, by peer region.
    peers: Mutex<BTreeMap<String, PeerInfo>>,
    /// Running totals for the status page.
    pub stats: crate::stats::HubStats,
    /// The durable log's directory; `None` for an ephemeral hub.
    pub data_dir: Option<Arc<DataDir>>,
    /// What the shard actors share (failing writes, for status).
    shard_ctx: Arc<ShardContext>,
    /// This hub as a replica of its region's JetStream log.
    pub replica: Option<Arc<crate::jetstream::Replica>>,
}

/// The state of one replication link, for status.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's URL.
    pub address: String,
    /// The link's stream is up.
    pub connected: bool,
    /// Events in the peer's log (as of its last status, read every second)
    /// that the link has not passed yet.
    pub lag_events: u64,
    /// Newest watermark received from the peer (its hub clock); until the
    /// first one, the time this hub started, so that a peer never heard from
    /// shows its lag growing (as a node's staleness grows from its hello).
    pub watermark_us: u64,
    /// Why the link last failed, if it did.
    pub last_error: String,
    /// With hub replicas: the replica holding the region's link lease.
    pub linked_by: Option<String>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("region", &self.region)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Builds a hub and spawns its shard actors on `tracker`. The actors stop
    /// when the last `Hub` reference is dropped. With `durable` (see
    /// [`crate::open_log`]) the hub keeps its epoch and starts from what the
    /// disk held; without, it starts empty in a new epoch.
    pub fn new(
        config: Config,
        durable: Option<Durable>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Self> {
        let clock = Clock::new();
        let region: Arc<str> = Arc::from(config.region.as_str());
        let (appended, _) = watch::channel(0);
        let bell = Arc::new(crate::shard::AppendBell::new(appended.clone()));
        tracker.spawn(bell.clone().run(shutdown.clone()));
        let ctx = Arc::new(ShardContext {
            region: region.clone(),
            clock,
            appended: bell,
            failing: Mutex::new(BTreeMap::new()),
        });
        crate::metrics::set_log_writable(true);
        let mut js_shards = Vec::new();
        let mut replica = None;
        let (epoch, data_dir, memories, wal, disk) = match durable {
            Some(Durable::Disk { opened, memories }) => (
                opened.epoch,
                Some(opened.dir),
                memories,
                Some(opened.wal),
                opened.readers,
            ),
            Some(Durable::JetStream(opened)) => {
                js_shards = opened.shards;
                // Watermarks wait for the tail from the start.
                opened.replica.spawn(
                    opened.tail,
                    clock,
                    (config.progress_interval / 4).max(Duration::from_millis(10)),
                    shutdown.clone(),
                    tracker,
                );
                replica = Some(opened.replica);
                (opened.epoch, None, opened.memories, None, Vec::new())
            }
            None => (
                crate::store::new_epoch_value(),
                None,
                (0..config.shards).map(|_| config.shard_memory(1)).collect(),
                None,
                Vec::new(),
            ),
        };
        if let Some(wal) = &wal {
            // The durable log's writer hands each group it wrote to this
            // task, which answers the group's actors: one wake across
            // threads per group. Each actor then ends its drain (visible,
            // answered) and rings the bell; its ringer runs behind them
            // all, so the sessions are woken once per group.
            let (completer, mut groups) = tokio::sync::mpsc::channel::<Vec<crate::store::Completion>>(
                config.shards as usize + 1,
            );
            wal.complete_on(completer);
            let stop = shutdown.clone();
            tracker.spawn(async move {
                loop {
                    let group = tokio::select! {
                        g = groups.recv() => g,
                        () = stop.cancelled() => None,
                    };
                    let Some(group) = group else { break };
                    group
                        .into_iter()
                        .for_each(crate::store::Completion::complete);
                }
                // Stopping: the writer completes later groups itself; the
                // ones already handed over are completed here, not dropped.
                // Both may run at once: each answer carries its drain's
                // number within its port, so none is taken as another's.
                groups.close();
                while let Some(group) = groups.recv().await {
                    group
                        .into_iter()
                        .for_each(crate::store::Completion::complete);
                }
            });
        }
        let logs: Vec<_> = memories.iter().map(|m| m.log().clone()).collect();
        let actors = ShardActors::spawn(
            memories,
            ctx.clone(),
            config.actors(),
            config.shard_queue,
            tracker,
            wal.as_ref(),
            js_shards,
        );
        let traces = actors.traces();
        let logs = LogReader::new(logs, disk, traces);
        let (acks_changed, _) = watch::channel(0);
        let hub = Arc::new(Self {
            replica,
            data_dir,
            shard_ctx: ctx,
            epoch,
            clock,
            region,
            actors,
            logs,
            appended,
            acks_changed,
            nodes: RwLock::new(HashMap::new()),
            nodes_gone: tokio::sync::Notify::new(),
            next_session: AtomicU64::new(1),
            ack_waiters: Semaphore::new(config.max_ack_waiters),
            shutdown,
            peers: Mutex::new(
                config
                    .peers
                    .iter()
                    .map(|(region, address)| {
                        (
                            region.clone(),
                            PeerInfo {
                                address: address.clone(),
                                watermark_us: clock.now_us(),
                                ..PeerInfo::default()
                            },
                        )
                    })
                    .collect(),
            ),
            stats: crate::stats::HubStats::new(clock.now_us()),
            config,
        });
        if let Some(replica) = &hub.replica {
            // REGION acks across the region's replicas.
            let weak = Arc::downgrade(&hub);
            let woken = Arc::downgrade(&hub);
            tracker.spawn(crate::jetstream::share_acks(
                replica.clone(),
                move || weak.upgrade().map(|h| h.local_node_acks()),
                move || {
                    if let Some(h) = woken.upgrade() {
                        h.acks_changed();
                    }
                },
                hub.shutdown.clone(),
            ));
        }
        hub
    }

    /// This hub's cache nodes and peer links, as shared with the region's
    /// other replicas.
    pub fn local_node_acks(&self) -> Vec<crate::jetstream::SharedNode> {
        self.nodes
            .read()
            .values()
            .map(|n| crate::jetstream::SharedNode {
                id: n.node_id.clone(),
                filter: n.filter.clone(),
                acked: n.acked.lock().clone(),
                link: n.replication.then(|| crate::jetstream::SharedLink {
                    region: n.region.clone(),
                    applied: n.applied.lock().clone(),
                }),
            })
            .collect()
    }

    /// Shard count.
    pub fn shard_count(&self) -> u32 {
        self.config.shards
    }

    /// Current head seq of every shard.
    pub fn heads(&self) -> Vec<u64> {
        self.logs.heads()
    }

    /// Orders and appends a validated publish, then waits for the ack level.
    pub async fn publish(&self, req: ValidPublish) -> Result<Published, HubError> {
        let (applied, note) = match req.ack {
            AckLevel::Global if self.config.peers.is_empty() => (
                AckLevel::Region,
                "this hub has no peer regions: GLOBAL was applied as REGION".to_owned(),
            ),
            other => (other, String::new()),
        };
        let awaited = applied != AckLevel::Accepted;
        // A call that would wait is refused before anything is applied.
        let _permit =
            if awaited {
                Some(self.ack_waiters.try_acquire().map_err(|_| {
                    HubError::from(Exhausted::AckWaiters(self.config.max_ack_waiters))
                })?)
            } else {
                None
            };
        // Only a call that waits for acks needs its events' namespaces
        // (which nodes must ack them), after the events have gone to the
        // shards.
        let namespaces: Vec<Arc<str>> = if awaited {
            req.events
                .iter()
                .map(|e| Arc::from(e.entity.namespace()))
                .collect()
        } else {
            Vec::new()
        };
        let incoming = req
            .events
            .into_iter()
            .map(|e| Incoming::published(e, awaited))
            .collect();
        let results = self
            .append(incoming, &[], Some(self.config.admission_timeout))
            .await?;
        let mut by_outcome = [0u64; 3];
        for (o, _) in &results {
            by_outcome[o.outcome as usize] += 1;
        }
        self.stats.published(results.len() as u64);
        crate::metrics::count_published(by_outcome);

        if !awaited {
            return Ok(Published {
                results,
                by_outcome,
                complete: true,
                pending_nodes: Vec::new(),
                pending_regions: Vec::new(),
                applied,
                note,
            });
        }
        let targets: Vec<(ShardId, u64, &str)> = results
            .iter()
            .zip(&namespaces)
            .map(|((o, shard), ns)| (*shard, o.seq, &**ns))
            .collect();
        let deadline = tokio::time::Instant::now() + req.timeout;
        let span = tracing::info_span!(
            "hub.wait_acks",
            region = %self.region,
            ack = ?applied,
            pending_nodes = tracing::field::Empty,
            pending_regions = tracing::field::Empty,
        );
        let (pending_nodes, pending_regions) = async {
            if applied == AckLevel::Global {
                tokio::join!(
                    self.wait_for_region(&targets, deadline),
                    self.wait_for_peers(&targets, deadline)
                )
            } else {
                (self.wait_for_region(&targets, deadline).await, Vec::new())
            }
        }
        .instrument(span.clone())
        .await;
        span.record("pending_nodes", crate::telemetry::num(pending_nodes.len()));
        span.record(
            "pending_regions",
            crate::telemetry::num(pending_regions.len()),
        );
        Ok(Published {
            results,
            by_outcome,
            complete: pending_nodes.is_empty() && pending_regions.is_empty(),
            pending_nodes,
            pending_regions,
            applied,
            note,
        })
    }

    /// Admits the whole call or nothing: a permit on the queue of every
    /// shard actor it reaches first, then the commands (one per actor).
    /// With an admission timeout, a queue that stays full
    /// that long refuses the call with nothing applied; without one (events
    /// replicated from a peer) the caller waits, which backpressures the link.
    /// `gaps` are shards that get a replication gap marker before the events.
    pub async fn append(
        &self,
        events: Vec<Incoming>,
        gaps: &[u32],
        admission: Option<Duration>,
    ) -> Result<Vec<(EventOutcome, ShardId)>, HubError> {
        let s = self.shard_count();
        let n = events.len();
        let mut by_shard: BTreeMap<ShardId, (bool, Vec<usize>, Vec<Incoming>)> = BTreeMap::new();
        let mut shard_of = Vec::with_capacity(n);
        for (i, e) in events.into_iter().enumerate() {
            let shard = e.entity.shard(s);
            shard_of.push(shard);
            let slot = by_shard.entry(shard).or_default();
            slot.1.push(i);
            slot.2.push(e);
        }
        for g in gaps {
            by_shard.entry(ShardId(*g)).or_default().0 = true;
        }
        // One command per actor, its shards' parts in shard order; the
        // answer's outcomes come in that order.
        let mut by_actor: BTreeMap<usize, (Vec<usize>, Vec<Part>)> = BTreeMap::new();
        for (shard, (gap, idx, events)) in by_shard {
            let slot = by_actor.entry(self.actors.actor_of(shard)).or_default();
            slot.0.extend(idx);
            slot.1.push(Part {
                shard: shard.0,
                gap,
                events,
            });
        }
        let reserve_all = async {
            let mut permits = Vec::with_capacity(by_actor.len());
            for a in by_actor.keys() {
                permits.push(self.actors.reserve(*a).await);
            }
            permits
        };
        let permits = match admission {
            Some(limit) => tokio::time::timeout(limit, reserve_all)
                .await
                .map_err(|_| HubError::Overloaded {
                    what: "shard queue full",
                    retry_after: limit.max(Duration::from_millis(10)),
                })?,
            None => reserve_all.await,
        };
        // The calling span (a publish) becomes the parent of the shard
        // actors' append spans.
        let trace = crate::telemetry::current_span_context();
        let mut waits = Vec::with_capacity(by_actor.len());
        for ((idx, parts), permit) in by_actor.into_values().zip(permits) {
            let permit = permit.map_err(|_| HubError::ShuttingDown)?;
            let (reply, rx) = oneshot::channel();
            permit.send(Append {
                parts,
                reply,
                trace: trace.clone(),
            });
            waits.push((idx, rx));
        }
        let mut out: Vec<Option<EventOutcome>> = vec![None; n];
        for (idx, rx) in waits {
            let outcomes = rx.await.map_err(|_| HubError::ShuttingDown)??;
            for (i, o) in idx.into_iter().zip(outcomes) {
                out[i] = Some(o);
            }
        }
        // Every index was routed to exactly one shard, which answers every
        // event of its command.
        out.into_iter()
            .zip(shard_of)
            .map(|(o, shard)| o.map(|o| (o, shard)).ok_or(HubError::ShuttingDown))
            .collect()
    }

    /// Waits until every connected node whose filter matches has acked the
    /// targets, or the timeout passes; returns the nodes still pending.
    async fn wait_for_region(
        &self,
        targets: &[(ShardId, u64, &str)],
        deadline: tokio::time::Instant,
    ) -> Vec<String> {
        // Requirement per node: highest seq per shard among matching events.
        let needs = |wants: &dyn Fn(&str) -> bool| {
            let mut need: HashMap<ShardId, u64> = HashMap::new();
            for (shard, seq, ns) in targets {
                if wants(ns) {
                    let e = need.entry(*shard).or_default();
                    *e = (*e).max(*seq);
                }
            }
            need.into_iter().collect::<Vec<_>>()
        };
        let mut pending: Vec<(String, Vec<(ShardId, u64)>)> = self
            .nodes
            .read()
            .values()
            .filter(|n| !n.replication)
            .filter_map(|n| {
                let need = needs(&|ns| n.wants(ns));
                (!need.is_empty()).then(|| (n.node_id.clone(), need))
            })
            .collect();
        // With hub replicas: the nodes of the region's other replicas too.
        if let Some(replica) = &self.replica {
            for (id, filter) in replica.other_nodes() {
                if pending.iter().any(|(p, _)| *p == id) {
                    continue;
                }
                let wants = |ns: &str| filter.is_empty() || filter.iter().any(|f| f == ns);
                let need = needs(&wants);
                if !need.is_empty() {
                    pending.push((id, need));
                }
            }
        }
        let replica = self.replica.as_deref();
        let acked =
            |nodes: &HashMap<String, Arc<SessionShared>>, id: &str, need: &[(ShardId, u64)]| {
                // A node that went away has not acked (it may come back and do so).
                nodes.get(id).is_some_and(|n| {
                    let acked = n.acked.lock();
                    need.iter()
                        .all(|(s, seq)| acked.get(s.index()).is_some_and(|a| a >= seq))
                }) || replica.is_some_and(|r| {
                    let need: Vec<(usize, u64)> =
                        need.iter().map(|(s, seq)| (s.index(), *seq)).collect();
                    r.other_node_acked(id, &need)
                })
            };
        let mut changes = self.acks_changed.subscribe();
        loop {
            changes.mark_unchanged();
            {
                // The call ends when its last node has acked, so a wake-up
                // looks at one pending node until that one has: checking
                // every pending node on every ack of every node (a lock
                // each) cost nodes × acks per call.
                let nodes = self.nodes.read();
                while let Some((id, need)) = pending.last() {
                    if !acked(&nodes, id, need) {
                        break;
                    }
                    pending.pop();
                }
            }
            if pending.is_empty() {
                return Vec::new();
            }
            let woke = tokio::select! {
                r = changes.changed() => r.is_ok(),
                () = tokio::time::sleep_until(deadline) => false,
                () = self.shutdown.cancelled() => false,
            };
            if !woke {
                let nodes = self.nodes.read();
                let mut ids: Vec<String> = pending
                    .into_iter()
                    .filter(|(id, need)| !acked(&nodes, id, need))
                    .map(|(id, _)| id)
                    .collect();
                ids.sort();
                return ids;
            }
        }
    }

    /// Waits until every peer region's replicating hub reports that its own
    /// nodes applied the targets, or the deadline; returns the regions still
    /// pending.
    async fn wait_for_peers(
        &self,
        targets: &[(ShardId, u64, &str)],
        deadline: tokio::time::Instant,
    ) -> Vec<String> {
        let mut pending: Vec<String> = self.config.peers.keys().cloned().collect();
        let mut changes = self.acks_changed.subscribe();
        loop {
            changes.mark_unchanged();
            {
                let nodes = self.nodes.read();
                pending.retain(|region| {
                    let here = nodes.values().any(|n| {
                        n.replication && n.region == *region && {
                            let applied = n.applied.lock();
                            targets
                                .iter()
                                .all(|(s, seq, _)| applied.get(s.index()).is_some_and(|a| a >= seq))
                        }
                    });
                    // With replicas, the peer's link may have reached another.
                    !here
                        && !self.replica.as_ref().is_some_and(|r| {
                            let need: Vec<(usize, u64)> = targets
                                .iter()
                                .map(|(s, seq, _)| (s.index(), *seq))
                                .collect();
                            r.other_link_applied(region, &need)
                        })
                });
            }
            if pending.is_empty() {
                return pending;
            }
            let woke = tokio::select! {
                r = changes.changed() => r.is_ok(),
                () = tokio::time::sleep_until(deadline) => false,
                () = self.shutdown.cancelled() => false,
            };
            if !woke {
                return pending;
            }
        }
    }

    /// Per shard, the lowest seq acked by every connected cache node (the
    /// head where no node is connected): what this region has applied.
    pub fn min_node_acked(&self) -> Vec<u64> {
        let mut min = self.heads();
        for n in self.nodes.read().values().filter(|n| !n.replication) {
            for (m, a) in min.iter_mut().zip(n.acked.lock().iter()) {
                *m = (*m).min(*a);
            }
        }
        // With replicas: the region's nodes are those of every replica.
        if let Some(r) = &self.replica {
            r.lower_to_other_nodes(&mut min);
        }
        min
    }

    /// Updates what status shows of a replication link.
    pub fn update_peer(&self, region: &str, f: impl FnOnce(&mut PeerInfo)) {
        if let Some(p) = self.peers.lock().get_mut(region) {
            f(p);
        }
    }

    /// Updates what status shows of every replication link.
    pub fn update_peers(&self, mut f: impl FnMut(&mut PeerInfo)) {
        self.peers.lock().values_mut().for_each(&mut f);
    }

    /// Whether any replication link of this hub is up.
    pub fn any_peer_connected(&self) -> bool {
        self.peers.lock().values().any(|p| p.connected)
    }

    /// Registers a stream. A stream with the same node id is ended
    /// (replaced). Refused when `max_nodes` streams are connected.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        node_id: String,
        filter: Vec<String>,
        replication: bool,
        region: String,
        peer: String,
        acked: Vec<u64>,
        max_in_flight: u32,
    ) -> Result<Arc<SessionShared>, HubError> {
        let shared = Arc::new(SessionShared {
            session_id: self.next_session.fetch_add(1, Ordering::Relaxed),
            node_id: node_id.clone(),
            filter,
            replication,
            region,
            peer,
            connected_at_us: self.clock.now_us(),
            // A peer's link resumes from what its hub received, which its
            // nodes may not have applied yet (a link that moved to another
            // replica of the peer region resumes from the lease's cursor):
            // it counts for GLOBAL only from its first report.
            applied: Mutex::new(if replication {
                vec![0; acked.len()]
            } else {
                acked.clone()
            }),
            acked: Mutex::new(acked),
            in_flight: AtomicU32::new(0),
            max_in_flight,
            parked: AtomicBool::new(false),
            unpolled_since_us: AtomicU64::new(0),
            resetting: AtomicBool::new(false),
            state: AtomicU8::new(NodeState::Live as u8),
            state_since_us: AtomicU64::new(self.clock.now_us()),
            acked_watermark_us: AtomicU64::new(self.clock.now_us()),
            cancel: self.shutdown.child_token(),
            end_reason: Mutex::new(None),
        });
        let mut nodes = self.nodes.write();
        if !nodes.contains_key(&node_id) && nodes.len() >= self.config.max_nodes {
            return Err(Exhausted::Streams(self.config.max_nodes).into());
        }
        let replaced = nodes.insert(node_id, shared.clone());
        crate::metrics::set_nodes(nodes.len());
        if let Some(old) = replaced {
            *old.end_reason.lock() = Some(EndReason::Replaced);
            old.cancel.cancel();
            tracing::info!(node_id = %old.node_id, "stream replaced by a newer one");
        }
        Ok(shared)
    }

    /// Removes a stream, unless a newer one already took its place.
    pub fn unregister(&self, shared: &SessionShared) {
        let mut nodes = self.nodes.write();
        if nodes
            .get(&shared.node_id)
            .is_some_and(|n| n.session_id == shared.session_id)
        {
            nodes.remove(&shared.node_id);
        }
        crate::metrics::set_nodes(nodes.len());
        if nodes.is_empty() {
            self.nodes_gone.notify_waiters();
        }
    }

    /// Returns once no stream is connected.
    pub async fn sessions_ended(&self) {
        loop {
            let gone = self.nodes_gone.notified();
            let mut gone = std::pin::pin!(gone);
            gone.as_mut().enable();
            if self.nodes.read().is_empty() {
                return;
            }
            gone.await;
        }
    }

    /// Wakes REGION waiters after a node acked.
    pub fn acks_changed(&self) {
        // Nobody waits most of the time (ACCEPTED publishes): skip the wake.
        if self.acks_changed.receiver_count() > 0 {
            self.acks_changed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Commands waiting in each shard actor's queue.
    pub fn queue_depths(&self) -> Vec<usize> {
        self.actors.queue_depths()
    }

    /// Connected streams.
    pub fn node_count(&self) -> usize {
        self.nodes.read().len()
    }

    /// The status snapshot (`grpc.rs` makes the wire answer of it).
    pub fn status(&self) -> HubStatus {
        let now = self.clock.now_us();
        let mut retained_events = 0;
        let mut retained_bytes = 0;
        let mut heads = Vec::with_capacity(self.config.shards as usize);
        let shards = self
            .logs
            .all_memory()
            .enumerate()
            .map(|(i, l)| {
                let log = l.read();
                retained_events += log.len() as u64;
                retained_bytes += log.bytes() as u64;
                heads.push(log.head());
                ShardStatus {
                    shard: i as u32,
                    head_seq: log.head(),
                    first_seq: self.logs.retained_first(i).min(log.first_seq()),
                }
            })
            .collect();
        let mut nodes: Vec<NodeStatus> = self
            .nodes
            .read()
            .values()
            .map(|n| {
                let acked = n.acked.lock().clone();
                let lag_events = heads
                    .iter()
                    .zip(&acked)
                    .map(|(h, a)| h.saturating_sub(*a))
                    .sum();
                let (state, since) = n.state_since(now);
                NodeStatus {
                    node_id: n.node_id.clone(),
                    namespaces: n.filter.clone(),
                    acked: Some(Cursor {
                        epoch: self.epoch,
                        seqs: acked,
                    }),
                    lag_events,
                    staleness_ms: now.saturating_sub(n.acked_watermark_us.load(Ordering::Relaxed))
                        / 1000,
                    in_flight: n.in_flight.load(Ordering::Relaxed),
                    max_in_flight: n.max_in_flight,
                    parked: n.parked.load(Ordering::Relaxed),
                    replication: n.replication,
                    peer: n.peer.clone(),
                    connected_at_us: n.connected_at_us,
                    state: Some(state),
                    state_since_us: since,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        metrics::gauge!(crate::metrics::LOG_EVENTS).set(retained_events as f64);
        HubStatus {
            hub_id: self.config.hub_id.clone(),
            region: self.config.region.clone(),
            epoch: self.epoch,
            shard_count: self.shard_count(),
            shards,
            nodes,
            peers: self
                .peers
                .lock()
                .iter()
                .map(|(region, p)| PeerStatus {
                    region: region.clone(),
                    address: p.address.clone(),
                    connected: p.connected,
                    lag_events: p.lag_events,
                    lag_ms: now.saturating_sub(p.watermark_us) / 1000,
                    last_error: p.last_error.clone(),
                    linked_by: p.linked_by.clone(),
                })
                .collect(),
            retained_events,
            retained_bytes,
            now_us: now,
            durable: self.data_dir.is_some() || self.replica.is_some(),
            log_error: self
                .shard_ctx
                .failing
                .lock()
                .iter()
                .next()
                .map(|(shard, e)| format!("shard {shard}: {e}")),
        }
    }

    /// The newest watermark a session may send now: the hub time, or for a
    /// replica of a JetStream log, the time at which it had provably
    /// applied every event then in the region's stream.
    pub fn watermark_now(&self) -> u64 {
        let now = self.clock.now_us();
        match &self.replica {
            Some(r) => now.min(r.watermark_cap()),
            None => now,
        }
    }

    /// The cursor at the current head of every shard.
    pub fn head_cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            seqs: self.heads(),
        }
    }
}
