//! The relay against real PostgreSQL and a real hub: what a writer commits
//! reaches a subscribed node, what it rolls back never does, and faults
//! (the hub down, PostgreSQL restarted, two relays at once, transactions
//! committing out of id order, rows the hub refuses) lose nothing.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

fn rows(ns: &str, range: std::ops::Range<u32>) -> Vec<(String, i64)> {
    range.map(|i| (format!("{ns}:{i}"), 1)).collect()
}

fn expected(rows: &[(String, i64)]) -> HashSet<(String, u64)> {
    rows.iter().map(|(e, v)| (e.clone(), *v as u64)).collect()
}

async fn wait_empty(db: &TestDb) {
    wait_for(|| async { (db.depth().await == 0).then_some(()) }).await;
}

#[tokio::test]
async fn committed_rows_arrive_rolled_back_rows_never() {
    let db = TestDb::create().await;
    let hub = TestHub::start().await;
    let node = Node::start(&hub.url()).await;
    let relay = RelayProcess::start(&db.url(), &hub.url(), &[]);
    let mut client = db.client().await;

    let committed = rows("user", 0..50);
    for chunk in committed.chunks(7) {
        commit(&mut client, chunk).await;
    }
    // The same writer rolls back: nothing of it may be published.
    let tx = client.transaction().await.unwrap();
    for i in 0..10 {
        tx.execute(
            "INSERT INTO freshness_outbox (entity, version) VALUES ($1, 1)",
            &[&format!("rolled:{i}")],
        )
        .await
        .unwrap();
    }
    tx.rollback().await.unwrap();
    let more = rows("post", 0..5);
    commit(&mut client, &more).await;

    let mut all = expected(&committed);
    all.extend(expected(&more));
    node.wait_all(&all).await;
    // Deleted only after the hub answered: the table drains.
    wait_empty(&db).await;
    let applied = wait_for(|| async {
        relay
            .metric_with("freshness_relay_rows_published_total", "result=\"applied\"")
            .await
            .filter(|v| *v >= 55.0)
    })
    .await;
    assert_eq!(applied, 55.0);
    assert!(
        !node
            .seen
            .events
            .lock()
            .iter()
            .any(|(e, _)| e.starts_with("rolled:")),
        "a rolled-back row was published"
    );
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
}

/// A transaction that took a lower id but commits after a higher one is
/// still published: no high-water mark passes it. The poll interval is an
/// hour, so every arrival here was woken by a notification.
#[tokio::test]
async fn transactions_committing_out_of_id_order_are_not_skipped() {
    let db = TestDb::create().await;
    let hub = TestHub::start().await;
    let node = Node::start(&hub.url()).await;
    let relay = RelayProcess::start(&db.url(), &hub.url(), &["--poll-interval", "1h"]);

    // Ten long transactions take ids first and stay open ...
    let mut long = Vec::new();
    for i in 0..10 {
        let client = db.client().await;
        client.batch_execute("BEGIN").await.unwrap();
        client
            .execute(
                "INSERT INTO freshness_outbox (entity, version) VALUES ($1, 1)",
                &[&format!("long:{i}")],
            )
            .await
            .unwrap();
        long.push(client);
    }
    // ... while short ones with higher ids commit and are published.
    let mut short = db.client().await;
    let first = rows("short", 0..20);
    commit(&mut short, &first).await;
    node.wait_all(&expected(&first)).await;
    assert!(!node.has("long:0", 1), "an uncommitted row was published");

    // The long ones commit in reverse order, short ones in between.
    let mut all = expected(&first);
    for (i, client) in long.into_iter().enumerate().rev() {
        client.batch_execute("COMMIT").await.unwrap();
        let between = rows("short", (100 + 10 * i as u32)..(105 + 10 * i as u32));
        commit(&mut short, &between).await;
        all.extend(expected(&between));
        all.insert((format!("long:{i}"), 1));
        node.wait_all(&all).await;
    }
    wait_empty(&db).await;
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
}

/// Without the trigger's notification a row still goes out, within the
/// poll interval.
#[tokio::test]
async fn a_lost_notification_costs_at_most_the_poll_interval() {
    let db = TestDb::create().await;
    let hub = TestHub::start().await;
    let node = Node::start(&hub.url()).await;
    let relay = RelayProcess::start(&db.url(), &hub.url(), &["--poll-interval", "200ms"]);
    let mut client = db.client().await;
    client
        .batch_execute("ALTER TABLE freshness_outbox DISABLE TRIGGER freshness_outbox_notify")
        .await
        .unwrap();
    let silent = rows("quiet", 0..30);
    commit(&mut client, &silent).await;
    node.wait_all(&expected(&silent)).await;
    wait_empty(&db).await;
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
}

/// Rows the hub can never accept go to the dead-letter table with the
/// reason, are counted, and do not hold up the rows around them.
#[tokio::test]
async fn rows_the_hub_refuses_are_dead_lettered_and_block_nothing() {
    let db = TestDb::create().await;
    let hub = TestHub::start().await;
    let node = Node::start(&hub.url()).await;
    let relay = RelayProcess::start(&db.url(), &hub.url(), &[]);
    let mut client = db.client().await;
    let good_before = rows("user", 0..5);
    let good_after = rows("user", 5..10);
    let mut batch = good_before.clone();
    batch.push(("Not An Entity".into(), 3));
    batch.push(("user:zero".into(), 0));
    batch.extend(good_after.iter().cloned());
    commit(&mut client, &batch).await;

    let mut all = expected(&good_before);
    all.extend(expected(&good_after));
    node.wait_all(&all).await;
    wait_empty(&db).await;
    let dead = client
        .query(
            "SELECT entity, version, error FROM freshness_outbox_dead ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let dead: Vec<(String, i64, String)> = dead
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, "Not An Entity");
    assert!(dead[0].2.contains("entity"), "{dead:?}");
    assert_eq!(dead[1].0, "user:zero");
    assert!(dead[1].2.contains("version"), "{dead:?}");
    let counted = wait_for(|| async {
        relay
            .metric("freshness_relay_rows_dead_total")
            .await
            .filter(|v| *v >= 2.0)
    })
    .await;
    assert_eq!(counted, 2.0);
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
}

/// Two relays on one table: no row lost; a row both published is answered
/// `DUPLICATE`, and each row is applied exactly once by the hub.
#[tokio::test]
async fn two_relays_lose_nothing() {
    let db = TestDb::create().await;
    let hub = TestHub::start().await;
    let node = Node::start(&hub.url()).await;
    let a = RelayProcess::start(&db.url(), &hub.url(), &["--batch", "25"]);
    let b = RelayProcess::start(&db.url(), &hub.url(), &["--batch", "25"]);
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = db.client().await;
        writers.push(tokio::spawn(async move {
            let rows = rows(&format!("w{w}"), 0..500);
            for chunk in rows.chunks(5) {
                commit(&mut client, chunk).await;
            }
            rows
        }));
    }
    let mut all = HashSet::new();
    for w in writers {
        all.extend(expected(&w.await.unwrap()));
    }
    node.wait_all(&all).await;
    wait_empty(&db).await;
    // Both relays' tallies: every row applied once, anything more was a
    // duplicate the hub recognised.
    let applied = wait_for(|| async {
        let a = a
            .metric_with("freshness_relay_rows_published_total", "result=\"applied\"")
            .await
            .unwrap_or(0.0);
        let b = b
            .metric_with("freshness_relay_rows_published_total", "result=\"applied\"")
            .await
            .unwrap_or(0.0);
        (a + b >= 2000.0).then_some(a + b)
    })
    .await;
    assert_eq!(applied, 2000.0, "a row was applied twice or not at all");
    a.kill().await;
    b.kill().await;
    node.stop().await;
    hub.stop().await;
}

/// The hub down for 30 s: rows accumulate (the depth metric shows them),
/// then drain; nothing is lost. The hub keeps a durable log, so the node
/// resumes where it was when the hub is back.
#[tokio::test]
async fn hub_down_for_30s_loses_nothing() {
    let db = TestDb::create().await;
    let data = tempfile::tempdir().unwrap();
    let config = freshness_hub::Config {
        ephemeral: false,
        data_dir: data.path().to_owned(),
        ..freshness_tests::test_config()
    };
    let hub = TestHub::start_with(config.clone()).await;
    let addr = hub.addr;
    let node = Node::start(&hub.url()).await;
    let relay = RelayProcess::start(&db.url(), &hub.url(), &["--batch", "100"]);
    let mut client = db.client().await;
    let before = rows("before", 0..20);
    commit(&mut client, &before).await;
    node.wait_all(&expected(&before)).await;

    hub.stop().await;
    let down_at = tokio::time::Instant::now();
    let during = rows("during", 0..300);
    for chunk in during.chunks(10) {
        commit(&mut client, chunk).await;
    }
    // The depth gauge (sampled every second) shows what waits.
    let depth = wait_for(|| async {
        relay
            .metric("freshness_relay_outbox_rows")
            .await
            .filter(|d| *d >= 300.0)
    })
    .await;
    assert_eq!(depth, 300.0);
    assert!(
        relay
            .metric("freshness_relay_publish_errors_total")
            .await
            .unwrap_or(0.0)
            > 0.0,
        "the relay never tried the hub"
    );
    // The outage lasts 30 s.
    tokio::time::sleep_until(down_at + Duration::from_secs(30)).await;
    assert_eq!(db.depth().await, 300, "a row left before the hub answered");
    let hub = TestHub::start_on(addr, config).await;

    let mut all = expected(&before);
    all.extend(expected(&during));
    node.wait_all(&all).await;
    wait_empty(&db).await;
    wait_for(|| async {
        relay
            .metric("freshness_relay_outbox_rows")
            .await
            .filter(|d| *d == 0.0)
    })
    .await;
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
}

/// PostgreSQL restarted under the relay (a server of the test's own): the
/// relay reconnects, listens again and goes on.
#[tokio::test]
async fn postgres_restart_under_the_relay() {
    let pg = tokio::task::spawn_blocking(OwnPostgres::start)
        .await
        .unwrap();
    let db = TestDb::create_on(&pg.server()).await;
    let hub = TestHub::start().await;
    let node = Node::start(&hub.url()).await;
    // An hour between polls: after the restart only LISTEN, set up again
    // on the new connection, can wake the relay.
    let relay = RelayProcess::start(&db.url(), &hub.url(), &["--poll-interval", "1h"]);
    let mut client = db.client().await;
    let before = rows("before", 0..20);
    commit(&mut client, &before).await;
    node.wait_all(&expected(&before)).await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.pg_ctl("restart");
        pg
    })
    .await
    .unwrap();
    let mut all = expected(&before);
    // The relay may take a moment to reconnect; a writer keeps committing
    // through it (each on a fresh connection: the old ones died).
    for round in 0..5u32 {
        let mut client = db.client().await;
        let after = rows("after", round * 10..round * 10 + 10);
        commit(&mut client, &after).await;
        all.extend(expected(&after));
    }
    node.wait_all(&all).await;
    wait_empty(&db).await;
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
    drop(db);
    drop(pg);
}

/// A row's payload and W3C trace context travel with its event to the
/// node (the trace continues the writer's); the client's
/// `enqueue_with_payload` writes the same row as the plain INSERT.
#[tokio::test]
async fn payload_and_trace_context_reach_the_node() {
    let db = TestDb::create().await;
    let hub = TestHub::start().await;
    let node = Node::start(&hub.url()).await;
    let relay = RelayProcess::start(&db.url(), &hub.url(), &[]);
    let mut client = db.client().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    client
        .execute(
            "INSERT INTO freshness_outbox (entity, version, payload, traceparent) \
             VALUES ('user:1', 4, 'new name'::bytea, $1)",
            &[&traceparent],
        )
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    freshness_client::outbox::enqueue_with_payload(
        &tx,
        &freshness_client::Entity::parse("user:2").unwrap(),
        freshness_client::Version::new(9).unwrap(),
        b"refreshed",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let want: HashSet<_> = [("user:1".to_owned(), 4), ("user:2".to_owned(), 9)].into();
    node.wait_all(&want).await;
    let details = node.seen.details.lock().clone();
    assert_eq!(
        details["user:1"],
        (Some(b"new name".to_vec()), Some(traceparent.to_owned()))
    );
    assert_eq!(details["user:2"], (Some(b"refreshed".to_vec()), None));
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
}
