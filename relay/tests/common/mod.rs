//! What the relay's tests share: a fresh database per test on the machine's
//! PostgreSQL (or on a server of the test's own), the `freshness-relay`
//! binary as a child process, a cache node that records what it applied,
//! and a scrape of the relay's `/metrics`.

#![allow(dead_code)] // each test file uses its own part

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use freshness_client::{EventBatch, Handler, HandlerError, Reset, Subscriber, SubscriberHandle};
use parking_lot::Mutex;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

pub use freshness_tests::{TestHub, WAIT, wait_for};

/// The machine's PostgreSQL (`.ci/run` starts it).
pub const SERVER: &str = "host=127.0.0.1 port=5432 user=postgres";

/// The relay binary of this crate.
pub const RELAY: &str = env!("CARGO_BIN_EXE_freshness-relay");

/// A database of its own for one test, dropped when the test ends (also
/// when it panics), so that tests run in parallel without sharing a table
/// or a notification channel.
pub struct TestDb {
    server: String,
    pub name: String,
}

impl TestDb {
    /// A fresh database on the machine's server, with the outbox migrated
    /// by `freshness-relay migrate`.
    pub async fn create() -> Self {
        Self::create_on(SERVER).await
    }

    /// A fresh database on the server `server` (a libpq key-value string
    /// without `dbname`).
    pub async fn create_on(server: &str) -> Self {
        let name = format!("relay_test_{:016x}", rand::rng().random::<u64>());
        let admin = connect(&format!("{server} dbname=postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let db = Self {
            server: server.to_owned(),
            name,
        };
        let out = Command::new(RELAY)
            .args(["migrate", "--database-url", &db.url()])
            .output()
            .await
            .expect("run freshness-relay migrate");
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        db
    }

    /// The connection string of this database.
    pub fn url(&self) -> String {
        format!("{} dbname={}", self.server, self.name)
    }

    /// A new connection to it.
    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }

    /// Rows still in the outbox.
    pub async fn depth(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM freshness_outbox", &[])
            .await
            .expect("count the outbox")
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs outside async code (or while unwinding): a thread with a
        // runtime of its own does the clean-up and is waited for.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&format!("{server} dbname=postgres"), NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Connects, retrying until the server accepts.
pub async fn connect(url: &str) -> Client {
    let url = url.to_owned();
    wait_for(|| {
        let url = url.clone();
        async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await.ok()?;
            tokio::spawn(conn);
            Some(client)
        }
    })
    .await
}

pub use freshness_tests::free_port;

/// A `freshness-relay run` child process, killed (SIGKILL) when dropped.
pub struct RelayProcess {
    pub child: Child,
    pub metrics: SocketAddr,
}

impl RelayProcess {
    /// Starts a relay of `db` to `hub`, with extra flags.
    pub fn start(db_url: &str, hub: &str, extra: &[&str]) -> Self {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::env::var("FRESHNESS_LOG").ok();
        let child = Command::new(RELAY)
            .args(["run", "--database-url", db_url, "--hub", hub])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--max-backoff", "200ms"])
            .args(extra)
            .env("FRESHNESS_LOG", log.as_deref().unwrap_or("off"))
            .stdout(Stdio::null())
            .stderr(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("spawn freshness-relay");
        Self { child, metrics }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the relay");
    }

    /// One metric's value (summed over its label sets), once the endpoint
    /// answers; `None` while the metric has not been recorded.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = scrape(self.metrics).await?;
        let mut found = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let metric = key.split('{').next().unwrap_or(key);
            if metric == name
                && let Ok(v) = value.parse::<f64>()
            {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// A labelled metric's value, e.g. `("freshness_relay_rows_published_total", "result=\"applied\"")`.
    pub async fn metric_with(&self, name: &str, label: &str) -> Option<f64> {
        let text = scrape(self.metrics).await?;
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
    }
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body.split_once("\r\n\r\n")?.1.to_owned())
}

/// An event's payload and traceparent, as the node received them.
pub type Details = (Option<Vec<u8>>, Option<String>);

/// What a node applied: every `(entity, version)` and every reset.
#[derive(Default)]
pub struct Seen {
    pub events: Mutex<HashSet<(String, u64)>>,
    /// Payload and traceparent of the last event per entity.
    pub details: Mutex<std::collections::HashMap<String, Details>>,
    pub resets: Mutex<u32>,
}

impl Handler for Seen {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        let mut seen = self.events.lock();
        let mut details = self.details.lock();
        for e in &batch.events {
            seen.insert((e.entity.as_str().to_owned(), e.version.get()));
            details.insert(
                e.entity.as_str().to_owned(),
                (
                    e.payload.as_ref().map(|p| p.to_vec()),
                    e.traceparent.clone(),
                ),
            );
        }
        Ok(())
    }

    async fn on_reset(&self, _reset: &Reset) -> Result<(), HandlerError> {
        *self.resets.lock() += 1;
        Ok(())
    }
}

/// A cache node subscribed to `hub`, live before this returns.
pub struct Node {
    pub seen: Arc<Seen>,
    handle: SubscriberHandle,
}

impl Node {
    pub async fn start(hub: &str) -> Self {
        Self::start_with(hub, freshness_client::Credentials::new()).await
    }

    /// A node of a secured hub, with `credentials`.
    pub async fn start_with(hub: &str, credentials: freshness_client::Credentials) -> Self {
        let seen = Arc::new(Seen::default());
        let subscriber =
            Subscriber::builder(hub, format!("node-{:x}", rand::rng().random::<u32>()))
                .credentials(credentials)
                .reconnect_backoff(freshness_client::Backoff::new(
                    Duration::from_millis(20),
                    Duration::from_millis(200),
                ))
                .build(seen.clone())
                .expect("build the subscriber");
        let mut feed = subscriber.feed();
        let handle = subscriber.spawn();
        tokio::time::timeout(WAIT, feed.wait_for(|s| s.is_live()))
            .await
            .expect("node live in time")
            .expect("feed open");
        Self { seen, handle }
    }

    /// Waits until every one of `expected` was applied.
    pub async fn wait_all(&self, expected: &HashSet<(String, u64)>) {
        let seen = self.seen.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let missing = expected.difference(&seen.events.lock()).count();
            if missing == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{missing} of {} committed rows never reached the node",
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn has(&self, entity: &str, version: u64) -> bool {
        self.seen
            .events
            .lock()
            .contains(&(entity.to_owned(), version))
    }

    pub async fn stop(self) {
        let _ = self.handle.shutdown().await;
    }
}

/// A PostgreSQL server of the test's own, on a free port, in a temporary
/// directory: for tests that stop and restart it. Stopped when dropped.
pub struct OwnPostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl OwnPostgres {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed under /usr/lib/postgresql")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        if is_root() {
            // PostgreSQL refuses to run as root: the directory goes to
            // `postgres` and every command runs as that user.
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the temp dir to postgres");
        }
        let port = free_port();
        let pg = Self { port, dir, bin };
        pg.ctl(&[
            pg.bin.join("initdb").to_str().unwrap_or("initdb"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-D",
            data.to_str().unwrap_or_default(),
        ]);
        pg.pg_ctl("start");
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `host=127.0.0.1 port=… user=postgres`.
    pub fn server(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres", self.port)
    }

    /// `pg_ctl start | stop | restart`, waiting for it to finish.
    pub fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let log = self.dir.path().join("log");
        let mut args = vec![
            self.bin.join("pg_ctl").to_string_lossy().into_owned(),
            "-D".into(),
            data.to_string_lossy().into_owned(),
            "-w".into(),
            "-m".into(),
            "fast".into(),
            "-l".into(),
            log.to_string_lossy().into_owned(),
        ];
        if action != "stop" {
            args.push("-o".into());
            args.push(options);
        }
        args.push(action.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctl(&args);
    }

    fn ctl(&self, args: &[&str]) {
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(args);
            c
        } else {
            let mut c = std::process::Command::new(args[0]);
            c.args(&args[1..]);
            c
        };
        let out = cmd
            .current_dir(self.dir.path())
            .output()
            .expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let pg_ctl = self.bin.join("pg_ctl");
        let args = [
            pg_ctl.to_string_lossy().into_owned(),
            "-D".into(),
            data.to_string_lossy().into_owned(),
            "-m".into(),
            "immediate".into(),
            "stop".into(),
        ];
        let _ = if is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(&args)
                .output()
        } else {
            std::process::Command::new(&args[0])
                .args(&args[1..])
                .output()
        };
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Commits one transaction inserting `rows` into the outbox.
pub async fn commit(client: &mut Client, rows: &[(String, i64)]) {
    let tx = client.transaction().await.expect("begin");
    for (entity, version) in rows {
        tx.execute(
            "INSERT INTO freshness_outbox (entity, version) VALUES ($1, $2)",
            &[entity, version],
        )
        .await
        .expect("insert an outbox row");
    }
    tx.commit().await.expect("commit");
}
