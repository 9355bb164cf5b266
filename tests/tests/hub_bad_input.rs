//! SPEC §4 over real sockets: every bad input gets its answer, nothing of a
//! rejected call is applied, and the hub keeps serving everyone else.

use freshness::pb;
use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind;
use freshness_tests::{NodeCursor, RawNode, TestHub, connect, hello, publish_request, test_config};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

mod raw;

fn total_head(s: &pb::StatusResponse) -> u64 {
    s.shards.iter().map(|s| s.head_seq).sum()
}

async fn assert_publish_fails(hub: &TestHub, req: pb::PublishRequest, code: Code, contains: &str) {
    let before = total_head(&hub.status().await);
    let err = hub.client().await.publish(req).await.unwrap_err();
    assert_eq!(err.code(), code, "{err:?}");
    assert!(
        err.message().contains(contains),
        "message {:?} should contain {contains:?}",
        err.message()
    );
    assert_eq!(
        total_head(&hub.status().await),
        before,
        "nothing of a rejected call is applied"
    );
}

#[tokio::test]
async fn malformed_events_are_rejected_whole_naming_index_and_field() {
    let hub = TestHub::start().await;
    let ok = ("user:1", 1);
    assert_publish_fails(
        &hub,
        publish_request(&[ok, ("User:2", 1)]),
        Code::InvalidArgument,
        "event 1: field `entity`",
    )
    .await;
    assert_publish_fails(
        &hub,
        publish_request(&[ok, ok, ("user:", 1)]),
        Code::InvalidArgument,
        "event 2: field `entity`: entity id",
    )
    .await;
    assert_publish_fails(
        &hub,
        publish_request(&[("nocolon", 1)]),
        Code::InvalidArgument,
        "event 0: field `entity`",
    )
    .await;
    assert_publish_fails(
        &hub,
        publish_request(&[ok, ("user:3", 0)]),
        Code::InvalidArgument,
        "event 1: field `version`",
    )
    .await;
    let long = format!("user:{}", "x".repeat(600));
    assert_publish_fails(
        &hub,
        publish_request(&[(long.as_str(), 1)]),
        Code::InvalidArgument,
        "more than the limit of 512",
    )
    .await;
    let mut big = publish_request(&[ok, ("user:4", 1)]);
    big.events[1].payload = vec![7u8; 64 * 1024 + 1].into();
    assert_publish_fails(&hub, big, Code::InvalidArgument, "event 1: field `payload`").await;
    assert_publish_fails(
        &hub,
        publish_request(&[]),
        Code::InvalidArgument,
        "no events",
    )
    .await;
}

#[tokio::test]
async fn more_than_ten_thousand_events_are_rejected() {
    let hub = TestHub::start().await;
    let names: Vec<String> = (0..10_001).map(|i| format!("user:{i}")).collect();
    let events: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    assert_publish_fails(
        &hub,
        publish_request(&events),
        Code::InvalidArgument,
        "10001 events",
    )
    .await;
    // Exactly the limit is fine.
    let resp = hub
        .client()
        .await
        .publish(publish_request(&events[..10_000]))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().results.len(), 10_000);
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted_and_the_hub_keeps_serving() {
    let mut config = test_config();
    config.max_message_bytes = 256 * 1024;
    let hub = TestHub::start_with(config).await;
    let mut req = publish_request(&[
        ("user:1", 1),
        ("user:2", 1),
        ("user:3", 1),
        ("user:4", 1),
        ("user:5", 1),
    ]);
    for e in &mut req.events {
        e.payload = vec![1u8; 60 * 1024].into();
    }
    let err = hub.client().await.publish(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let ok = hub
        .client()
        .await
        .publish(publish_request(&[("user:1", 1)]))
        .await;
    assert!(ok.is_ok(), "hub still serves: {ok:?}");
}

#[tokio::test]
async fn a_stream_must_open_with_exactly_one_hello() {
    let hub = TestHub::start().await;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();

    // First message an ack.
    let mut client = connect(&hub.url()).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        kind: Some(ReqKind::Ack(pb::Ack::default())),
    })
    .await
    .unwrap();
    let err = client.subscribe(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("must be a hello"));

    // A second hello.
    let mut node = RawNode::connect(&hub.url(), hello("twice", &[], None))
        .await
        .unwrap();
    node.tx
        .send(pb::SubscribeRequest {
            kind: Some(ReqKind::Hello(hello("twice", &[], None))),
        })
        .await
        .unwrap();
    let err = loop {
        match node.next().await {
            Err(e) => break e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("closed without a status"),
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // A bad hello.
    let err = RawNode::connect(&hub.url(), hello("", &[], None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node_id"), "{err:?}");
    let err = RawNode::connect(&hub.url(), hello("n", &["Bad NS"], None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The bystander is unaffected and still gets events.
    let mut cursor = NodeCursor::from_welcome(&bystander.welcome);
    hub.client()
        .await
        .publish(publish_request(&[("user:9", 9)]))
        .await
        .unwrap();
    loop {
        let msg = bystander.expect().await;
        cursor.apply(&msg);
        if let Kind::Events(b) = msg {
            assert_eq!(b.events[0].event.as_ref().unwrap().entity, "user:9");
            break;
        }
    }
}

async fn expect_closed_with(node: &mut RawNode, code: Code, contains: &str) {
    let err = loop {
        match node.next().await {
            Err(e) => break e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("closed without a status"),
        }
    };
    assert_eq!(err.code(), code, "{err:?}");
    assert!(
        err.message().contains(contains),
        "{:?} should contain {contains:?}",
        err.message()
    );
}

#[tokio::test]
async fn acks_beyond_what_was_sent_or_for_another_epoch_close_the_stream() {
    let hub = TestHub::start().await;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();

    let mut node = RawNode::connect(&hub.url(), hello("greedy", &[], None))
        .await
        .unwrap();
    let mut c = node.welcome.cursor.clone().unwrap();
    c.seqs[3] += 1;
    node.ack(c).await;
    expect_closed_with(&mut node, Code::InvalidArgument, "ack beyond what was sent").await;

    let mut node = RawNode::connect(&hub.url(), hello("confused", &[], None))
        .await
        .unwrap();
    let mut c = node.welcome.cursor.clone().unwrap();
    c.epoch ^= 1;
    node.ack(c).await;
    expect_closed_with(&mut node, Code::InvalidArgument, "epoch").await;

    let mut node = RawNode::connect(&hub.url(), hello("short", &[], None))
        .await
        .unwrap();
    node.ack(pb::Cursor {
        epoch: node.welcome.epoch,
        seqs: vec![0; 3],
    })
    .await;
    expect_closed_with(&mut node, Code::InvalidArgument, "shards").await;

    // A resume cursor ahead of the hub is refused at hello.
    let mut ahead = bystander.welcome.cursor.clone().unwrap();
    ahead.seqs[0] = 99;
    let err = RawNode::connect(&hub.url(), hello("ahead", &[], Some(ahead)))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The bystander still works.
    match bystander.expect().await {
        Kind::Progress(_) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_hello_whose_region_is_not_a_region_name_is_refused() {
    let hub = TestHub::start().await;
    // The hub would keep the region as long as the stream lasts: a megabyte
    // of it per stream was held until the stream ended. A megabyte is now
    // over the limit of a subscribe message; what fits must be a region name.
    for region in ["r".repeat(64 << 10), "Not A Region".to_owned()] {
        let mut h = hello("n", &[], None);
        h.region = region;
        let err = RawNode::connect(&hub.url(), h).await.err().unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("field `region`"), "{err:?}");
    }
    let mut h = hello("n", &[], None);
    h.region = "r".repeat(1 << 20);
    let err = RawNode::connect(&hub.url(), h).await.err().unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let mut h = hello("n", &[], None);
    h.region = "eu-west".into();
    RawNode::connect(&hub.url(), h).await.unwrap();
}

#[tokio::test]
async fn a_subscriber_with_another_shard_count_is_refused() {
    let hub = TestHub::start().await;
    let mut h = hello("n", &[], None);
    h.shard_count = 32;
    let err = RawNode::connect(&hub.url(), h).await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("shard count"));
}

#[tokio::test]
async fn a_full_hub_refuses_publishes_with_a_retry_hint_and_applies_nothing_of_them() {
    let mut config = test_config();
    config.shards = 1;
    config.shard_queue = 1;
    config.admission_timeout = std::time::Duration::from_millis(1);
    let hub = TestHub::start_with(config).await;
    // Flood one shard from many concurrent callers with large batches.
    let mut calls = Vec::new();
    for c in 0..64 {
        let url = hub.url();
        calls.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            let names: Vec<String> = (0..2_000).map(|i| format!("user:{c}-{i}")).collect();
            let evs: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
            client.publish(publish_request(&evs)).await
        }));
    }
    let mut refused = 0;
    let mut applied_calls = 0u64;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => applied_calls += 1,
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::ResourceExhausted),
                    "{e:?}"
                );
                assert!(e.metadata().get("retry-after-ms").is_some(), "retry hint");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "a queue of one must refuse some of 64 concurrent calls"
    );
    // All or nothing: the head equals the events of the accepted calls.
    let status = hub.status().await;
    assert_eq!(total_head(&status), applied_calls * 2_000);
}

#[tokio::test]
async fn garbage_bodies_are_invalid_argument_at_every_door_and_the_hub_keeps_serving() {
    let hub = TestHub::start().await;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();
    let channel = hub.channel().await;
    let garbage = [
        vec![0xff; 64],
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        b"not protobuf at all".to_vec(),
    ];
    // A body that does not decode is the client's fault, never INTERNAL.
    for body in &garbage {
        for path in [raw::PUBLISH, raw::STATUS] {
            let err = raw::unary(&channel, path, body.clone()).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
        }
        // As the first message of a stream.
        let (_tx, opened) = raw::subscribe(&channel, Some(body.clone())).await;
        let err = opened.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "first message: {err:?}");
        // After a good hello.
        let h = pb::SubscribeRequest {
            kind: Some(ReqKind::Hello(hello("garbled", &[], None))),
        };
        let (tx, opened) = raw::subscribe(&channel, Some(h.encode_to_vec())).await;
        let mut stream = opened.unwrap();
        assert!(stream.message().await.unwrap().is_some(), "welcome");
        tx.send(body.clone()).await.unwrap();
        let err = loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("closed without a status"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), Code::InvalidArgument, "after hello: {err:?}");
    }
    let ok = hub
        .client()
        .await
        .publish(publish_request(&[("user:1", 1)]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(
        total_head(&hub.status().await),
        1,
        "nothing of the garbage was applied"
    );
    let mut cursor = NodeCursor::from_welcome(&bystander.welcome);
    loop {
        let msg = bystander.expect().await;
        cursor.apply(&msg);
        if let Kind::Events(b) = msg {
            assert_eq!(b.events[0].event.as_ref().unwrap().entity, "user:1");
            break;
        }
    }
}

#[tokio::test]
async fn a_stream_that_ends_before_its_hello_is_failed_precondition() {
    let hub = TestHub::start().await;
    let (_tx, opened) = raw::subscribe(&hub.channel().await, None).await;
    let err = opened.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("before its hello"), "{err:?}");
}

#[tokio::test]
async fn a_full_registry_refuses_new_streams_and_admits_again_when_one_leaves() {
    let mut config = test_config();
    config.max_nodes = 2;
    let hub = TestHub::start_with(config).await;
    let mut first = RawNode::connect(&hub.url(), hello("one", &[], None))
        .await
        .unwrap();
    let second = RawNode::connect(&hub.url(), hello("two", &[], None))
        .await
        .unwrap();
    let err = RawNode::connect(&hub.url(), hello("three", &[], None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.metadata().get("retry-after-ms").is_some(), "retry hint");
    // A node already connected may still replace its own stream.
    let mut again = RawNode::connect(&hub.url(), hello("one", &[], None))
        .await
        .unwrap();
    match first.next_non_progress().await {
        Kind::Goodbye(g) => assert_eq!(g.reason, pb::GoodbyeReason::Replaced as i32),
        other => panic!("{other:?}"),
    }
    // The refused stream took no place: once one leaves, a new one fits.
    drop(second);
    let mut third = freshness_tests::wait_for(|| async {
        RawNode::connect(&hub.url(), hello("three", &[], None))
            .await
            .ok()
    })
    .await;
    let ids: Vec<String> = hub
        .status()
        .await
        .nodes
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(ids, ["one", "three"]);
    // Both are served.
    hub.client()
        .await
        .publish(publish_request(&[("user:1", 1)]))
        .await
        .unwrap();
    for node in [&mut again, &mut third] {
        assert!(matches!(node.next_non_progress().await, Kind::Events(_)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_opened_and_dropped_leave_nothing_behind() {
    let hub = TestHub::start().await;
    let client = hub.client().await;
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..50 {
        let mut client = client.clone();
        let opened = opened.clone();
        workers.push(tokio::spawn(async move {
            for i in 0..200 {
                let (tx, rx) = mpsc::channel(1);
                tx.send(pb::SubscribeRequest {
                    kind: Some(ReqKind::Hello(hello(&format!("churn-{w}-{i}"), &[], None))),
                })
                .await
                .unwrap();
                let mut stream = client
                    .subscribe(ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                // Read the welcome, then drop both halves.
                let first = stream.message().await.unwrap().unwrap();
                assert!(matches!(first.kind, Some(Kind::Welcome(_))));
                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(opened.load(std::sync::atomic::Ordering::Relaxed), 10_000);
    // Every session noticed its stream went away and left the registry.
    freshness_tests::wait_for(|| async { hub.status().await.nodes.is_empty().then_some(()) }).await;
    let ok = hub
        .client()
        .await
        .publish(publish_request(&[("user:1", 1)]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}
