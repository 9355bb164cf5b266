//! Flow control over the raw protocol (SPEC §3.2.7): in flight is counted
//! per event, shard by shard, so an ack that covers part of a batch frees
//! that part; and Status tells each node's state (live, parked, blocked,
//! resetting) and since when.

use freshness::pb::subscribe_response::Kind;
use freshness::pb::{self, NodeState};
use freshness_tests::{
    NodeCursor, RawNode, TestHub, hello, publish_request, test_config, wait_for,
};

/// `n` entities of every shard of `shards`, distinct from `taken`.
fn entities_per_shard(shards: u32, n: usize, tag: &str) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); shards as usize];
    let mut i = 0;
    while out.iter().any(|v| v.len() < n) {
        let e = format!("user:{tag}{i}");
        let s = freshness::shard(&e, shards).index();
        if out[s].len() < n {
            out[s].push(e);
        }
        i += 1;
    }
    out
}

async fn publish_all(hub: &TestHub, entities: &[Vec<String>]) {
    let events: Vec<(&str, u64)> = entities.iter().flatten().map(|e| (e.as_str(), 1)).collect();
    hub.client()
        .await
        .publish(publish_request(&events))
        .await
        .unwrap();
}

/// A hub of 4 shards with `per_shard` events on each, and a node with
/// `max_in_flight` that resumes from before them: the replay reaches it as
/// one batch.
async fn one_batch(per_shard: usize, max_in_flight: u32) -> (TestHub, RawNode, NodeCursor) {
    let mut config = test_config();
    config.shards = 4;
    let hub = TestHub::start_with(config).await;
    publish_all(&hub, &entities_per_shard(4, per_shard, "a")).await;
    let epoch = hub.status().await.epoch;
    let mut h = hello(
        "partial",
        &[],
        Some(pb::Cursor {
            epoch,
            seqs: vec![0; 4],
        }),
    );
    h.max_in_flight = max_in_flight;
    let mut node = RawNode::connect(&hub.url(), h).await.unwrap();
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    let batch = match node.next_non_progress().await {
        Kind::Events(b) => b,
        other => panic!("expected the replay, got {other:?}"),
    };
    assert_eq!(batch.events.len(), 4 * per_shard, "the replay is one batch");
    cursor.apply(&Kind::Events(batch));
    (hub, node, cursor)
}

/// Waits until Status shows the node with this in-flight count.
async fn in_flight_becomes(hub: &TestHub, want: u32) -> pb::NodeStatus {
    wait_for(|| async {
        let status = hub.status().await;
        let n = status.nodes.into_iter().next()?;
        (n.in_flight == want).then_some(n)
    })
    .await
}

/// Reads events until `want` arrived; no ack.
async fn events(node: &mut RawNode, want: usize) -> Vec<pb::DeliveredEvent> {
    let mut got = Vec::new();
    while got.len() < want {
        match node.next_non_progress().await {
            Kind::Events(b) => got.extend(b.events),
            other => panic!("expected events, got {other:?}"),
        }
    }
    got
}

#[tokio::test]
async fn an_ack_of_half_the_shards_of_a_full_batch_frees_half_the_budget() {
    // 20 events, 5 per shard, as one batch to a node at max_in_flight 20.
    let (hub, mut node, cursor) = one_batch(5, 20).await;
    let parked = in_flight_becomes(&hub, 20).await;
    assert!(parked.parked);
    assert_eq!(parked.state, NodeState::Parked as i32);

    // The node applied shards 0 and 1: 10 events.
    let mut acked = cursor.cursor.clone();
    acked.seqs = vec![5, 5, 0, 0];
    node.ack(acked).await;
    let freed = in_flight_becomes(&hub, 10).await;
    assert!(!freed.parked, "{freed:?}");
    assert_eq!(freed.lag_events, 10);

    // 20 more: the 10 the budget now holds arrive, then the node is parked
    // at its real limit.
    publish_all(&hub, &entities_per_shard(4, 5, "b")).await;
    let got = events(&mut node, 10).await;
    assert_eq!(got.len(), 10);
    let parked = in_flight_becomes(&hub, 20).await;
    assert!(parked.parked);
    assert_eq!(parked.lag_events, 30);
    hub.stop().await;
}

#[tokio::test]
async fn an_ack_of_all_shards_but_one_leaves_only_that_shard_in_flight() {
    // 12 events, 3 per shard, acked on every shard but the last.
    let (hub, mut node, cursor) = one_batch(3, 12).await;
    in_flight_becomes(&hub, 12).await;
    let mut acked = cursor.cursor.clone();
    acked.seqs = vec![3, 3, 3, 0];
    node.ack(acked.clone()).await;
    let n = in_flight_becomes(&hub, 3).await;
    assert_eq!(n.lag_events, 3, "in flight and lag agree: {n:?}");
    assert!(!n.parked);
    assert_eq!(n.state, NodeState::Live as i32);

    // It keeps receiving: 9 more fit.
    publish_all(&hub, &entities_per_shard(4, 3, "b")).await;
    let got = events(&mut node, 9).await;
    assert_eq!(got.len(), 9);
    in_flight_becomes(&hub, 12).await;

    // Part of one shard's run, the first event of the last shard, frees
    // one event of budget: exactly one more arrives.
    acked.seqs[3] = 1;
    node.ack(acked).await;
    assert_eq!(events(&mut node, 1).await.len(), 1);
    let n = in_flight_becomes(&hub, 12).await;
    assert_eq!(n.lag_events, 24 - 10, "{n:?}");
    hub.stop().await;
}

#[tokio::test]
async fn a_node_that_stops_reading_shows_blocked_with_its_lag() {
    let hub = TestHub::start().await;
    let mut h = hello("deaf", &[], None);
    h.max_in_flight = 1_000;
    // Connects, reads its welcome, and never reads again.
    let node = RawNode::connect(&hub.url(), h).await.unwrap();
    let live = hub.status().await.nodes.remove(0);
    assert_eq!(live.state, NodeState::Live as i32, "{live:?}");
    // More than the client's receive windows and the hub's send buffer.
    let payload = bytes::Bytes::from(vec![7u8; 60 * 1024]);
    let mut client = hub.client().await;
    for call in 0..10 {
        let mut req = publish_request(&[]);
        req.events = (0..20)
            .map(|i| pb::Event {
                entity: format!("blob:{call}-{i}"),
                version: 1,
                payload: payload.clone(),
                ..Default::default()
            })
            .collect();
        client.publish(req).await.unwrap();
    }
    let blocked = wait_for(|| async {
        let n = hub.status().await.nodes.into_iter().next()?;
        (n.state == NodeState::Blocked as i32).then_some(n)
    })
    .await;
    assert!(!blocked.parked, "blocked, not parked: {blocked:?}");
    assert!(blocked.lag_events > 0, "{blocked:?}");
    assert!(blocked.state_since_us >= live.state_since_us);
    drop(node);
    hub.stop().await;
}
