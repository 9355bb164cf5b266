//! A writer: commits a change to the shared store, *then* publishes the
//! invalidation (commit, then invalidate).
//!
//! ```text
//! cargo run -p freshness-client --example writer -- user:1 "Ada Lovelace"
//! cargo run -p freshness-client --example writer -- --demo 20   # 20 random changes
//! ```
//!
//! Run a hub first (`cargo run -p freshness-hub`) and a `cache_node` beside
//! it; both examples use `./freshness-demo-store.json` unless `--store` says
//! otherwise.

#[path = "shared/store.rs"]
mod store;

use std::time::Duration;

use clap::Parser;
use freshness_client::{Entity, Publisher, Version};
use rand::Rng;

#[derive(Parser)]
struct Args {
    /// The hub.
    #[arg(long, env = "FRESHNESS_HUB", default_value = "http://127.0.0.1:50051")]
    hub: String,
    /// The shared store file.
    #[arg(long, default_value = "freshness-demo-store.json")]
    store: String,
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
    let store = store::Store::new(&args.store);
    let publisher = Publisher::builder(&args.hub).build()?;
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
        // 1. Commit to the source of truth ...
        let version = store.commit(entity, value)?;
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
