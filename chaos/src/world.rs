//! One seed's world on loopback: a hub per region (in-process, with
//! replication links through fault proxies), cache nodes running the real
//! client (a `Subscriber` whose handler is a `VersionedCache`) behind a fault
//! proxy each, writers that commit to the source of truth and then publish,
//! readers that read through the caches, and the fault schedule of the plan.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use freshness::{Entity, Version};
use freshness_client::{
    Backoff, Credentials, Dep, EventBatch, Feed, FreshnessPolicy, Handler, HandlerError, Loaded,
    Publisher, Reset, Subscriber, SubscriberError, VersionedCache,
};
use freshness_tests::proxy::FaultProxy;
use freshness_tests::{TestHub, bind, test_config};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::Rng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::check::{self, Links, MAX_STALENESS, Verdict};
use crate::plan::{self, Action, Fault, FaultKind, Plan, SHARDS, SMALL_LOG_PER_SHARD};
use crate::report::{SeedReport, Violation, new_histogram};
use crate::truth::{Trace, Truth};

/// A node's cache: entity name → the version the fill read.
type Cache = VersionedCache<String, u64>;

/// Progress interval of every hub: a healthy feed's staleness stays below it.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Writer tasks per region.
const WRITERS_PER_REGION: usize = 2;
/// Reader tasks per node.
const READERS_PER_NODE: usize = 4;
/// Ids of each namespace that get most of the traffic, so that hits happen.
const HOT_IDS: usize = 8;
/// Reset and lifecycle lines kept per node for reports.
const NODE_RING: usize = 64;
/// Violations reported in full per seed, one per node and entity (all are
/// counted).
const REPORTED_VIOLATIONS: usize = 5;
/// How long quiescence may take to converge before stale entries count as
/// violations.
const CONVERGE_WITHIN: Duration = Duration::from_secs(5);

/// Counters of one seed's run.
#[derive(Debug, Default)]
struct Stats {
    commits: AtomicU64,
    events: AtomicU64,
    events_applied: AtomicU64,
    publish_errors: AtomicU64,
    reads: AtomicU64,
    hits: AtomicU64,
    fail_closed_reads: AtomicU64,
    fail_closed_hits: AtomicU64,
    violations: AtomicU64,
    stale_served_by_policy: AtomicU64,
    stale_excused: AtomicU64,
    resets: Mutex<BTreeMap<String, u64>>,
    faults: Mutex<BTreeMap<FaultKind, u64>>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One region: its hub (restartable on the same address) and the writers'
/// publisher.
struct Region {
    addr: SocketAddr,
    config: freshness_hub::Config,
    hub: tokio::sync::Mutex<Option<TestHub>>,
    publisher: Publisher,
}

/// What readers use of a node: its current cache and feed, and whether it
/// is up.
struct NodeState {
    cache: Cache,
    feed: Option<Feed>,
    up: bool,
}

struct Running {
    token: CancellationToken,
    task: JoinHandle<Result<(), SubscriberError>>,
}

/// One cache node.
struct Node {
    plan: plan::NodePlan,
    /// Between the node and its hub.
    proxy: FaultProxy,
    cursor_path: PathBuf,
    /// Open (`true`) unless the node is stalled.
    gate: watch::Sender<bool>,
    state: Mutex<NodeState>,
    running: tokio::sync::Mutex<Option<Running>>,
    /// Resets applied and lifecycle changes, newest last.
    ring: Mutex<VecDeque<(Instant, NodeEvent)>>,
}

#[derive(Debug, Clone)]
enum NodeEvent {
    Reset(Reset),
    Life(String),
}

/// The whole world of one seed.
pub(crate) struct World {
    plan: Plan,
    truth: Truth,
    links: Links,
    stats: Stats,
    regions: Vec<Region>,
    nodes: Vec<Node>,
    /// `(to, from)`: the proxy region `to` pulls from region `from` through.
    region_links: HashMap<(usize, usize), FaultProxy>,
    faults_log: Mutex<Vec<(Instant, String)>>,
    violations: Mutex<Vec<Violation>>,
    /// Handlers skip one in this many invalidations (a broken node, for the
    /// checker's own test).
    drop_one_in: Option<u64>,
    dropped: AtomicU64,
    /// Every link over TLS, with authentication ([`Pki`]).
    secure: bool,
    /// What nodes and writers connect with.
    credentials: Credentials,
    /// Data directories of the hubs, one per region, removed with the world.
    _data: tempfile::TempDir,
    /// `hub_data_lost` faults injected (each allows `EPOCH_CHANGED` resets).
    epochs_lost: AtomicU64,
}

fn new_cache(name: &str) -> Cache {
    VersionedCache::builder()
        .name(name)
        .max_capacity(10_000)
        .policy(
            "price",
            FreshnessPolicy::FailClosed {
                max_staleness: MAX_STALENESS,
            },
        )
        .policy("user", FreshnessPolicy::ServeStale)
        .build()
}

/// The node's handler: the cache, behind a gate that a stall closes, with
/// what it applies recorded for reports.
#[derive(Clone)]
struct NodeHandler {
    cache: Cache,
    gate: watch::Receiver<bool>,
    world: Arc<World>,
    node: usize,
}

impl NodeHandler {
    async fn pass_gate(&self) {
        let mut gate = self.gate.clone();
        // A dropped gate (the world is going away) counts as open.
        let _ = gate.wait_for(|open| *open).await;
    }
}

impl Handler for NodeHandler {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        self.pass_gate().await;
        let w = &self.world;
        let kept;
        let batch = match w.drop_one_in {
            // A broken node: it loses some invalidations.
            Some(n) => {
                let mut b = batch.clone();
                b.events
                    .retain(|_| !w.dropped.fetch_add(1, Ordering::Relaxed).is_multiple_of(n));
                kept = b;
                &kept
            }
            None => batch,
        };
        self.cache.on_events(batch).await?;
        for inv in &batch.events {
            if let Some(e) = w.truth.index_of(&inv.entity) {
                w.truth.invalidated(e, self.node, inv.version.get());
            }
        }
        add(&w.stats.events_applied, batch.events.len() as u64);
        Ok(())
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.pass_gate().await;
        self.cache.on_reset(reset).await?;
        let w = &self.world;
        *w.stats
            .resets
            .lock()
            .entry(reset.reason.as_str().to_owned())
            .or_default() += 1;
        w.node_event(self.node, NodeEvent::Reset(reset.clone()));
        Ok(())
    }

    async fn on_start_at_head(&self) -> Result<(), HandlerError> {
        self.cache.on_start_at_head().await?;
        self.world.node_event(
            self.node,
            NodeEvent::Life("starts at the head: cache flushed".into()),
        );
        Ok(())
    }
}

impl World {
    /// Builds and starts the world of `plan`: hubs up and linked, nodes live.
    pub(crate) async fn start(
        plan: Plan,
        drop_one_in: Option<u64>,
        secure: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let regions = plan.regions.len();
        let mut listeners = Vec::new();
        for _ in 0..regions {
            listeners.push(bind().await);
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr().context("listener address"))
            .collect::<Result<_, _>>()?;
        let mut region_links = HashMap::new();
        for to in 0..regions {
            for from in (0..regions).filter(|f| *f != to) {
                region_links.insert((to, from), FaultProxy::start(addrs[from]).await);
            }
        }
        let data = tempfile::Builder::new()
            .prefix("freshness-chaos-")
            .tempdir()
            .context("a data directory for the hubs")?;
        let pki = if secure {
            Some(Pki::new(data.path(), &plan.regions)?)
        } else {
            None
        };
        let credentials = match &pki {
            Some(p) => p.client.clone(),
            None => Credentials::new(),
        };
        let scheme = |url: String| match &pki {
            Some(_) => url.replacen("http://", "https://", 1),
            None => url,
        };
        let mut region_list = Vec::new();
        for (r, listener) in listeners.into_iter().enumerate() {
            let mut config = test_config();
            config.region = plan.regions[r].clone();
            config.hub_id = format!("hub-{}", plan.regions[r]);
            config.shards = SHARDS;
            config.progress_interval = PROGRESS_INTERVAL;
            config.shutdown_grace = Duration::from_secs(2);
            // Durable, so that a hub restart keeps the epoch.
            config.ephemeral = false;
            config.data_dir = data.path().join(&plan.regions[r]);
            if plan.small_log {
                config.log_max_events = u64::from(SHARDS) * SMALL_LOG_PER_SHARD;
            }
            config.peers = (0..regions)
                .filter(|p| *p != r)
                .map(|p| (plan.regions[p].clone(), scheme(region_links[&(r, p)].url())))
                .collect();
            if let Some(pki) = &pki {
                pki.secure(&mut config);
            }
            let hub = TestHub::start_with_listener(listener, config.clone());
            let publisher = Publisher::builder(scheme(hub.url()))
                .credentials(credentials.clone())
                .build()
                .context("writer publisher")?;
            region_list.push(Region {
                addr: addrs[r],
                config,
                hub: tokio::sync::Mutex::new(Some(hub)),
                publisher,
            });
        }
        let mut nodes = Vec::new();
        for (i, np) in plan.nodes.iter().enumerate() {
            // In the seed's own directory: two runs of one seed at once (the
            // suite runs seeds plain and over TLS in parallel) never share
            // a cursor file.
            let cursor_path = data.path().join(format!("node-{i}.cursor"));
            nodes.push(Node {
                plan: np.clone(),
                proxy: FaultProxy::start(addrs[np.region]).await,
                cursor_path,
                gate: watch::Sender::new(true),
                state: Mutex::new(NodeState {
                    cache: new_cache(&np.id),
                    feed: None,
                    up: false,
                }),
                running: tokio::sync::Mutex::new(None),
                ring: Mutex::new(VecDeque::new()),
            });
        }
        let world = Arc::new(Self {
            truth: Truth::new(&plan.entity_names()),
            plan,
            links: Links::default(),
            stats: Stats::default(),
            regions: region_list,
            nodes,
            region_links,
            faults_log: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            drop_one_in,
            dropped: AtomicU64::new(0),
            secure,
            credentials,
            _data: data,
            epochs_lost: AtomicU64::new(0),
        });
        let up = async {
            world.wait_links_up().await?;
            for n in 0..world.nodes.len() {
                world.start_node(n, false).await?;
            }
            world.wait_nodes_live().await
        };
        if let Err(e) = up.await {
            // Leave nothing running behind a failed start.
            world.stop().await;
            return Err(e);
        }
        Ok(world)
    }

    fn node_event(&self, node: usize, event: NodeEvent) {
        let mut ring = self.nodes[node].ring.lock();
        if ring.len() == NODE_RING {
            ring.pop_front();
        }
        ring.push_back((Instant::now(), event));
    }

    async fn start_node(self: &Arc<Self>, n: usize, fresh_cache: bool) -> anyhow::Result<()> {
        let node = &self.nodes[n];
        let cache = if fresh_cache {
            new_cache(&node.plan.id)
        } else {
            node.state.lock().cache.clone()
        };
        let handler = NodeHandler {
            cache: cache.clone(),
            gate: node.gate.subscribe(),
            world: self.clone(),
            node: n,
        };
        let url = if self.secure {
            node.proxy.url().replacen("http://", "https://", 1)
        } else {
            node.proxy.url()
        };
        let mut builder = Subscriber::builder(url, node.plan.id.clone())
            .credentials(self.credentials.clone())
            .reconnect_backoff(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(500),
            ))
            .connect_timeout(Duration::from_secs(2))
            .max_in_flight(node.plan.max_in_flight);
        if node.plan.persisted {
            builder = builder
                .cursor_file(&node.cursor_path)
                .persist_interval(Duration::from_millis(100));
        }
        let subscriber = builder.build(handler).context("build the subscriber")?;
        let feed = subscriber.feed();
        cache.bind_feed(feed.clone());
        let token = CancellationToken::new();
        let task = tokio::spawn(subscriber.run(token.clone()));
        *node.running.lock().await = Some(Running { token, task });
        *node.state.lock() = NodeState {
            cache,
            feed: Some(feed),
            up: true,
        };
        self.node_event(n, NodeEvent::Life("started".into()));
        Ok(())
    }

    async fn stop_node(&self, n: usize, crash: bool) {
        let node = &self.nodes[n];
        node.state.lock().up = false;
        if let Some(r) = node.running.lock().await.take() {
            if crash {
                r.task.abort();
            } else {
                r.token.cancel();
            }
            let _ = r.task.await;
        }
        let what = if crash { "killed" } else { "stopped" };
        self.node_event(n, NodeEvent::Life(what.into()));
    }

    /// Every replication link of every hub is connected.
    async fn wait_links_up(&self) -> anyhow::Result<()> {
        if self.regions.len() < 2 {
            return Ok(());
        }
        for region in &self.regions {
            poll_until(Duration::from_secs(30), "replication links up", || async {
                region
                    .publisher
                    .status()
                    .await
                    .is_ok_and(|s| s.peers.iter().all(|p| p.connected))
            })
            .await?;
        }
        Ok(())
    }

    /// Every node's feed is live.
    async fn wait_nodes_live(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            let feed = node.state.lock().feed.clone();
            let Some(mut feed) = feed else { continue };
            tokio::time::timeout(Duration::from_secs(30), feed.wait_for(|s| s.is_live()))
                .await
                .with_context(|| format!("{} live in time", node.plan.id))?
                .with_context(|| format!("{} subscriber running", node.plan.id))?;
        }
        Ok(())
    }

    fn entity_pick(&self, rng: &mut StdRng) -> usize {
        let ids = self.plan.ids;
        let ns = rng.random_range(0..2usize);
        let id = if rng.random_bool(0.6) {
            rng.random_range(0..HOT_IDS.min(ids))
        } else {
            rng.random_range(0..ids)
        };
        ns * ids + id
    }

    /// Commits, then publishes, until `stop`.
    async fn writer(self: Arc<Self>, region: usize, mut rng: StdRng, stop: CancellationToken) {
        let publisher = &self.regions[region].publisher;
        while !stop.is_cancelled() {
            let e = self.entity_pick(&mut rng);
            let v = self.truth.commit(e, region);
            add(&self.stats.commits, 1);
            let version = Version::new(v).expect("commits start at version 1");
            // An invalidation must not be lost: a writer keeps publishing a
            // committed version until its hub takes it.
            loop {
                match publisher
                    .publish(self.truth.entity(e).clone(), version)
                    .await
                {
                    Ok(r) => {
                        self.truth.accepted(e, v, region, r.outcome.as_str());
                        add(&self.stats.events, 1);
                        break;
                    }
                    Err(_) => {
                        add(&self.stats.publish_errors, 1);
                        sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            sleep(Duration::from_micros(rng.random_range(5_000..20_000))).await;
        }
    }

    /// Reads through node `n`'s cache until `stop`; returns the staleness
    /// histogram of its reads (µs).
    async fn reader(
        self: Arc<Self>,
        n: usize,
        mut rng: StdRng,
        stop: CancellationToken,
    ) -> Histogram<u64> {
        let mut staleness = new_histogram();
        let region = self.nodes[n].plan.region;
        while !stop.is_cancelled() {
            let pause = Duration::from_micros(rng.random_range(500..3_000));
            let e = self.entity_pick(&mut rng);
            let versioned = rng.random_bool(0.7);
            let (before, after) = (
                Duration::from_micros(rng.random_range(0..2_000)),
                Duration::from_micros(rng.random_range(0..3_000)),
            );
            let current = {
                let s = self.nodes[n].state.lock();
                s.up.then(|| (s.cache.clone(), s.feed.clone()))
            };
            let Some((cache, feed)) = current else {
                // A node that is down serves nothing.
                sleep(pause).await;
                continue;
            };
            let entity = self.truth.entity(e);
            let key = entity.as_str().to_owned();
            let began = Instant::now();
            let fresh = feed.is_some_and(|f| f.is_fresh_within(MAX_STALENESS));
            let (value, hit) = match cache.get(&key).await {
                Some(v) => (v, true),
                None => {
                    let truth = &self.truth;
                    let v = cache
                        .get_or_load(key, || async move {
                            sleep(before).await;
                            let v = truth.read(e);
                            sleep(after).await;
                            let dep = match Version::new(v) {
                                Some(version) if versioned => Dep::at(entity.clone(), version),
                                _ => Dep::unversioned(entity.clone()),
                            };
                            Ok::<_, Infallible>(Loaded::new(v, [dep]))
                        })
                        .await
                        .unwrap_or_else(|never| match never {});
                    (v, false)
                }
            };
            let fail_closed = entity.namespace() == "price";
            let s = &self.stats;
            add(&s.reads, 1);
            add(&s.hits, u64::from(hit));
            if fail_closed {
                add(&s.fail_closed_reads, 1);
                add(&s.fail_closed_hits, u64::from(hit));
            }
            let (verdict, stale) = check::judge(&self.truth, &self.links, e, value, region, began);
            staleness.saturating_record(u64::try_from(stale.as_micros()).unwrap_or(u64::MAX));
            match verdict {
                Verdict::Fresh => {}
                Verdict::Excused => add(&s.stale_excused, 1),
                Verdict::Late { .. } if !fail_closed && !fresh => {
                    add(&s.stale_served_by_policy, 1);
                }
                Verdict::Late { commit, due } => {
                    add(&s.violations, 1);
                    let read = format!(
                        "READ at {} of {} served v{value} ({}, feed {}); v{} committed in {} at +{}ms was due at +{}ms; bound {}ms",
                        self.nodes[n].plan.id,
                        entity,
                        if hit { "cache hit" } else { "load" },
                        if fresh { "fresh" } else { "not fresh" },
                        commit.version,
                        self.plan.regions[commit.region],
                        self.ms(commit.committed_at),
                        self.ms(due),
                        check::BOUND.as_millis(),
                    );
                    self.violation("read", n, e, began, read);
                }
            }
            sleep(pause).await;
        }
        staleness
    }

    fn ms(&self, at: Instant) -> u128 {
        at.saturating_duration_since(self.truth.start).as_millis()
    }

    /// Records a violation with the trace of what led to it.
    fn violation(&self, kind: &'static str, n: usize, e: usize, at: Instant, what: String) {
        let mut v = self.violations.lock();
        let entity = self.truth.entity(e);
        let node_id = &self.plan.nodes[n].id;
        // One report per node and entity: the same stale entry read again
        // says nothing new.
        if v.len() >= REPORTED_VIOLATIONS
            || v.iter()
                .any(|r| r.node == *node_id && r.entity == entity.as_str())
        {
            return;
        }
        let id = |node: usize| self.plan.nodes[node].id.as_str();
        let mut lines: Vec<(Instant, String)> = Vec::new();
        for item in self.truth.trace(e) {
            let text = match item.what {
                Trace::Commit { version, region } => {
                    format!("commit v{version} in {}", self.plan.regions[region])
                }
                Trace::Accepted {
                    version,
                    region,
                    outcome,
                } => format!(
                    "publish v{version} to {} hub: {outcome}",
                    self.plan.regions[region]
                ),
                Trace::Republished {
                    version,
                    region,
                    outcome,
                    why,
                } => format!(
                    "fault: {why} publish v{version} to {} hub: {outcome}",
                    self.plan.regions[region]
                ),
                Trace::Invalidated { node, version } if node == n => {
                    format!("{} applied invalidation v{version}", id(node))
                }
                Trace::Invalidated { .. } => continue,
            };
            lines.push((item.at, text));
        }
        for (t, ev) in self.nodes[n].ring.lock().iter() {
            let text = match ev {
                NodeEvent::Reset(r) if r.covers(entity) => format!(
                    "{} reset ({}, {})",
                    id(n),
                    r.reason,
                    if r.is_all() {
                        "all shards".to_owned()
                    } else {
                        format!("{} shards incl. {}'s", r.shard_list().len(), entity)
                    }
                ),
                NodeEvent::Reset(_) => continue,
                NodeEvent::Life(what) => format!("{} {what}", id(n)),
            };
            lines.push((*t, text));
        }
        for (t, f) in self.faults_log.lock().iter() {
            lines.push((*t, format!("fault: {f}")));
        }
        lines.push((at, what));
        lines.sort_by_key(|(t, _)| *t);
        v.push(Violation {
            seed: self.plan.seed,
            kind,
            node: self.plan.nodes[n].id.clone(),
            entity: entity.to_string(),
            trace: lines
                .into_iter()
                .map(|(t, s)| format!("+{:>6}ms {s}", self.ms(t)))
                .collect(),
        });
    }

    /// Injects one fault at its time and heals it after its hold.
    async fn fault(self: Arc<Self>, f: Fault, t0: Instant) -> anyhow::Result<()> {
        sleep_until(t0 + f.at).await;
        *self.stats.faults.lock().entry(f.kind).or_default() += 1;
        self.faults_log
            .lock()
            .push((Instant::now(), self.plan.fault_text(&f)));
        match f.action {
            Action::RestartNode { node, crash } => {
                self.stop_node(node, crash).await;
                sleep(f.hold).await;
                self.start_node(node, !self.nodes[node].plan.persisted)
                    .await?;
            }
            Action::RestartHub { region, lose_data } => {
                let others: Vec<(usize, Instant)> = (0..self.regions.len())
                    .filter(|r| *r != region)
                    .map(|r| (r, self.links.down(region, r)))
                    .collect();
                let r = &self.regions[region];
                let hub = r.hub.lock().await.take();
                if let Some(hub) = hub {
                    hub.stop().await;
                }
                if lose_data {
                    self.epochs_lost.fetch_add(1, Ordering::Relaxed);
                    std::fs::remove_dir_all(&r.config.data_dir)
                        .context("delete the hub's data directory")?;
                }
                sleep(f.hold).await;
                let hub = TestHub::start_on(r.addr, r.config.clone()).await;
                *r.hub.lock().await = Some(hub);
                for (other, since) in others {
                    self.links.up(region, other, since);
                }
            }
            Action::PartitionRegions { a, b } => {
                let since = self.links.down(a, b);
                self.region_links[&(a, b)].partition();
                self.region_links[&(b, a)].partition();
                sleep(f.hold).await;
                self.region_links[&(a, b)].heal();
                self.region_links[&(b, a)].heal();
                self.links.up(a, b, since);
            }
            Action::DelayRegions { a, b, delay } => {
                self.region_links[&(a, b)].set_delay(delay);
                self.region_links[&(b, a)].set_delay(delay);
                sleep(f.hold).await;
                self.region_links[&(a, b)].set_delay(Duration::ZERO);
                self.region_links[&(b, a)].set_delay(Duration::ZERO);
            }
            Action::PartitionNode { node } => {
                self.nodes[node].proxy.partition();
                sleep(f.hold).await;
                self.nodes[node].proxy.heal();
            }
            Action::DelayNode { node, delay } => {
                self.nodes[node].proxy.set_delay(delay);
                sleep(f.hold).await;
                self.nodes[node].proxy.set_delay(Duration::ZERO);
            }
            Action::Duplicate { region, entities } => {
                for e in entities {
                    if let Some(v) = self.truth.newest_accepted(e) {
                        self.republish(region, e, v, "duplicate").await;
                    }
                }
            }
            Action::Reorder {
                region,
                entities,
                back,
            } => {
                for e in entities {
                    if let Some(v) = self.truth.newest_accepted(e).filter(|v| *v > back) {
                        self.republish(region, e, v - back, "reordered").await;
                    }
                }
            }
            Action::StallNode { node } => {
                self.nodes[node].gate.send_replace(false);
                self.node_event(node, NodeEvent::Life("stalled".into()));
                sleep(f.hold).await;
                self.nodes[node].gate.send_replace(true);
                self.node_event(node, NodeEvent::Life("unstalled".into()));
            }
        }
        Ok(())
    }

    async fn republish(&self, region: usize, e: usize, v: u64, why: &'static str) {
        let entity: Entity = self.truth.entity(e).clone();
        let version = Version::new(v).expect("published versions are at least 1");
        let outcome = match self.regions[region]
            .publisher
            .publish(entity, version)
            .await
        {
            Ok(r) => {
                add(&self.stats.events, 1);
                r.outcome.as_str()
            }
            Err(_) => "failed",
        };
        self.truth.republished(e, v, region, outcome, why);
    }

    /// Heals every fault, waits for links and feeds, then checks that every
    /// node's cache converges on the source of truth.
    async fn quiesce(&self) -> anyhow::Result<u64> {
        for p in self.region_links.values() {
            p.heal();
            p.set_delay(Duration::ZERO);
        }
        for n in &self.nodes {
            n.proxy.heal();
            n.proxy.set_delay(Duration::ZERO);
            n.gate.send_replace(true);
        }
        self.wait_links_up().await?;
        self.wait_nodes_live().await?;
        let deadline = Instant::now() + CONVERGE_WITHIN;
        let mut pause = Duration::from_millis(5);
        loop {
            let (checked, stale) = self.stale_entries().await;
            if stale.is_empty() {
                return Ok(checked);
            }
            if Instant::now() >= deadline {
                for (n, e, cached) in &stale {
                    add(&self.stats.violations, 1);
                    let what = format!(
                        "QUIESCENCE: {} still caches {} at v{cached}; the source has v{}",
                        self.plan.nodes[*n].id,
                        self.truth.entity(*e),
                        self.truth.read(*e)
                    );
                    self.violation("quiescence", *n, *e, Instant::now(), what);
                }
                return Ok(checked);
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Entries checked, and every `(node, entity, cached version)` behind
    /// the source of truth.
    async fn stale_entries(&self) -> (u64, Vec<(usize, usize, u64)>) {
        let mut stale = Vec::new();
        let mut checked = 0;
        for (n, node) in self.nodes.iter().enumerate() {
            let cache = node.state.lock().cache.clone();
            for e in 0..self.truth.len() {
                if let Some(v) = cache.get(&self.truth.entity(e).as_str().to_owned()).await {
                    checked += 1;
                    if v != self.truth.read(e) {
                        stale.push((n, e, v));
                    }
                }
            }
        }
        (checked, stale)
    }

    /// Stops nodes and hubs and removes cursor files.
    async fn stop(&self) {
        for n in 0..self.nodes.len() {
            self.stop_node(n, false).await;
            let _ = std::fs::remove_file(&self.nodes[n].cursor_path);
        }
        for r in &self.regions {
            if let Some(hub) = r.hub.lock().await.take() {
                hub.stop().await;
            }
        }
    }
}

/// Polls `f` with a backoff from 5 ms to 100 ms until it is true.
async fn poll_until<F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    while !f().await {
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs the plan: start the world, traffic and faults for the plan's
/// duration, quiescence, the final check; then stops everything.
pub(crate) async fn run(
    plan: Plan,
    drop_one_in: Option<u64>,
    secure: bool,
) -> anyhow::Result<SeedReport> {
    let started = Instant::now();
    let seed = plan.seed;
    let world = World::start(plan, drop_one_in, secure).await?;
    let t0 = Instant::now();
    let stop = CancellationToken::new();
    let mut task = 0u64;
    let mut next_rng = || {
        task += 1;
        plan::task_rng(seed, task)
    };
    let mut writers = Vec::new();
    for r in 0..world.regions.len() {
        for _ in 0..WRITERS_PER_REGION {
            writers.push(tokio::spawn(world.clone().writer(
                r,
                next_rng(),
                stop.clone(),
            )));
        }
    }
    let mut readers = Vec::new();
    for n in 0..world.nodes.len() {
        for _ in 0..READERS_PER_NODE {
            readers.push(tokio::spawn(world.clone().reader(
                n,
                next_rng(),
                stop.clone(),
            )));
        }
    }
    let faults: Vec<_> = world
        .plan
        .faults
        .iter()
        .map(|f| tokio::spawn(world.clone().fault(f.clone(), t0)))
        .collect();
    let finished =
        crate::traffic::finish(t0 + world.plan.duration, faults, &stop, writers, readers).await;
    let (checked, staleness) = match finished {
        Ok(staleness) => (world.quiesce().await, staleness),
        Err(e) => (Err(e), new_histogram()),
    };
    // Stopped whatever happened, so that a failed seed leaves nothing
    // running in a soak.
    world.stop().await;
    let checked = checked?;
    let s = &world.stats;
    let report = SeedReport {
        seed,
        regions: world.plan.regions.len(),
        nodes: world.plan.nodes.len(),
        wall_ms: started.elapsed().as_millis() as u64,
        commits: get(&s.commits),
        events: get(&s.events),
        events_applied: get(&s.events_applied),
        publish_errors: get(&s.publish_errors),
        reads: get(&s.reads),
        hits: get(&s.hits),
        fail_closed_reads: get(&s.fail_closed_reads),
        fail_closed_hits: get(&s.fail_closed_hits),
        violations: get(&s.violations),
        stale_served_by_policy: get(&s.stale_served_by_policy),
        stale_excused: get(&s.stale_excused),
        entries_checked: checked,
        resets: s.resets.lock().clone(),
        faults: s.faults.lock().clone(),
        counters: BTreeMap::new(),
        staleness,
        violation_reports: std::mem::take(&mut *world.violations.lock()),
        schedule: world
            .plan
            .faults
            .iter()
            .map(|f| world.plan.describe_fault(f))
            .collect(),
    };
    let mut report = report;
    // The hubs keep their log on disk: only a hub whose data was lost may
    // start a new epoch, so any other EPOCH_CHANGED reset is a failure.
    let epoch_resets = report.resets.get("epoch_changed").copied().unwrap_or(0);
    if epoch_resets > 0 && world.epochs_lost.load(Ordering::Relaxed) == 0 {
        report.violations += epoch_resets;
        let mut trace = report.schedule.clone();
        trace.push(format!(
            "{epoch_resets} EPOCH_CHANGED resets, and no hub lost its data"
        ));
        report.violation_reports.push(Violation {
            seed,
            kind: "epoch",
            node: "*".into(),
            entity: "*".into(),
            trace,
        });
    }
    Ok(report)
}

/// The certificates, policy and client credentials of a run over TLS: one
/// CA; each hub's certificate names 127.0.0.1 (every link goes through a
/// loopback proxy) and its region (`spiffe://chaos/hub/<region>`, granted
/// `replicate`); nodes and writers share a client certificate granted
/// publish, subscribe and status.
struct Pki {
    dir: PathBuf,
    client: Credentials,
}

impl Pki {
    fn new(dir: &std::path::Path, regions: &[String]) -> anyhow::Result<Self> {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).context("the certificates' directory")?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = |uri: &str| -> anyhow::Result<(String, String)> {
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into()?));
            Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        std::fs::write(dir.join("ca.pem"), &ca_pem)?;
        let mut policy = String::from("[principals]\n");
        for region in regions {
            let (cert, key) = leaf(&format!("spiffe://chaos/hub/{region}"))?;
            std::fs::write(dir.join(format!("{region}.pem")), cert)?;
            std::fs::write(dir.join(format!("{region}.key")), key)?;
            policy.push_str(&format!(
                "\"spiffe://chaos/hub/{region}\" = [\"replicate\"]\n"
            ));
        }
        policy
            .push_str("\"spiffe://chaos/client\" = [\"publish:*\", \"subscribe:*\", \"status\"]\n");
        std::fs::write(dir.join("policy.toml"), policy)?;
        let (cert, key) = leaf("spiffe://chaos/client")?;
        let client = Credentials::new()
            .ca_pem(ca_pem)
            .client_identity_pem(cert, key);
        Ok(Self { dir, client })
    }

    /// Region `r`'s hub serves TLS, requires client certificates and checks
    /// the policy.
    fn secure(&self, config: &mut freshness_hub::Config) {
        let region = config.region.clone();
        config.tls_cert = Some(self.dir.join(format!("{region}.pem")));
        config.tls_key = Some(self.dir.join(format!("{region}.key")));
        config.tls_client_ca = Some(self.dir.join("ca.pem"));
        config.peer_ca = Some(self.dir.join("ca.pem"));
        config.auth_policy = Some(self.dir.join("policy.toml"));
    }
}
