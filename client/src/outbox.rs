//! The writer's side of the outbox (feature `outbox`): an invalidation
//! written in the writer's own PostgreSQL transaction, published by
//! `freshness-relay` once that transaction has committed.
//!
//! Commit, then invalidate, without trusting the writer process: the row
//! commits or rolls back with the change itself, so a writer that dies
//! right after its commit loses nothing, and a rolled-back change publishes
//! nothing. The relay deletes a row only after the hub answered for it.
//!
//! ```no_run
//! # async fn f(db: &mut tokio_postgres::Client) -> anyhow::Result<()> {
//! use freshness_client::{Entity, Version, outbox};
//!
//! let tx = db.transaction().await?;
//! let row = tx
//!     .query_one(
//!         "UPDATE users SET name = $1, version = version + 1 WHERE id = 42 RETURNING version",
//!         &[&"Ada"],
//!     )
//!     .await?;
//! let version: i64 = row.get(0);
//! let version = Version::new(u64::try_from(version)?).expect("versions start at 1");
//! outbox::enqueue(&tx, &Entity::parse("user:42")?, version).await?;
//! tx.commit().await?; // the relay publishes user:42 v<version> after this
//! # Ok(()) }
//! ```
//!
//! The row is a plain `INSERT` (the table is created by `freshness-relay
//! migrate`, or by `relay/sql/outbox.sql`), so a writer in any language, or
//! on another driver such as sqlx, does the same with its own SQL:
//!
//! ```sql
//! INSERT INTO freshness_outbox (entity, version) VALUES ('user:42', 7);
//! ```
//!
//! The current span's W3C trace context goes with the row (when an
//! OpenTelemetry layer is installed), so the relay's publish, the hub's
//! append and the nodes' apply continue the writer's trace.

use freshness::limits::MAX_PAYLOAD_BYTES;
use tokio_postgres::Transaction;

use crate::{Entity, Version};

/// The row could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outbox stores versions as `BIGINT`.
    #[error("field `version`: {0} is above the outbox's largest version (2^63 - 1)")]
    VersionTooLarge(u64),
    /// The payload is over the hub's limit.
    #[error("field `payload`: {0} bytes, more than the limit of {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge(usize),
    /// PostgreSQL refused the insert (no outbox table, a closed transaction).
    #[error("outbox insert failed: {0}")]
    Database(#[from] tokio_postgres::Error),
}

const INSERT: &str = "INSERT INTO freshness_outbox (entity, version, payload, traceparent, tracestate) \
     VALUES ($1, $2, $3, $4, $5) RETURNING id";

/// Writes an invalidation of `entity` at `version` in `tx`; published once
/// `tx` commits. Returns the row's id.
pub async fn enqueue(
    tx: &Transaction<'_>,
    entity: &Entity,
    version: Version,
) -> Result<i64, OutboxError> {
    insert(tx, entity, version, None).await
}

/// [`enqueue`] with the new value, for nodes that refresh in place
/// (at most 64 KiB).
pub async fn enqueue_with_payload(
    tx: &Transaction<'_>,
    entity: &Entity,
    version: Version,
    payload: &[u8],
) -> Result<i64, OutboxError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(OutboxError::PayloadTooLarge(payload.len()));
    }
    insert(tx, entity, version, Some(payload)).await
}

async fn insert(
    tx: &Transaction<'_>,
    entity: &Entity,
    version: Version,
    payload: Option<&[u8]>,
) -> Result<i64, OutboxError> {
    let v =
        i64::try_from(version.get()).map_err(|_| OutboxError::VersionTooLarge(version.get()))?;
    let (traceparent, tracestate) = match crate::telemetry::traceparent(&tracing::Span::current()) {
        Some((tp, ts)) => (Some(tp), (!ts.is_empty()).then_some(ts)),
        None => (None, None),
    };
    let row = tx
        .query_one(
            INSERT,
            &[&entity.as_str(), &v, &payload, &traceparent, &tracestate],
        )
        .await?;
    Ok(row.try_get(0)?)
}
