//! The Freshness regional hub, as a library: [`run`] serves one hub on a
//! listener until a cancellation token fires. The `freshness-hub` binary is a
//! thin wrapper around it, and tests run real hubs on `127.0.0.1:0` with it.
//!
//! Data path: `grpc` (validate) → `hub` (route by shard, admit all or
//! nothing) → `shard` actor (order, version check, encode once, append to
//! `log`) → `session` (read the logs, filter, one frame per batch) → node;
//! acks flow back into the session and wake REGION publishers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod clock;
pub mod codec;
pub mod config;
pub mod error;
pub mod flow;
pub mod grpc;
pub mod hub;
pub mod jetstream;
mod lanes;
pub mod link_lease;
pub mod log;
pub mod metrics;
pub mod reader;
pub mod reload;
pub mod replication;
mod server;
pub mod session;
pub mod shard;
pub mod stats;
pub mod status;
pub mod status_json;
pub mod store;
pub mod telemetry;
pub mod tls;
mod transport;
mod web;

pub use config::{Args, Config, ConfigError, LogBackend, LogFormat};
pub use server::{
    RunError, Security, load_security, open_log, run, run_with_http, serve, serve_with_http,
};
