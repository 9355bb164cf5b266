//! A hub restart on the same data directory keeps the epoch (SPEC §6): a
//! node that was connected resumes with no reset and gets exactly what it
//! missed, a publisher's retry is a `DUPLICATE`, an older version is
//! `SUPERSEDED`, and neither region of a replicating pair sees a
//! `REPLICATION_GAP` when one of the two hubs restarts.

use std::path::Path;

use freshness::pb;
use freshness::pb::subscribe_response::Kind;
use freshness_tests::{
    NodeCursor, RawNode, TestHub, WAIT, bind, hello, publish_request, test_config, wait_for,
};

fn durable(dir: &Path) -> freshness_hub::Config {
    let mut c = test_config();
    c.ephemeral = false;
    c.data_dir = dir.to_owned();
    c.shards = 8;
    c
}

async fn publish(hub: &TestHub, events: &[(&str, u64)]) -> Vec<pb::PublishOutcome> {
    hub.client()
        .await
        .publish(publish_request(events))
        .await
        .expect("publish")
        .into_inner()
        .results
        .iter()
        .map(|r| r.outcome())
        .collect()
}

/// Reads until the node's cursor reaches `heads`, returning the events (by
/// entity and version); any reset fails the test.
async fn read_until(
    node: &mut RawNode,
    cursor: &mut NodeCursor,
    heads: &[u64],
) -> Vec<(String, u64)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while cursor.cursor.seqs.iter().zip(heads).any(|(c, h)| c < h) {
        assert!(tokio::time::Instant::now() < deadline, "caught up in time");
        let msg = node.expect().await;
        if let Kind::Reset(r) = &msg {
            panic!("the node was reset: {r:?}");
        }
        if let Kind::Events(b) = &msg {
            for e in &b.events {
                let ev = e.event.as_ref().expect("event body");
                got.push((ev.entity.clone(), ev.version));
            }
        }
        cursor.apply(&msg);
        node.ack(cursor.cursor.clone()).await;
    }
    got
}

fn heads(s: &pb::StatusResponse) -> Vec<u64> {
    s.shards.iter().map(|s| s.head_seq).collect()
}

#[tokio::test]
async fn a_restart_keeps_the_epoch_and_a_node_resumes_with_what_it_missed() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_with(durable(tmp.path())).await;
    let first = hub.status().await;
    assert!(first.durable);

    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], None))
        .await
        .unwrap();
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    let before: Vec<(String, u64)> = (1..=20).map(|i| (format!("user:{i}"), 3)).collect();
    let refs: Vec<(&str, u64)> = before.iter().map(|(e, v)| (e.as_str(), *v)).collect();
    publish(&hub, &refs).await;
    let got = read_until(&mut node, &mut cursor, &heads(&hub.status().await)).await;
    assert_eq!(got.len(), 20);

    // The node goes away; more is published; the hub restarts.
    drop(node);
    let missed = [("user:3", 4), ("post:9", 1), ("user:20", 5)];
    publish(&hub, &missed).await;
    let addr = hub.addr;
    let heads_before = heads(&hub.status().await);
    hub.stop().await;
    let hub = TestHub::start_on(addr, durable(tmp.path())).await;
    let after = hub.status().await;
    assert_eq!(after.epoch, first.epoch, "the epoch survives the restart");
    assert_eq!(heads(&after), heads_before, "every shard's seqs continue");

    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], Some(cursor.cursor.clone())))
        .await
        .unwrap();
    assert!(node.welcome.resumed, "resumed, no reset");
    let mut got = read_until(&mut node, &mut cursor, &heads_before).await;
    got.sort();
    let mut want: Vec<(String, u64)> = missed.iter().map(|(e, v)| ((*e).into(), *v)).collect();
    want.sort();
    assert_eq!(got, want, "exactly what it missed");

    // G3 across the restart.
    let outcomes = publish(&hub, &[("user:3", 4), ("user:20", 2), ("post:9", 2)]).await;
    assert_eq!(
        outcomes,
        [
            pb::PublishOutcome::Duplicate,
            pb::PublishOutcome::Superseded,
            pb::PublishOutcome::Applied
        ]
    );
    hub.stop().await;
}

/// Two regions, each durable; `a` restarts. Nodes of both regions keep
/// receiving with no reset: `b`'s link to `a` resumes in the same epoch,
/// and `a`'s link to `b` resumes from the cursor `a` kept on disk.
#[tokio::test]
async fn restarting_one_region_causes_no_replication_gap_in_either() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let la = bind().await;
    let lb = bind().await;
    let (addr_a, addr_b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let config = |region: &str, dir: &Path, peer: &str, peer_addr| {
        let mut c = durable(dir);
        c.region = region.into();
        c.hub_id = format!("hub-{region}");
        c.peers = [(peer.to_owned(), format!("http://{peer_addr}"))].into();
        c
    };
    let a = TestHub::start_with_listener(la, config("a", dir_a.path(), "b", addr_b));
    let b = TestHub::start_with_listener(lb, config("b", dir_b.path(), "a", addr_a));
    for hub in [&a, &b] {
        wait_for(|| async { hub.status().await.peers[0].connected.then_some(()) }).await;
    }
    let mut node_a = RawNode::connect(&a.url(), hello("na", &[], None))
        .await
        .unwrap();
    let mut node_b = RawNode::connect(&b.url(), hello("nb", &[], None))
        .await
        .unwrap();
    let mut ca = NodeCursor::from_welcome(&node_a.welcome);
    let mut cb = NodeCursor::from_welcome(&node_b.welcome);

    // Traffic both ways, and both nodes caught up on it. Each log holds a
    // gap marker per shard from the links' first contact (8), then the
    // three events.
    publish(&a, &[("user:1", 1), ("user:2", 1)]).await;
    publish(&b, &[("user:3", 1)]).await;
    for (hub, node, cursor) in [(&a, &mut node_a, &mut ca), (&b, &mut node_b, &mut cb)] {
        let want = wait_for(|| async {
            let s = hub.status().await;
            (s.retained_events >= 8 + 3).then(|| heads(&s))
        })
        .await;
        read_until(node, cursor, &want).await;
    }

    // `a` restarts; `b`'s node stays connected throughout.
    a.stop().await;
    let a = TestHub::start_on(addr_a, config("a", dir_a.path(), "b", addr_b)).await;
    wait_for(|| async { a.status().await.peers[0].connected.then_some(()) }).await;
    let mut node_a = RawNode::connect(&a.url(), hello("na", &[], Some(ca.cursor.clone())))
        .await
        .unwrap();
    assert!(node_a.welcome.resumed);

    publish(&a, &[("user:1", 2)]).await;
    publish(&b, &[("user:3", 2)]).await;
    for (hub, node, cursor) in [(&a, &mut node_a, &mut ca), (&b, &mut node_b, &mut cb)] {
        let want = wait_for(|| async {
            let s = hub.status().await;
            (s.retained_events >= 8 + 5).then(|| heads(&s))
        })
        .await;
        // Any reset (REPLICATION_GAP included) fails here.
        let got = read_until(node, cursor, &want).await;
        assert!(!got.is_empty());
    }
    a.stop().await;
    b.stop().await;
}

/// Resumes a node from seq 0 of every shard and reads until it has all
/// that `hub` holds: in order, no gap, no reset. Returns the entities.
async fn replay_from_zero(hub: &TestHub, epoch: u64, round: &str) -> Vec<String> {
    let zero = pb::Cursor {
        epoch,
        seqs: vec![0; 8],
    };
    let mut node = RawNode::connect(&hub.url(), hello("n1", &[], Some(zero.clone())))
        .await
        .unwrap();
    assert!(node.welcome.resumed, "{round}: resumed from disk, no reset");
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    cursor.cursor = zero;
    let mut got: Vec<String> = Vec::new();
    let want_heads = heads(&hub.status().await);
    let deadline = tokio::time::Instant::now() + WAIT;
    while cursor
        .cursor
        .seqs
        .iter()
        .zip(&want_heads)
        .any(|(c, h)| c < h)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{round}: caught up in time"
        );
        let msg = node.expect().await;
        match &msg {
            Kind::Reset(r) => panic!("{round}: the node was reset: {r:?}"),
            Kind::Events(b) => {
                for e in &b.events {
                    let at = &mut cursor.cursor.seqs[e.shard as usize];
                    assert_eq!(e.seq, *at + 1, "{round}: in order, no gap");
                    *at = e.seq;
                    got.push(e.event.as_ref().unwrap().entity.clone());
                }
            }
            other => cursor.apply(other),
        }
        node.ack(cursor.cursor.clone()).await;
    }
    got.sort();
    got
}

/// A node whose cursor is older than the in-memory tail, but still on
/// disk, is replayed from disk in order: no reset, nothing missing. Before
/// and after a restart (which loads only the tail into memory).
#[tokio::test]
async fn a_node_behind_the_memory_tail_is_replayed_from_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = durable(tmp.path());
    // 4 events per shard in memory; the disk keeps the default million.
    config.memory_max_events = 32;
    let hub = TestHub::start_with(config.clone()).await;
    let epoch = hub.status().await.epoch;
    let mut names: Vec<String> = (0..600).map(|i| format!("user:{i}")).collect();
    for chunk in names.chunks(100) {
        let events: Vec<(&str, u64)> = chunk.iter().map(|e| (e.as_str(), 1)).collect();
        publish(&hub, &events).await;
    }
    names.sort();
    let status = hub.status().await;
    assert!(
        status.retained_events <= 32,
        "memory holds the tail only: {}",
        status.retained_events
    );
    assert!(
        status.shards.iter().all(|s| s.first_seq == 1),
        "status shows what is retained on disk"
    );
    assert_eq!(
        replay_from_zero(&hub, epoch, "before the restart").await,
        names
    );
    let addr = hub.addr;
    hub.stop().await;
    let hub = TestHub::start_on(addr, config).await;
    assert_eq!(
        replay_from_zero(&hub, epoch, "after the restart").await,
        names
    );
    hub.stop().await;
}

/// A node that stops acking while the in-memory tail moves past what it
/// was sent is replayed from disk once it acks again, while connected: no
/// reset, every shard in order with no gap, nothing missing. (The hub
/// looks on disk only once a fill has met such a shard, so this is the
/// path where it must notice on its own.)
#[tokio::test]
async fn a_connected_node_the_memory_tail_outruns_is_replayed_from_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = durable(tmp.path());
    config.memory_max_events = 32;
    // No progress tick to fall back on: the replay must start from the
    // acks and appends alone.
    config.progress_interval = std::time::Duration::from_secs(60);
    let hub = TestHub::start_with(config).await;
    let mut hello = hello("slow", &[], None);
    hello.max_in_flight = 8;
    let mut node = RawNode::connect(&hub.url(), hello).await.unwrap();
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    // One event, read and acked: the node is caught up and its session
    // has looked on disk and found nothing.
    publish(&hub, &[("user:first", 1)]).await;
    let mut got = read_until(&mut node, &mut cursor, &heads(&hub.status().await)).await;
    // Eight more fill its in-flight budget; it reads them and does not
    // ack, so the hub sends it nothing more (parked)...
    let parked: Vec<String> = (0..8).map(|i| format!("user:parked:{i}")).collect();
    let events: Vec<(&str, u64)> = parked.iter().map(|e| (e.as_str(), 1)).collect();
    publish(&hub, &events).await;
    let mut in_flight = 0;
    while in_flight < 8 {
        let msg = node.expect().await;
        if let Kind::Events(b) = &msg {
            for e in &b.events {
                cursor.cursor.seqs[e.shard as usize] = e.seq;
                let ev = e.event.as_ref().expect("event body");
                got.push((ev.entity.clone(), ev.version));
                in_flight += 1;
            }
        } else {
            cursor.apply(&msg);
        }
    }
    // ... while 600 events pass through a memory of 32. The ack after
    // them is the only thing left to start the replay.
    let mut names: Vec<String> = (0..600).map(|i| format!("user:{i}")).collect();
    for chunk in names.chunks(100) {
        let events: Vec<(&str, u64)> = chunk.iter().map(|e| (e.as_str(), 1)).collect();
        publish(&hub, &events).await;
    }
    let status = hub.status().await;
    assert!(status.retained_events <= 32, "memory holds the tail only");
    let heads = heads(&status);
    node.ack(cursor.cursor.clone()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while cursor.cursor.seqs.iter().zip(&heads).any(|(c, h)| c < h) {
        assert!(tokio::time::Instant::now() < deadline, "caught up in time");
        let msg = node.expect().await;
        match &msg {
            Kind::Reset(r) => panic!("the node was reset: {r:?}"),
            Kind::Events(b) => {
                for e in &b.events {
                    let at = cursor.cursor.seqs[e.shard as usize];
                    assert_eq!(e.seq, at + 1, "shard {}: in order, no gap", e.shard);
                    cursor.cursor.seqs[e.shard as usize] = e.seq;
                    let ev = e.event.as_ref().expect("event body");
                    got.push((ev.entity.clone(), ev.version));
                }
            }
            other => cursor.apply(other),
        }
        node.ack(cursor.cursor.clone()).await;
    }
    names.push("user:first".into());
    names.extend(parked);
    names.sort();
    let mut entities: Vec<String> = got.into_iter().map(|(e, _)| e).collect();
    entities.sort();
    assert_eq!(entities, names, "every event, once");
    hub.stop().await;
}
