//! Property tests of the decoding and validation boundary: whatever bytes or
//! messages arrive, decoding and validation never panic, and what they
//! accept is valid by construction.
//!
//! The structured strategies below build every request message of the
//! protocol (`PublishRequest`, `SubscribeRequest` with each `kind`,
//! `StatusRequest`), including the fields only hubs set (`origin`,
//! `publish_time_us`, `Hello.replication`, `Ack.applied`), with values
//! biased towards the edges of each rule. Validation is checked against an
//! oracle written from SPEC §1 and §4 rather than from the code: it accepts
//! exactly what the oracle accepts, hands back the same values, and rejects
//! the rest with the documented error naming the first bad index and field.

use std::time::Duration;

use crate::validate::{self, AckLevel, InvalidHello, InvalidPublish, PublishLimits};
use crate::wire::{BatchBuilder, encode_event_entry};
use crate::{Cursor, CursorError, Entity, pb, shard};
use proptest::prelude::*;
use prost::Message;

/// Namespaces as SPEC §1 words them: `[a-z0-9][a-z0-9_.-]{0,62}`.
fn oracle_namespace(ns: &str) -> bool {
    let b = ns.as_bytes();
    (1..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(c))
}

/// Entities as SPEC §1 words them: at most 512 bytes, no control characters,
/// a valid namespace before the first `:` and a non-empty id after it.
fn oracle_entity(e: &str) -> bool {
    e.len() <= 512
        && !e.chars().any(char::is_control)
        && e.split_once(':')
            .is_some_and(|(ns, id)| oracle_namespace(ns) && !id.is_empty())
}

/// W3C trace context fields: printable ASCII, at most 512 bytes.
fn oracle_trace(s: &str) -> bool {
    s.len() <= 512 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// What validation must answer for a publish, per SPEC §3.1 and §4.
fn oracle_publish(req: &pb::PublishRequest, limits: PublishLimits) -> Result<(), InvalidPublish> {
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
    if !(0..=3).contains(&req.ack) {
        return Err(InvalidPublish::AckLevel(req.ack));
    }
    if req.timeout_ms > 60_000 {
        return Err(InvalidPublish::Timeout(req.timeout_ms));
    }
    for (index, e) in req.events.iter().enumerate() {
        let bad = |field| {
            Err(InvalidPublish::Event {
                index,
                field,
                reason: String::new(),
            })
        };
        if !oracle_entity(&e.entity) {
            return bad("entity");
        }
        if e.version == 0 {
            return bad("version");
        }
        if e.payload.len() > limits.max_payload_bytes {
            return bad("payload");
        }
        if !oracle_trace(&e.traceparent) {
            return bad("traceparent");
        }
        if !oracle_trace(&e.tracestate) {
            return bad("tracestate");
        }
    }
    Ok(())
}

/// Same variant, and for event errors the same index and field (the reason
/// is prose).
fn same_error(got: &InvalidPublish, want: &InvalidPublish) -> bool {
    match (got, want) {
        (
            InvalidPublish::Event { index, field, .. },
            InvalidPublish::Event {
                index: i, field: f, ..
            },
        ) => index == i && field == f,
        _ => got == want,
    }
}

/// Text that is valid for the field in question, plausible but wrong, or
/// anything at all.
fn any_text(valid: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        24 => valid,
        2 => any::<String>(),
        1 => Just(String::new()),
        1 => "[a-z]{1,4}[\\x00-\\x1f\\x7f][a-z]{0,4}",
        1 => (600usize..700).prop_map(|n| "x".repeat(n)),
    ]
}

fn any_entity() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => "[a-z0-9][a-z0-9_.-]{0,8}:[^\\x00-\\x1f\\x7f-\\u{9f}]{1,12}",
        1 => "[a-z0-9]{63,64}:[a-z]{1,3}",
        1 => "[a-z]{1,4}:",
        1 => "[A-Z_][a-z]{0,4}:[a-z]{1,4}",
        1 => (505usize..515).prop_map(|n| format!("user:{}", "x".repeat(n - 5))),
        2 => any_text("[a-z]{1,6}"),
    ]
}

fn any_trace() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => Just(String::new()),
        20 => "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
        1 => "[ -~]{500,520}",
        1 => any::<String>(),
    ]
}

/// An event as a writer or a peer hub may send it, every field arbitrary.
fn any_event() -> impl Strategy<Value = pb::Event> {
    (
        any_entity(),
        prop_oneof![1 => Just(0u64), 10 => 1u64..5, 10 => any::<u64>()],
        any_text("[a-z]{1,8}"),
        any::<u64>(),
        prop_oneof![
            30 => 0usize..8,
            1 => Just(16),
            1 => Just(17),
            1 => Just(64 * 1024),
            1 => Just(64 * 1024 + 1)
        ],
        any_trace(),
        any_trace(),
    )
        .prop_map(
            |(entity, version, origin, publish_time_us, payload, traceparent, tracestate)| {
                pb::Event {
                    entity,
                    version,
                    origin,
                    publish_time_us,
                    payload: vec![0x5a; payload].into(),
                    traceparent,
                    tracestate,
                }
            },
        )
}

fn any_ack_level() -> impl Strategy<Value = i32> {
    prop_oneof![40 => 0i32..4, 1 => -2i32..8, 1 => any::<i32>()]
}

fn any_publish() -> impl Strategy<Value = pb::PublishRequest> {
    (
        prop_oneof![
            1 => Just(Vec::new()),
            20 => proptest::collection::vec(any_event(), 1..4),
            5 => proptest::collection::vec(any_event(), 4..12),
        ],
        any_ack_level(),
        prop_oneof![
            20 => Just(0u32),
            20 => 1u32..5_000,
            1 => Just(60_000),
            1 => Just(60_001),
            1 => any::<u32>()
        ],
    )
        .prop_map(|(events, ack, timeout_ms)| pb::PublishRequest {
            events,
            ack,
            timeout_ms,
        })
}

/// Limits small enough that arbitrary calls cross them.
fn any_limits() -> impl Strategy<Value = PublishLimits> {
    prop_oneof![
        3 => Just(PublishLimits::default()),
        1 => (1usize..12, 0usize..20).prop_map(|(max_events, max_payload_bytes)| PublishLimits {
            max_events,
            max_payload_bytes,
        }),
    ]
}

fn any_cursor() -> impl Strategy<Value = pb::Cursor> {
    (
        prop_oneof![Just(0u64), 1u64..4, any::<u64>()],
        prop_oneof![
            proptest::collection::vec(0u64..4, 0..6),
            proptest::collection::vec(prop_oneof![0u64..4, any::<u64>()], 64),
            proptest::collection::vec(any::<u64>(), 63..=65),
        ],
    )
        .prop_map(|(epoch, seqs)| pb::Cursor { epoch, seqs })
}

fn any_hello() -> impl Strategy<Value = pb::Hello> {
    (
        any_text("[a-z0-9/_-]{1,20}"),
        prop_oneof![
            8 => proptest::collection::vec(any_text("[a-z0-9][a-z0-9_.-]{0,8}"), 0..5),
            1 => proptest::collection::vec("[a-z]{1,3}", 1024..=1025),
        ],
        proptest::option::of(any_cursor()),
        any::<u32>(),
        any::<bool>(),
        prop_oneof![Just(0u32), Just(64), any::<u32>()],
        any_text("[a-z]{1,6}"),
    )
        .prop_map(
            |(node_id, namespaces, resume, max_in_flight, replication, shard_count, region)| {
                pb::Hello {
                    node_id,
                    namespaces,
                    resume,
                    max_in_flight,
                    replication,
                    shard_count,
                    region,
                }
            },
        )
}

fn any_ack() -> impl Strategy<Value = pb::Ack> {
    (
        proptest::option::of(any_cursor()),
        proptest::option::of(any_cursor()),
    )
        .prop_map(|(cursor, applied)| pb::Ack { cursor, applied })
}

fn any_subscribe() -> impl Strategy<Value = pb::SubscribeRequest> {
    use pb::subscribe_request::Kind;
    prop_oneof![
        1 => Just(pb::SubscribeRequest { kind: None }),
        3 => any_hello().prop_map(|h| pb::SubscribeRequest { kind: Some(Kind::Hello(h)) }),
        3 => any_ack().prop_map(|a| pb::SubscribeRequest { kind: Some(Kind::Ack(a)) }),
    ]
}

fn round_trips<M: Message + Default + PartialEq + std::fmt::Debug>(
    msg: &M,
) -> Result<(), TestCaseError> {
    let bytes = msg.encode_to_vec();
    prop_assert_eq!(bytes.len(), msg.encoded_len());
    let back = M::decode(bytes.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, msg);
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(req) = pb::PublishRequest::decode(bytes.as_slice()) {
            let _ = validate::publish(req, PublishLimits::default());
        }
        if let Ok(pb::SubscribeRequest { kind: Some(pb::subscribe_request::Kind::Hello(h)) }) =
            pb::SubscribeRequest::decode(bytes.as_slice())
        {
            let _ = validate::hello_filter(&h);
            if let Some(c) = &h.resume {
                let _ = Cursor::from_wire(c, 64);
            }
        }
        let _ = pb::StatusRequest::decode(bytes.as_slice());
        let _ = pb::SubscribeResponse::decode(bytes.as_slice());
    }

    #[test]
    fn every_request_message_round_trips(
        publish in any_publish(),
        subscribe in any_subscribe(),
    ) {
        round_trips(&publish)?;
        round_trips(&subscribe)?;
        round_trips(&pb::StatusRequest {})?;
    }

    #[test]
    fn publish_validation_agrees_with_the_spec(
        req in any_publish(),
        limits in any_limits(),
    ) {
        let want = oracle_publish(&req, limits);
        // Fields the hub sets itself (SPEC §3.1: origin, publish time) do not
        // change the answer.
        let mut stripped = req.clone();
        for e in &mut stripped.events {
            e.origin.clear();
            e.publish_time_us = 0;
        }
        let stripped = validate::publish(stripped, limits).map(|v| v.events.len());
        match validate::publish(req.clone(), limits) {
            Ok(v) => {
                prop_assert!(want.is_ok(), "accepted {:?}, the spec says {:?}", req, want);
                prop_assert_eq!(stripped, Ok(v.events.len()));
                prop_assert_eq!(v.events.len(), req.events.len());
                for (e, raw) in v.events.iter().zip(&req.events) {
                    prop_assert_eq!(e.entity.as_str(), raw.entity.as_str());
                    prop_assert_eq!(e.version.get(), raw.version);
                    prop_assert_eq!(&e.payload, &raw.payload);
                    prop_assert_eq!(&e.traceparent, &raw.traceparent);
                    prop_assert_eq!(&e.tracestate, &raw.tracestate);
                    prop_assert_eq!(e.entity.shard(64), shard(&raw.entity, 64));
                    let (ns, id) = raw.entity.split_once(':').unwrap_or_default();
                    prop_assert_eq!((e.entity.namespace(), e.entity.id()), (ns, id));
                }
                let ack = match req.ack {
                    0 | 1 => AckLevel::Accepted,
                    2 => AckLevel::Region,
                    _ => AckLevel::Global,
                };
                prop_assert_eq!(v.ack, ack);
                prop_assert_eq!(v.ack.to_wire() as i32, req.ack.max(1));
                let timeout = match req.timeout_ms {
                    0 => Duration::from_secs(2),
                    ms => Duration::from_millis(u64::from(ms)),
                };
                prop_assert_eq!(v.timeout, timeout);
            }
            Err(err) => {
                let Err(want) = want else {
                    return Err(TestCaseError::fail(format!("refused {req:?}: {err}")));
                };
                prop_assert!(same_error(&err, &want), "got {:?}, the spec says {:?}", err, want);
                prop_assert_eq!(stripped.map_err(|e| same_error(&e, &want)), Err(true));
                if let InvalidPublish::Event { index, field, .. } = &err {
                    let prefix = format!("event {index}: field `{field}`: ");
                    prop_assert!(err.to_string().starts_with(&prefix), "{}", err);
                }
            }
        }
    }

    #[test]
    fn hello_validation_agrees_with_the_spec(hello in any_hello()) {
        let id = &hello.node_id;
        let id_ok = !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control);
        let first_bad = hello.namespaces.iter().position(|ns| !oracle_namespace(ns));
        // A region is a region name, or absent (cache nodes).
        let region_ok = hello.region.is_empty() || oracle_namespace(&hello.region);
        match validate::hello_filter(&hello) {
            Ok(filter) => {
                prop_assert!(id_ok && region_ok);
                prop_assert!(hello.namespaces.len() <= 1024 && first_bad.is_none());
                let mut want = hello.namespaces.clone();
                want.sort();
                want.dedup();
                prop_assert_eq!(filter, want);
            }
            Err(InvalidHello::NodeId(_)) => prop_assert!(!id_ok),
            Err(InvalidHello::Region(_)) => prop_assert!(id_ok && !region_ok),
            Err(InvalidHello::TooManyNamespaces(n)) => {
                prop_assert!(id_ok && region_ok && n > 1024 && n == hello.namespaces.len());
            }
            Err(InvalidHello::Namespace { index, .. }) => {
                prop_assert!(id_ok && region_ok && hello.namespaces.len() <= 1024);
                prop_assert_eq!(Some(index), first_bad);
            }
        }
    }

    #[test]
    fn wire_cursors_are_checked_against_the_shard_count(
        c in any_cursor(),
        shards in prop_oneof![Just(64u32), 1u32..80],
    ) {
        match Cursor::from_wire(&c, shards) {
            Ok(cursor) => {
                prop_assert!(c.epoch != 0 && c.seqs.len() == shards as usize);
                prop_assert_eq!(cursor.to_wire(), c);
            }
            Err(CursorError::ZeroEpoch) => prop_assert_eq!(c.epoch, 0),
            Err(CursorError::ShardCount { got, want }) => {
                prop_assert!(c.epoch != 0);
                prop_assert_eq!((got, want), (c.seqs.len(), shards as usize));
            }
        }
    }

    #[test]
    fn encoded_once_batches_decode_as_the_events_they_carry(
        events in proptest::collection::vec((any::<u32>(), any::<u64>(), any_event()), 0..8),
        watermark_us in prop_oneof![Just(0u64), any::<u64>()],
        ack_requested in any::<bool>(),
    ) {
        let mut b = BatchBuilder::new();
        for (shard, seq, e) in &events {
            b.push(&encode_event_entry(*shard, *seq, e));
        }
        let frame = b.finish(watermark_us, ack_requested);
        let want = pb::SubscribeResponse {
            kind: Some(pb::subscribe_response::Kind::Events(pb::EventBatch {
                events: events
                    .into_iter()
                    .map(|(shard, seq, e)| pb::DeliveredEvent { shard, seq, event: Some(e) })
                    .collect(),
                watermark_us,
                ack_requested,
            })),
        };
        prop_assert_eq!(&frame.message()[..], &want.encode_to_vec()[..]);
        prop_assert_eq!(pb::SubscribeResponse::decode(frame.message()).ok(), Some(want));
        let grpc = frame.clone().into_grpc();
        prop_assert_eq!(&grpc[..5], &[&[0u8][..], &(frame.len() as u32).to_be_bytes()[..]].concat()[..]);
    }

    #[test]
    fn merged_cursors_dominate_both_sides(
        a in proptest::collection::vec(any::<u64>(), 8),
        b in proptest::collection::vec(any::<u64>(), 8),
    ) {
        let mut m = Cursor { epoch: 1, seqs: a.clone() };
        m.merge_max(&b);
        prop_assert!(m.dominates(&a) && m.dominates(&b));
        prop_assert!(m.seqs.iter().zip(a.iter().zip(&b)).all(|(x, (p, q))| x == p || x == q));
    }

    #[test]
    fn shard_is_always_in_range(entity in any::<String>(), shards in 1u32..100_000) {
        prop_assert!(shard(&entity, shards).0 < shards);
    }
}

#[test]
fn the_oracle_matches_entity_parsing_on_the_edges() {
    // The oracle is only worth its agreement if it is right on the edges the
    // spec names.
    for (e, ok) in [
        ("user:42", true),
        ("a.b-c_d:x:y", true),
        ("user:", false),
        (":1", false),
        ("User:1", false),
        ("_a:1", false),
        ("nocolon", false),
        ("user:4\n2", false),
        ("user:\u{85}", false),
    ] {
        assert_eq!(oracle_entity(e), ok, "{e:?}");
        assert_eq!(Entity::parse(e).is_ok(), ok, "{e:?}");
    }
    let long = format!("user:{}", "x".repeat(507));
    assert!(oracle_entity(&long) && Entity::parse(&long).is_ok());
    let longer = format!("{long}x");
    assert!(!oracle_entity(&longer) && Entity::parse(&longer).is_err());
}
