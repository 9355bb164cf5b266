//! Measures publish → applied propagation across regions with an injected
//! one-way WAN delay: two hubs (regions `a`, `b`) on loopback, a fault proxy
//! on the link from `b` to `a`, a node in `b` that acks what it applies, and
//! a writer in `a`. Prints p50/p99/max of (node receive time − publish time).
//!
//! `cargo run --release -p freshness-tests --example cross_region_latency -- [DELAY_MS] [EVENTS]`

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use freshness::pb::subscribe_response::Kind;
use freshness_tests::proxy::FaultProxy;
use freshness_tests::{
    NodeCursor, RawNode, TestHub, bind, connect, hello, publish_request, test_config, wait_for,
};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let delay_ms: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let events: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);

    let (la, lb) = (bind().await, bind().await);
    let proxy = FaultProxy::start(la.local_addr().expect("addr")).await;
    proxy.set_delay(Duration::from_millis(delay_ms));
    let mut ca = test_config();
    ca.region = "a".into();
    ca.peers.insert(
        "b".into(),
        format!("http://{}", lb.local_addr().expect("addr")),
    );
    let mut cb = test_config();
    cb.region = "b".into();
    cb.peers.insert("a".into(), proxy.url());
    let hub_a = TestHub::start_with_listener(la, ca);
    let hub_b = TestHub::start_with_listener(lb, cb);
    wait_for(|| async {
        let s = hub_b.status().await;
        s.peers.iter().all(|p| p.connected).then_some(())
    })
    .await;

    let mut node = RawNode::connect(&hub_b.url(), hello("b-node", &[], None))
        .await
        .expect("node");
    let mut cursor = NodeCursor::from_welcome(&node.welcome);
    let writer = tokio::spawn({
        let url = hub_a.url();
        async move {
            let mut client = connect(&url).await;
            for i in 0..events {
                let entity = format!("item:{}", i % 100);
                client
                    .publish(publish_request(&[(entity.as_str(), i as u64 + 1)]))
                    .await
                    .expect("publish");
                // Light load: one event every 2 ms.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let mut lat = Vec::with_capacity(events);
    while lat.len() < events {
        let msg = node.expect().await;
        cursor.apply(&msg);
        if let Kind::Events(b) = &msg {
            let now = now_us();
            for d in &b.events {
                let e = d.event.as_ref().expect("body");
                lat.push(now.saturating_sub(e.publish_time_us));
            }
        }
        node.ack(cursor.cursor.clone()).await;
    }
    writer.await.expect("writer");
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "cross-region propagation, one-way delay {delay_ms} ms, {} events: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    hub_b.stop().await;
    hub_a.stop().await;
}
