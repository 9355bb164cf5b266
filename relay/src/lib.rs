//! The Freshness outbox relay: commit, then invalidate, without trusting
//! the writer process.
//!
//! A writer inserts a row into `freshness_outbox` in the transaction that
//! changes the entity (`INSERT INTO freshness_outbox (entity, version)
//! VALUES ('user:42', 7)`); the relay publishes committed rows to the hub
//! and deletes each only after the hub answered for it. A writer that
//! crashes after its commit loses nothing; a rolled-back transaction leaves
//! no row and publishes nothing.
//!
//! - [`schema`]: the outbox's SQL and [`migrate`].
//! - [`relay`]: the claim → publish → delete loop ([`run`]).
//! - [`config`]: the typed, layered configuration.
//! - [`metrics`]: metric names and the `/metrics` endpoint.
//!
//! The `freshness-relay` binary is a thin `main` over this library.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod metrics;
pub mod relay;
pub mod schema;

pub use config::{AckLevel, Args, Command, Config, ConfigError, LogFormat, RunArgs};
pub use relay::{RunError, run};
pub use schema::{CHANNEL, MigrateError, OUTBOX_SQL, migrate};
