//! The Prometheus endpoint over a real socket: every family from the first
//! scrape with HELP and TYPE, the page accepted by Prometheus' own parser
//! (`promtool check metrics`, installed by `scripts/install-promtool.sh`)
//! before and after traffic, the recorder's counters and the hub's own
//! histograms (propagation, events per frame, actor drains, node lag) with
//! cumulative buckets, `_sum` and `_count`; other paths and methods get
//! clear answers. The recorder is process-wide, so this file holds the one
//! test that installs it.

use std::io::Write;
use std::process::{Command, Stdio};

use freshness::pb::subscribe_response::Kind;
use freshness_tests::{
    NodeCursor, RawNode, TestHub, hello, publish_request, test_config, wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `promtool check metrics` on the page: Prometheus' parser and its
/// naming lint. A missing promtool fails the test (never a skip).
fn promtool_check(page: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is missing ({e}): run scripts/install-promtool.sh (Debian package prometheus)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the page:\n{}{}\n--- page ---\n{page}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every family the hub declares is on the page with HELP and TYPE.
fn assert_every_family(page: &str) {
    for (name, kind) in freshness_hub::metrics::families() {
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no HELP for {name}:\n{page}"
        );
        assert!(
            page.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "no TYPE {kind} for {name}:\n{page}"
        );
        let sample = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_owned()
        };
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!("{sample} "))
                    || l.starts_with(&format!("{sample}{{"))),
            "no sample of {name}:\n{page}"
        );
    }
}

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
    let mut config = test_config();
    // A peer that never answers: its series exist from the start too.
    config
        .peers
        .insert("eu".into(), "http://127.0.0.1:9".into());
    let hub = TestHub::start_with_http(config).await;
    let addr = hub.http.unwrap();

    // Before any traffic (the hub serves: its start-up ran): every family,
    // at zero, and a valid page.
    assert!(hub.status().await.nodes.is_empty());
    let (code, fresh) = http(addr, "GET", "/metrics").await;
    assert_eq!(code, 200);
    promtool_check(&fresh);
    assert_every_family(&fresh);
    for sli in [
        "freshness_deliveries_acked_total",
        "freshness_deliveries_acked_within_100ms_total",
        "freshness_deliveries_acked_within_1s_total",
    ] {
        assert_eq!(sample(&fresh, sli), Some(0.0), "{sli} at zero:\n{fresh}");
    }
    assert_eq!(
        sample(
            &fresh,
            "freshness_resets_total{reason=\"RESET_REASON_SLOW_CONSUMER\"}"
        ),
        Some(0.0)
    );
    let (version, revision) = freshness_hub::metrics::build_info();
    assert_eq!(
        sample(
            &fresh,
            &format!("freshness_build_info{{version=\"{version}\",revision=\"{revision}\"}}")
        ),
        Some(1.0),
        "{fresh}"
    );
    assert!(sample(&fresh, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(sample(&fresh, "process_open_fds").unwrap() > 0.0);
    assert!(sample(&fresh, "process_start_time_seconds").unwrap() > 1.0e9);
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
    // Kept by the hub per publish and handed to the recorder on render.
    for (result, n) in [("applied", 3.0), ("duplicate", 0.0), ("superseded", 0.0)] {
        let name = format!("freshness_publish_events_total{{result=\"{result}\"}}");
        assert_eq!(sample(&text, &name), Some(n), "{name}:\n{text}");
    }
    // Each connection was served on the lane of its first call: the
    // node's (Subscribe) on the stream lane, the status and publish
    // clients' on the call lane.
    for lane in ["calls", "streams"] {
        let name = format!("freshness_connections_total{{lane=\"{lane}\"}}");
        assert!(sample(&text, &name).unwrap() >= 1.0, "{name}:\n{text}");
    }
    assert_eq!(sample(&text, "freshness_events_delivered_total"), Some(3.0));
    assert_eq!(sample(&text, "freshness_deliveries_acked_total"), Some(3.0));
    for (name, count) in [
        ("freshness_propagation_seconds", 3.0),
        ("freshness_frame_events", -1.0),
        ("freshness_shard_drain_commands", -1.0),
        // This hub keeps no log on disk: the families are there, empty.
        ("freshness_log_flush_seconds", 0.0),
        ("freshness_log_append_seconds", 0.0),
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
    promtool_check(&text);
    assert_every_family(&text);
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
