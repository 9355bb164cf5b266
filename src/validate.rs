//! Wire → domain conversions. Everything a client sends is checked here, at
//! the boundary, so that the hub's core only ever sees valid values.

use std::time::Duration;

use bytes::Bytes;

use crate::limits::{DEFAULT_ACK_TIMEOUT_MS, MAX_EVENTS_PER_PUBLISH, MAX_PAYLOAD_BYTES};
use crate::{Entity, Version, pb, validate_namespace};

/// Most bytes in a node id.
pub const MAX_NODE_ID_BYTES: usize = 256;
/// Most bytes in a traceparent or tracestate.
pub const MAX_TRACE_CONTEXT_BYTES: usize = 512;
/// Most namespaces in one subscription filter.
pub const MAX_FILTER_NAMESPACES: usize = 1024;
/// Longest REGION / GLOBAL timeout a caller may ask for.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// The configurable limits a publish is checked against.
#[derive(Debug, Clone, Copy)]
pub struct PublishLimits {
    /// Most events in one call.
    pub max_events: usize,
    /// Largest payload of one event.
    pub max_payload_bytes: usize,
}

impl Default for PublishLimits {
    fn default() -> Self {
        Self {
            max_events: MAX_EVENTS_PER_PUBLISH,
            max_payload_bytes: MAX_PAYLOAD_BYTES,
        }
    }
}

/// A publish rejected as a whole. Maps to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPublish {
    /// No events.
    #[error("publish carries no events (1 to {max} per call)")]
    Empty {
        /// The limit.
        max: usize,
    },
    /// Too many events.
    #[error("publish carries {got} events, more than the limit of {max} per call")]
    TooMany {
        /// Events in the call.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// One event is malformed.
    #[error("event {index}: field `{field}`: {reason}")]
    Event {
        /// Position of the event in the call.
        index: usize,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The ack level is not one of the known values.
    #[error("field `ack`: unknown ack level {0}")]
    AckLevel(i32),
    /// The timeout is longer than allowed.
    #[error("field `timeout_ms`: {0} ms is more than the limit of 60000")]
    Timeout(u32),
}

/// How much a publisher waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckLevel {
    /// Ordered and appended by the hub.
    Accepted,
    /// Also acked by every matching node of the region.
    Region,
    /// Also acked in every peer region.
    Global,
}

impl AckLevel {
    /// The wire value.
    pub fn to_wire(self) -> pb::AckLevel {
        match self {
            Self::Accepted => pb::AckLevel::Accepted,
            Self::Region => pb::AckLevel::Region,
            Self::Global => pb::AckLevel::Global,
        }
    }
}

/// A publish call that passed validation.
#[derive(Debug, Clone)]
pub struct ValidPublish {
    /// The events, in call order (their `origin` and `publish_time_us` are
    /// the hub's to set: a publish's are ignored).
    pub events: Vec<CheckedEvent>,
    /// What the caller waits for.
    pub ack: AckLevel,
    /// How long REGION / GLOBAL wait.
    pub timeout: Duration,
}

/// An event as the wire carries it (`pb::Event`), its fields checked: the
/// one conversion publish ([`CheckedEvent::check`], with the hub's payload
/// limit), replication and the client (`TryFrom`) share.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedEvent {
    /// What changed.
    pub entity: Entity,
    /// Its version at the source of truth (at least 1).
    pub version: Version,
    /// Region it was first published in (set by a hub; empty in a publish).
    pub origin: String,
    /// When its first hub accepted it, µs since the Unix epoch (0 unset).
    pub publish_time_us: u64,
    /// Optional new value.
    pub payload: Bytes,
    /// W3C trace context (may be empty): printable ASCII, at most
    /// [`MAX_TRACE_CONTEXT_BYTES`].
    pub traceparent: String,
    /// W3C trace state, as `traceparent`.
    pub tracestate: String,
}

/// Why a `pb::Event` is not a [`CheckedEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct InvalidEvent {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl TryFrom<pb::Event> for CheckedEvent {
    type Error = InvalidEvent;

    /// The conversion without a payload limit (replicated and delivered
    /// events: the hub they were published at held them to its own).
    fn try_from(e: pb::Event) -> Result<Self, InvalidEvent> {
        Self::check(e, usize::MAX)
    }
}

impl CheckedEvent {
    /// Checks every field, in field order, the payload against
    /// `max_payload_bytes`.
    pub fn check(e: pb::Event, max_payload_bytes: usize) -> Result<Self, InvalidEvent> {
        let entity = Entity::parse(&e.entity).map_err(|err| InvalidEvent {
            field: "entity",
            reason: err.to_string(),
        })?;
        let version = Version::new(e.version).ok_or_else(|| InvalidEvent {
            field: "version",
            reason: "version must be at least 1".into(),
        })?;
        if e.payload.len() > max_payload_bytes {
            return Err(InvalidEvent {
                field: "payload",
                reason: format!(
                    "{} bytes, more than the limit of {max_payload_bytes}",
                    e.payload.len(),
                ),
            });
        }
        check_trace_field(&e.traceparent, "traceparent")?;
        check_trace_field(&e.tracestate, "tracestate")?;
        Ok(Self {
            entity,
            version,
            origin: e.origin,
            publish_time_us: e.publish_time_us,
            payload: e.payload,
            traceparent: e.traceparent,
            tracestate: e.tracestate,
        })
    }
}

fn check_trace_field(value: &str, field: &'static str) -> Result<(), InvalidEvent> {
    if value.len() > MAX_TRACE_CONTEXT_BYTES {
        return Err(InvalidEvent {
            field,
            reason: format!(
                "{} bytes, more than the limit of {MAX_TRACE_CONTEXT_BYTES}",
                value.len()
            ),
        });
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(InvalidEvent {
            field,
            reason: "must be printable ASCII (W3C trace context)".into(),
        });
    }
    Ok(())
}

/// Validates a whole publish call. Fields the hub sets itself (`origin`,
/// `publish_time_us`) are ignored.
pub fn publish(
    req: pb::PublishRequest,
    limits: PublishLimits,
) -> Result<ValidPublish, InvalidPublish> {
    let n = req.events.len();
    if n == 0 {
        return Err(InvalidPublish::Empty {
            max: limits.max_events,
        });
    }
    if n > limits.max_events {
        return Err(InvalidPublish::TooMany {
            got: n,
            max: limits.max_events,
        });
    }
    let ack = match pb::AckLevel::try_from(req.ack) {
        Ok(pb::AckLevel::Unspecified | pb::AckLevel::Accepted) => AckLevel::Accepted,
        Ok(pb::AckLevel::Region) => AckLevel::Region,
        Ok(pb::AckLevel::Global) => AckLevel::Global,
        Err(_) => return Err(InvalidPublish::AckLevel(req.ack)),
    };
    let timeout = match req.timeout_ms {
        0 => Duration::from_millis(u64::from(DEFAULT_ACK_TIMEOUT_MS)),
        ms if Duration::from_millis(u64::from(ms)) > MAX_ACK_TIMEOUT => {
            return Err(InvalidPublish::Timeout(ms));
        }
        ms => Duration::from_millis(u64::from(ms)),
    };
    let mut events = Vec::with_capacity(n);
    for (index, e) in req.events.into_iter().enumerate() {
        let e = CheckedEvent::check(e, limits.max_payload_bytes).map_err(|err| {
            InvalidPublish::Event {
                index,
                field: err.field,
                reason: err.reason,
            }
        })?;
        events.push(e);
    }
    Ok(ValidPublish {
        events,
        ack,
        timeout,
    })
}

/// A hello rejected. Maps to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHello {
    /// Missing or malformed node id.
    #[error("field `node_id`: {0}")]
    NodeId(String),
    /// A namespace of the filter is malformed.
    #[error("field `namespaces[{index}]`: {reason}")]
    Namespace {
        /// Position in the filter.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Too many namespaces.
    #[error("field `namespaces`: {0} namespaces, more than the limit of 1024")]
    TooManyNamespaces(usize),
    /// The region is not a region name. Hubs keep it for as long as the
    /// stream lasts, so an unchecked one would let any stream pin a whole
    /// message's worth of memory.
    #[error("field `region`: {0}")]
    Region(String),
}

/// Validates a node id: non-empty, at most 256 bytes, no control characters.
pub fn node_id(id: &str) -> Result<(), InvalidHello> {
    if id.is_empty() {
        return Err(InvalidHello::NodeId("node id is empty".into()));
    }
    if id.len() > MAX_NODE_ID_BYTES {
        return Err(InvalidHello::NodeId(format!(
            "{} bytes, more than the limit of {MAX_NODE_ID_BYTES}",
            id.len()
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(InvalidHello::NodeId("contains a control character".into()));
    }
    Ok(())
}

/// Validates the identity and filter of a hello, returning the filter sorted
/// and de-duplicated. The region, when given, must be a region name (the
/// syntax of a namespace, as in the hub's configuration). The cursor is
/// checked by the hub, which knows its shards.
pub fn hello_filter(hello: &pb::Hello) -> Result<Vec<String>, InvalidHello> {
    node_id(&hello.node_id)?;
    if !hello.region.is_empty() && validate_namespace(&hello.region).is_err() {
        return Err(InvalidHello::Region(format!(
            "{} bytes that are not a region name ([a-z0-9][a-z0-9_.-]{{0,62}})",
            hello.region.len()
        )));
    }
    if hello.namespaces.len() > MAX_FILTER_NAMESPACES {
        return Err(InvalidHello::TooManyNamespaces(hello.namespaces.len()));
    }
    for (index, ns) in hello.namespaces.iter().enumerate() {
        validate_namespace(ns).map_err(|e| InvalidHello::Namespace {
            index,
            reason: e.to_string(),
        })?;
    }
    let mut filter = hello.namespaces.clone();
    filter.sort();
    filter.dedup();
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(entity: &str, version: u64) -> pb::Event {
        pb::Event {
            entity: entity.into(),
            version,
            ..Default::default()
        }
    }

    fn req(events: Vec<pb::Event>) -> pb::PublishRequest {
        pb::PublishRequest {
            events,
            ..Default::default()
        }
    }

    #[test]
    fn one_conversion_checks_every_field_it_can_without_a_configuration() {
        let mut e = ev("user:1", 3);
        e.origin = "eu".into();
        e.publish_time_us = 7;
        e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into();
        let ok = CheckedEvent::try_from(e.clone()).unwrap();
        assert_eq!(ok.entity.as_str(), "user:1");
        assert_eq!(ok.version.get(), 3);
        assert_eq!((ok.origin.as_str(), ok.publish_time_us), ("eu", 7));
        for (bad, field) in [
            (
                pb::Event {
                    entity: "nocolon".into(),
                    ..e.clone()
                },
                "entity",
            ),
            (
                pb::Event {
                    version: 0,
                    ..e.clone()
                },
                "version",
            ),
            (
                pb::Event {
                    traceparent: "x".repeat(MAX_TRACE_CONTEXT_BYTES + 1),
                    ..e.clone()
                },
                "traceparent",
            ),
            (
                pb::Event {
                    tracestate: "caf\u{e9}".into(),
                    ..e.clone()
                },
                "tracestate",
            ),
        ] {
            assert_eq!(CheckedEvent::try_from(bad).unwrap_err().field, field);
        }
    }

    #[test]
    fn names_index_and_field() {
        let err = publish(
            req(vec![ev("user:1", 1), ev("user:2", 0)]),
            PublishLimits::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "event 1: field `version`: version must be at least 1"
        );
        let err = publish(req(vec![ev("Bad:1", 1)]), PublishLimits::default()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("event 0: field `entity`: namespace")
        );
        let mut big = ev("user:1", 1);
        big.payload = vec![0; MAX_PAYLOAD_BYTES + 1].into();
        let err = publish(req(vec![ev("user:1", 1), big]), PublishLimits::default()).unwrap_err();
        assert!(matches!(
            err,
            InvalidPublish::Event {
                index: 1,
                field: "payload",
                ..
            }
        ));
    }

    #[test]
    fn batch_size_limits() {
        let limits = PublishLimits::default();
        assert_eq!(
            publish(req(vec![]), limits).unwrap_err(),
            InvalidPublish::Empty { max: 10_000 }
        );
        let many = (0..10_001).map(|i| ev(&format!("user:{i}"), 1)).collect();
        assert_eq!(
            publish(req(many), limits).unwrap_err(),
            InvalidPublish::TooMany {
                got: 10_001,
                max: 10_000
            }
        );
        let ok = (0..10_000).map(|i| ev(&format!("user:{i}"), 1)).collect();
        assert_eq!(publish(req(ok), limits).unwrap().events.len(), 10_000);
    }

    #[test]
    fn ack_and_timeout() {
        let mut r = req(vec![ev("user:1", 1)]);
        r.ack = 9;
        assert_eq!(
            publish(r, PublishLimits::default()).unwrap_err(),
            InvalidPublish::AckLevel(9)
        );
        let mut r = req(vec![ev("user:1", 1)]);
        r.ack = pb::AckLevel::Region as i32;
        let v = publish(r, PublishLimits::default()).unwrap();
        assert_eq!(
            (v.ack, v.timeout),
            (AckLevel::Region, Duration::from_secs(2))
        );
    }

    #[test]
    fn hello_checks() {
        let mut h = pb::Hello {
            node_id: "n1".into(),
            namespaces: vec!["user".into(), "post".into(), "user".into()],
            ..Default::default()
        };
        assert_eq!(hello_filter(&h).unwrap(), vec!["post", "user"]);
        h.namespaces.push("Nope".into());
        assert!(matches!(
            hello_filter(&h),
            Err(InvalidHello::Namespace { index: 3, .. })
        ));
        h.namespaces.pop();
        h.region = "eu-west".into();
        assert!(hello_filter(&h).is_ok());
        h.region = "r".repeat(64);
        assert!(matches!(hello_filter(&h), Err(InvalidHello::Region(_))));
        h.node_id.clear();
        assert!(matches!(hello_filter(&h), Err(InvalidHello::NodeId(_))));
    }
}
