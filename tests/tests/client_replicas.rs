//! The client with several hub replicas of one region (`--log jetstream`
//! on a `nats-server` this test starts on a free port): a `Subscriber` and
//! a `Publisher` given the list move to the next replica when theirs stops,
//! with no reset and nothing missed, and say which one they use.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use freshness::{Entity, Version};
use freshness_client::{
    Backoff, EventBatch, FeedState, Handler, HandlerError, Publisher, Reset, Subscriber,
};
use freshness_hub::{Config, LogBackend};
use freshness_tests::{TestHub, WAIT, test_config};
use tokio::sync::watch;

/// A `nats-server` with JetStream of this test's own, stopped on drop.
struct Nats {
    child: Child,
    _dir: tempfile::TempDir,
    url: String,
}

impl Nats {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = freshness_tests::free_port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed");
        let mut tries = 0;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            tries += 1;
            assert!(tries < 3_000, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            _dir: dir,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica_config(nats: &str, id: &str) -> Config {
    Config {
        hub_id: id.into(),
        ephemeral: false,
        log: LogBackend::JetStream,
        nats_url: nats.into(),
        ..test_config()
    }
}

#[derive(Debug, Default, Clone)]
struct Seen {
    events: Vec<(String, u64)>,
    resets: usize,
}

#[derive(Clone)]
struct Recorder(Arc<watch::Sender<Seen>>);

impl Handler for Recorder {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        self.0.send_modify(|s| {
            s.events.extend(
                batch
                    .events
                    .iter()
                    .map(|e| (e.entity.to_string(), e.version.get())),
            );
        });
        Ok(())
    }

    async fn on_reset(&self, _reset: &Reset) -> Result<(), HandlerError> {
        self.0.send_modify(|s| s.resets += 1);
        Ok(())
    }
}

impl Recorder {
    async fn until_saw(&self, entity: &str, version: u64) {
        let mut rx = self.0.subscribe();
        let saw = |s: &Seen| s.events.iter().any(|(e, v)| e == entity && *v == version);
        if tokio::time::timeout(WAIT, rx.wait_for(saw)).await.is_err() {
            panic!("never saw {entity} v{version}: {:?}", self.0.borrow());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_and_publisher_move_to_the_next_replica_without_reset() {
    let nats = Nats::start();
    let mut a = TestHub::start_with(replica_config(&nats.url, "replica-a")).await;
    let mut b = TestHub::start_with(replica_config(&nats.url, "replica-b")).await;
    // Both opened the region's stream (at once: one of them makes it and
    // its epoch) before either is relied on.
    a.serving().await;
    b.serving().await;
    let (a_url, b_url) = (a.url(), b.url());
    let hubs = format!("{a_url},{b_url}");

    let recorder = Recorder(Arc::new(watch::Sender::new(Seen::default())));
    let node = Subscriber::builder(&hubs, "node-1")
        .reconnect_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
        ))
        .build(recorder.clone())
        .expect("a valid list")
        .spawn();
    let mut feed = node.feed();
    tokio::time::timeout(WAIT, feed.wait_for(FeedState::is_live))
        .await
        .expect("feed live in time")
        .expect("subscriber running");

    let publisher = Publisher::builder(&hubs).build().expect("a valid list");
    assert_eq!(publisher.hub(), a_url, "the first hub of the list is used");
    let entity = Entity::parse("user:1").unwrap();
    publisher
        .publish(entity.clone(), Version::new(1).unwrap())
        .await
        .expect("published at a");
    recorder.until_saw("user:1", 1).await;

    // The replica both use stops: they move to the other one.
    a.stop().await;
    publisher
        .publish(entity.clone(), Version::new(2).unwrap())
        .await
        .expect("published at b after a stopped");
    assert_eq!(publisher.hub(), b_url, "the publisher moved to b");
    recorder.until_saw("user:1", 2).await;
    let seen = recorder.0.borrow().clone();
    assert_eq!(
        seen.resets, 0,
        "no reset moving to another replica: {seen:?}"
    );
    assert_eq!(
        seen.events,
        vec![("user:1".to_owned(), 1), ("user:1".to_owned(), 2)],
        "each version once, in order"
    );
    let status = b.status().await;
    assert!(
        status.nodes.iter().any(|n| n.node_id == "node-1"),
        "the node is connected to b now"
    );
    node.shutdown().await.ok();
    b.stop().await;
}

#[test]
fn an_empty_hub_list_is_refused() {
    assert!(Publisher::builder(" , ").build().is_err());
}
