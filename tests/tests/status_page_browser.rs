//! The hub's status page in a real headless browser (Debian's Chromium
//! through chromedriver; `scripts/install-chromium.sh` installs both, and
//! this test fails naming the script when they are missing).
//!
//! Two regions, `eu` and `us`, with eu's replication link to us through a
//! fault proxy; two raw nodes on eu, one that always acks and one that
//! stops. The page, loaded once, must show the connected nodes, then the
//! stopped one lagging, then the peer disconnected when the link is cut,
//! all without a reload; its filter box narrows the node list.
//!
//! `FRESHNESS_STATUS_SCREENSHOT=docs/status-page.png` also writes the
//! screenshot (the README's) there.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use freshness_hub::Config;
use freshness_tests::proxy::FaultProxy;
use freshness_tests::webdriver::Browser;
use freshness_tests::{NodeCursor, RawNode, TestHub, WAIT, hello, publish_request, test_config};
use serde_json::Value;

/// Reads everything the hub sends and acks it while `acking` holds.
fn run_node(mut node: RawNode, acking: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut cursor = NodeCursor::from_welcome(&node.welcome);
        while let Ok(Some(msg)) = node.rx.message().await {
            let Some(kind) = msg.kind else { continue };
            cursor.apply(&kind);
            if acking.load(Ordering::SeqCst) {
                node.ack(cursor.cursor.clone()).await;
            }
        }
    })
}

/// Waits until `script` returns true in the page; fails with what the page
/// shows otherwise.
async fn wait_page(browser: &Browser, what: &str, script: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = browser.eval(script).await.expect("script runs");
        if v == Value::Bool(true) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let text = browser
                .eval("return document.body.innerText")
                .await
                .unwrap_or_default();
            panic!("the page does not show {what} within {WAIT:?}; it shows:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eval_u64(browser: &Browser, script: &str) -> u64 {
    let v = browser.eval(script).await.expect("script runs");
    v.as_str()
        .and_then(|s| s.replace(',', "").parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or_else(|| panic!("{script} gave {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_nodes_lag_and_a_cut_peer_without_reloading() {
    let us = TestHub::start_with(Config {
        region: "us".into(),
        hub_id: "hub-us-1".into(),
        ..test_config()
    })
    .await;
    let link = FaultProxy::start(us.addr).await;
    let eu = TestHub::start_with_http(Config {
        region: "eu".into(),
        hub_id: "hub-eu-1".into(),
        peers: BTreeMap::from([("us".to_owned(), link.url())]),
        ..test_config()
    })
    .await;
    let steady = Arc::new(AtomicBool::new(true));
    let stopping = Arc::new(AtomicBool::new(true));
    let nodes = [
        run_node(
            RawNode::connect(&eu.url(), hello("cache-eu-a", &["user", "post"], None))
                .await
                .unwrap(),
            steady.clone(),
        ),
        run_node(
            RawNode::connect(&eu.url(), hello("cache-eu-b", &[], None))
                .await
                .unwrap(),
            stopping.clone(),
        ),
    ];
    // A writer in the background: five events every 100 ms, bounded.
    let writer = {
        let mut client = eu.client().await;
        tokio::spawn(async move {
            for round in 1..=600u64 {
                let entities: Vec<String> =
                    (0..5).map(|i| format!("user:{}", round * 5 + i)).collect();
                let events: Vec<(&str, u64)> = entities.iter().map(|e| (e.as_str(), 1)).collect();
                let _ = client.publish(publish_request(&events)).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let browser = Browser::start(scratch, 1280, 1000)
        .await
        .expect("headless chromium through chromedriver");
    browser.goto(&eu.page_url()).await.unwrap();
    // A mark that a reload would wipe.
    browser
        .eval("window.__loadedOnce = true; return true")
        .await
        .unwrap();

    wait_page(
        &browser,
        "both nodes live and the peer connected",
        r#"const a = document.querySelector('tr[data-node="cache-eu-a"]');
           const b = document.querySelector('tr[data-node="cache-eu-b"]');
           const us = document.querySelector('tr[data-peer="us"]');
           return !!a && !!b && !!us && a.dataset.state === 'live' && b.dataset.state === 'live'
             && b.dataset.lagging === 'false' && us.dataset.connected === 'true'
             && document.getElementById('region').textContent === 'eu';"#,
    )
    .await;
    let updates_before = eval_u64(&browser, "return document.body.dataset.updates").await;

    // cache-eu-b stops acking: the writer's events pile up behind it.
    stopping.store(false, Ordering::SeqCst);
    wait_page(
        &browser,
        "cache-eu-b lagging, first in the list",
        r#"const b = document.querySelector('tr[data-node="cache-eu-b"]');
           const lag = Number(b.querySelector('[data-field="lag"]').textContent.replace(/,/g, ''));
           const first = document.querySelector('#nodes tbody tr');
           return b.dataset.lagging === 'true' && lag > 0 && first === b;"#,
    )
    .await;
    let lag_then = eval_u64(
        &browser,
        r#"return document.querySelector('tr[data-node="cache-eu-b"] [data-field="lag"]').textContent"#,
    )
    .await;

    // The link to us is cut and stays down.
    link.partition();
    wait_page(
        &browser,
        "peer us disconnected",
        r#"const us = document.querySelector('tr[data-peer="us"]');
           return us.dataset.connected === 'false' && us.textContent.includes('disconnected');"#,
    )
    .await;
    // Still the same document, redrawn many times over, with the lag grown.
    wait_page(
        &browser,
        "a growing lag",
        &format!(
            r#"const lag = Number(document.querySelector('tr[data-node="cache-eu-b"] [data-field="lag"]').textContent.replace(/,/g, ''));
               return lag > {lag_then};"#
        ),
    )
    .await;
    let same_document = browser
        .eval(
            "return window.__loadedOnce === true && performance.getEntriesByType('navigation').length === 1",
        )
        .await
        .unwrap();
    assert_eq!(same_document, Value::Bool(true), "the page was reloaded");
    let updates_after = eval_u64(&browser, "return document.body.dataset.updates").await;
    assert!(
        updates_after >= updates_before + 2,
        "the page redrew {updates_before} → {updates_after} times"
    );
    // The healthy node stays live and fresh; the SLI shows its acks.
    wait_page(
        &browser,
        "cache-eu-a live and an SLI figure",
        r#"const a = document.querySelector('tr[data-node="cache-eu-a"]');
           return a.dataset.state === 'live' && a.dataset.lagging === 'false'
             && document.getElementById('sli-1s-minute').textContent.includes('%');"#,
    )
    .await;

    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    std::fs::write(scratch.join("status-page.png"), &png).unwrap();
    if let Ok(path) = std::env::var("FRESHNESS_STATUS_SCREENSHOT") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        std::fs::write(&path, &png).unwrap();
    }

    // The filter box narrows the list to what matches.
    browser.type_into("#filter", "eu-a").await.unwrap();
    wait_page(
        &browser,
        "only cache-eu-a after filtering",
        r#"const rows = [...document.querySelectorAll('#nodes tbody tr')];
           return rows.length === 1 && rows[0].dataset.node === 'cache-eu-a'
             && document.getElementById('nodes-shown').textContent.includes('2 connected');"#,
    )
    .await;

    browser.quit().await.unwrap();
    writer.abort();
    for n in nodes {
        n.abort();
    }
    eu.stop().await;
    us.stop().await;
}
