//! The client library as a writer uses it, against real hubs on loopback:
//! retries are safe because publishing is idempotent (a retried version comes
//! back DUPLICATE and reaches nodes once), batching keeps each caller's
//! results apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use freshness::{Entity, Version};
use freshness_client::publisher::{Event, RetryPolicy};
use freshness_client::{
    AckLevel, Backoff, EventBatch, FeedState, Handler, HandlerError, Outcome, PublishOptions,
    Publisher, Reset, Subscriber, SubscriberHandle,
};
use freshness_tests::{TestHub, WAIT, test_config, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn e(s: &str) -> Entity {
    Entity::parse(s).unwrap()
}

fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

/// A node that records every `(entity, version, epoch-changing reset count)`
/// it is handed.
#[derive(Clone, Default)]
struct Watcher {
    seen: Arc<watch::Sender<Vec<String>>>,
}

impl Watcher {
    fn count(&self, entry: &str) -> usize {
        self.seen.borrow().iter().filter(|s| *s == entry).count()
    }

    async fn until_seen(&self, entry: &str) {
        let mut rx = self.seen.subscribe();
        if tokio::time::timeout(WAIT, rx.wait_for(|s| s.iter().any(|x| x == entry)))
            .await
            .is_err()
        {
            panic!("never saw {entry}; saw {:?}", self.seen.borrow());
        }
    }

    async fn start(&self, url: &str, node_id: &str) -> SubscriberHandle {
        let handle = Subscriber::builder(url, node_id)
            .reconnect_backoff(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(200),
            ))
            .build(self.clone())
            .unwrap()
            .spawn();
        let mut feed = handle.feed();
        tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
            .await
            .expect("live in time")
            .unwrap();
        handle
    }
}

impl Handler for Watcher {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        self.seen.send_modify(|s| {
            s.extend(
                batch
                    .events
                    .iter()
                    .map(|e| format!("{}@{}", e.entity, e.version)),
            );
        });
        Ok(())
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.seen
            .send_modify(|s| s.push(format!("reset:{}", reset.reason)));
        Ok(())
    }
}

/// A TCP proxy that can hold back everything the hub sends (so a publish is
/// applied but its answer never arrives) while still forwarding what the
/// client sends, and can refuse new connections (as a hub that is down
/// does). Counts the bytes the client sends.
struct Proxy {
    addr: SocketAddr,
    hold: watch::Sender<bool>,
    refuse: watch::Sender<bool>,
    upstream_bytes: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = watch::Sender::new(false);
        let refuse = watch::Sender::new(false);
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let (hold_rx, refuse_rx, counter) =
            (hold.subscribe(), refuse.subscribe(), upstream_bytes.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *refuse_rx.borrow() {
                    drop(client);
                    continue;
                }
                let Ok(hub) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut hr, mut hw) = hub.into_split();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        // Counted before forwarding: once the hub has acted
                        // on bytes, the count includes them.
                        counter.fetch_add(n as u64, Ordering::SeqCst);
                        if n == 0 || hw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut hold = hold_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        if hold.wait_for(|h| !*h).await.is_err() {
                            break;
                        }
                        match hr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                // Held back until released, never dropped.
                                if hold.wait_for(|h| !*h).await.is_err()
                                    || cw.write_all(&buf[..n]).await.is_err()
                                {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            hold,
            refuse,
            upstream_bytes,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[tokio::test]
async fn retry_after_a_lost_answer_gets_duplicate_and_reaches_nodes_once() {
    let hub = TestHub::start().await;
    let watcher = Watcher::default();
    let node = watcher.start(&hub.url(), "watcher").await;
    let proxy = Proxy::start(hub.addr).await;
    let publisher = Publisher::builder(proxy.url())
        .linger(Duration::ZERO)
        .retry(RetryPolicy {
            max_attempts: 20,
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
            give_up_after: WAIT,
            attempt_timeout: Duration::from_millis(300),
        })
        .build()
        .unwrap();
    // Open the connection through the proxy.
    let warm = publisher.publish(e("user:0"), v(1)).await.unwrap();
    // A first attempt slower than the 300 ms attempt timeout on a busy
    // machine is retried and answered DUPLICATE: either way it is applied.
    assert!(
        matches!(warm.outcome, Outcome::Applied | Outcome::Duplicate),
        "{warm:?}"
    );

    proxy.hold.send_replace(true);
    let call = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish(e("user:1"), v(5)).await })
    };
    // The hub applied it (the node has it) but its answer is held back ...
    watcher.until_seen("user:1@5").await;
    let sent = proxy.upstream_bytes.load(Ordering::SeqCst);
    // ... until the first attempt has timed out: the client sends nothing
    // more on a connection that hears nothing back, except to cancel that
    // attempt or to retry.
    wait_for(|| async { (proxy.upstream_bytes.load(Ordering::SeqCst) > sent).then_some(()) }).await;
    proxy.hold.send_replace(false);
    let result = call.await.unwrap().unwrap();
    assert_eq!(result.outcome, Outcome::Duplicate, "{result:?}");
    assert_eq!(result.current_version, 5);

    // Everything appended so far has reached the node: the retry did not
    // fan out again.
    caught_up(&hub, &node).await;
    assert_eq!(watcher.count("user:1@5"), 1);
    node.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn publisher_retrying_across_a_hub_restart_gets_duplicate_and_no_double_fan_out() {
    let config = test_config();
    let hub = TestHub::start_with(config.clone()).await;
    let addr = hub.addr;
    let watcher = Watcher::default();
    let node = watcher.start(&hub.url(), "watcher").await;
    let proxy = Proxy::start(addr).await;
    let publisher = Publisher::builder(proxy.url())
        .retry(RetryPolicy {
            max_attempts: 1_000,
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
            give_up_after: WAIT,
            attempt_timeout: Duration::from_secs(2),
        })
        .build()
        .unwrap();
    assert_eq!(
        publisher.publish(e("user:1"), v(1)).await.unwrap().outcome,
        Outcome::Applied
    );
    watcher.until_seen("user:1@1").await;

    // The hub goes down; the writer commits v2 and the publisher retries.
    proxy.refuse.send_replace(true);
    hub.stop().await;
    let call = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish(e("user:1"), v(2)).await })
    };
    let hub = TestHub::start_on(addr, config).await;
    // The node is back first (flushed by the new epoch's reset) ...
    watcher.until_seen("reset:epoch_changed").await;
    caught_up(&hub, &node).await;
    assert!(
        !call.is_finished(),
        "the publisher kept retrying while the hub was down"
    );
    // ... then the publisher's retry gets through: the restarted hub (a new
    // epoch without a durable log) never saw v2.
    proxy.refuse.send_replace(false);
    let first = call.await.unwrap().unwrap();
    assert_eq!(first.outcome, Outcome::Applied);
    // The writer publishes again (say it crashed before recording success).
    let again = publisher.publish(e("user:1"), v(2)).await.unwrap();
    assert_eq!(again.outcome, Outcome::Duplicate);
    assert_eq!((again.seq, again.shard), (first.seq, first.shard));
    let older = publisher.publish(e("user:1"), v(1)).await.unwrap();
    assert_eq!(older.outcome, Outcome::Superseded);

    caught_up(&hub, &node).await;
    assert_eq!(watcher.count("user:1@2"), 1, "{:?}", watcher.seen.borrow());
    assert_eq!(
        watcher.count("user:1@1"),
        1,
        "a superseded version is not fanned out"
    );
    assert_eq!(watcher.count("reset:epoch_changed"), 1);
    node.shutdown().await.unwrap();
    hub.stop().await;
}

/// Waits until the node has applied a watermark the hub took after this
/// call: everything the hub appended before it has reached the node. The
/// barrier is read from the hub's own clock, the one its watermarks use.
async fn caught_up(hub: &TestHub, node: &SubscriberHandle) {
    let now = UNIX_EPOCH + Duration::from_micros(hub.status().await.now_us);
    let mut feed = node.feed();
    tokio::time::timeout(
        WAIT,
        feed.wait_for(|s| matches!(s, FeedState::Live { watermark, .. } if *watermark > now)),
    )
    .await
    .expect("caught up in time")
    .unwrap();
}

#[tokio::test]
async fn batched_calls_share_requests_but_get_their_own_results() {
    let hub = TestHub::start().await;
    let publisher = Publisher::builder(hub.url())
        .linger(Duration::from_millis(20))
        .max_batch(64)
        .build()
        .unwrap();
    let calls: Vec<_> = (0..50u64)
        .map(|i| {
            let p = publisher.clone();
            tokio::spawn(async move {
                let events = vec![
                    Event::new(e(&format!("user:{i}")), v(i + 1)),
                    Event::new(e(&format!("post:{i}")), v(1)).with_payload(vec![b'x'; 10]),
                ];
                p.publish_events(events, PublishOptions::default()).await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let receipt = call.await.unwrap().unwrap();
        let got: Vec<(String, u64, Outcome)> = receipt
            .results
            .iter()
            .map(|r| (r.entity.to_string(), r.version.get(), r.outcome))
            .collect();
        assert_eq!(
            got,
            vec![
                (format!("user:{i}"), i as u64 + 1, Outcome::Applied),
                (format!("post:{i}"), 1, Outcome::Applied)
            ]
        );
    }
    // 100 events went out in fewer requests than calls.
    let status = hub.status().await;
    let appended: u64 = status.shards.iter().map(|s| s.head_seq).sum();
    assert_eq!(appended, 100);

    // REGION with a node that acks: complete, nobody pending.
    let watcher = Watcher::default();
    let node = watcher.start(&hub.url(), "acker").await;
    let receipt = publisher
        .publish_events(
            vec![Event::new(e("user:1"), v(99))],
            PublishOptions::ack(AckLevel::Region).with_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert!(receipt.complete, "{receipt:?}");
    assert!(receipt.pending_nodes.is_empty());
    assert_eq!(receipt.applied_ack, AckLevel::Region);
    node.shutdown().await.unwrap();
    hub.stop().await;
}
