//! The outbox schema (`relay/sql/outbox.sql`) and `migrate`, which applies
//! it idempotently, serialised by an advisory lock so that several relays
//! (a Deployment's replicas) may run it at once.

use tokio_postgres::NoTls;

/// The SQL `migrate` runs: the outbox table, its index, the dead-letter
/// table and the trigger that notifies the relays. The same file is
/// `relay/sql/outbox.sql`, for teams that run their own migrations.
pub const OUTBOX_SQL: &str = include_str!("../sql/outbox.sql");

/// The channel the trigger notifies and the relays `LISTEN` on.
pub const CHANNEL: &str = "freshness_outbox";

/// The outbox could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The connection string does not parse.
    #[error("invalid database url: {0}")]
    Url(tokio_postgres::Error),
    /// PostgreSQL could not be reached or refused the SQL.
    #[error("cannot create the outbox: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

/// Creates the outbox if it is not there (a no-op when it is).
pub async fn migrate(database_url: &str) -> Result<(), MigrateError> {
    let config: tokio_postgres::Config = database_url.parse().map_err(MigrateError::Url)?;
    let (mut client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let tx = client.transaction().await?;
    // Two concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the
    // catalog; one lock per database makes them take turns.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('freshness_outbox'))",
        &[],
    )
    .await?;
    tx.batch_execute(OUTBOX_SQL).await?;
    tx.commit().await?;
    drop(client);
    // The connection ends with the client; its error, if any, came first.
    let _ = driver.await;
    Ok(())
}
