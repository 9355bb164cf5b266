//! The agent's benchmark, in one run against a Redis of its own and a hub on
//! loopback:
//!
//! - **throughput**: a backlog of `--events` invalidations (each deleting one
//!   templated key) replayed to one node, applied by the agent's handler
//!   (pipelined `FCALL freshness_apply`, tombstones) and by a naive handler
//!   that sends one `DEL` per event and waits for it;
//! - **latency**: `--rate` publishes a second for `--seconds`, one event per
//!   call, each deleting a key; publish call start → Redis' `del` keyspace
//!   notification, p50/p99/max, for the same two handlers.
//!
//! ```sh
//! cargo run --release -p freshness-agent --example bench -- --events 200000 --rate 1000 --seconds 10
//! ```
//!
//! Both handlers run under the client's `Subscriber` in this process, so the
//! only difference is how they talk to Redis; the binary `freshness-agent`
//! runs the same handler.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use freshness::pb::{self, hub_client::HubClient};
use freshness_agent::{Config, RedisCursor, RedisHandler, Store};
use freshness_client::{
    CursorStore, EventBatch, Handler, HandlerError, Reset, Subscriber, SubscriberHandle,
};
use futures::StreamExt;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Invalidations in the throughput backlog.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Publishes per second in the latency run.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Agent,
    Naive,
    /// Applies nothing: the feed's own ceiling in this process.
    Noop,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Agent => "agent (pipelined FCALL)",
            Mode::Naive => "naive (one DEL per event)",
            Mode::Noop => "no Redis (feed ceiling)",
        }
    }
}

/// Counts the events a handler applied.
struct Counting<H> {
    inner: H,
    applied: Arc<AtomicU64>,
}

impl<H: Handler> Handler for Counting<H> {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        self.inner.on_events(batch).await?;
        self.applied
            .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.inner.on_reset(reset).await
    }
    async fn on_start_at_head(&self) -> Result<(), HandlerError> {
        self.inner.on_start_at_head().await
    }
}

/// What a cache node without the agent would do: one `DEL` per event.
struct Naive {
    conn: MultiplexedConnection,
}

impl Handler for Naive {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        let mut c = self.conn.clone();
        for e in &batch.events {
            redis::cmd("DEL")
                .arg(format!("cache:{}", e.entity))
                .query_async::<()>(&mut c)
                .await?;
        }
        Ok(())
    }
    async fn on_reset(&self, _: &Reset) -> Result<(), HandlerError> {
        Ok(())
    }
}

struct Noop;

impl Handler for Noop {
    async fn on_events(&self, _: &EventBatch) -> Result<(), HandlerError> {
        Ok(())
    }
    async fn on_reset(&self, _: &Reset) -> Result<(), HandlerError> {
        Ok(())
    }
}

struct OwnRedis {
    port: u16,
    _child: tokio::process::Child,
}

impl OwnRedis {
    async fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--notify-keyspace-events", "Eg"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("redis-server")?;
        let r = Self {
            port,
            _child: child,
        };
        for _ in 0..100 {
            if let Ok(mut c) = r.conn(0).await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("redis-server did not start")
    }

    fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    async fn conn(&self, db: u32) -> redis::RedisResult<MultiplexedConnection> {
        redis::Client::open(self.url(db))?
            .get_multiplexed_async_connection()
            .await
    }
}

struct Node {
    handle: SubscriberHandle,
    applied: Arc<AtomicU64>,
}

async fn node(
    mode: Mode,
    hub: &str,
    redis: &OwnRedis,
    db: u32,
    dir: &std::path::Path,
) -> Result<Node> {
    let applied = Arc::new(AtomicU64::new(0));
    let node_id = format!("bench-{db}");
    let builder = Subscriber::builder(hub, node_id.clone());
    let handle = match mode {
        Mode::Agent => {
            let config = Config {
                redis: redis.url(db),
                node_id,
                map: [("user".to_owned(), vec!["cache:user:{id}".to_owned()])].into(),
                ..Config::default()
            };
            config.validate()?;
            let store = Store::new(&config)?;
            builder
                .cursor_store(CursorStore::Backend(Arc::new(RedisCursor(store.clone()))))
                .build(Counting {
                    inner: RedisHandler::new(store),
                    applied: applied.clone(),
                })?
                .spawn()
        }
        Mode::Noop => builder
            .cursor_file(dir.join(format!("noop-{db}.cursor")))
            .build(Counting {
                inner: Noop,
                applied: applied.clone(),
            })?
            .spawn(),
        Mode::Naive => builder
            .cursor_file(dir.join(format!("naive-{db}.cursor")))
            .build(Counting {
                inner: Naive {
                    conn: redis.conn(db).await?,
                },
                applied: applied.clone(),
            })?
            .spawn(),
    };
    let mut feed = handle.feed();
    tokio::time::timeout(Duration::from_secs(30), feed.wait_for(|s| s.is_live()))
        .await
        .context("node did not go live")??;
    Ok(Node { handle, applied })
}

fn events(ids: std::ops::Range<u64>) -> Vec<pb::Event> {
    ids.map(|i| pb::Event {
        entity: format!("user:{i}"),
        version: 1,
        ..Default::default()
    })
    .collect()
}

async fn set_keys(c: &mut MultiplexedConnection, ids: std::ops::Range<u64>) -> Result<()> {
    let ids: Vec<u64> = ids.collect();
    for chunk in ids.chunks(1000) {
        let mut cmd = redis::cmd("MSET");
        for i in chunk {
            cmd.arg(format!("cache:user:{i}")).arg("v");
        }
        cmd.query_async::<()>(c).await?;
    }
    Ok(())
}

/// What every run shares: the hub (a client and its URL), the Redis and a
/// directory for the file cursors.
struct Ctx {
    hub: HubClient<tonic::transport::Channel>,
    url: String,
    redis: OwnRedis,
    dir: tempfile::TempDir,
}

/// Backlog replay: invalidations applied per second.
async fn throughput(mode: Mode, ctx: &mut Ctx, db: u32, ids: std::ops::Range<u64>) -> Result<f64> {
    let (url, redis, dir) = (ctx.url.as_str(), &ctx.redis, ctx.dir.path());
    let hub = &mut ctx.hub;
    let n = ids.end - ids.start;
    // A first run leaves the node's cursor at the head, then it stops.
    node(mode, url, redis, db, dir)
        .await?
        .handle
        .shutdown()
        .await?;
    let all = events(ids.clone());
    for chunk in all.chunks(10_000) {
        hub.publish(pb::PublishRequest {
            events: chunk.to_vec(),
            ..Default::default()
        })
        .await?;
    }
    let mut c = redis.conn(db).await?;
    set_keys(&mut c, ids.clone()).await?;
    let started = Instant::now();
    let node = node(mode, url, redis, db, dir).await?;
    while node.applied.load(Ordering::Relaxed) < n {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("backlog not applied in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    node.handle.shutdown().await?;
    let left: u64 = if mode == Mode::Noop {
        0
    } else {
        redis::cmd("EXISTS")
            .arg(format!("cache:user:{}", ids.start))
            .arg(format!("cache:user:{}", ids.end - 1))
            .query_async(&mut c)
            .await?
    };
    if left != 0 {
        bail!("{}: keys left after the backlog", mode.name());
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// Publish call start → key deleted, one event per call at `rate`/s.
async fn latency(
    mode: Mode,
    ctx: &Ctx,
    db: u32,
    ids: std::ops::Range<u64>,
    rate: u64,
) -> Result<Vec<Duration>> {
    let (hub, url, redis, dir) = (&ctx.hub, ctx.url.as_str(), &ctx.redis, ctx.dir.path());
    let n = (ids.end - ids.start) as usize;
    let deleted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut pubsub = redis::Client::open(redis.url(db))?
        .get_async_pubsub()
        .await?;
    pubsub.subscribe(format!("__keyevent@{db}__:del")).await?;
    let listener = {
        let deleted = deleted.clone();
        tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                if let Ok(key) = msg.get_payload::<String>() {
                    deleted.lock().insert(key, Instant::now());
                }
            }
        })
    };
    // Keys are set once the node is live: an agent starting at the hub's
    // head deletes every templated key first.
    let node = node(mode, url, redis, db, dir).await?;
    let mut c = redis.conn(db).await?;
    set_keys(&mut c, ids.clone()).await?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / u32::try_from(rate)?);
    let mut calls = Vec::with_capacity(n);
    for i in ids {
        tick.tick().await;
        let mut hub = hub.clone();
        let sent = sent.clone();
        calls.push(tokio::spawn(async move {
            sent.lock()
                .insert(format!("cache:user:{i}"), Instant::now());
            hub.publish(pb::PublishRequest {
                events: events(i..i + 1),
                ..Default::default()
            })
            .await
        }));
    }
    for call in calls {
        call.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while deleted.lock().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.handle.shutdown().await?;
    listener.abort();
    let deleted = deleted.lock();
    let sent = sent.lock();
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(k, t)| deleted.get(k).map(|d| d.saturating_duration_since(*t)))
        .collect();
    if lat.len() < n {
        bail!("{}: {} of {n} keys deleted", mode.name(), lat.len());
    }
    lat.sort();
    Ok(lat)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let redis = OwnRedis::start().await?;
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let config = freshness_hub::Config {
        listen: addr,
        ephemeral: true,
        log_max_events: 1 << 21,
        log_max_bytes: 1 << 30,
        ..freshness_hub::Config::default()
    };
    let hub_task = tokio::spawn(freshness_hub::run(config, listener, shutdown.clone()));
    let url = format!("http://{addr}");
    let hub = HubClient::connect(url.clone()).await?;
    let mut ctx = Ctx {
        hub,
        url,
        redis,
        dir,
    };

    let n = args.events;
    let tp_agent = throughput(Mode::Agent, &mut ctx, 0, 0..n).await?;
    let tp_naive = throughput(Mode::Naive, &mut ctx, 1, n..2 * n).await?;
    let tp_noop = throughput(Mode::Noop, &mut ctx, 4, 2 * n..3 * n).await?;
    let m = args.rate * args.seconds;
    let base = 3 * n;
    let lat_agent = latency(Mode::Agent, &ctx, 2, base..base + m, args.rate).await?;
    let lat_naive = latency(Mode::Naive, &ctx, 3, base + m..base + 2 * m, args.rate).await?;

    println!("throughput ({n} invalidations replayed, one templated key each):");
    println!("  {:<28} {:>10.0} /s", Mode::Agent.name(), tp_agent);
    println!("  {:<28} {:>10.0} /s", Mode::Naive.name(), tp_naive);
    println!("  {:<28} {:>10.0} /s", Mode::Noop.name(), tp_noop);
    println!(
        "publish -> key deleted at {}/s for {} s ({m} events), ms:",
        args.rate, args.seconds
    );
    for (mode, lat) in [(Mode::Agent, &lat_agent), (Mode::Naive, &lat_naive)] {
        println!(
            "  {:<28} p50 {:>6.3}  p99 {:>6.3}  max {:>7.3}",
            mode.name(),
            pct(lat, 0.5),
            pct(lat, 0.99),
            pct(lat, 1.0)
        );
    }
    shutdown.cancel();
    let _ = hub_task.await;
    Ok(())
}
