//! Real parts for the agent's tests: Redis servers (the shared one on
//! 127.0.0.1:6379 with a database per test, or one of the test's own on a
//! free port when it must restart or lose data), hubs on loopback and the
//! `freshness-agent` binary as a child process.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use freshness::pb;
use freshness_tests::{TestHub, publish_request, wait_for};
use redis::aio::MultiplexedConnection;
use tokio::process::{Child, Command};

/// A Redis database for one test.
pub struct Redis {
    /// `redis://127.0.0.1:PORT/DB`.
    pub url: String,
    pub port: u16,
    pub db: u32,
    /// Set for a server of the test's own (killed on drop).
    server: Option<Child>,
}

impl Redis {
    /// Database `db` of the shared server on 127.0.0.1:6379, emptied first.
    /// Each test uses its own `db`, so tests run in parallel.
    pub async fn shared(db: u32) -> Self {
        let r = Self {
            url: format!("redis://127.0.0.1:6379/{db}"),
            port: 6379,
            db,
            server: None,
        };
        let mut c = r.conn().await;
        let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
        r
    }

    /// A server of the test's own on a free port, no persistence.
    pub async fn own() -> Self {
        // Below the ephemeral range, as the hub harness's ports: a server
        // restarted on its port must find it free.
        let port = freshness_tests::free_port();
        let mut r = Self {
            url: format!("redis://127.0.0.1:{port}/0"),
            port,
            db: 0,
            server: None,
        };
        r.start().await;
        r
    }

    async fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on PATH");
        self.server = Some(child);
        let url = self.url.clone();
        wait_for(|| {
            let url = url.clone();
            async move {
                let c = redis::Client::open(url).ok()?;
                let mut c = c.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING").query_async::<String>(&mut c).await.ok()
            }
        })
        .await;
    }

    /// Kills the server (its data is gone) and starts a new one on the same
    /// port: a Redis restarted empty, with a new run id.
    pub async fn restart_empty(&mut self) {
        let mut child = self.server.take().expect("a server of the test's own");
        child.kill().await.unwrap();
        child.wait().await.unwrap();
        self.start().await;
    }

    pub async fn conn(&self) -> MultiplexedConnection {
        let c = redis::Client::open(self.url.as_str()).unwrap();
        c.get_multiplexed_async_connection().await.unwrap()
    }

    pub async fn exists(&self, key: &str) -> bool {
        let mut c = self.conn().await;
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<u32>(&mut c)
            .await
            .unwrap()
            == 1
    }

    pub async fn set(&self, key: &str, value: &str) {
        let mut c = self.conn().await;
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut c)
            .await
            .unwrap();
    }

    /// `FCALL freshness_fill_reason 1 KEY VALUE 0 ENTITY VERSION...`.
    pub async fn fill(&self, key: &str, value: &str, deps: &[(&str, u64)]) -> (i64, String) {
        self.try_fill(key, value, deps).await.unwrap()
    }

    /// The same, with Redis' error (a Redis without the library).
    pub async fn try_fill(
        &self,
        key: &str,
        value: &str,
        deps: &[(&str, u64)],
    ) -> redis::RedisResult<(i64, String)> {
        let mut c = self.conn().await;
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("freshness_fill_reason")
            .arg(1)
            .arg(key)
            .arg(value)
            .arg(0);
        for (e, v) in deps {
            cmd.arg(*e).arg(*v);
        }
        cmd.query_async(&mut c).await
    }

    pub async fn hget(&self, key: &str, field: &str) -> Option<String> {
        let mut c = self.conn().await;
        redis::cmd("HGET")
            .arg(key)
            .arg(field)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    pub async fn run_id(&self) -> String {
        let mut c = self.conn().await;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Waits until the agent wrote a live feed state.
    pub async fn wait_live(&self) {
        wait_for(|| async {
            (self.hget("freshness:feed", "state").await.as_deref() == Some("live")).then_some(())
        })
        .await;
    }

    /// Waits until the feed is live and the fence the agent put up when it
    /// started clean (fills refused for the tombstone TTL) is past.
    pub async fn wait_ready(&self) {
        self.wait_live().await;
        wait_for(|| async {
            let fence: u64 = self
                .hget("freshness:config", "fence_until")
                .await?
                .parse()
                .ok()?;
            let mut c = self.conn().await;
            let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.ok()?;
            (s * 1000 + us / 1000 >= fence).then_some(())
        })
        .await;
    }

    /// Waits until `key` is gone.
    pub async fn wait_gone(&self, key: &str) {
        wait_for(|| async { (!self.exists(key).await).then_some(()) }).await;
    }
}

/// The agent binary as a child process (killed on drop).
pub struct Agent {
    child: Child,
}

impl Agent {
    pub async fn start(hub: &str, redis: &Redis, node_id: &str, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_freshness-agent"))
            .args(["--hub", hub, "--redis", &redis.url, "--node-id", node_id])
            .args(if extra.contains(&"--metrics-listen") {
                &[][..]
            } else {
                &["--no-metrics"][..]
            })
            .args(["--persist-interval", "20ms", "--feed-interval", "50ms"])
            // Short fences after a clean start or a reset, so tests can fill
            // soon; a test that needs another value passes it again.
            .args(if extra.contains(&"--tombstone-ttl") {
                &[][..]
            } else {
                &["--tombstone-ttl", "300ms"][..]
            })
            .args(extra)
            .env(
                "FRESHNESS_LOG",
                std::env::var("FRESHNESS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn freshness-agent");
        Self { child }
    }

    /// SIGKILL: no last cursor write, no goodbye.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM and the exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let _ = Command::new("kill").arg(pid.to_string()).status().await;
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("agent stops on SIGTERM")
            .unwrap()
    }
}

/// Publishes `(entity, version)` pairs at ACCEPTED; returns the results.
pub async fn publish(hub: &TestHub, events: &[(&str, u64)]) -> Vec<pb::EventResult> {
    hub.client()
        .await
        .publish(publish_request(events))
        .await
        .expect("publish")
        .into_inner()
        .results
}
