//! Test harness for black-box tests of the whole: real hubs on loopback
//! ([`TestHub`]), a protocol-level node that speaks the raw gRPC stream
//! ([`RawNode`]), and waiting helpers that await conditions instead of
//! sleeping.

pub mod pki;
pub mod proxy;
pub mod webdriver;

use std::net::SocketAddr;
use std::time::Duration;

use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::pb::{self, hub_client::HubClient};
use freshness_hub::Config;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Longest any test waits for a condition before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// Installs a test log subscriber once (quiet unless `FRESHNESS_LOG` is set).
pub fn init_logging() {
    let filter = std::env::var("FRESHNESS_LOG").unwrap_or_else(|_| "off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// A hub served in this process on a real loopback socket.
pub struct TestHub {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its HTTP listener (status page, `/status.json`, `/metrics`)
    /// listens, when it has one ([`TestHub::start_with_http`]).
    pub http: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), freshness_hub::RunError>>,
}

/// A config for tests: loopback on an ephemeral port, short grace, the log
/// in memory (tests of the durable log set `data_dir` and `ephemeral`).
pub fn test_config() -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        hub_id: "test-hub".into(),
        shutdown_grace: Duration::from_secs(5),
        ephemeral: true,
        ..Config::default()
    }
}

impl TestHub {
    /// A hub with the test defaults.
    pub async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    /// A hub with this configuration, on a free loopback port ([`bind`]).
    pub async fn start_with(config: Config) -> Self {
        Self::start_with_listener(bind().await, config)
    }

    /// A hub on this address (to restart one on the same port).
    pub async fn start_on(addr: SocketAddr, config: Config) -> Self {
        // A port just released by a stopped hub can take a moment to free up.
        let listener = wait_for(|| async { tokio::net::TcpListener::bind(addr).await.ok() }).await;
        Self::start_with_listener(listener, config)
    }

    /// A hub on an already bound listener (to know its address before its
    /// peers are configured).
    pub fn start_with_listener(listener: tokio::net::TcpListener, config: Config) -> Self {
        init_logging();
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(freshness_hub::run(config, listener, shutdown.clone()));
        Self {
            addr,
            http: None,
            shutdown,
            task,
        }
    }

    /// A hub with this configuration on `127.0.0.1:0`, and its HTTP
    /// listener (status page, `/status.json`, `/metrics`) on another
    /// ephemeral port.
    pub async fn start_with_http(config: Config) -> Self {
        init_logging();
        let listener = bind().await;
        let http = bind().await;
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let http_addr = http.local_addr().expect("bound listener has an address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(freshness_hub::run_with_http(
            config,
            listener,
            Some(http),
            shutdown.clone(),
        ));
        Self {
            addr,
            http: Some(http_addr),
            shutdown,
            task,
        }
    }

    /// `http://127.0.0.1:PORT/` of the status page.
    pub fn page_url(&self) -> String {
        format!(
            "http://{}/",
            self.http.expect("a hub started with start_with_http")
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC client of this hub.
    pub async fn client(&self) -> HubClient<Channel> {
        connect(&self.url()).await
    }

    /// A plain channel to this hub, for other services on it (health,
    /// reflection) or raw calls.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .expect("valid url")
            .connect()
            .await
            .expect("connect to the test hub")
    }

    /// Waits until the hub answers its health check. A hub whose start
    /// failed (its log could not be opened) fails the test with its own
    /// error, not with a connection refused later on.
    pub async fn serving(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.task.is_finished() {
                let ended = (&mut self.task).await;
                panic!("the hub at {} stopped before serving: {ended:?}", self.addr);
            }
            let check = async {
                let endpoint =
                    tonic::transport::Endpoint::from_shared(self.url()).expect("valid url");
                let Ok(channel) = endpoint.connect().await else {
                    return false;
                };
                tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1)
            };
            if tokio::time::timeout(Duration::from_millis(500), check)
                .await
                .unwrap_or(false)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the hub at {} did not serve within {WAIT:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Graceful stop; returns once the hub has fully stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("hub task panicked")
            .expect("hub returned an error");
    }

    /// The hub's status.
    pub async fn status(&self) -> pb::StatusResponse {
        self.client()
            .await
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }
}

/// Binds a loopback listener on an ephemeral port.
pub async fn bind() -> tokio::net::TcpListener {
    let listener = bind_std();
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    tokio::net::TcpListener::from_std(listener).expect("a tokio listener")
}

/// A free loopback port, for a server process that binds it itself.
pub fn free_port() -> u16 {
    bind_std().local_addr().expect("a bound address").port()
}

/// `127.0.0.1` and a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A field of a process's `/proc/PID/status` in KiB: `VmRSS` (resident
/// now) or `VmHWM` (its peak).
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e} (has the process exited?)"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Loopback ports the harness hands out: below the kernel's ephemeral
/// range (32768–60999 by default). A hub restarted on its port must find it
/// free; one from `:0` lies in the ephemeral range, where under load some
/// other connection can take it as its source port while the hub is down.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

fn bind_std() -> std::net::TcpListener {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    // Test processes that run at once start at different places.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PORTS.start + (start.wrapping_add(i) % span) as u16;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener;
        }
    }
    panic!("no free loopback port in {PORTS:?}");
}

/// Connects a client, retrying until the server accepts.
pub async fn connect(url: &str) -> HubClient<Channel> {
    let url = url.to_owned();
    wait_for(|| {
        let url = url.clone();
        async move { HubClient::connect(url).await.ok() }
    })
    .await
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20)
}

/// Polls `f` until it yields `Some`, or panics after [`WAIT`]. Polling backs
/// off from 1 ms to 50 ms; use it for conditions that have no event to await.
pub async fn wait_for<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One publish of `(entity, version)` pairs at ACCEPTED.
pub fn publish_request(events: &[(&str, u64)]) -> pb::PublishRequest {
    pb::PublishRequest {
        events: events
            .iter()
            .map(|(e, v)| pb::Event {
                entity: (*e).to_owned(),
                version: *v,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A node speaking the raw protocol, for tests that pin protocol behaviour:
/// it sends what the test says and records every message it receives.
pub struct RawNode {
    /// Requests to the hub.
    pub tx: mpsc::Sender<pb::SubscribeRequest>,
    /// The response stream.
    pub rx: tonic::Streaming<pb::SubscribeResponse>,
    /// The welcome.
    pub welcome: pb::Welcome,
}

/// A hello with these fields and defaults for the rest.
pub fn hello(node_id: &str, namespaces: &[&str], resume: Option<pb::Cursor>) -> pb::Hello {
    pb::Hello {
        node_id: node_id.into(),
        namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(),
        resume,
        ..Default::default()
    }
}

impl RawNode {
    /// Opens a stream, sends `hello` and reads the welcome.
    pub async fn connect(url: &str, hello: pb::Hello) -> Result<Self, tonic::Status> {
        let mut client = connect(url).await;
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::SubscribeRequest {
            kind: Some(ReqKind::Hello(hello)),
        })
        .await
        .expect("fresh channel");
        let mut rx = client
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("welcome in time")?;
        match first.and_then(|m| m.kind) {
            Some(RespKind::Welcome(welcome)) => Ok(Self { tx, rx, welcome }),
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// The next message, failing the test after [`WAIT`].
    pub async fn next(&mut self) -> Result<Option<RespKind>, tonic::Status> {
        let m = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a message in time")?;
        Ok(m.and_then(|m| m.kind))
    }

    /// The next message, which must exist and not be an error.
    pub async fn expect(&mut self) -> RespKind {
        self.next()
            .await
            .expect("stream error")
            .expect("stream ended")
    }

    /// Skips progress messages and returns the next other message.
    pub async fn next_non_progress(&mut self) -> RespKind {
        loop {
            match self.expect().await {
                RespKind::Progress(_) => {}
                other => return other,
            }
        }
    }

    /// Sends an ack of `cursor`.
    pub async fn ack(&self, cursor: pb::Cursor) {
        // The hub may already have closed the stream; the test reads why.
        let _ = self
            .tx
            .send(pb::SubscribeRequest {
                kind: Some(ReqKind::Ack(pb::Ack {
                    cursor: Some(cursor),
                    applied: None,
                })),
            })
            .await;
    }
}

/// A node-side cursor that applies messages the way the protocol says.
#[derive(Debug, Clone)]
pub struct NodeCursor {
    /// The cursor.
    pub cursor: pb::Cursor,
}

impl NodeCursor {
    /// Starts from the welcome.
    pub fn from_welcome(w: &pb::Welcome) -> Self {
        Self {
            cursor: w.cursor.clone().expect("welcome carries a cursor"),
        }
    }

    /// Applies one message to the cursor.
    pub fn apply(&mut self, msg: &RespKind) {
        match msg {
            RespKind::Events(b) => {
                for e in &b.events {
                    let s = &mut self.cursor.seqs[e.shard as usize];
                    *s = (*s).max(e.seq);
                }
            }
            RespKind::Progress(p) => {
                if let Some(c) = &p.cursor {
                    for (a, b) in self.cursor.seqs.iter_mut().zip(&c.seqs) {
                        *a = (*a).max(*b);
                    }
                }
            }
            RespKind::Reset(r) => {
                let c = r.cursor.as_ref().expect("reset carries a cursor");
                let shards: Vec<usize> = if r.all {
                    (0..self.cursor.seqs.len()).collect()
                } else {
                    r.shards.iter().map(|s| *s as usize).collect()
                };
                for s in shards {
                    self.cursor.seqs[s] = c.seqs[s];
                }
                self.cursor.epoch = c.epoch;
            }
            _ => {}
        }
    }
}
