//! The relay world: the source of truth is a PostgreSQL cluster of the
//! world's own, and invalidations flow only through the outbox.
//!
//! Writers bump an entity's version in a table `chaos_truth` and, in the
//! same transaction, log `(tx, entity, version)` in `chaos_log` and enqueue
//! the invalidation with the client crate's `outbox::enqueue_with_payload`
//! (the payload is the transaction's id). Some transactions roll back, some
//! are abandoned (the writer's connection dies mid-transaction), and some
//! writers crash right after their commit: a writer never publishes, so a
//! crash between commit and publish is nothing the outbox notices. One or
//! two `freshness-relay run` processes publish the rows to a durable hub
//! through a proxy that can pause it; cache nodes (the real `Subscriber`)
//! record every event they apply.
//!
//! Faults: a relay killed with SIGKILL (restarted after the hold), the hub
//! restarted on its data directory, PostgreSQL restarted (fast shutdown),
//! the hub paused (connections open, nothing answered).
//!
//! Checks: every event a node applied is a committed row (`chaos_log`, the
//! same transaction: no rolled-back or abandoned version is ever seen); per
//! entity a node never applies a version below one it applied before (G2);
//! after the faults heal and writers stop, every node holds the newest
//! committed version of every entity, the outbox is empty and the
//! dead-letter table too; no `EPOCH_CHANGED` reset (the hub is durable).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use freshness::{Entity, Version};
use freshness_client::{
    Backoff, EventBatch, Handler, HandlerError, Publisher, Reset, Subscriber, SubscriberHandle,
    outbox,
};
use freshness_tests::{TestHub, test_config};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::Flaw;
use crate::plan::{self, FaultKind, ProcFault, SHARDS, schedule_procs};
use crate::procs::{self, OwnPostgres, PauseProxy, child_log, poll_until};
use crate::report::{SeedReport, Violation, new_histogram};

/// Writer tasks.
const WRITERS: usize = 3;
/// How long quiescence may take before what is missing counts as lost: the
/// relays' backoff is capped at 200 ms, their poll at 200 ms.
const CONVERGE_WITHIN: Duration = Duration::from_secs(20);
/// Violations reported in full per seed (all are counted).
const REPORTED: usize = 8;
/// Keeps the relay world's plans apart from the hub world's for one seed.
const SALT: u64 = 0x0018_5e1a_0018_5e1a;

const SCHEMA: &str = "CREATE TABLE chaos_truth (entity TEXT PRIMARY KEY, version BIGINT NOT NULL);
     CREATE TABLE chaos_log (tx BIGINT NOT NULL, entity TEXT NOT NULL, version BIGINT NOT NULL,
         PRIMARY KEY (entity, version));";
const BUMP: &str = "INSERT INTO chaos_truth (entity, version) VALUES ($1, 1) \
     ON CONFLICT (entity) DO UPDATE SET version = chaos_truth.version + 1 RETURNING version";
const LOG: &str = "INSERT INTO chaos_log (tx, entity, version) VALUES ($1, $2, $3)";

/// What a fault of the relay world acts on.
fn busy_key(kind: FaultKind, target: usize) -> String {
    match kind {
        FaultKind::RelayKill => format!("relay-{target}"),
        FaultKind::PostgresRestart => "postgres".into(),
        _ => "hub".into(),
    }
}

/// The relay world a seed stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayPlan {
    /// The seed.
    pub seed: u64,
    /// Traffic and faults.
    pub duration: Duration,
    /// `freshness-relay` processes, with the `--batch` of each.
    pub relays: Vec<usize>,
    /// Cache nodes.
    pub nodes: usize,
    /// Ids per namespace (`price:i`, `user:i`).
    pub ids: usize,
    /// The fault schedule.
    pub faults: Vec<ProcFault>,
}

impl RelayPlan {
    /// The plan of `seed` for traffic of `duration`.
    pub fn new(seed: u64, duration: Duration) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ SALT);
        let relays: Vec<usize> = (0..rng.random_range(1..=2usize))
            .map(|_| rng.random_range(1..=500usize))
            .collect();
        let nodes = rng.random_range(1..=2usize);
        let ids = rng.random_range(12..=40usize);
        let n = relays.len();
        let faults = schedule_procs(
            &mut rng,
            duration,
            &[
                // Kills twice as often as the rest: they are what the
                // outbox is for.
                (FaultKind::RelayKill, n, (50, 800)),
                (FaultKind::RelayKill, n, (50, 800)),
                (FaultKind::HubRestart, 1, (200, 1_200)),
                (FaultKind::PostgresRestart, 1, (100, 1_000)),
                (FaultKind::HubPause, 1, (200, 1_500)),
            ],
            busy_key,
        );
        Self {
            seed,
            duration,
            relays,
            nodes,
            ids,
            faults,
        }
    }

    /// The world in one line.
    pub fn describe(&self) -> String {
        format!(
            "relay world: {} relays (batch {:?}), {} nodes, {} entities",
            self.relays.len(),
            self.relays,
            self.nodes,
            self.ids * 2
        )
    }

    /// The fault schedule, one line per fault.
    pub fn schedule(&self) -> Vec<String> {
        self.faults
            .iter()
            .map(|f| {
                let target = match f.kind {
                    FaultKind::RelayKill => format!("kill relay-{}", f.target),
                    FaultKind::HubRestart => "restart the hub".into(),
                    FaultKind::PostgresRestart => "restart PostgreSQL".into(),
                    _ => "pause the hub".into(),
                };
                f.describe(&target)
            })
            .collect()
    }
}

/// What one node applied.
#[derive(Debug, Default)]
struct NodeLog {
    /// Per entity, every `(version, tx)` applied, in order.
    applied: HashMap<String, Vec<(u64, u64)>>,
    /// Events applied (redeliveries counted again).
    events: u64,
    /// Versions applied below one applied before: `(entity, version, after)`.
    out_of_order: Vec<(String, u64, u64)>,
    resets: BTreeMap<String, u64>,
    /// When each `(entity, version)` was first applied.
    applied_at: HashMap<(String, u64), Instant>,
    /// Events received (for a broken node that drops some).
    seen: u64,
}

/// A node's handler: records what it applies; a broken one (for the
/// checker's own test) loses one event in `drop_one_in`.
#[derive(Clone)]
struct Recorder {
    log: Arc<Mutex<NodeLog>>,
    drop_one_in: Option<u64>,
}

impl Handler for Recorder {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        let now = Instant::now();
        let mut log = self.log.lock();
        for e in &batch.events {
            if let Some(n) = self.drop_one_in {
                log.seen += 1;
                if log.seen.is_multiple_of(n) {
                    continue;
                }
            }
            // The payload is the writer's transaction id; no payload (which
            // no writer sends) is an id no transaction has.
            let tx = e
                .payload
                .as_ref()
                .and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())
                .unwrap_or(u64::MAX);
            let entity = e.entity.as_str().to_owned();
            let v = e.version.get();
            let list = log.applied.entry(entity.clone()).or_default();
            let last = list.last().map(|(v, _)| *v);
            list.push((v, tx));
            if let Some(last) = last.filter(|last| v < *last) {
                log.out_of_order.push((entity.clone(), v, last));
            }
            log.applied_at.entry((entity, v)).or_insert(now);
            log.events += 1;
        }
        Ok(())
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        *self
            .log
            .lock()
            .resets
            .entry(reset.reason.as_str().to_owned())
            .or_default() += 1;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counters {
    committed: AtomicU64,
    rolled_back: AtomicU64,
    abandoned: AtomicU64,
    crashed_after_commit: AtomicU64,
    in_doubt: AtomicU64,
    write_errors: AtomicU64,
    relay_starts: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct World {
    plan: RelayPlan,
    pg: OwnPostgres,
    relay_bin: std::path::PathBuf,
    hub_addr: std::net::SocketAddr,
    hub_config: freshness_hub::Config,
    hub: tokio::sync::Mutex<Option<TestHub>>,
    proxy: PauseProxy,
    relays: Vec<tokio::sync::Mutex<Option<Child>>>,
    nodes: Vec<(Arc<Mutex<NodeLog>>, CancellationToken, SubscriberHandle)>,
    entities: Vec<Entity>,
    next_tx: AtomicU64,
    /// When each committed `(entity, version)`'s commit returned.
    committed_at: Mutex<HashMap<(String, u64), Instant>>,
    counters: Counters,
    faults: Mutex<BTreeMap<FaultKind, u64>>,
    start: Instant,
    events_log: Mutex<Vec<(Instant, String)>>,
    /// One lock per fault target: a fault waits until the one before it on
    /// the same target (a restart slower than its slot) has finished.
    fault_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// A broken writer (the checker's own test) publishes one rolled-back
    /// transaction in this many straight to the hub, before its rollback.
    publish_before_rollback: Option<u64>,
    /// Straight to the hub, for that broken writer.
    publisher: Publisher,
    _data: tempfile::TempDir,
}

/// Connects to the world's database, the connection driven by its own task.
async fn connect(url: &str) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, task))
}

impl World {
    async fn start(plan: RelayPlan, flaw: Option<Flaw>) -> anyhow::Result<Arc<Self>> {
        let drop_one_in = match flaw {
            Some(Flaw::NodesDrop(n)) => Some(n),
            Some(f @ (Flaw::AgentsDeafToUser | Flaw::AgentsNeverFailClosed)) => {
                anyhow::bail!("{f:?} is not a flaw of the relay world")
            }
            _ => None,
        };
        let publish_before_rollback = match flaw {
            Some(Flaw::PublishBeforeRollback(n)) => Some(n),
            _ => None,
        };
        let relay_bin = procs::binary("freshness-relay", "freshness-relay")?;
        let pg = OwnPostgres::start().await?;
        let out = Command::new(&relay_bin)
            .args(["migrate", "--database-url", &pg.url()])
            .output()
            .await
            .context("run freshness-relay migrate")?;
        anyhow::ensure!(
            out.status.success(),
            "freshness-relay migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (client, _conn) = connect(&pg.url())
            .await
            .context("connect to the world's PostgreSQL")?;
        client
            .batch_execute(SCHEMA)
            .await
            .context("the truth tables")?;
        drop(client);

        let data = tempfile::Builder::new()
            .prefix("freshness-chaos-relay-")
            .tempdir()
            .context("a data directory for the hub")?;
        let listener = procs::bind_restartable().await?;
        let hub_addr = listener.local_addr().context("hub address")?;
        let mut config = test_config();
        config.hub_id = "hub-relay-world".into();
        config.shards = SHARDS;
        config.progress_interval = Duration::from_millis(100);
        config.shutdown_grace = Duration::from_secs(2);
        config.ephemeral = false;
        config.data_dir = data.path().join("hub");
        let hub = TestHub::start_with_listener(listener, config.clone());
        let proxy = PauseProxy::start(hub_addr).await?;

        let mut nodes = Vec::new();
        for i in 0..plan.nodes {
            let log = Arc::new(Mutex::new(NodeLog::default()));
            let subscriber = Subscriber::builder(proxy.url(), format!("relay-world-node-{i}"))
                .reconnect_backoff(Backoff::new(
                    Duration::from_millis(20),
                    Duration::from_millis(500),
                ))
                .connect_timeout(Duration::from_secs(2))
                .build(Recorder {
                    log: log.clone(),
                    drop_one_in,
                })
                .context("build a subscriber")?;
            let mut feed = subscriber.feed();
            let token = CancellationToken::new();
            let handle = subscriber.spawn_with(token.clone());
            tokio::time::timeout(Duration::from_secs(30), feed.wait_for(|s| s.is_live()))
                .await
                .context("a node live in time")?
                .context("the subscriber runs")?;
            nodes.push((log, token, handle));
        }
        let world = Arc::new(Self {
            entities: plan::entity_names(plan.ids)
                .iter()
                .map(|n| Entity::parse(n).expect("the key space is made of valid entities"))
                .collect(),
            relays: plan
                .relays
                .iter()
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            plan,
            pg,
            relay_bin,
            hub_addr,
            hub_config: config,
            hub: tokio::sync::Mutex::new(Some(hub)),
            proxy,
            nodes,
            next_tx: AtomicU64::new(0),
            committed_at: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            faults: Mutex::new(BTreeMap::new()),
            start: Instant::now(),
            events_log: Mutex::new(Vec::new()),
            fault_locks: Mutex::new(HashMap::new()),
            publish_before_rollback,
            publisher: Publisher::builder(format!("http://{hub_addr}"))
                .build()
                .context("a publisher")?,
            _data: data,
        });
        for r in 0..world.relays.len() {
            world.start_relay(r).await?;
        }
        Ok(world)
    }

    fn note(&self, what: String) {
        self.events_log.lock().push((Instant::now(), what));
    }

    async fn start_relay(&self, r: usize) -> anyhow::Result<()> {
        let (filter, stderr) = child_log();
        let metrics = format!("127.0.0.1:{}", procs::free_port()?);
        let child = Command::new(&self.relay_bin)
            .args(["run", "--database-url", &self.pg.url()])
            .args(["--hub", &self.proxy.url()])
            .args(["--batch", &self.plan.relays[r].to_string()])
            .args(["--max-backoff", "200ms", "--poll-interval", "200ms"])
            .args(["--publish-timeout", "3s", "--metrics-listen", &metrics])
            .env("FRESHNESS_LOG", filter)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("spawn freshness-relay")?;
        bump(&self.counters.relay_starts);
        *self.relays[r].lock().await = Some(child);
        Ok(())
    }

    /// Commits, rolls back and abandons transactions until `stop`.
    async fn writer(self: Arc<Self>, mut rng: StdRng, stop: CancellationToken) {
        let url = self.pg.url();
        let mut conn: Option<(Client, JoinHandle<()>)> = None;
        while !stop.is_cancelled() {
            let (client, task) = match conn.as_mut() {
                Some(c) => c,
                None => match connect(&url).await {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        // PostgreSQL is restarting.
                        sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let mut picked: Vec<usize> = (0..rng.random_range(1..=3))
                .map(|_| {
                    let ids = self.plan.ids;
                    let id = if rng.random_bool(0.6) {
                        rng.random_range(0..ids.min(6))
                    } else {
                        rng.random_range(0..ids)
                    };
                    rng.random_range(0..2usize) * ids + id
                })
                .collect();
            // One order for every writer: no deadlock between them.
            picked.sort_unstable();
            picked.dedup();
            let fate = rng.random_range(0..100u32);
            let tx_id = self.next_tx.fetch_add(1, Ordering::Relaxed) + 1;
            let payload = tx_id.to_string();
            let mut rows = Vec::new();
            let mut committing = false;
            let result: anyhow::Result<()> = async {
                let tx = client.transaction().await?;
                for &e in &picked {
                    let entity = &self.entities[e];
                    let v: i64 = tx.query_one(BUMP, &[&entity.as_str()]).await?.get(0);
                    tx.execute(LOG, &[&(tx_id as i64), &entity.as_str(), &v])
                        .await?;
                    let version = Version::new(v as u64).context("versions start at 1")?;
                    outbox::enqueue_with_payload(&tx, entity, version, payload.as_bytes()).await?;
                    rows.push((entity.as_str().to_owned(), v as u64));
                }
                match fate {
                    0..12 => {
                        let n = self.counters.rolled_back.fetch_add(1, Ordering::Relaxed) + 1;
                        if self
                            .publish_before_rollback
                            .is_some_and(|k| n.is_multiple_of(k))
                        {
                            for (entity, v) in &rows {
                                let entity = Entity::parse(entity)?;
                                let version = Version::new(*v).context("versions start at 1")?;
                                let _ = self.publisher.publish(entity, version).await;
                            }
                        }
                        tx.rollback().await?;
                    }
                    12..16 => {
                        // The writer dies mid-transaction: its connection
                        // goes, and the server rolls the transaction back.
                        task.abort();
                        bump(&self.counters.abandoned);
                        anyhow::bail!("abandoned");
                    }
                    _ => {
                        committing = true;
                        tx.commit().await?;
                        let now = Instant::now();
                        let mut at = self.committed_at.lock();
                        for r in rows.drain(..) {
                            at.insert(r, now);
                        }
                        bump(&self.counters.committed);
                        if fate >= 96 {
                            // The writer dies right after its commit, before
                            // anything else: the relay publishes anyway.
                            task.abort();
                            bump(&self.counters.crashed_after_commit);
                            anyhow::bail!("crashed after commit");
                        }
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let planned =
                    matches!(e.to_string().as_str(), "abandoned" | "crashed after commit");
                if !planned {
                    bump(&self.counters.write_errors);
                    if committing {
                        // The commit's outcome is unknown: `chaos_log`
                        // says whether it happened.
                        bump(&self.counters.in_doubt);
                    }
                }
                if let Some((_, task)) = conn.take() {
                    task.abort();
                }
                continue;
            }
            sleep(Duration::from_micros(rng.random_range(2_000..8_000))).await;
        }
        if let Some((_, task)) = conn.take() {
            task.abort();
        }
    }

    async fn fault(self: Arc<Self>, f: ProcFault, t0: Instant) -> anyhow::Result<()> {
        sleep_until(t0 + f.at).await;
        let lock = self
            .fault_locks
            .lock()
            .entry(busy_key(f.kind, f.target))
            .or_default()
            .clone();
        let _target = lock.lock().await;
        *self.faults.lock().entry(f.kind).or_default() += 1;
        self.note(format!("fault: {}", f.kind));
        match f.kind {
            FaultKind::RelayKill => {
                if let Some(child) = self.relays[f.target].lock().await.take() {
                    procs::kill(child).await;
                }
                sleep(f.hold).await;
                self.start_relay(f.target).await?;
            }
            FaultKind::HubRestart => {
                let hub = self.hub.lock().await.take();
                if let Some(hub) = hub {
                    hub.stop().await;
                }
                sleep(f.hold).await;
                let hub = TestHub::start_on(self.hub_addr, self.hub_config.clone()).await;
                *self.hub.lock().await = Some(hub);
            }
            FaultKind::PostgresRestart => {
                self.pg.pg_ctl("stop").await?;
                sleep(f.hold).await;
                self.pg.pg_ctl("start").await?;
            }
            FaultKind::HubPause => {
                self.proxy.pause();
                sleep(f.hold).await;
                self.proxy.resume();
            }
            other => anyhow::bail!("{other} is not a fault of the relay world"),
        }
        self.note(format!("healed: {}", f.kind));
        Ok(())
    }

    /// Waits until the outbox is empty and every node holds the newest
    /// committed version of every entity; returns what is still behind.
    async fn converge(&self) -> anyhow::Result<Convergence> {
        let (client, conn) = connect(&self.pg.url()).await?;
        let deadline = Instant::now() + CONVERGE_WITHIN;
        let mut pause = Duration::from_millis(10);
        let result = loop {
            let truth: HashMap<String, u64> = client
                .query("SELECT entity, version FROM chaos_truth", &[])
                .await?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                .collect();
            let depth: i64 = client
                .query_one("SELECT count(*) FROM freshness_outbox", &[])
                .await?
                .get(0);
            let mut behind = Vec::new();
            for (n, (log, _, _)) in self.nodes.iter().enumerate() {
                let log = log.lock();
                for (entity, v) in &truth {
                    let held = log
                        .applied
                        .get(entity)
                        .and_then(|l| l.iter().map(|(v, _)| *v).max())
                        .unwrap_or(0);
                    if held < *v {
                        behind.push((n, entity.clone(), held, *v));
                    }
                }
            }
            if (depth == 0 && behind.is_empty()) || Instant::now() >= deadline {
                let dead: i64 = client
                    .query_one("SELECT count(*) FROM freshness_outbox_dead", &[])
                    .await?
                    .get(0);
                let log: HashMap<(String, u64), u64> = client
                    .query("SELECT entity, version, tx FROM chaos_log", &[])
                    .await?
                    .iter()
                    .map(|r| {
                        (
                            (r.get::<_, String>(0), r.get::<_, i64>(1) as u64),
                            r.get::<_, i64>(2) as u64,
                        )
                    })
                    .collect();
                break Convergence {
                    truth,
                    depth,
                    dead,
                    behind,
                    log,
                };
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        };
        conn.abort();
        Ok(result)
    }

    async fn stop(&self) {
        for r in &self.relays {
            if let Some(child) = r.lock().await.take() {
                procs::kill(child).await;
            }
        }
        self.proxy.resume();
        if let Some(hub) = self.hub.lock().await.take() {
            hub.stop().await;
        }
    }

    fn ms(&self, t: Instant) -> u128 {
        t.saturating_duration_since(self.start).as_millis()
    }

    /// A violation, with the faults that came before it.
    fn violation(
        &self,
        kind: &'static str,
        node: String,
        entity: String,
        what: String,
    ) -> Violation {
        let mut trace: Vec<String> = self
            .events_log
            .lock()
            .iter()
            .map(|(t, s)| format!("+{:>6}ms {s}", self.ms(*t)))
            .collect();
        trace.push(what);
        Violation {
            seed: self.plan.seed,
            kind,
            node,
            entity,
            trace,
        }
    }
}

struct Convergence {
    truth: HashMap<String, u64>,
    depth: i64,
    dead: i64,
    /// `(node, entity, held, committed)`.
    behind: Vec<(usize, String, u64, u64)>,
    /// Committed rows: `(entity, version)` → transaction.
    log: HashMap<(String, u64), u64>,
}

/// Runs the relay world of `seed`.
pub(crate) async fn run(
    seed: u64,
    duration: Duration,
    flaw: Option<Flaw>,
) -> anyhow::Result<SeedReport> {
    let started = Instant::now();
    let plan = RelayPlan::new(seed, duration);
    let world = World::start(plan, flaw).await?;
    let result = drive(&world).await;
    world.stop().await;
    for (_, token, _) in &world.nodes {
        token.cancel();
    }
    let converged = result?;
    Ok(report(&world, converged, started))
}

async fn drive(world: &Arc<World>) -> anyhow::Result<Convergence> {
    let t0 = Instant::now();
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(world.clone().writer(
                plan::task_rng(world.plan.seed ^ SALT, w as u64),
                stop.clone(),
            ))
        })
        .collect();
    let faults: Vec<_> = world
        .plan
        .faults
        .iter()
        .map(|f| tokio::spawn(world.clone().fault(*f, t0)))
        .collect();
    crate::traffic::finish(t0 + world.plan.duration, faults, &stop, writers, Vec::new()).await?;
    world.note("writers stopped; every fault healed".into());
    // PostgreSQL answers again before the check begins.
    let url = world.pg.url();
    poll_until(Duration::from_secs(30), "PostgreSQL up", || {
        let url = url.clone();
        async move {
            match connect(&url).await {
                Ok((_, task)) => {
                    task.abort();
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await?;
    world.converge().await
}

fn report(world: &World, c: Convergence, started: Instant) -> SeedReport {
    let seed = world.plan.seed;
    let mut violations = 0u64;
    let mut reports = Vec::new();
    let mut push = |v: Violation, reports: &mut Vec<Violation>| {
        violations += 1;
        if reports.len() < REPORTED {
            reports.push(v);
        }
    };
    let mut staleness = new_histogram();
    let mut resets: BTreeMap<String, u64> = BTreeMap::new();
    let mut events_applied = 0;
    let mut redelivered = 0u64;
    let committed_at = world.committed_at.lock();
    for (n, (log, _, _)) in world.nodes.iter().enumerate() {
        let node = format!("relay-world-node-{n}");
        let log = log.lock();
        events_applied += log.events;
        for (k, v) in &log.resets {
            *resets.entry(k.clone()).or_default() += v;
        }
        for (entity, list) in &log.applied {
            for (v, tx) in list {
                match c.log.get(&(entity.clone(), *v)) {
                    Some(t) if t == tx => {}
                    committed => push(
                        world.violation(
                            "uncommitted",
                            node.clone(),
                            entity.clone(),
                            format!(
                                "{node} applied {entity} v{v} of transaction {tx}; committed: {}",
                                committed.map_or("no such row".to_owned(), |t| format!(
                                    "v{v} by transaction {t}"
                                ))
                            ),
                        ),
                        &mut reports,
                    ),
                }
            }
            let mut seen = std::collections::HashSet::new();
            for (v, _) in list {
                if !seen.insert(*v) {
                    redelivered += 1;
                }
            }
        }
        for (entity, v, after) in &log.out_of_order {
            push(
                world.violation(
                    "order",
                    node.clone(),
                    entity.clone(),
                    format!("{node} applied {entity} v{v} after v{after}"),
                ),
                &mut reports,
            );
        }
        // Commit (the writer's commit returned) to applied, per row; a row
        // applied before its commit returned counts 0.
        for (key, at) in &log.applied_at {
            if let Some(committed) = committed_at.get(key) {
                let d = at.saturating_duration_since(*committed);
                staleness.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            }
        }
    }
    drop(committed_at);
    for (n, entity, held, v) in &c.behind {
        push(
            world.violation(
                "lost",
                format!("relay-world-node-{n}"),
                entity.clone(),
                format!(
                    "QUIESCENCE: relay-world-node-{n} holds {entity} at v{held}; v{v} is committed"
                ),
            ),
            &mut reports,
        );
    }
    if c.depth > 0 {
        push(
            world.violation(
                "outbox",
                "*".into(),
                "*".into(),
                format!(
                    "{} rows still in freshness_outbox after quiescence",
                    c.depth
                ),
            ),
            &mut reports,
        );
    }
    if c.dead > 0 {
        push(
            world.violation(
                "dead_letter",
                "*".into(),
                "*".into(),
                format!("{} rows in freshness_outbox_dead", c.dead),
            ),
            &mut reports,
        );
    }
    if let Some(n) = resets.get("epoch_changed") {
        push(
            world.violation(
                "epoch",
                "*".into(),
                "*".into(),
                format!("{n} EPOCH_CHANGED resets, and the hub is durable"),
            ),
            &mut reports,
        );
    }
    let k = &world.counters;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let counters: BTreeMap<String, u64> = [
        ("transactions_committed", get(&k.committed)),
        ("transactions_rolled_back", get(&k.rolled_back)),
        ("transactions_abandoned", get(&k.abandoned)),
        ("writers_crashed_after_commit", get(&k.crashed_after_commit)),
        ("commits_in_doubt", get(&k.in_doubt)),
        ("relay_starts", get(&k.relay_starts)),
        ("events_redelivered", redelivered),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    SeedReport {
        seed,
        regions: 1,
        nodes: world.plan.nodes,
        wall_ms: started.elapsed().as_millis() as u64,
        commits: c.log.len() as u64,
        events: c.log.len() as u64,
        events_applied,
        publish_errors: get(&k.write_errors),
        reads: 0,
        hits: 0,
        fail_closed_reads: 0,
        fail_closed_hits: 0,
        violations,
        stale_served_by_policy: 0,
        stale_excused: 0,
        entries_checked: (c.truth.len() * world.plan.nodes) as u64,
        resets,
        faults: world.faults.lock().clone(),
        counters,
        staleness,
        violation_reports: reports,
        schedule: world.plan.schedule(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_plan_and_faults_end_in_time() {
        let d = Duration::from_secs(3);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..100 {
            let plan = RelayPlan::new(seed, d);
            assert_eq!(plan, RelayPlan::new(seed, d));
            assert!(plan.faults.len() >= 3, "seed {seed}: {:?}", plan.faults);
            for f in &plan.faults {
                assert!(f.at + f.hold <= d, "{f:?}");
                assert!(f.kind != FaultKind::RelayKill || f.target < plan.relays.len());
                seen.insert(f.kind);
            }
        }
        assert_eq!(seen.len(), FaultKind::RELAY_WORLD.len(), "{seen:?}");
    }
}
