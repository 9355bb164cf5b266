//! Commit → node applied, through the outbox relay and, in the same run,
//! with the writer calling `Publish` directly after each commit.
//!
//! ```text
//! cargo run --release -p freshness-relay --example outbox_bench -- \
//!     --database "host=127.0.0.1 user=postgres" --rates 1000,2000,4000,8000 --seconds 5
//! ```
//!
//! One process holds a hub (in memory, on loopback), a relay (the library's
//! `run`, the binary's code), a cache node (the client's `Subscriber`) and a
//! pool of writer connections to PostgreSQL. The bench creates a database of
//! its own and drops it at the end. For each mode and rate, writers commit
//! open-loop at that rate for the given time (each commit one transaction
//! with one row: the outbox row, or for `direct` a row of a plain table
//! followed by `Publisher::publish`); the latency of a commit is from its
//! `COMMIT` returning to the node's handler receiving the event.
//! Prints one line per step and a JSON summary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use freshness_client::{
    Entity, EventBatch, Handler, HandlerError, Publisher, Reset, Subscriber, Version,
};
use parking_lot::Mutex;
use rand::Rng;
use tokio::time::Instant;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// PostgreSQL server (libpq key-value string without dbname).
    #[arg(long, default_value = "host=127.0.0.1 user=postgres")]
    database: String,
    /// Commit rates to try, per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,8000")]
    rates: Vec<u32>,
    /// Seconds per step.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Writer connections.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Relay batch size.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// The writers' `synchronous_commit`: `off` takes the disk flush out of
    /// each commit (same for both modes), so that a busy disk does not cap
    /// the commit rate below what the relay carries.
    #[arg(long, default_value = "on")]
    synchronous_commit: String,
}

#[derive(Default)]
struct Applied(Mutex<HashMap<u64, Instant>>);

impl Handler for Applied {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        let now = Instant::now();
        let mut seen = self.0.lock();
        for e in &batch.events {
            if let Some(id) = e.entity.as_str().strip_prefix("b:")
                && let Ok(id) = id.parse()
            {
                seen.entry(id).or_insert(now);
            }
        }
        Ok(())
    }

    async fn on_reset(&self, _reset: &Reset) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Outbox,
    Direct,
}

struct Step {
    mode: &'static str,
    target: u32,
    achieved: f64,
    commits: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = format!("relay_bench_{:08x}", rand::rng().random::<u32>());
    let (admin, conn) =
        tokio_postgres::connect(&format!("{} dbname=postgres", args.database), NoTls)
            .await
            .context("connect to PostgreSQL")?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = format!("{} dbname={name}", args.database);
    let result = run(&args, &url).await;
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await?;
    result
}

async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    freshness_relay::migrate(url).await?;
    let (setup, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    setup
        .batch_execute(
            "CREATE TABLE bench_direct (id BIGSERIAL PRIMARY KEY, entity TEXT, version BIGINT)",
        )
        .await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hub_url = format!("http://{}", listener.local_addr()?);
    let hub_config = freshness_hub::Config {
        listen: listener.local_addr()?,
        hub_id: "bench".into(),
        ephemeral: true,
        ..freshness_hub::Config::default()
    };
    let stop = CancellationToken::new();
    tokio::spawn(freshness_hub::run(hub_config, listener, stop.clone()));

    let applied = Arc::new(Applied::default());
    let subscriber = Subscriber::builder(&hub_url, "bench-node").build(applied.clone())?;
    let mut feed = subscriber.feed();
    let node = subscriber.spawn_with(stop.clone());
    feed.wait_for(|s| s.is_live()).await?;

    let publisher = Publisher::builder(&hub_url).build()?;
    let mut writers = Vec::new();
    let writer_url = format!(
        "{url} options='-c synchronous_commit={}'",
        args.synchronous_commit
    );
    for _ in 0..args.writers {
        let (c, conn) = tokio_postgres::connect(&writer_url, NoTls).await?;
        tokio::spawn(conn);
        writers.push(Arc::new(tokio::sync::Mutex::new(c)));
    }

    let mut next_id = 0u64;
    let mut steps = Vec::new();
    for mode in [Mode::Outbox, Mode::Direct] {
        let relay_stop = CancellationToken::new();
        if mode == Mode::Outbox {
            let config = freshness_relay::Config {
                database_url: url.to_owned(),
                hub: hub_url.clone(),
                batch: args.batch,
                ..freshness_relay::Config::default()
            };
            tokio::spawn(freshness_relay::run(config, relay_stop.clone()));
        }
        for &rate in &args.rates {
            let step = step(
                mode,
                rate,
                Duration::from_secs(args.seconds),
                &writers,
                &publisher,
                &applied,
                &mut next_id,
            )
            .await?;
            println!(
                "{:7} target {:6}/s achieved {:8.0}/s  commits {:6}  commit→node p50 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
                step.mode, step.target, step.achieved, step.commits, step.p50, step.p99, step.max
            );
            steps.push(step);
        }
        relay_stop.cancel();
    }
    let json: Vec<_> = steps
        .iter()
        .map(|s| {
            serde_json::json!({"mode": s.mode, "target_per_s": s.target, "achieved_per_s": s.achieved.round(),
                "commits": s.commits, "p50_ms": s.p50, "p99_ms": s.p99, "max_ms": s.max})
        })
        .collect();
    println!("{}", serde_json::Value::Array(json));
    stop.cancel();
    let _ = node.join().await;
    Ok(())
}

async fn step(
    mode: Mode,
    rate: u32,
    length: Duration,
    writers: &[Arc<tokio::sync::Mutex<tokio_postgres::Client>>],
    publisher: &Publisher,
    applied: &Arc<Applied>,
    next_id: &mut u64,
) -> anyhow::Result<Step> {
    let committed: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let total = (u64::from(rate) * length.as_secs()) as usize;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let first = *next_id;
    for i in 0..total {
        // Open loop: commit i starts at its slot whatever the others do
        // (every commit due is started at each millisecond tick).
        let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let id = first + i as u64;
        let writer = writers[i % writers.len()].clone();
        let committed = committed.clone();
        let publisher = publisher.clone();
        tasks.spawn(async move {
            let mut client = writer.lock().await;
            let entity = format!("b:{id}");
            let tx = client.transaction().await?;
            let table = match mode {
                Mode::Outbox => "freshness_outbox",
                Mode::Direct => "bench_direct",
            };
            tx.execute(
                &format!("INSERT INTO {table} (entity, version) VALUES ($1, 1)"),
                &[&entity],
            )
            .await?;
            tx.commit().await?;
            committed.lock().insert(id, Instant::now());
            drop(client);
            if mode == Mode::Direct {
                publisher
                    .publish(
                        Entity::parse(&entity)?,
                        Version::new(1).expect("1 is a version"),
                    )
                    .await?;
            }
            anyhow::Ok(())
        });
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = started.elapsed();
    *next_id += total as u64;
    // Every commit must arrive; wait for the stragglers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let end = *next_id;
        let all = {
            let seen = applied.0.lock();
            (first..end).all(|id| seen.contains_key(&id))
        };
        if all {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "commits missing at the node after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let committed = committed.lock();
    let seen = applied.0.lock();
    let mut ms: Vec<f64> = (first..*next_id)
        .map(|id| {
            seen[&id]
                .saturating_duration_since(committed[&id])
                .as_secs_f64()
                * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
    Ok(Step {
        mode: match mode {
            Mode::Outbox => "outbox",
            Mode::Direct => "direct",
        },
        target: rate,
        achieved: total as f64 / elapsed.as_secs_f64(),
        commits: total,
        p50: pct(0.50),
        p99: pct(0.99),
        max: ms.last().copied().unwrap_or(0.0),
    })
}
