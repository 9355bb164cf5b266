//! The Prometheus endpoint over a real socket: the recorder's counters and
//! the hub's own histograms (propagation, events per frame, actor drains)
//! with cumulative buckets, `_sum` and `_count`; other paths and methods
//! get clear answers. The recorder is process-wide, so this file holds the
//! one test that installs it.

use freshness::pb::subscribe_response::Kind;
use freshness_tests::{NodeCursor, RawNode, TestHub, hello, publish_request, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request; the status code and the body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    if code == 200 && path == "/metrics" {
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
    }
    (code, body.to_owned())
}

/// The value of the sample line `name` (with its labels), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_show_counters_and_the_hubs_own_histograms() {
    freshness_hub::metrics::install_recorder().unwrap();
    let hub = TestHub::start_with_http(freshness_tests::test_config()).await;
    let addr = hub.http.unwrap();
    let mut node = RawNode::connect(&hub.url(), hello("m1", &[], None))
        .await
        .unwrap();
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    hub.client()
        .await
        .publish(publish_request(&[
            ("user:1", 1),
            ("user:2", 1),
            ("user:3", 1),
        ]))
        .await
        .unwrap();
    let mut got = 0;
    while got < 3 {
        let msg = node.next_non_progress().await;
        if let Kind::Events(b) = &msg {
            got += b.events.len();
        }
        cursor.apply(&msg);
    }
    node.ack(cursor.cursor.clone()).await;

    // Sessions hand their tallies over on the progress tick.
    let text = wait_for(|| async {
        let (code, text) = http(addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        (sample(&text, "freshness_propagation_seconds_count") == Some(3.0)).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "freshness_events_appended_total"), Some(3.0));
    assert_eq!(sample(&text, "freshness_events_delivered_total"), Some(3.0));
    assert_eq!(sample(&text, "freshness_deliveries_acked_total"), Some(3.0));
    for (name, count) in [
        ("freshness_propagation_seconds", 3.0),
        ("freshness_frame_events", -1.0),
        ("freshness_shard_drain_commands", -1.0),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name} is a histogram:\n{text}"
        );
        let buckets: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(buckets.len() > 2, "{name} has buckets:\n{text}");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{name} buckets are cumulative: {buckets:?}"
        );
        let total = sample(&text, &format!("{name}_count")).unwrap();
        assert_eq!(
            sample(&text, &format!("{name}_bucket{{le=\"+Inf\"}}")),
            Some(total)
        );
        if count >= 0.0 {
            assert_eq!(total, count, "{name}");
        } else {
            assert!(total >= 1.0, "{name}: {total}");
        }
    }
    // One frame carried the three events: its `_sum` counts them.
    assert_eq!(sample(&text, "freshness_frame_events_sum"), Some(3.0));
    let propagation = sample(&text, "freshness_propagation_seconds_sum").unwrap();
    assert!(
        propagation > 0.0 && propagation < 3.0 * 10.0,
        "{propagation}"
    );

    let (code, body) = http(addr, "GET", "/nowhere").await;
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "{body}");
    let (code, _) = http(addr, "POST", "/metrics").await;
    assert_eq!(code, 405);
}
