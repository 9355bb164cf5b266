//! A writer: commits a change to the shared store and, in the same
//! PostgreSQL transaction, an outbox row that `freshness-relay` publishes
//! once the transaction has committed (commit, then invalidate, without
//! trusting this process).
//!
//! ```text
//! freshness-relay migrate --database-url "host=127.0.0.1 user=postgres dbname=test"
//! freshness-relay run --database-url "host=127.0.0.1 user=postgres dbname=test"
//! cargo run -p freshness-client --features outbox --example writer -- user:1 "Ada Lovelace"
//! cargo run -p freshness-client --features outbox --example writer -- --demo 20
//! ```
//!
//! `--direct` is the writer without PostgreSQL: it commits to a JSON file
//! (`--store`) and then calls `Publish` itself, which loses the
//! invalidation if it dies between the two.
//!
//! Run a hub first (`cargo run -p freshness-hub`), a relay, and a
//! `cache_node` beside it with the same `--database-url` (or `--store`).

#[path = "shared/store.rs"]
mod store;

use std::time::Duration;

use clap::Parser;
use freshness_client::{Entity, Publisher, Version, outbox};
use rand::Rng;

#[derive(Parser)]
struct Args {
    /// The database holding the store and the outbox.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "host=127.0.0.1 user=postgres dbname=test"
    )]
    database_url: String,
    /// Publish directly after each commit instead of through the outbox.
    #[arg(long)]
    direct: bool,
    /// With --direct: keep the store in this JSON file instead of PostgreSQL.
    #[arg(long, requires = "direct")]
    store: Option<String>,
    /// With --direct: the hub.
    #[arg(long, env = "FRESHNESS_HUB", default_value = "http://127.0.0.1:50051")]
    hub: String,
    /// Make this many random changes to user:1..=5, one every 500 ms.
    #[arg(long, conflicts_with_all = ["entity", "value"])]
    demo: Option<u32>,
    /// The entity to change (`namespace:id`).
    #[arg(required_unless_present = "demo")]
    entity: Option<String>,
    /// Its new value.
    #[arg(required_unless_present = "demo")]
    value: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut store = store::Store::open(args.store.as_deref(), &args.database_url).await?;
    let publisher = match args.direct {
        true => Some(Publisher::builder(&args.hub).build()?),
        false => None,
    };
    let changes: Vec<(String, String)> = match (args.demo, args.entity, args.value) {
        (Some(n), _, _) => (0..n)
            .map(|i| {
                let id = rand::rng().random_range(1..=5);
                (format!("user:{id}"), format!("name #{i} of user {id}"))
            })
            .collect(),
        (None, Some(e), Some(v)) => vec![(e, v)],
        _ => anyhow::bail!("give ENTITY VALUE or --demo N"),
    };
    for (i, (entity, value)) in changes.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let parsed = Entity::parse(entity)?;
        let Some(publisher) = &publisher else {
            // The change and its outbox row commit together, or neither does.
            let version = store
                .commit(entity, value, async |tx, version| {
                    let version = Version::new(version).expect("store versions start at 1");
                    outbox::enqueue(tx, &parsed, version).await?;
                    Ok(())
                })
                .await?;
            println!("committed {entity} v{version} = {value:?} with its outbox row");
            continue;
        };
        // 1. Commit to the source of truth ...
        let version = store.commit(entity, value, async |_, _| Ok(())).await?;
        // 2. ... then invalidate, with the committed version.
        let version = Version::new(version).expect("store versions start at 1");
        let result = publisher.publish(parsed, version).await?;
        println!(
            "committed {entity} v{version} = {value:?}; published: {} (shard {}, seq {})",
            result.outcome.as_str(),
            result.shard,
            result.seq
        );
    }
    Ok(())
}
