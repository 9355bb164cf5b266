//! The hub's typed errors and their one mapping to gRPC status codes.

use std::time::Duration;

use freshness::validate::{InvalidHello, InvalidPublish};
use tonic::{Code, Status};

/// Metadata key carrying a retry hint in milliseconds on overload answers.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Everything a hub call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A publish failed validation; nothing was applied.
    #[error(transparent)]
    InvalidPublish(#[from] InvalidPublish),
    /// A hello failed validation.
    #[error("invalid hello: {0}")]
    InvalidHello(#[from] InvalidHello),
    /// Any other malformed request (bad cursor, bad ack).
    #[error("{0}")]
    InvalidArgument(String),
    /// Protocol misuse (no hello first, a second hello, shard count mismatch).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bounded queue is full; retry after the hint.
    #[error("hub overloaded: {what}; retry in {retry_after:?}")]
    Overloaded {
        /// Which limit was hit.
        what: &'static str,
        /// Retry hint.
        retry_after: Duration,
    },
    /// A configured maximum is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The hub is shutting down.
    #[error("hub is shutting down")]
    ShuttingDown,
    /// The durable log cannot be written (disk full, I/O error): the
    /// shards concerned applied nothing; retry after the hint.
    #[error(transparent)]
    LogUnavailable(#[from] crate::store::WriteFailed),
}

impl From<HubError> for Status {
    fn from(e: HubError) -> Self {
        let msg = e.to_string();
        match e {
            HubError::InvalidPublish(_)
            | HubError::InvalidHello(_)
            | HubError::InvalidArgument(_) => Status::invalid_argument(msg),
            HubError::FailedPrecondition(_) => Status::failed_precondition(msg),
            HubError::Overloaded { retry_after, .. } => {
                let mut s = Status::unavailable(msg);
                if let Ok(v) = retry_after.as_millis().to_string().parse() {
                    s.metadata_mut().insert(RETRY_AFTER_MS, v);
                }
                s
            }
            HubError::ResourceExhausted(_) => {
                let mut s = Status::resource_exhausted(msg);
                s.metadata_mut().insert(
                    RETRY_AFTER_MS,
                    tonic::metadata::MetadataValue::from_static("1000"),
                );
                s
            }
            HubError::ShuttingDown => Status::unavailable(msg),
            HubError::LogUnavailable(_) => {
                let mut s = Status::unavailable(msg);
                s.metadata_mut().insert(
                    RETRY_AFTER_MS,
                    tonic::metadata::MetadataValue::from_static("1000"),
                );
                s
            }
        }
    }
}

/// What prost's decode errors start with; tonic answers them `INTERNAL`.
pub const DECODE_ERROR_PREFIX: &str = "failed to decode Protobuf message";

/// Maps tonic's answers to a request that does not decode onto the codes of
/// the contract: a message over the decoding limit is `OUT_OF_RANGE` in
/// tonic and `RESOURCE_EXHAUSTED` in SPEC §4; bytes that are not a valid
/// message are `INTERNAL` in tonic, which would blame the hub for the
/// client's input, and `INVALID_ARGUMENT` here.
pub fn map_decode_status(s: Status) -> Status {
    if s.code() == Code::OutOfRange && s.message().contains("too large") {
        Status::resource_exhausted(s.message().to_owned())
    } else if s.code() == Code::Internal && s.message().starts_with(DECODE_ERROR_PREFIX) {
        Status::invalid_argument(s.message().to_owned())
    } else {
        s
    }
}
