//! The Freshness protocol: generated wire code, the domain types it carries and
//! the validation that turns one into the other.
//!
//! This crate is shared by the hub and the client. It knows nothing of
//! networking or tasks (it never depends on tokio); it owns:
//! - [`pb`]: the code generated from `proto/freshness/v1/freshness.proto`;
//! - the domain types [`Entity`], [`Version`], [`ShardId`], [`Cursor`];
//! - the one [`shard()`] function of the protocol;
//! - [`validate`]: wire → domain conversions that reject bad input with an
//!   error naming the event index and field;
//! - [`wire`]: encode-once helpers the hub uses to share event bytes between
//!   streams;
//! - [`ack`]: when a node acks (the delayed-ack rule, acks on request).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ack;
pub mod backoff;
mod cursor;
mod entity;
mod shard;
pub mod status;
pub mod validate;
pub mod wire;

#[cfg(test)]
mod props;

pub use ack::AckPacer;
pub use cursor::{Cursor, CursorError};
pub use entity::{Entity, EntityError, Version, validate_namespace};
pub use shard::{HASH_NAME, ShardId, fnv1a64, shard};

/// Generated protocol code (package `freshness.v1`). Never edited by hand.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/freshness.v1.rs"));

    /// The encoded `FileDescriptorSet` of the protocol, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/freshness_descriptor.bin"));
}

/// Protocol limits and defaults of SPEC §5 that both ends need to know.
pub mod limits {
    /// Most bytes in an entity.
    pub const MAX_ENTITY_BYTES: usize = 512;
    /// Most events in one publish call (default of the hub's configurable limit).
    pub const MAX_EVENTS_PER_PUBLISH: usize = 10_000;
    /// Largest payload (default of the hub's configurable limit).
    pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
    /// Default shard count.
    pub const DEFAULT_SHARDS: u32 = 64;
    /// Default progress interval in milliseconds.
    pub const DEFAULT_PROGRESS_INTERVAL_MS: u64 = 250;
    /// Default in-flight events per node.
    pub const DEFAULT_MAX_IN_FLIGHT: u32 = 8_192;
    /// Default largest gRPC message, in bytes.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
    /// Default timeout of REGION and GLOBAL publishes, in milliseconds.
    pub const DEFAULT_ACK_TIMEOUT_MS: u32 = 2_000;
}
