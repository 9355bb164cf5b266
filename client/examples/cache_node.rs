//! A cache node: a read-through cache of "profiles" in front of the shared
//! store, kept fresh by the hub. It prints every hit, miss, invalidation,
//! reset and refused fill.
//!
//! ```text
//! cargo run -p freshness-hub                                   # a hub
//! cargo run -p freshness-relay -- run --database-url "host=127.0.0.1 user=postgres dbname=test"
//! cargo run -p freshness-client --example cache_node           # this node
//! cargo run -p freshness-client --features outbox --example writer -- --demo 20
//! ```
//!
//! The store is the `freshness_demo_users` table of `--database-url`
//! (`DATABASE_URL`), or with `--store FILE` a JSON file (for a writer run
//! with `--direct --store FILE`, without PostgreSQL).
//!
//! Every 300 ms the node reads `profile:1..=5`; a profile depends on
//! `user:N`, read at the version the store reports. Loads are made slow on
//! purpose (up to 400 ms), so that a writer's change sometimes lands while a
//! load is in flight: the cache then refuses the fill, which read the old
//! version, instead of serving it until the next change.
//!
//! `user` fails closed after 2 s without a watermark: stop the hub and watch
//! the hits turn into misses, restart it and watch them come back.

#[path = "shared/store.rs"]
mod store;

use std::time::Duration;

use clap::Parser;
use freshness_client::{
    Dep, EventBatch, FeedState, FreshnessPolicy, Handler, HandlerError, Reset, Subscriber, Version,
    VersionedCache,
};
use rand::Rng;

#[derive(Parser)]
struct Args {
    /// The hub.
    #[arg(long, env = "FRESHNESS_HUB", default_value = "http://127.0.0.1:50051")]
    hub: String,
    /// The database holding the shared store (the writer's).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "host=127.0.0.1 user=postgres dbname=test"
    )]
    database_url: String,
    /// Read the store from this JSON file instead (a writer run with
    /// `--direct --store`).
    #[arg(long)]
    store: Option<String>,
    /// This node's id.
    #[arg(long, default_value = "demo-node")]
    node_id: String,
}

type Profiles = VersionedCache<String, String>;

/// The cache as the subscriber's handler, printing what it applies.
struct Printing(Profiles);

impl Handler for Printing {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        for e in &batch.events {
            println!("  invalidate {} v{} (seq {})", e.entity, e.version, e.seq);
        }
        self.0.on_events(batch).await
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        println!("  RESET {:?} ({})", reset.scope, reset.reason);
        self.0.on_reset(reset).await
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = store::Store::open(args.store.as_deref(), &args.database_url).await?;
    let cache: Profiles = VersionedCache::builder()
        .name("profiles")
        .max_capacity(1_000)
        .policy(
            "user",
            FreshnessPolicy::FailClosed {
                max_staleness: Duration::from_secs(2),
            },
        )
        .build();
    let subscriber = Subscriber::builder(&args.hub, &args.node_id)
        .namespaces(["user"])
        .build(Printing(cache.clone()))?;
    cache.bind_feed(subscriber.feed());
    let mut states = subscriber.feed().watch();
    let handle = subscriber.spawn();
    tokio::spawn(async move {
        while states.changed().await.is_ok() {
            let state = states.borrow_and_update().clone();
            if !state.is_live() {
                println!("feed: {state:?}");
            }
        }
    });
    println!(
        "reading profile:1..=5 from {} through the cache; ctrl-c to stop",
        store.describe()
    );

    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let mut round = 0u64;
    // One listener for the whole run: a ctrl-c that arrives while a round is
    // being read is not lost.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
        }
        round += 1;
        for id in 1..=5 {
            read_profile(&cache, &store, id).await?;
        }
        if round.is_multiple_of(20) {
            let s = cache.stats();
            let live = matches!(handle.feed().state(), FeedState::Live { .. });
            println!(
                "stats: {} hits, {} misses ({} fail-closed), {} refused fills, {} invalidated, {} resets, feed live: {live}",
                s.hits, s.misses, s.fail_closed, s.refused_fills, s.invalidated, s.resets
            );
        }
    }
    handle.shutdown().await?;
    Ok(())
}

/// Read-through by hand, to show each step. `VersionedCache::get_or_load`
/// does the same in one call (and coalesces concurrent misses).
async fn read_profile(cache: &Profiles, store: &store::Store, id: u32) -> anyhow::Result<()> {
    let key = format!("profile:{id}");
    if let Some(v) = cache.get(&key).await {
        println!("hit     {key} = {v:?}");
        return Ok(());
    }
    // Take the ticket before reading the source of truth.
    let ticket = cache.ticket();
    let entity = format!("user:{id}");
    let Some(row) = store.read(&entity).await? else {
        println!("miss    {key}: no {entity} in the store yet");
        return Ok(());
    };
    // A slow request: the row may change meanwhile.
    let pause = rand::rng().random_range(0..400);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    let value = format!("profile of {}", row.value);
    let dep = Dep::at(
        freshness_client::Entity::parse(&entity)?,
        Version::new(row.version).expect("store versions start at 1"),
    );
    match cache
        .insert_with_ticket(ticket, key.clone(), value.clone(), [dep])
        .await
    {
        Ok(()) => println!("miss    {key}: loaded v{} {value:?}", row.version),
        Err(refused) => println!("REFUSED {key}: {refused}"),
    }
    Ok(())
}
