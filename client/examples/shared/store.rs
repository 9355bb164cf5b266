//! The examples' source of truth, shared by the `writer` and `cache_node`
//! processes: a small versioned key-value table in PostgreSQL (the default,
//! which the outbox needs), or in a JSON file for a demo without one.
//!
//! A commit bumps the entity's version: the version a real schema keeps as
//! a row version. The PostgreSQL commit is one transaction, to which the
//! writer adds its outbox row; the file is rewritten atomically (temporary
//! file, then rename), good enough for a demo on one machine.

// Each example uses part of the store.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One row: its value and the version of its last commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub version: u64,
    pub value: String,
}

/// The store: a PostgreSQL table or a JSON file.
pub enum Store {
    Postgres(tokio_postgres::Client),
    File(PathBuf),
}

const TABLE: &str = "CREATE TABLE IF NOT EXISTS freshness_demo_users (
    entity TEXT PRIMARY KEY, value TEXT NOT NULL, version BIGINT NOT NULL)";
const UPSERT: &str = "INSERT INTO freshness_demo_users AS u (entity, value, version)
    VALUES ($1, $2, 1)
    ON CONFLICT (entity) DO UPDATE SET value = EXCLUDED.value, version = u.version + 1
    RETURNING version";

impl Store {
    /// The JSON file at `path`, or else the database at `database_url`.
    pub async fn open(file: Option<&str>, database_url: &str) -> anyhow::Result<Self> {
        if let Some(path) = file {
            return Ok(Self::File(path.into()));
        }
        let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {database_url:?}: {e}"))?;
        tokio::spawn(connection);
        client.batch_execute(TABLE).await?;
        Ok(Self::Postgres(client))
    }

    /// Where the data lives, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres(_) => "table freshness_demo_users".into(),
            Self::File(p) => p.display().to_string(),
        }
    }

    fn load(path: &PathBuf) -> anyhow::Result<BTreeMap<String, Row>> {
        match std::fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads one row.
    pub async fn read(&self, entity: &str) -> anyhow::Result<Option<Row>> {
        match self {
            Self::Postgres(db) => {
                let row = db
                    .query_opt(
                        "SELECT value, version FROM freshness_demo_users WHERE entity = $1",
                        &[&entity],
                    )
                    .await?;
                Ok(row.map(|r| Row {
                    value: r.get(0),
                    version: r.get::<_, i64>(1) as u64,
                }))
            }
            Self::File(path) => Ok(Self::load(path)?.remove(entity)),
        }
    }

    /// Commits a new value, returning the new version. `in_tx` runs inside
    /// the PostgreSQL transaction before it commits (the writer's outbox
    /// row); it is not called for the file.
    pub async fn commit<F>(&mut self, entity: &str, value: &str, in_tx: F) -> anyhow::Result<u64>
    where
        F: AsyncFnOnce(&tokio_postgres::Transaction<'_>, u64) -> anyhow::Result<()>,
    {
        match self {
            Self::Postgres(db) => {
                let tx = db.transaction().await?;
                let version: i64 = tx.query_one(UPSERT, &[&entity, &value]).await?.get(0);
                let version = version as u64;
                in_tx(&tx, version).await?;
                tx.commit().await?;
                Ok(version)
            }
            Self::File(path) => {
                let mut rows = Self::load(path)?;
                let version = rows.get(entity).map_or(1, |r| r.version + 1);
                rows.insert(
                    entity.to_owned(),
                    Row {
                        version,
                        value: value.to_owned(),
                    },
                );
                let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
                std::fs::write(&tmp, serde_json::to_vec_pretty(&rows)?)?;
                std::fs::rename(&tmp, path)?;
                Ok(version)
            }
        }
    }
}
