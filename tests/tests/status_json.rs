//! `/status.json` on the hub's HTTP listener against the Status RPC: the
//! same hub, nodes, cursors and peers; the SLI counts what nodes acked;
//! `worst` and `filter` cut the node list; the page and its files are
//! served; bad requests get clear answers.

use std::collections::BTreeMap;

use freshness::pb;
use freshness::pb::subscribe_response::Kind;
use freshness_hub::Config;
use freshness_tests::webdriver::http;
use freshness_tests::{
    NodeCursor, RawNode, TestHub, hello, publish_request, test_config, wait_for,
};
use hyper::{Method, StatusCode};
use serde_json::Value;

async fn get(hub: &TestHub, path: &str) -> (StatusCode, String) {
    let (code, body) = http(hub.http.unwrap(), Method::GET, path, None)
        .await
        .unwrap();
    (code, String::from_utf8(body.to_vec()).unwrap())
}

async fn status_json(hub: &TestHub, query: &str) -> Value {
    let (code, body) = get(hub, &format!("/status.json{query}")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Reads until `n` events arrived, then acks them (or not).
async fn receive(node: &mut RawNode, cursor: &mut NodeCursor, n: usize, ack: bool) {
    let mut got = 0;
    while got < n {
        let msg = node.next_non_progress().await;
        if let Kind::Events(b) = &msg {
            got += b.events.len();
        }
        cursor.apply(&msg);
    }
    if ack {
        node.ack(cursor.cursor.clone()).await;
    }
}

fn assert_node_agrees(j: &Value, n: &pb::NodeStatus) {
    let id = &n.node_id;
    assert_eq!(j["node_id"], n.node_id.as_str());
    assert_eq!(j["namespaces"], serde_json::json!(n.namespaces), "{id}");
    let acked = n.acked.as_ref().unwrap();
    assert_eq!(j["acked"]["epoch"], acked.epoch.to_string(), "{id}");
    assert_eq!(j["acked"]["seqs"], serde_json::json!(acked.seqs), "{id}");
    assert_eq!(j["lag_events"], n.lag_events, "{id}");
    assert_eq!(j["in_flight"], n.in_flight, "{id}");
    assert_eq!(j["max_in_flight"], n.max_in_flight, "{id}");
    assert_eq!(j["parked"], n.parked, "{id}");
    let state = freshness::pb::NodeState::try_from(n.state).unwrap();
    let want = state
        .as_str_name()
        .trim_start_matches("NODE_STATE_")
        .to_lowercase();
    assert_eq!(j["state"], want.as_str(), "{id}");
    assert_eq!(j["state_since_us"], n.state_since_us, "{id}");
    assert_eq!(j["replication"], n.replication, "{id}");
    assert_eq!(j["peer"], n.peer.as_str(), "{id}");
    assert_eq!(j["connected_at_us"], n.connected_at_us, "{id}");
    // Staleness moves with the clock and the node's acks of progress.
    let stale = j["staleness_ms"].as_u64().unwrap();
    assert!(
        stale.abs_diff(n.staleness_ms) < 2_000,
        "{id}: {stale} vs {n:?}"
    );
}

#[tokio::test]
async fn status_json_agrees_with_the_status_rpc() {
    let config = Config {
        region: "eu".into(),
        hub_id: "hub-eu".into(),
        // A peer that is never there: its link shows down, with an error.
        peers: BTreeMap::from([("us".to_owned(), "http://127.0.0.1:1".to_owned())]),
        ..test_config()
    };
    let hub = TestHub::start_with_http(config).await;
    let mut fast = RawNode::connect(&hub.url(), hello("fast-node", &["user"], None))
        .await
        .unwrap();
    let mut slow = RawNode::connect(&hub.url(), hello("slow-node", &[], None))
        .await
        .unwrap();
    let (mut fast_cursor, mut slow_cursor) = (
        NodeCursor::from_welcome(&fast.welcome),
        NodeCursor::from_welcome(&slow.welcome),
    );
    hub.client()
        .await
        .publish(publish_request(&[
            ("user:1", 1),
            ("user:2", 1),
            ("user:3", 1),
        ]))
        .await
        .unwrap();
    receive(&mut fast, &mut fast_cursor, 3, true).await;
    receive(&mut slow, &mut slow_cursor, 3, false).await;

    // Sessions hand their tallies over on the progress tick; the peer's
    // link reports its first failure.
    let json = wait_for(|| async {
        let j = status_json(&hub, "").await;
        (j["sli"]["since_start"]["acked"] == 3 && j["peers"][0]["last_error"] != "").then_some(j)
    })
    .await;
    let rpc = hub.status().await;
    let json_again = status_json(&hub, "").await;
    for j in [&json, &json_again] {
        assert_eq!(j["hub_id"], "hub-eu");
        assert_eq!(j["region"], rpc.region.as_str());
        assert_eq!(j["epoch"], rpc.epoch.to_string());
        assert_eq!(j["shard_count"], rpc.shard_count);
        assert_eq!(j["retained_events"], rpc.retained_events);
        assert_eq!(j["retained_bytes"], rpc.retained_bytes);
        assert_eq!(j["durable"], rpc.durable);
        assert_eq!(j["log_error"], rpc.log_error.as_str());
        let shards = j["shards"].as_array().unwrap();
        assert_eq!(shards.len(), rpc.shards.len());
        for (js, s) in shards.iter().zip(&rpc.shards) {
            assert_eq!(js["shard"], s.shard);
            assert_eq!(js["head_seq"], s.head_seq);
            assert_eq!(js["first_seq"], s.first_seq);
        }
        assert_eq!(j["head_events"], 3);
        let nodes = j["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), rpc.nodes.len());
        assert_eq!(j["nodes_total"], 2);
        assert_eq!(j["nodes_matched"], 2);
        for (jn, n) in nodes.iter().zip(&rpc.nodes) {
            assert_node_agrees(jn, n);
        }
        let peers = j["peers"].as_array().unwrap();
        assert_eq!(peers.len(), rpc.peers.len());
        for (jp, p) in peers.iter().zip(&rpc.peers) {
            assert_eq!(jp["region"], p.region.as_str());
            assert_eq!(jp["address"], p.address.as_str());
            assert_eq!(jp["connected"], p.connected);
            assert_eq!(jp["lag_events"], p.lag_events);
            assert!(!p.last_error.is_empty());
            assert!(!jp["last_error"].as_str().unwrap().is_empty());
        }
    }
    assert!(json_again["now_us"].as_u64().unwrap() >= rpc.now_us);
    assert!(json["now_us"].as_u64().unwrap() <= rpc.now_us);
    // The slow node has the three events outstanding; the fast one none.
    assert_eq!(rpc.nodes[0].node_id, "fast-node");
    assert_eq!((rpc.nodes[0].lag_events, rpc.nodes[1].lag_events), (0, 3));

    // The SLI counts the fast node's three acked deliveries, in time.
    let sli = &json_again["sli"];
    for window in ["since_start", "last_minute"] {
        assert_eq!(sli[window]["acked"], 3, "{sli}");
        assert_eq!(sli[window]["within_1s"], 3, "{sli}");
        assert_eq!(sli[window]["ratio_1s"], 1.0, "{sli}");
    }
    assert!(json_again["uptime_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        json_again["resets"],
        serde_json::json!({
            "CURSOR_EXPIRED": 0, "EPOCH_CHANGED": 0, "REPLICATION_GAP": 0, "SLOW_CONSUMER": 0
        })
    );

    // The worst first, cut to one, and a filter.
    let worst = status_json(&hub, "?worst=1").await;
    assert_eq!(worst["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(worst["nodes"][0]["node_id"], "slow-node");
    assert_eq!(
        (worst["nodes_total"].clone(), worst["nodes_matched"].clone()),
        (2.into(), 2.into())
    );
    let filtered = status_json(&hub, "?worst=100&filter=FAST").await;
    assert_eq!(filtered["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["nodes"][0]["node_id"], "fast-node");
    assert_eq!(filtered["nodes_matched"], 1);
    let by_namespace = status_json(&hub, "?filter=user").await;
    assert_eq!(by_namespace["nodes_matched"], 1);

    // Bad requests name what is wrong.
    let (code, body) = get(&hub, "/status.json?worst=lots").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(body.contains("worst") && body.contains("lots"), "{body}");
    let (code, body) = get(&hub, "/status.json?limit=3").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(body.contains("\"limit\""), "{body}");
    let (code, _) = http(hub.http.unwrap(), Method::POST, "/status.json", None)
        .await
        .unwrap();
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);

    // The page and its two files; nothing from elsewhere.
    let (code, html) = get(&hub, "/").await;
    assert_eq!(code, StatusCode::OK);
    assert!(html.contains("<script src=\"status.js\">"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    let (code, js) = get(&hub, "/status.js").await;
    assert_eq!(code, StatusCode::OK);
    assert!(js.contains("status.json"));
    let (code, _) = get(&hub, "/status.css").await;
    assert_eq!(code, StatusCode::OK);
    // No recorder in this process: /metrics says so.
    let (code, body) = get(&hub, "/metrics").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(body.contains("recorder"), "{body}");
    hub.stop().await;
}
