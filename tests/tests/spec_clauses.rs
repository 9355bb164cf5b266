//! The contract's clauses on hellos, subscribe message limits and REGION
//! waits (SPEC §3.1, §3.2.1, §4), one test per clause, named after it.

use std::time::Duration;

use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind;
use freshness::pb::{self, AckLevel};
use freshness_tests::{RawNode, TestHub, hello, publish_request, wait_for};
use tonic::Code;

/// A hello refused with `code`, its message naming `field`.
async fn refused(hub: &TestHub, h: pb::Hello, code: Code, field: &str) {
    let err = RawNode::connect(&hub.url(), h)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), code, "{err:?}");
    assert!(
        err.message().contains(field),
        "{:?} should name {field:?}",
        err.message()
    );
}

/// The node still gets what is published after the refusals.
async fn still_served(hub: &TestHub, node: &mut RawNode) {
    hub.client()
        .await
        .publish(publish_request(&[("user:served", 1)]))
        .await
        .unwrap();
    loop {
        if let Kind::Events(b) = node.expect().await {
            assert_eq!(b.events[0].event.as_ref().unwrap().entity, "user:served");
            return;
        }
    }
}

#[tokio::test]
async fn spec_3_2_1_node_id_is_1_to_256_bytes_without_control_characters() {
    let hub = TestHub::start().await;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();
    for bad in [
        String::new(),
        "n".repeat(257),
        "node\n1".to_owned(),
        "node\u{7f}".to_owned(),
    ] {
        refused(
            &hub,
            hello(&bad, &[], None),
            Code::InvalidArgument,
            "field `node_id`",
        )
        .await;
    }
    for good in ["n".to_owned(), "é".repeat(128), "node 1/eu-west".to_owned()] {
        assert!(good.len() <= 256);
        RawNode::connect(&hub.url(), hello(&good, &[], None))
            .await
            .unwrap_or_else(|e| panic!("{good:?} refused: {e:?}"));
    }
    still_served(&hub, &mut bystander).await;
}

#[tokio::test]
async fn spec_4_subscribe_streams_are_limited_to_what_a_hello_or_an_ack_of_s_shards_needs() {
    let hub = TestHub::start().await;
    let shards = hub.status().await.shard_count as usize;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();

    // The largest valid hello: a 256-byte node id, 1,024 namespaces of 63
    // bytes, a region and a resume cursor of S shards at the largest seqs
    // (of another epoch: reset, not refused).
    let namespaces: Vec<String> = (0..1024).map(|i| format!("{i:0>63}")).collect();
    let refs: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    let mut h = hello(
        &"n".repeat(256),
        &refs,
        Some(pb::Cursor {
            epoch: bystander.welcome.epoch ^ 1,
            seqs: vec![u64::MAX; shards],
        }),
    );
    h.region = "r".repeat(63);
    h.max_in_flight = u32::MAX;
    let mut big = RawNode::connect(&hub.url(), h).await.unwrap();
    match big.expect().await {
        Kind::Reset(r) => assert!(r.all),
        other => panic!("expected the epoch reset, got {other:?}"),
    }
    // An ack of S shards, with `applied`, at the largest seqs: decoded (and
    // refused for what it says, not for its size).
    big.tx
        .send(pb::SubscribeRequest {
            kind: Some(ReqKind::Ack(pb::Ack {
                cursor: Some(pb::Cursor {
                    epoch: big.welcome.epoch,
                    seqs: vec![u64::MAX; shards],
                }),
                applied: Some(pb::Cursor {
                    epoch: big.welcome.epoch,
                    seqs: vec![u64::MAX; shards],
                }),
            })),
        })
        .await
        .unwrap();
    let err = loop {
        match big.next().await {
            Err(e) => break e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("closed without a status"),
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // A message over the limit (256 KiB + 22 bytes per shard) is
    // RESOURCE_EXHAUSTED, well below the 4 MiB of a publish.
    let limit = 256 * 1024 + 22 * shards;
    let mut h = hello("too-big", &[], None);
    h.region = "r".repeat(limit + 1);
    refused(&hub, h, Code::ResourceExhausted, "").await;
    let mut node = RawNode::connect(&hub.url(), hello("acks-too-much", &[], None))
        .await
        .unwrap();
    node.ack(pb::Cursor {
        epoch: node.welcome.epoch,
        seqs: vec![0; limit],
    })
    .await;
    let err = loop {
        match node.next().await {
            Err(e) => break e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("closed without a status"),
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    still_served(&hub, &mut bystander).await;
}

#[tokio::test]
async fn spec_4_a_resume_cursor_with_the_wrong_shard_count_is_invalid_argument_naming_resume() {
    let hub = TestHub::start().await;
    let epoch = hub.status().await.epoch;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();
    for seqs in [vec![0; 63], vec![0; 65], Vec::new()] {
        refused(
            &hub,
            hello("n", &[], Some(pb::Cursor { epoch, seqs })),
            Code::InvalidArgument,
            "field `resume`",
        )
        .await;
    }
    still_served(&hub, &mut bystander).await;
}

#[tokio::test]
async fn spec_4_a_resume_cursor_ahead_of_the_hubs_head_is_invalid_argument_naming_resume() {
    let hub = TestHub::start().await;
    hub.client()
        .await
        .publish(publish_request(&[("user:1", 1)]))
        .await
        .unwrap();
    let status = hub.status().await;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();
    let mut seqs: Vec<u64> = status.shards.iter().map(|s| s.head_seq).collect();
    // At the head: accepted.
    RawNode::connect(
        &hub.url(),
        hello(
            "at-head",
            &[],
            Some(pb::Cursor {
                epoch: status.epoch,
                seqs: seqs.clone(),
            }),
        ),
    )
    .await
    .unwrap();
    // One past it on any shard: refused.
    seqs[5] += 1;
    refused(
        &hub,
        hello(
            "ahead",
            &[],
            Some(pb::Cursor {
                epoch: status.epoch,
                seqs,
            }),
        ),
        Code::InvalidArgument,
        "field `resume`",
    )
    .await;
    still_served(&hub, &mut bystander).await;
}

#[tokio::test]
async fn spec_4_a_malformed_namespace_in_a_filter_is_invalid_argument_naming_namespaces() {
    let hub = TestHub::start().await;
    let mut bystander = RawNode::connect(&hub.url(), hello("bystander", &[], None))
        .await
        .unwrap();
    for bad in ["User", "", "-user", "user:1", &"n".repeat(64)] {
        refused(
            &hub,
            hello("n", &["post", bad], None),
            Code::InvalidArgument,
            "field `namespaces[1]`",
        )
        .await;
    }
    still_served(&hub, &mut bystander).await;
}

#[tokio::test]
async fn spec_3_1_a_node_that_leaves_during_a_region_wait_stays_pending_until_the_timeout() {
    let hub = TestHub::start().await;
    let mut node = RawNode::connect(&hub.url(), hello("leaver", &[], None))
        .await
        .unwrap();
    // Longer than the node's delivery, leaving and being dropped from the
    // status take on a busy machine.
    let timeout = Duration::from_secs(5);
    let mut req = publish_request(&[("user:1", 1)]);
    req.ack = AckLevel::Region as i32;
    req.timeout_ms = timeout.as_millis() as u32;
    let mut client = hub.client().await;
    let started = tokio::time::Instant::now();
    let call = tokio::spawn(async move { client.publish(req).await });
    // The node receives the event, then leaves without acking it.
    loop {
        if let Kind::Events(_) = node.expect().await {
            break;
        }
    }
    drop(node);
    wait_for(|| async { hub.status().await.nodes.is_empty().then_some(()) }).await;
    assert!(!call.is_finished(), "the call ended when its node left");
    let resp = call.await.unwrap().unwrap().into_inner();
    assert!(
        started.elapsed() >= timeout,
        "answered before its timeout: {:?}",
        started.elapsed()
    );
    assert!(!resp.complete);
    assert_eq!(resp.pending_nodes, vec!["leaver".to_owned()]);
    assert_eq!(
        resp.results.len(),
        1,
        "the events were accepted all the same"
    );
}
