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
    /// A hello's resume cursor cannot be resumed from.
    #[error("field `resume`: {0}")]
    InvalidResume(#[from] InvalidResume),
    /// A message on an open stream is malformed (an ack, mostly).
    #[error(transparent)]
    InvalidMessage(#[from] InvalidMessage),
    /// Protocol misuse: no hello first, a second hello, another shard count.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A bounded queue is full; retry after the hint.
    #[error("hub overloaded: {what}; retry in {retry_after:?}")]
    Overloaded {
        /// Which limit was hit.
        what: &'static str,
        /// Retry hint.
        retry_after: Duration,
    },
    /// A configured maximum is reached.
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    /// The hub is shutting down.
    #[error("hub is shutting down")]
    ShuttingDown,
    /// The durable log cannot be written (disk full, I/O error): the
    /// shards concerned applied nothing; retry after the hint.
    #[error(transparent)]
    LogUnavailable(#[from] crate::store::WriteFailed),
}

/// Why a hello's resume cursor is refused (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidResume {
    /// The cursor does not fit this hub.
    #[error(transparent)]
    Cursor(#[from] freshness::CursorError),
    /// It is ahead of what the hub has.
    #[error("shard {shard} is at seq {at}, beyond the hub's head {head}")]
    BeyondHead {
        /// The shard.
        shard: usize,
        /// The cursor's seq.
        at: u64,
        /// The hub's head.
        head: u64,
    },
}

/// A malformed message on an open stream (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    /// Neither hello nor ack.
    #[error("empty subscribe request (neither hello nor ack)")]
    Empty,
    /// An ack without its cursor.
    #[error("ack without a cursor")]
    AckWithoutCursor,
    /// An ack of another epoch.
    #[error("ack for epoch {got}, this stream is in epoch {want}")]
    AckEpoch {
        /// The ack's.
        got: u64,
        /// The stream's.
        want: u64,
    },
    /// An ack of another shard count.
    #[error("ack cursor has {got} shards, the hub has {want}")]
    AckShards {
        /// The ack's.
        got: usize,
        /// The hub's.
        want: usize,
    },
    /// An ack of more than was sent.
    #[error("ack beyond what was sent: shard {shard} acked seq {acked}, only {sent} was sent")]
    AckBeyondSent {
        /// The shard.
        shard: usize,
        /// What it acked.
        acked: u64,
        /// What was sent.
        sent: u64,
    },
    /// `applied` from a node, or not within the stream's epoch and sends.
    #[error("`applied` is for replicating hubs, in this stream's epoch, within what was sent")]
    Applied,
}

/// Protocol misuse (`FAILED_PRECONDITION`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// No hello in time.
    #[error("no hello within {0:?} of opening the stream")]
    NoHello(Duration),
    /// The stream ended first.
    #[error("stream ended before its hello")]
    EndedBeforeHello,
    /// Something else came first.
    #[error("the first message of a subscribe stream must be a hello")]
    HelloNotFirst,
    /// A hello after the first.
    #[error("a second hello on the same stream; open a new stream instead")]
    SecondHello,
    /// The subscriber's shard count is not the hub's.
    #[error("shard count mismatch: the subscriber has {theirs}, this hub has {ours}")]
    ShardCount {
        /// The hello's.
        theirs: u32,
        /// The hub's.
        ours: u32,
    },
}

/// A configured maximum reached (`RESOURCE_EXHAUSTED`, retry in a second).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    /// `max_nodes` streams are connected.
    #[error("{0} streams are connected, the limit of this hub")]
    Streams(usize),
    /// `max_ack_waiters` publishes wait for acks.
    #[error("more than {0} publishes are waiting for acks; use ack level ACCEPTED or retry")]
    AckWaiters(usize),
}

impl From<HubError> for Status {
    fn from(e: HubError) -> Self {
        let msg = e.to_string();
        match e {
            HubError::InvalidPublish(_)
            | HubError::InvalidHello(_)
            | HubError::InvalidResume(_)
            | HubError::InvalidMessage(_) => Status::invalid_argument(msg),
            HubError::Protocol(_) => Status::failed_precondition(msg),
            HubError::Overloaded { retry_after, .. } => {
                let mut s = Status::unavailable(msg);
                if let Ok(v) = retry_after.as_millis().to_string().parse() {
                    s.metadata_mut().insert(RETRY_AFTER_MS, v);
                }
                s
            }
            HubError::Exhausted(_) => {
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

/// Maps what tonic answers a request that does not decode onto the codes of
/// the contract, by code alone. Bytes that are not a valid message are
/// `INVALID_ARGUMENT` already (`codec::LeanCodec`'s decoder says so); a
/// message over the decoding limit is `OUT_OF_RANGE` in tonic, which is
/// the only thing a request stream answers with that code, and
/// `RESOURCE_EXHAUSTED` in SPEC §4.
pub fn map_decode_status(s: Status) -> Status {
    if s.code() == Code::OutOfRange {
        Status::resource_exhausted(s.message().to_owned())
    } else {
        s
    }
}
