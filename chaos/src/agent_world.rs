//! The agent world: cache nodes are Redis servers of the world's own, each
//! kept fresh by a `freshness-agent` process subscribed to a durable hub
//! (through a fault proxy). Writers commit to the simulated source of truth
//! ([`Truth`]) and publish to the hub; readers read `cache:<entity>` with a
//! plain `GET` and, on a miss, read the source and fill through
//! `FCALL freshness_fill_reason` with the version they read, so that fills
//! race invalidations. The agents map both namespaces with a template
//! (`cache:price:{id}`, `cache:user:{id}`), every fill also registers its
//! dependency, and `price` fails closed at 500 ms.
//!
//! Faults: an agent killed with SIGKILL (restarted after the hold), its
//! Redis killed and restarted empty, the hub restarted on its data
//! directory, an agent stopped with SIGSTOP, an agent's link to the hub cut.
//!
//! Checks:
//! - **Reads** are judged as in the hub world ([`check::judge`]): a late
//!   read is a violation when the agent's feed, as `freshness:feed` in the
//!   same Redis said in the same pipeline as the `GET`, was fresh within
//!   [`MAX_STALENESS`] (an app that checks the feed had no reason to doubt
//!   the key); otherwise it is counted as served by policy (a killed,
//!   stopped or cut-off agent deletes nothing).
//! - **Fail closed**: once the feed of an agent has been cut (hub down,
//!   agent killed, stopped or cut off) for longer than
//!   [`FAIL_CLOSED_AFTER`], a `price` fill must be refused (the library
//!   reads the feed clock even with the agent down), and while the agent
//!   itself runs (hub down, link cut) no `price` key may be served.
//! - **Quiescence**: after the faults heal and writers stop, no Redis holds
//!   a value older than the newest committed version of its entity.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use freshness::Version;
use freshness_client::Publisher;
use freshness_tests::proxy::FaultProxy;
use freshness_tests::{TestHub, test_config};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::Flaw;
use crate::check::{self, Links, MAX_STALENESS, Verdict};
use crate::plan::{self, FaultKind, ProcFault, SHARDS, schedule_procs};
use crate::procs::{self, OwnRedis, child_log, poll_until};
use crate::report::{SeedReport, Violation, new_histogram};
use crate::truth::Truth;

/// The fail-closed bound of `price` given to the agents.
pub const PRICE_BOUND: Duration = Duration::from_millis(500);
/// How often agents write the feed state (and check the bound).
const FEED_INTERVAL: Duration = Duration::from_millis(50);
/// After a cut this long, `price` must be closed: the bound, an interval of
/// the feed writer, and 450 ms for a loaded machine.
pub const FAIL_CLOSED_AFTER: Duration =
    Duration::from_millis(PRICE_BOUND.as_millis() as u64 + FEED_INTERVAL.as_millis() as u64 + 450);
/// Tombstone TTL of the agents (also how long fills are fenced after a
/// clean start or a reset); readers' fills take milliseconds.
const TOMBSTONE_TTL: &str = "1s";
const WRITERS: usize = 2;
const READERS_PER_AGENT: usize = 3;
const HOT_IDS: usize = 6;
const CONVERGE_WITHIN: Duration = Duration::from_secs(15);
const REPORTED: usize = 8;
/// Redis calls that take longer count as failed (the server is gone).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const SALT: u64 = 0x0020_a6e7_0020_a6e7;

/// A read: the key's value, `freshness:feed`'s `fresh_at_ms` and Redis'
/// `TIME`.
type ReadReply = (Option<String>, Option<u64>, (u64, u64));

/// `freshness:feed` state, `fence_until` and Redis' `TIME`.
type FeedAndFence = (Option<String>, Option<u64>, (u64, u64));

/// What a fault of the agent world acts on.
fn busy_key(kind: FaultKind, target: usize) -> String {
    match kind {
        FaultKind::HubRestart => "hub".into(),
        _ => format!("agent-{target}"),
    }
}

/// The agent world a seed stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPlan {
    /// The seed.
    pub seed: u64,
    /// Traffic and faults.
    pub duration: Duration,
    /// Redis servers, one agent each.
    pub agents: usize,
    /// Ids per namespace.
    pub ids: usize,
    /// The fault schedule.
    pub faults: Vec<ProcFault>,
}

impl AgentPlan {
    /// The plan of `seed` for traffic of `duration`.
    pub fn new(seed: u64, duration: Duration) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ SALT);
        let agents = rng.random_range(1..=2usize);
        let ids = rng.random_range(12..=40usize);
        let faults = schedule_procs(
            &mut rng,
            duration,
            &[
                (FaultKind::AgentKill, agents, (100, 1_000)),
                (FaultKind::RedisRestart, agents, (50, 600)),
                (FaultKind::HubRestart, 1, (600, 1_800)),
                (FaultKind::AgentPause, agents, (300, 1_500)),
                (FaultKind::AgentPartition, agents, (600, 1_800)),
            ],
            busy_key,
        );
        Self {
            seed,
            duration,
            agents,
            ids,
            faults,
        }
    }

    /// The world in one line.
    pub fn describe(&self) -> String {
        format!(
            "agent world: {} Redis servers with an agent each, {} entities",
            self.agents,
            self.ids * 2
        )
    }

    /// The fault schedule, one line per fault.
    pub fn schedule(&self) -> Vec<String> {
        self.faults.iter().map(|f| f.describe(&what(f))).collect()
    }
}

/// What a fault of the agent world does.
fn what(f: &ProcFault) -> String {
    match f.kind {
        FaultKind::AgentKill => format!("kill agent-{}", f.target),
        FaultKind::RedisRestart => format!("restart agent-{}'s Redis empty", f.target),
        FaultKind::HubRestart => "restart the hub".into(),
        FaultKind::AgentPause => format!("SIGSTOP agent-{}", f.target),
        _ => format!("cut agent-{} from the hub", f.target),
    }
}

/// What the world knows of one agent's feed.
#[derive(Debug, Clone, Copy)]
struct Health {
    /// The feed cut since then; `true` while the agent itself runs (it can
    /// delete keys), `false` while it is killed or stopped.
    cut: Option<(Instant, bool)>,
}

struct Agent {
    redis: tokio::sync::Mutex<OwnRedis>,
    url: String,
    proxy: FaultProxy,
    child: tokio::sync::Mutex<Option<Child>>,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Stats {
    commits: AtomicU64,
    events: AtomicU64,
    publish_errors: AtomicU64,
    reads: AtomicU64,
    hits: AtomicU64,
    price_reads: AtomicU64,
    price_hits: AtomicU64,
    violations: AtomicU64,
    stale_served_by_policy: AtomicU64,
    stale_excused: AtomicU64,
    counters: Mutex<BTreeMap<String, u64>>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct World {
    plan: AgentPlan,
    truth: Truth,
    links: Links,
    agent_bin: std::path::PathBuf,
    hub_addr: std::net::SocketAddr,
    hub_config: freshness_hub::Config,
    hub: tokio::sync::Mutex<Option<TestHub>>,
    publisher: Publisher,
    agents: Vec<Agent>,
    stats: Stats,
    faults: Mutex<BTreeMap<FaultKind, u64>>,
    faults_log: Mutex<Vec<(Instant, String)>>,
    /// One lock per fault target: a fault waits until the one before it on
    /// the same target (a restart slower than its slot) has finished.
    fault_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    violations: Mutex<Vec<Violation>>,
    /// Broken on purpose (the checker's own tests).
    flaw: Option<Flaw>,
    _data: tempfile::TempDir,
}

async fn redis_conn(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url).context("redis url")?;
    Ok(
        timeout(CALL_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .context("connect to redis: timed out")??,
    )
}

impl World {
    async fn start(plan: AgentPlan, flaw: Option<Flaw>) -> anyhow::Result<Arc<Self>> {
        if let Some(f @ (Flaw::NodesDrop(_) | Flaw::PublishBeforeRollback(_))) = flaw {
            anyhow::bail!("{f:?} is not a flaw of the agent world");
        }
        let agent_bin = procs::binary("freshness-agent", "freshness-agent")?;
        let data = tempfile::Builder::new()
            .prefix("freshness-chaos-agent-")
            .tempdir()
            .context("a data directory for the hub")?;
        let listener = procs::bind_restartable().await?;
        let hub_addr = listener.local_addr().context("hub address")?;
        let mut config = test_config();
        config.hub_id = "hub-agent-world".into();
        config.shards = SHARDS;
        config.progress_interval = Duration::from_millis(100);
        config.shutdown_grace = Duration::from_secs(2);
        config.ephemeral = false;
        config.data_dir = data.path().join("hub");
        let hub = TestHub::start_with_listener(listener, config.clone());
        let publisher = Publisher::builder(hub.url())
            .build()
            .context("writer publisher")?;
        let mut agents = Vec::new();
        for _ in 0..plan.agents {
            let redis = OwnRedis::start().await?;
            agents.push(Agent {
                url: redis.url(),
                redis: tokio::sync::Mutex::new(redis),
                proxy: FaultProxy::start(hub_addr).await,
                child: tokio::sync::Mutex::new(None),
                health: Mutex::new(Health { cut: None }),
            });
        }
        let world = Arc::new(Self {
            truth: Truth::new(&plan::entity_names(plan.ids)),
            plan,
            links: Links::default(),
            agent_bin,
            hub_addr,
            hub_config: config,
            hub: tokio::sync::Mutex::new(Some(hub)),
            publisher,
            agents,
            stats: Stats::default(),
            faults: Mutex::new(BTreeMap::new()),
            faults_log: Mutex::new(Vec::new()),
            fault_locks: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            flaw,
            _data: data,
        });
        let up = async {
            for a in 0..world.agents.len() {
                world.start_agent(a).await?;
            }
            for a in 0..world.agents.len() {
                world.wait_ready(a).await?;
            }
            anyhow::Ok(())
        };
        if let Err(e) = up.await {
            world.stop().await;
            return Err(e);
        }
        Ok(world)
    }

    async fn start_agent(&self, a: usize) -> anyhow::Result<()> {
        let agent = &self.agents[a];
        let (filter, stderr) = child_log();
        let child = Command::new(&self.agent_bin)
            .args(["--hub", &agent.proxy.url(), "--redis", &agent.url])
            .args(["--node-id", &format!("chaos-agent-{a}"), "--no-metrics"])
            .args(["--shards", &SHARDS.to_string()])
            .args(["--persist-interval", "20ms"])
            .args([
                "--feed-interval",
                &format!("{}ms", FEED_INTERVAL.as_millis()),
            ])
            .args(["--tombstone-ttl", TOMBSTONE_TTL])
            .args([
                "--map",
                "price=cache:price:{id}",
                "--map",
                "user=cache:user:{id}",
            ])
            .args(match self.flaw {
                Some(Flaw::AgentsNeverFailClosed) => vec![],
                _ => vec![
                    "--fail-closed".to_owned(),
                    format!("price={}ms", PRICE_BOUND.as_millis()),
                ],
            })
            .args(if self.flaw == Some(Flaw::AgentsDeafToUser) {
                &["--namespace", "price"][..]
            } else {
                &[][..]
            })
            .env("FRESHNESS_LOG", filter)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("spawn freshness-agent")?;
        *agent.child.lock().await = Some(child);
        Ok(())
    }

    /// The agent's feed is live in its Redis and the fence of its clean
    /// start is past.
    async fn wait_ready(&self, a: usize) -> anyhow::Result<()> {
        let url = self.agents[a].url.clone();
        poll_until(Duration::from_secs(30), "agent ready", || {
            let url = url.clone();
            async move {
                let Ok(mut c) = redis_conn(&url).await else {
                    return false;
                };
                let ready: redis::RedisResult<FeedAndFence> = redis::pipe()
                    .cmd("HGET")
                    .arg("freshness:feed")
                    .arg("state")
                    .cmd("HGET")
                    .arg("freshness:config")
                    .arg("fence_until")
                    .cmd("TIME")
                    .query_async(&mut c)
                    .await;
                matches!(ready, Ok((Some(state), fence, (s, us)))
                    if state == "live" && fence.is_none_or(|f| s * 1000 + us / 1000 >= f))
            }
        })
        .await
    }

    fn pick(&self, rng: &mut StdRng) -> usize {
        let ids = self.plan.ids;
        let id = if rng.random_bool(0.6) {
            rng.random_range(0..HOT_IDS.min(ids))
        } else {
            rng.random_range(0..ids)
        };
        rng.random_range(0..2usize) * ids + id
    }

    async fn writer(self: Arc<Self>, mut rng: StdRng, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let e = self.pick(&mut rng);
            let v = self.truth.commit(e, 0);
            add(&self.stats.commits, 1);
            let version = Version::new(v).expect("commits start at version 1");
            // A committed version is published until the hub takes it.
            loop {
                match self
                    .publisher
                    .publish(self.truth.entity(e).clone(), version)
                    .await
                {
                    Ok(r) => {
                        self.truth.accepted(e, v, 0, r.outcome.as_str());
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

    fn count(&self, name: &str) {
        *self
            .stats
            .counters
            .lock()
            .entry(name.to_owned())
            .or_default() += 1;
    }

    /// The feed of agent `a` has been cut for longer than the fail-closed
    /// allowance: `Some(agent alive)`.
    fn closed(&self, a: usize, now: Instant) -> Option<bool> {
        let h = *self.agents[a].health.lock();
        let (since, alive) = h.cut?;
        (now.saturating_duration_since(since) > FAIL_CLOSED_AFTER).then_some(alive)
    }

    /// Reads through agent `a`'s Redis until `stop`; returns the staleness
    /// histogram of its reads (µs).
    async fn reader(
        self: Arc<Self>,
        a: usize,
        mut rng: StdRng,
        stop: CancellationToken,
    ) -> Histogram<u64> {
        let mut staleness = new_histogram();
        let url = self.agents[a].url.clone();
        let mut conn: Option<MultiplexedConnection> = None;
        while !stop.is_cancelled() {
            let pause = Duration::from_micros(rng.random_range(500..3_000));
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match redis_conn(&url).await {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        // Its Redis is restarting.
                        sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let e = self.pick(&mut rng);
            let entity = self.truth.entity(e).clone();
            let key = format!("cache:{entity}");
            let price = entity.namespace() == "price";
            let began = Instant::now();
            let closed_before = self.closed(a, began);
            // The key, and the feed clock an app would check with it.
            let got: redis::RedisResult<ReadReply> = match timeout(
                CALL_TIMEOUT,
                redis::pipe()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("HGET")
                    .arg("freshness:feed")
                    .arg("fresh_at_ms")
                    .cmd("TIME")
                    .query_async(c),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "GET timed out",
                ))),
            };
            let fresh = match &got {
                Ok((_, Some(fresh_at), (s, us))) => {
                    (s * 1000 + us / 1000).saturating_sub(*fresh_at)
                        <= MAX_STALENESS.as_millis() as u64
                }
                _ => false,
            };
            let value = match got.map(|(v, _, _)| v) {
                Ok(Some(s)) => {
                    let v: u64 = s.parse().unwrap_or(0);
                    if price
                        && closed_before == Some(true)
                        && self.closed(a, Instant::now()) == Some(true)
                    {
                        self.fail(
                            "fail_closed",
                            a,
                            e,
                            began,
                            format!(
                                "READ of {key} at agent-{a} served v{v} while its feed had been cut for more than {}ms and the agent ran",
                                FAIL_CLOSED_AFTER.as_millis()
                            ),
                        );
                    }
                    Some((v, true))
                }
                Ok(None) => {
                    let before = Duration::from_micros(rng.random_range(0..2_000));
                    let after = Duration::from_micros(rng.random_range(0..3_000));
                    sleep(before).await;
                    let v = self.truth.read(e);
                    sleep(after).await;
                    let closed_before = self.closed(a, Instant::now());
                    let fill: redis::RedisResult<(i64, String)> = match timeout(
                        CALL_TIMEOUT,
                        redis::cmd("FCALL")
                            .arg("freshness_fill_reason")
                            .arg(1)
                            .arg(&key)
                            .arg(v)
                            .arg(60_000)
                            .arg(entity.as_str())
                            .arg(v)
                            .query_async(c),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "FCALL timed out",
                        ))),
                    };
                    match fill {
                        Ok((1, _)) => {
                            self.count("fills_stored");
                            if price
                                && closed_before.is_some()
                                && self.closed(a, Instant::now()).is_some()
                            {
                                self.fail(
                                    "fail_closed",
                                    a,
                                    e,
                                    began,
                                    format!(
                                        "FILL of {key} at v{v} stored at agent-{a}'s Redis while the feed had been cut for more than {}ms",
                                        FAIL_CLOSED_AFTER.as_millis()
                                    ),
                                );
                            }
                        }
                        Ok((_, reason)) => {
                            let word = reason.split(' ').next().unwrap_or("other");
                            self.count(&format!("fills_refused_{word}"));
                        }
                        Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                            self.count("redis_errors");
                            conn = None;
                        }
                        // No library yet: a Redis restarted empty, before its
                        // agent reinstalled it.
                        Err(_) => self.count("fills_refused_no_library"),
                    }
                    Some((v, false))
                }
                Err(_) => {
                    self.count("redis_errors");
                    conn = None;
                    None
                }
            };
            let Some((served, hit)) = value else {
                sleep(pause).await;
                continue;
            };
            let s = &self.stats;
            add(&s.reads, 1);
            add(&s.hits, u64::from(hit));
            if price {
                add(&s.price_reads, 1);
                add(&s.price_hits, u64::from(hit));
            }
            let (verdict, stale) = check::judge(&self.truth, &self.links, e, served, 0, began);
            staleness.saturating_record(u64::try_from(stale.as_micros()).unwrap_or(u64::MAX));
            match verdict {
                Verdict::Fresh => {}
                Verdict::Excused => add(&s.stale_excused, 1),
                Verdict::Late { .. } if !fresh => {
                    add(&s.stale_served_by_policy, 1);
                }
                Verdict::Late { commit, due } => {
                    let what = format!(
                        "READ of {key} at agent-{a} served v{served} ({}, freshness:feed fresh within {}ms); v{} was due at +{}ms; bound {}ms",
                        if hit { "cache hit" } else { "load" },
                        MAX_STALENESS.as_millis(),
                        commit.version,
                        self.ms(due),
                        check::BOUND.as_millis(),
                    );
                    self.fail("read", a, e, began, what);
                }
            }
            sleep(pause).await;
        }
        staleness
    }

    fn ms(&self, at: Instant) -> u128 {
        at.saturating_duration_since(self.truth.start).as_millis()
    }

    fn fail(&self, kind: &'static str, a: usize, e: usize, at: Instant, what: String) {
        add(&self.stats.violations, 1);
        let mut v = self.violations.lock();
        let node = format!("agent-{a}");
        let entity = self.truth.entity(e).to_string();
        if v.len() >= REPORTED || v.iter().any(|r| r.node == node && r.entity == entity) {
            return;
        }
        let mut lines: Vec<(Instant, String)> = self
            .truth
            .trace(e)
            .into_iter()
            .filter_map(|item| match item.what {
                crate::truth::Trace::Commit { version, .. } => {
                    Some((item.at, format!("commit v{version}")))
                }
                crate::truth::Trace::Accepted {
                    version, outcome, ..
                } => Some((item.at, format!("publish v{version}: {outcome}"))),
                _ => None,
            })
            .collect();
        lines.extend(self.faults_log.lock().iter().cloned());
        lines.push((at, what));
        lines.sort_by_key(|(t, _)| *t);
        v.push(Violation {
            seed: self.plan.seed,
            kind,
            node,
            entity,
            trace: lines
                .into_iter()
                .map(|(t, s)| format!("+{:>6}ms {s}", self.ms(t)))
                .collect(),
        });
    }

    fn cut(&self, agents: &[usize], alive: bool) {
        let now = Instant::now();
        for &a in agents {
            let mut h = self.agents[a].health.lock();
            h.cut = Some(
                h.cut
                    .map_or((now, alive), |(since, was)| (since, was && alive)),
            );
        }
    }

    fn heal(&self, agents: &[usize]) {
        for &a in agents {
            self.agents[a].health.lock().cut = None;
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
        self.faults_log.lock().push((
            Instant::now(),
            format!("fault: {} for {}ms", what(&f), f.hold.as_millis()),
        ));
        let a = f.target;
        let agent = &self.agents[a];
        match f.kind {
            FaultKind::AgentKill => {
                self.cut(&[a], false);
                if let Some(child) = agent.child.lock().await.take() {
                    procs::kill(child).await;
                }
                sleep(f.hold).await;
                self.start_agent(a).await?;
                self.heal(&[a]);
            }
            FaultKind::RedisRestart => {
                // Not a cut of the feed: the agent keeps hearing the hub,
                // and fills find no library until it reinstalled it.
                agent.redis.lock().await.kill().await;
                sleep(f.hold).await;
                agent.redis.lock().await.restart().await?;
                self.heal(&[a]);
            }
            FaultKind::HubRestart => {
                let all: Vec<usize> = (0..self.agents.len()).collect();
                self.cut(&all, true);
                let hub = self.hub.lock().await.take();
                if let Some(hub) = hub {
                    hub.stop().await;
                }
                sleep(f.hold).await;
                let hub = TestHub::start_on(self.hub_addr, self.hub_config.clone()).await;
                *self.hub.lock().await = Some(hub);
                self.heal(&all);
            }
            FaultKind::AgentPause => {
                let child = agent.child.lock().await;
                if let Some(child) = child.as_ref() {
                    self.cut(&[a], false);
                    procs::signal(child, "STOP").await?;
                    sleep(f.hold).await;
                    procs::signal(child, "CONT").await?;
                }
                drop(child);
                self.heal(&[a]);
            }
            FaultKind::AgentPartition => {
                self.cut(&[a], true);
                agent.proxy.partition();
                sleep(f.hold).await;
                agent.proxy.heal();
                self.heal(&[a]);
            }
            other => anyhow::bail!("{other} is not a fault of the agent world"),
        }
        Ok(())
    }

    /// Every key at every Redis equals the source of truth, or is absent;
    /// returns the keys checked and what is still stale after the deadline.
    async fn converge(&self) -> anyhow::Result<(u64, Vec<(usize, usize, u64)>)> {
        for a in 0..self.agents.len() {
            self.wait_ready(a).await?;
        }
        let deadline = Instant::now() + CONVERGE_WITHIN;
        let mut pause = Duration::from_millis(10);
        let keys: Vec<String> = (0..self.truth.len())
            .map(|e| format!("cache:{}", self.truth.entity(e)))
            .collect();
        loop {
            let mut checked = 0;
            let mut stale = Vec::new();
            for (a, agent) in self.agents.iter().enumerate() {
                let mut c = redis_conn(&agent.url).await?;
                let values: Vec<Option<String>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query_async(&mut c)
                    .await
                    .context("MGET the cache keys")?;
                for (e, v) in values.into_iter().enumerate() {
                    let Some(v) = v else { continue };
                    checked += 1;
                    let v: u64 = v.parse().unwrap_or(0);
                    if v != self.truth.read(e) {
                        stale.push((a, e, v));
                    }
                }
            }
            if stale.is_empty() || Instant::now() >= deadline {
                return Ok((checked, stale));
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    async fn stop(&self) {
        for agent in &self.agents {
            if let Some(child) = agent.child.lock().await.take() {
                procs::kill(child).await;
            }
            agent.redis.lock().await.kill().await;
        }
        if let Some(hub) = self.hub.lock().await.take() {
            hub.stop().await;
        }
    }
}

/// Runs the agent world of `seed`.
pub(crate) async fn run(
    seed: u64,
    duration: Duration,
    flaw: Option<Flaw>,
) -> anyhow::Result<SeedReport> {
    let started = Instant::now();
    let world = World::start(AgentPlan::new(seed, duration), flaw).await?;
    let result = drive(&world).await;
    world.stop().await;
    let (checked, stale, staleness) = result?;
    for (a, e, v) in &stale {
        let what = format!(
            "QUIESCENCE: agent-{a}'s Redis still holds {} at v{v}; the source has v{}",
            world.truth.entity(*e),
            world.truth.read(*e)
        );
        world.fail("quiescence", *a, *e, Instant::now(), what);
    }
    let s = &world.stats;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(SeedReport {
        seed,
        regions: 1,
        nodes: world.plan.agents,
        wall_ms: started.elapsed().as_millis() as u64,
        commits: get(&s.commits),
        events: get(&s.events),
        events_applied: 0,
        publish_errors: get(&s.publish_errors),
        reads: get(&s.reads),
        hits: get(&s.hits),
        fail_closed_reads: get(&s.price_reads),
        fail_closed_hits: get(&s.price_hits),
        violations: get(&s.violations),
        stale_served_by_policy: get(&s.stale_served_by_policy),
        stale_excused: get(&s.stale_excused),
        entries_checked: checked,
        resets: BTreeMap::new(),
        faults: world.faults.lock().clone(),
        counters: s.counters.lock().clone(),
        staleness,
        violation_reports: std::mem::take(&mut *world.violations.lock()),
        schedule: world.plan.schedule(),
    })
}

type Outcome = (u64, Vec<(usize, usize, u64)>, Histogram<u64>);

async fn drive(world: &Arc<World>) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let stop = CancellationToken::new();
    let mut task = 0u64;
    let mut next_rng = || {
        task += 1;
        plan::task_rng(world.plan.seed ^ SALT, task)
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| tokio::spawn(world.clone().writer(next_rng(), stop.clone())))
        .collect();
    let mut readers = Vec::new();
    for a in 0..world.agents.len() {
        for _ in 0..READERS_PER_AGENT {
            readers.push(tokio::spawn(world.clone().reader(
                a,
                next_rng(),
                stop.clone(),
            )));
        }
    }
    let faults: Vec<_> = world
        .plan
        .faults
        .iter()
        .map(|f| tokio::spawn(world.clone().fault(*f, t0)))
        .collect();
    let staleness =
        crate::traffic::finish(t0 + world.plan.duration, faults, &stop, writers, readers).await?;
    let (checked, stale) = world.converge().await?;
    Ok((checked, stale, staleness))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_plan_and_faults_end_in_time() {
        let d = Duration::from_secs(3);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..100 {
            let plan = AgentPlan::new(seed, d);
            assert_eq!(plan, AgentPlan::new(seed, d));
            // One agent and the hub, with holds of up to 1.8 s, leave room
            // for two faults in 3 s at times.
            assert!(plan.faults.len() >= 2, "seed {seed}: {:?}", plan.faults);
            for f in &plan.faults {
                assert!(f.at + f.hold <= d, "{f:?}");
                assert!(f.target < plan.agents);
                seen.insert(f.kind);
            }
        }
        assert_eq!(seen.len(), FaultKind::AGENT_WORLD.len(), "{seen:?}");
    }
}
