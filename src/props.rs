//! Property tests of the decoding and validation boundary: whatever bytes or
//! messages arrive, decoding and validation never panic, and what they
//! accept is valid by construction.

use crate::validate::{self, InvalidPublish, PublishLimits};
use crate::{Cursor, Entity, pb, shard};
use proptest::prelude::*;
use prost::Message;

fn any_event() -> impl Strategy<Value = pb::Event> {
    (
        prop_oneof![
            "[a-z0-9][a-z0-9_.-]{0,8}:[^\\x00-\\x1f]{1,12}",
            any::<String>(),
            Just(String::new()),
        ],
        prop_oneof![Just(0u64), 1u64..5, any::<u64>()],
        proptest::collection::vec(any::<u8>(), 0..64),
        prop_oneof![Just(String::new()), any::<String>()],
    )
        .prop_map(|(entity, version, payload, traceparent)| pb::Event {
            entity,
            version,
            payload: payload.into(),
            traceparent,
            ..Default::default()
        })
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
        let _ = pb::SubscribeResponse::decode(bytes.as_slice());
    }

    #[test]
    fn validation_accepts_only_valid_events_and_names_the_first_bad_one(
        events in proptest::collection::vec(any_event(), 0..20),
        ack in -1i32..5,
    ) {
        let req = pb::PublishRequest { events: events.clone(), ack, timeout_ms: 0 };
        match validate::publish(req, PublishLimits::default()) {
            Ok(v) => {
                prop_assert_eq!(v.events.len(), events.len());
                for (e, raw) in v.events.iter().zip(&events) {
                    prop_assert_eq!(e.entity.as_str(), raw.entity.as_str());
                    prop_assert!(e.version.get() >= 1);
                    prop_assert_eq!(e.entity.shard(64), shard(&raw.entity, 64));
                }
            }
            Err(InvalidPublish::Event { index, field, .. }) => {
                prop_assert!(index < events.len());
                // Every event before the named one is valid.
                for raw in &events[..index] {
                    prop_assert!(Entity::parse(&raw.entity).is_ok() && raw.version >= 1);
                }
                let bad = &events[index];
                let entity_bad = Entity::parse(&bad.entity).is_err();
                prop_assert!(match field {
                    "entity" => entity_bad,
                    "version" => !entity_bad && bad.version == 0,
                    "traceparent" | "tracestate" | "payload" => !entity_bad && bad.version >= 1,
                    _ => false,
                }, "field {} for {:?}", field, bad);
            }
            Err(InvalidPublish::Empty { .. }) => prop_assert!(events.is_empty()),
            Err(InvalidPublish::AckLevel(a)) => prop_assert!(!(0..=3).contains(&a)),
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
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
