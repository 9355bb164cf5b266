//! The hub's protocol over real sockets: delivery, order, versions,
//! watermarks, flow control, resume, replacement and shutdown (SPEC G1–G5,
//! §3.1, §3.2).

use std::collections::HashMap;

use freshness::pb::subscribe_response::Kind;
use freshness::pb::{self, PublishOutcome};
use freshness_tests::{NodeCursor, RawNode, TestHub, hello, publish_request, test_config};

fn outcomes(resp: &pb::PublishResponse) -> Vec<PublishOutcome> {
    resp.results
        .iter()
        .map(|r| PublishOutcome::try_from(r.outcome).expect("known outcome"))
        .collect()
}

/// Reads messages, acking each, until `want` events arrived; returns them.
async fn receive(
    node: &mut RawNode,
    cursor: &mut NodeCursor,
    want: usize,
) -> Vec<pb::DeliveredEvent> {
    let mut got = Vec::new();
    while got.len() < want {
        let msg = node.expect().await;
        cursor.apply(&msg);
        match &msg {
            Kind::Events(b) => got.extend(b.events.iter().cloned()),
            Kind::Reset(r) => panic!("unexpected reset {r:?}"),
            _ => {}
        }
        node.ack(cursor.cursor.clone()).await;
    }
    got
}

/// A node subscribed to everything, with its cursor at the welcome.
async fn subscribed(hub: &TestHub, node_id: &str) -> (RawNode, NodeCursor) {
    let node = RawNode::connect(&hub.url(), hello(node_id, &[], None))
        .await
        .unwrap();
    let cursor = NodeCursor::from_welcome(&node.welcome);
    (node, cursor)
}

/// Skips progress until a goodbye, which must carry `reason`.
async fn expect_goodbye(node: &mut RawNode, reason: pb::GoodbyeReason) {
    loop {
        match node.next().await {
            Ok(Some(Kind::Goodbye(g))) => {
                assert_eq!(g.reason, reason as i32);
                return;
            }
            Ok(Some(Kind::Progress(_))) => {}
            other => panic!("expected goodbye, got {other:?}"),
        }
    }
}

fn entity_version(e: &pb::DeliveredEvent) -> (String, u64) {
    let ev = e.event.as_ref().expect("event body");
    (ev.entity.clone(), ev.version)
}

#[tokio::test]
async fn g1_every_accepted_event_reaches_a_subscribed_node() {
    let hub = TestHub::start().await;
    let (mut node, mut cursor) = subscribed(&hub, "n1").await;
    let mut client = hub.client().await;
    let mut want = Vec::new();
    for batch in 0..20 {
        let events: Vec<(String, u64)> = (0..50)
            .map(|i| (format!("user:{}", batch * 50 + i), 1))
            .collect();
        let refs: Vec<(&str, u64)> = events.iter().map(|(e, v)| (e.as_str(), *v)).collect();
        let resp = client
            .publish(publish_request(&refs))
            .await
            .unwrap()
            .into_inner();
        assert!(
            outcomes(&resp)
                .iter()
                .all(|o| *o == PublishOutcome::Applied)
        );
        want.extend(events);
    }
    let got = receive(&mut node, &mut cursor, want.len()).await;
    let mut got: Vec<(String, u64)> = got.iter().map(entity_version).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every event exactly once on a healthy stream");
    // Events carry the hub's stamps.
    hub.stop().await;
}

#[tokio::test]
async fn events_carry_shard_seq_origin_and_publish_time() {
    let hub = TestHub::start().await;
    let (mut node, mut cursor) = subscribed(&hub, "n1").await;
    assert_eq!(node.welcome.hash, "fnv1a64");
    assert_eq!(node.welcome.shard_count, 64);
    let resp = hub
        .client()
        .await
        .publish(publish_request(&[("user:42", 7)]))
        .await
        .unwrap()
        .into_inner();
    let got = receive(&mut node, &mut cursor, 1).await;
    let e = &got[0];
    assert_eq!(e.shard, freshness::shard("user:42", 64).0);
    assert_eq!(
        (e.shard, e.seq),
        (resp.results[0].shard, resp.results[0].seq)
    );
    let ev = e.event.as_ref().unwrap();
    assert_eq!(ev.origin, "local");
    assert!(ev.publish_time_us > 0);
    assert_eq!(resp.epoch, node.welcome.epoch);
}

#[tokio::test]
async fn g2_many_nodes_and_writers_see_versions_in_order_and_end_on_the_latest() {
    let hub = TestHub::start().await;
    let entities: Vec<String> = (0..40).map(|i| format!("post:{i}")).collect();
    let mut nodes = Vec::new();
    for i in 0..50 {
        let node = RawNode::connect(&hub.url(), hello(&format!("node-{i}"), &[], None))
            .await
            .unwrap();
        nodes.push(node);
    }
    // Three writers publish overlapping entities with interleaved versions:
    // writer w publishes versions v ≡ w (mod 3), so each sees SUPERSEDED at times.
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let url = hub.url();
        let entities = entities.clone();
        writers.push(tokio::spawn(async move {
            let mut client = freshness_tests::connect(&url).await;
            for round in 0..30u64 {
                let v = round * 3 + w + 1;
                let evs: Vec<(&str, u64)> = entities.iter().map(|e| (e.as_str(), v)).collect();
                client.publish(publish_request(&evs)).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // The newest version of every entity is 90 (round 29, writer 2).
    let mut checks = Vec::new();
    for mut node in nodes {
        checks.push(tokio::spawn(async move {
            let mut cursor = NodeCursor::from_welcome(&node.welcome);
            let mut latest: HashMap<String, u64> = HashMap::new();
            while latest.len() < 40 || latest.values().any(|v| *v != 90) {
                let msg = node.expect().await;
                cursor.apply(&msg);
                if let Kind::Events(b) = &msg {
                    for e in &b.events {
                        let (entity, version) = entity_version(e);
                        let prev = latest.insert(entity.clone(), version).unwrap_or(0);
                        assert!(version > prev, "{entity}: version {version} after {prev}");
                    }
                }
                node.ack(cursor.cursor.clone()).await;
            }
        }));
    }
    for c in checks {
        c.await.unwrap();
    }
}

#[tokio::test]
async fn g3_older_and_equal_versions_are_never_fanned_out() {
    let hub = TestHub::start().await;
    let (mut node, mut cursor) = subscribed(&hub, "n1").await;
    let mut client = hub.client().await;
    let r = client
        .publish(publish_request(&[("user:1", 5)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&r), vec![PublishOutcome::Applied]);
    let r = client
        .publish(publish_request(&[
            ("user:1", 3),
            ("user:1", 5),
            ("user:2", 1),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        outcomes(&r),
        vec![
            PublishOutcome::Superseded,
            PublishOutcome::Duplicate,
            PublishOutcome::Applied
        ]
    );
    assert_eq!(r.results[0].current_version, 5);
    let got = receive(&mut node, &mut cursor, 2).await;
    let got: Vec<(String, u64)> = got.iter().map(entity_version).collect();
    assert_eq!(got.len(), 2);
    assert!(got.contains(&("user:1".into(), 5)) && got.contains(&("user:2".into(), 1)));
    // Nothing else arrives: the next thing on the stream is progress.
    let _ = hub
        .client()
        .await
        .publish(publish_request(&[("user:3", 1)]))
        .await
        .unwrap();
    let got = receive(&mut node, &mut cursor, 1).await;
    assert_eq!(entity_version(&got[0]), ("user:3".into(), 1));
}

#[tokio::test]
async fn g4_watermark_advances_while_idle() {
    let mut config = test_config();
    config.progress_interval = std::time::Duration::from_millis(20);
    let hub = TestHub::start_with(config).await;
    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], None))
        .await
        .unwrap();
    let mut last = 0;
    for _ in 0..5 {
        match node.expect().await {
            Kind::Progress(p) => {
                assert!(p.watermark_us > last, "watermark must advance");
                last = p.watermark_us;
                assert_eq!(p.cursor.unwrap().epoch, node.welcome.epoch);
            }
            other => panic!("idle stream got {other:?}"),
        }
    }
    let status = hub.status().await;
    assert_eq!(status.nodes.len(), 1);
    assert_eq!(status.nodes[0].node_id, "n1");
}

#[tokio::test]
async fn namespace_filter_delivers_only_matching_events() {
    let hub = TestHub::start().await;
    let mut node = RawNode::connect(&hub.url(), hello("n1", &["post"], None))
        .await
        .unwrap();
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    let mut client = hub.client().await;
    client
        .publish(publish_request(&[
            ("user:1", 1),
            ("post:1", 1),
            ("user:2", 1),
            ("post:2", 1),
        ]))
        .await
        .unwrap();
    let mut got: Vec<String> = receive(&mut node, &mut cursor, 2)
        .await
        .iter()
        .map(|e| entity_version(e).0)
        .collect();
    got.sort();
    assert_eq!(got, vec!["post:1", "post:2"]);
    // The progress cursor covers the skipped user:* events too.
    loop {
        if let Kind::Progress(p) = node.expect().await {
            let c = p.cursor.unwrap();
            assert_eq!(c.seqs.iter().sum::<u64>(), 4);
            break;
        }
    }
}

#[tokio::test]
async fn g5_a_node_that_never_acks_is_parked_at_its_in_flight_limit_then_reset() {
    let mut config = test_config();
    config.shards = 4;
    config.log_max_events = 400; // 100 per shard
    let hub = TestHub::start_with(config).await;
    let mut h = hello("stalled", &[], None);
    h.max_in_flight = 64;
    let mut node = RawNode::connect(&hub.url(), h).await.unwrap();
    let mut client = hub.client().await;
    for round in 0..10 {
        let events: Vec<(String, u64)> =
            (0..100).map(|i| (format!("user:{i}"), round + 1)).collect();
        let refs: Vec<(&str, u64)> = events.iter().map(|(e, v)| (e.as_str(), *v)).collect();
        client.publish(publish_request(&refs)).await.unwrap();
    }
    // Never ack: read what the hub sends until it resets us for being slow.
    let mut delivered = 0;
    let reset = loop {
        match node.expect().await {
            Kind::Events(b) => delivered += b.events.len(),
            Kind::Reset(r) => break r,
            _ => {}
        }
    };
    assert!(
        delivered <= 64,
        "in-flight limit exceeded: {delivered} unacked events sent"
    );
    assert_eq!(reset.reason, pb::ResetReason::SlowConsumer as i32);
    assert!(!reset.shards.is_empty());
    let status = hub.status().await;
    let n = &status.nodes[0];
    assert!(n.in_flight <= 64 && n.parked, "{n:?}");
    assert!(
        status.retained_events <= 400,
        "log bounded: {}",
        status.retained_events
    );
}

#[tokio::test]
async fn a_slow_node_that_acks_again_continues_after_its_reset() {
    let mut config = test_config();
    config.shards = 2;
    config.log_max_events = 20;
    let hub = TestHub::start_with(config).await;
    let mut h = hello("slow", &[], None);
    h.max_in_flight = 4;
    let mut node = RawNode::connect(&hub.url(), h).await.unwrap();
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    let mut client = hub.client().await;
    // 100 events per entity while the node reads nothing: it is parked after
    // 4 and the log (10 per shard) moves past it.
    for v in 1..=100 {
        client
            .publish(publish_request(&[("user:a", v), ("user:b", v)]))
            .await
            .unwrap();
    }
    let mut latest: HashMap<String, u64> = HashMap::new();
    loop {
        let msg = node.expect().await;
        cursor.apply(&msg);
        node.ack(cursor.cursor.clone()).await;
        match msg {
            Kind::Reset(r) => {
                assert_eq!(r.reason, pb::ResetReason::SlowConsumer as i32);
                break;
            }
            Kind::Events(b) => b.events.iter().map(entity_version).for_each(|(e, v)| {
                latest.insert(e, v);
            }),
            _ => {}
        }
    }
    // Acking again, the node catches up: resets and events until a progress
    // says it is at the head.
    loop {
        let msg = node.expect().await;
        cursor.apply(&msg);
        node.ack(cursor.cursor.clone()).await;
        if matches!(msg, Kind::Progress(_)) {
            break;
        }
    }
    // Now live: new versions arrive as events, in order, without resets.
    client
        .publish(publish_request(&[("user:a", 1000), ("user:b", 1000)]))
        .await
        .unwrap();
    let got = receive(&mut node, &mut cursor, 2).await;
    let mut got: Vec<(String, u64)> = got.iter().map(entity_version).collect();
    got.sort();
    assert_eq!(got, vec![("user:a".into(), 1000), ("user:b".into(), 1000)]);
    let status = hub.status().await;
    assert!(!status.nodes[0].parked);
}

#[tokio::test]
async fn resume_in_the_same_epoch_replays_what_was_missed() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    client
        .publish(publish_request(&[("user:1", 1)]))
        .await
        .unwrap();
    let node = RawNode::connect(&hub.url(), hello("n1", &[], None))
        .await
        .unwrap();
    let start = node.welcome.cursor.clone().unwrap();
    assert!(!node.welcome.resumed);
    drop(node);
    client
        .publish(publish_request(&[("user:2", 1), ("user:3", 1)]))
        .await
        .unwrap();
    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], Some(start.clone())))
        .await
        .unwrap();
    assert!(node.welcome.resumed);
    assert_eq!(node.welcome.cursor.as_ref(), Some(&start));
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    let mut got: Vec<String> = receive(&mut node, &mut cursor, 2)
        .await
        .iter()
        .map(|e| entity_version(e).0)
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec!["user:2", "user:3"],
        "replay without a reset, and not user:1"
    );
}

#[tokio::test]
async fn resume_past_the_retained_log_resets_exactly_the_expired_shards() {
    let mut config = test_config();
    config.shards = 4;
    config.log_max_events = 8; // 2 per shard
    let hub = TestHub::start_with(config).await;
    let node = RawNode::connect(&hub.url(), hello("n1", &[], None))
        .await
        .unwrap();
    let start = node.welcome.cursor.clone().unwrap();
    drop(node);
    // Find entities of shard 0 and shard 1; overflow shard 0 only.
    let of_shard = |s: u32| {
        (0..)
            .map(|i| format!("user:{i}"))
            .find(|e| freshness::shard(e, 4).0 == s)
            .unwrap()
    };
    let (e0, e1) = (of_shard(0), of_shard(1));
    let mut client = hub.client().await;
    for v in 1..=5 {
        client
            .publish(publish_request(&[(e0.as_str(), v)]))
            .await
            .unwrap();
    }
    client
        .publish(publish_request(&[(e1.as_str(), 1)]))
        .await
        .unwrap();
    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], Some(start)))
        .await
        .unwrap();
    assert!(node.welcome.resumed);
    match node.expect().await {
        Kind::Reset(r) => {
            assert_eq!(r.reason, pb::ResetReason::CursorExpired as i32);
            assert_eq!(r.shards, vec![0]);
            assert!(!r.all);
            assert_eq!(r.cursor.unwrap().seqs[0], 5);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    cursor.cursor.seqs[0] = 5;
    let got = receive(&mut node, &mut cursor, 1).await;
    assert_eq!(entity_version(&got[0]), (e1, 1), "shard 1 replayed");
}

#[tokio::test]
async fn resume_from_another_epoch_resets_everything() {
    let hub = TestHub::start().await;
    let addr = hub.addr;
    let node = RawNode::connect(&hub.url(), hello("n1", &[], None))
        .await
        .unwrap();
    let old = node.welcome.cursor.clone().unwrap();
    drop(node);
    hub.stop().await;
    let hub = TestHub::start_on(addr, test_config()).await;
    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], Some(old.clone())))
        .await
        .unwrap();
    assert!(!node.welcome.resumed);
    assert_ne!(node.welcome.epoch, old.epoch);
    match node.expect().await {
        Kind::Reset(r) => {
            assert_eq!(r.reason, pb::ResetReason::EpochChanged as i32);
            assert!(r.all);
            assert_eq!(r.cursor.unwrap().epoch, node.welcome.epoch);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[tokio::test]
async fn a_second_stream_with_the_same_node_id_replaces_the_first() {
    let hub = TestHub::start().await;
    let mut first = RawNode::connect(&hub.url(), hello("same", &[], None))
        .await
        .unwrap();
    let _second = RawNode::connect(&hub.url(), hello("same", &[], None))
        .await
        .unwrap();
    expect_goodbye(&mut first, pb::GoodbyeReason::Replaced).await;
    assert!(
        matches!(first.next().await, Ok(None)),
        "stream closed after goodbye"
    );
    let status = hub.status().await;
    assert_eq!(status.nodes.len(), 1);
}

#[tokio::test]
async fn shutdown_says_goodbye_to_every_stream() {
    let hub = TestHub::start().await;
    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], None))
        .await
        .unwrap();
    let stopping = tokio::spawn(hub.stop());
    expect_goodbye(&mut node, pb::GoodbyeReason::Shutdown).await;
    stopping.await.unwrap();
}

#[tokio::test]
async fn region_ack_waits_for_matching_nodes_and_names_the_laggards() {
    let hub = TestHub::start().await;
    // An acking node for `user`, a silent node for `user`, a `post` node.
    let mut acker = RawNode::connect(&hub.url(), hello("acker", &["user"], None))
        .await
        .unwrap();
    let _silent = RawNode::connect(&hub.url(), hello("silent", &["user"], None))
        .await
        .unwrap();
    let _other = RawNode::connect(&hub.url(), hello("other-ns", &["post"], None))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut cursor = NodeCursor::from_welcome(&acker.welcome);
        while let Ok(Some(msg)) = acker.next().await {
            cursor.apply(&msg);
            acker.ack(cursor.cursor.clone()).await;
        }
    });
    let mut req = publish_request(&[("user:1", 1)]);
    req.ack = pb::AckLevel::Region as i32;
    req.timeout_ms = 300;
    let resp = hub.client().await.publish(req).await.unwrap().into_inner();
    assert!(!resp.complete);
    assert_eq!(
        resp.pending_nodes,
        vec!["silent"],
        "only the matching node that did not ack"
    );
    assert_eq!(outcomes(&resp), vec![PublishOutcome::Applied]);
}

#[tokio::test]
async fn region_ack_completes_when_every_matching_node_acked() {
    let hub = TestHub::start().await;
    for id in ["a", "b", "c"] {
        let mut node = RawNode::connect(&hub.url(), hello(id, &[], None))
            .await
            .unwrap();
        tokio::spawn(async move {
            let mut cursor = NodeCursor::from_welcome(&node.welcome);
            while let Ok(Some(msg)) = node.next().await {
                cursor.apply(&msg);
                node.ack(cursor.cursor.clone()).await;
            }
        });
    }
    let mut req = publish_request(&[("user:1", 1), ("post:9", 4)]);
    req.ack = pb::AckLevel::Region as i32;
    req.timeout_ms = 10_000;
    let resp = hub.client().await.publish(req).await.unwrap().into_inner();
    assert!(resp.complete, "{resp:?}");
    assert!(resp.pending_nodes.is_empty());
    // GLOBAL on a hub without peers says it behaved as REGION.
    let mut req = publish_request(&[("user:1", 2)]);
    req.ack = pb::AckLevel::Global as i32;
    let resp = hub.client().await.publish(req).await.unwrap().into_inner();
    assert!(resp.complete);
    assert_eq!(resp.applied_ack, pb::AckLevel::Region as i32);
    assert!(resp.note.contains("GLOBAL"));
}

#[tokio::test]
async fn a_cursor_of_another_epoch_is_reset_whatever_its_shard_count() {
    let hub = TestHub::start().await;
    let foreign = pb::Cursor {
        epoch: 12345,
        seqs: vec![7; 8],
    };
    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], Some(foreign)))
        .await
        .unwrap();
    match node.expect().await {
        Kind::Reset(r) => {
            assert_eq!(r.reason, pb::ResetReason::EpochChanged as i32);
            assert!(r.all);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// A call's headers larger than a connection's initial buffers (4 KiB to
/// write at the client, 1 KiB to read at the hub, `vendor/h2`) still go
/// through whole, under the hub's 16 KiB header-list limit.
#[tokio::test]
async fn headers_larger_than_a_connections_buffers_arrive_whole() {
    let hub = TestHub::start().await;
    let (mut node, mut cursor) = subscribed(&hub, "n1").await;
    let mut client = hub.client().await;
    let mut req = tonic::Request::new(publish_request(&[("user:big-headers", 3)]));
    // 12 KiB of characters that HPACK's Huffman code takes 5 to 7 bits
    // for: about 9 KiB on the wire, more than either buffer.
    let value: String = (0..12 * 1024)
        .map(|i| char::from(b"0123456789abcdefghijklmnopqrstuv"[(i * 7 + i / 32) % 32]))
        .collect();
    req.metadata_mut()
        .insert("x-caller-context", value.parse().unwrap());
    let resp = client.publish(req).await.unwrap().into_inner();
    assert_eq!(outcomes(&resp), vec![PublishOutcome::Applied]);
    let got = receive(&mut node, &mut cursor, 1).await;
    assert_eq!(
        got.iter().map(entity_version).collect::<Vec<_>>(),
        vec![("user:big-headers".to_string(), 3)]
    );
    hub.stop().await;
}

/// The next event batch, skipping progress.
async fn next_batch(node: &mut RawNode) -> pb::EventBatch {
    match node.next_non_progress().await {
        Kind::Events(b) => b,
        other => panic!("expected events, got {other:?}"),
    }
}

/// Acks on request: a batch asks for a prompt ack only when a REGION publish
/// waits on one of its events; the others may be acked lazily.
#[tokio::test]
async fn a_batch_asks_for_a_prompt_ack_only_when_a_publish_waits_on_it() {
    let hub = TestHub::start().await;
    let (mut node, mut cursor) = subscribed(&hub, "n1").await;
    assert!(node.welcome.acks_on_request);
    let mut client = hub.client().await;

    client
        .publish(publish_request(&[("user:1", 1)]))
        .await
        .unwrap();
    let b = next_batch(&mut node).await;
    assert_eq!(b.events.len(), 1);
    assert!(!b.ack_requested, "nobody waits on an ACCEPTED publish");
    cursor.apply(&Kind::Events(b));
    node.ack(cursor.cursor.clone()).await;

    let mut req = publish_request(&[("user:2", 1)]);
    req.ack = pb::AckLevel::Region as i32;
    req.timeout_ms = 10_000;
    let waiting = tokio::spawn(async move { client.publish(req).await.unwrap().into_inner() });
    let b = next_batch(&mut node).await;
    assert_eq!(entity_version(&b.events[0]), ("user:2".to_string(), 1));
    assert!(b.ack_requested, "a REGION publish waits on this batch");
    cursor.apply(&Kind::Events(b));
    node.ack(cursor.cursor.clone()).await;
    let resp = waiting.await.unwrap();
    assert!(resp.complete, "{resp:?}");
    hub.stop().await;
}

/// Lazy acks never park a node that keeps up: once a quarter of its
/// in-flight budget is unacked, every batch asks for a prompt ack.
#[tokio::test]
async fn a_batch_asks_for_a_prompt_ack_once_a_quarter_of_the_budget_is_unacked() {
    let hub = TestHub::start().await;
    let mut h = hello("n1", &[], None);
    h.max_in_flight = 8;
    let mut node = RawNode::connect(&hub.url(), h).await.unwrap();
    let mut client = hub.client().await;
    let mut requested = Vec::new();
    for i in 1..=3 {
        client
            .publish(publish_request(&[(&format!("user:{i}"), 1)]))
            .await
            .unwrap();
        // Not acked: the unacked events grow by one per batch.
        requested.push(next_batch(&mut node).await.ack_requested);
    }
    assert_eq!(requested, vec![false, true, true], "8 / 4 = 2 unacked");
    hub.stop().await;
}

/// A REGION publish refused because too many publishes already wait applies
/// nothing: the same event published again is applied, not a duplicate.
#[tokio::test]
async fn a_publish_refused_for_too_many_waiters_applies_nothing() {
    let mut config = test_config();
    config.max_ack_waiters = 1;
    let hub = TestHub::start_with(config).await;
    // A node that never acks keeps the first REGION publish waiting.
    let _silent = RawNode::connect(&hub.url(), hello("silent", &[], None))
        .await
        .unwrap();
    let mut first = publish_request(&[("user:1", 1)]);
    first.ack = pb::AckLevel::Region as i32;
    first.timeout_ms = 10_000;
    let mut client = hub.client().await;
    let waiting = tokio::spawn(async move { client.publish(first).await });
    freshness_tests::wait_for(|| async {
        let s = hub.status().await;
        (s.shards.iter().map(|sh| sh.head_seq).sum::<u64>() == 1).then_some(())
    })
    .await;
    let mut second = publish_request(&[("user:2", 1)]);
    second.ack = pb::AckLevel::Region as i32;
    let err = hub.client().await.publish(second).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("waiting for acks"), "{err:?}");
    let resp = hub
        .client()
        .await
        .publish(publish_request(&[("user:2", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&resp), vec![PublishOutcome::Applied]);
    waiting.abort();
    hub.stop().await;
}
