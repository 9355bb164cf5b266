//! What Freshness cache nodes and writers link.
//!
//! - [`Subscriber`]: a node's resilient stream of invalidations from its hub
//!   (reconnects with jittered backoff, resumes from its cursor, honours
//!   resets, acks only what its [`Handler`] applied) and the [`Feed`] state it
//!   publishes (`Connecting | Live | Stale | Down`).
//! - [`VersionedCache`]: a [`moka`] cache that is a [`Handler`]: entries know
//!   which entities (at which versions) they were read from; invalidations,
//!   resets and freshness policies act on exactly those; late fills are
//!   refused.
//! - [`Publisher`]: the writer side: batching, retrying, idempotent
//!   publishing, called after the writer's transaction commits.
//!
//! - [`outbox`] (feature `outbox`): the writer's invalidation as a row in
//!   its own PostgreSQL transaction, published by `freshness-relay` after
//!   the commit.
//!
//! - [`telemetry`]: the W3C trace context on events (the publisher writes
//!   it, the subscriber joins it) and a logs-and-traces set-up for programs.
//!
//! The `freshctl` binary is built on this library.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
mod code;
mod cursor_store;
mod event;
mod feed;
#[cfg(feature = "outbox")]
pub mod outbox;
pub mod publisher;
pub mod subscriber;
pub mod telemetry;
mod transport;

pub use cache::{
    CacheStats, Dep, FillRefused, FreshnessPolicy, Loaded, Ticket, VersionedCache,
    VersionedCacheBuilder,
};
pub use code::Code;
pub use cursor_store::{BackendFuture, CursorBackend, CursorStore, CursorStoreError};
pub use event::{EventBatch, Invalidation, Reset, ResetReason, ResetScope};
pub use feed::{Feed, FeedClosed, FeedState};
pub use freshness::backoff::Backoff;
pub use freshness::status::{HubStatus, NodeState, NodeStatus, PeerStatus, ShardStatus};
pub use freshness::validate::AckLevel;
pub use freshness::{Cursor, Entity, ShardId, Version};
pub use publisher::{
    Outcome, PublishError, PublishOptions, PublishReceipt, PublishResult, Publisher,
    PublisherBuilder, RetryPolicy, StatusError,
};
pub use subscriber::{
    Handler, HandlerError, HandlerRetry, Subscriber, SubscriberBuilder, SubscriberError,
    SubscriberHandle,
};
pub use transport::{Credentials, InvalidAddress};

/// An error and its sources on one line (`a: b: c`), for logs and the CLI.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !line.contains(&s_text) {
            line.push_str(": ");
            line.push_str(&s_text);
        }
        source = s.source();
    }
    line
}
