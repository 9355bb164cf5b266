//! The server under test as a process: a fresh `freshness-hub` child per
//! run (optionally pinned with `taskset`), or an external server (a hub
//! given by `--hub`, NATS, Redis) whose pid, when given, is measured.
//!
//! Why a child process rather than a hub inside the bench: the kernel then
//! accounts the hub's CPU time and memory (`/proc/PID`) apart from the load
//! generator's, exactly as for NATS and Redis, and pinning it to its own core
//! is one `taskset`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use freshness::pb;

use crate::target::{hub_client, hub_endpoint};

/// A server the run talks to.
#[derive(Debug)]
pub struct Server {
    /// Where nodes and publisher connect: for the replicas of one region
    /// (`--hub URL1,URL2,…`), node `i` connects to the `i mod n`-th and the
    /// publisher to the first.
    urls: Vec<String>,
    /// Its processes (one per replica), for CPU and memory, when known.
    pub pids: Vec<u32>,
    /// True when this run started it (so its peak RSS is this run's).
    pub fresh: bool,
    child: Option<tokio::process::Child>,
    /// The started hub's own log directory, removed when it stops.
    data_dir: Option<PathBuf>,
}

/// How to start hubs.
#[derive(Debug, Clone)]
pub struct HubLauncher {
    /// The `freshness-hub` binary.
    pub bin: PathBuf,
    /// `taskset -c` list to pin it to, if any.
    pub cpus: Option<String>,
    /// Extra flags.
    pub args: Vec<String>,
}

impl HubLauncher {
    /// The started hubs keep no log (`--ephemeral`).
    pub fn ephemeral(&self) -> bool {
        self.args.iter().any(|a| a == "--ephemeral")
    }
}

/// `freshness-hub` next to this binary (`target/release/`), unless told.
pub fn default_hub_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("freshness-hub")))
        .unwrap_or_else(|| PathBuf::from("freshness-hub"))
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Server {
    /// An external server (a comma-separated list of hub replicas).
    pub fn external(url: String, pids: Vec<u32>) -> Self {
        Self {
            urls: url.split(',').map(|u| u.trim().to_owned()).collect(),
            pids,
            fresh: false,
            child: None,
            data_dir: None,
        }
    }

    /// Starts a fresh hub on a free loopback port and waits until it serves;
    /// `secure`: with TLS and token authentication ([`crate::secure`]).
    pub async fn spawn_hub(l: &HubLauncher, secure: bool) -> Result<Self> {
        if !Path::new(&l.bin).exists() {
            bail!(
                "hub binary {} not found: build it with `cargo build --release -p freshness-hub` or pass --hub-bin",
                l.bin.display()
            );
        }
        let port = free_port()?;
        // Every started hub gets an empty log directory of its own: a hub
        // started on an earlier run's log would answer this run's versions
        // as duplicates. Unless the flags choose the log already.
        let data_dir = if l
            .args
            .iter()
            .any(|a| a.starts_with("--data-dir") || a == "--ephemeral")
        {
            None
        } else {
            static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("freshness-bench-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Some(dir)
        };
        // A hub on a JetStream log (`--log jetstream`) keeps its log in the
        // region's stream, across hub starts: each started hub gets a region
        // (so a stream) of its own, for the same reason. Unless the flags
        // name the region.
        let jetstream = l
            .args
            .iter()
            .any(|a| a == "jetstream" || a == "--log=jetstream");
        let region = (jetstream && !l.args.iter().any(|a| a.starts_with("--region"))).then(|| {
            static REGIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = REGIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("bench-{}-{n}", std::process::id())
        });
        let mut cmd = match &l.cpus {
            Some(cpus) => {
                let mut c = tokio::process::Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&l.bin);
                c
            }
            None => tokio::process::Command::new(&l.bin),
        };
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .arg("--hub-id")
            .arg("bench-hub")
            .args(
                data_dir
                    .iter()
                    .flat_map(|d| [std::ffi::OsString::from("--data-dir"), d.into()]),
            )
            .args(
                region
                    .iter()
                    .flat_map(|r| [std::ffi::OsString::from("--region"), r.into()]),
            )
            .args(if secure {
                crate::secure::material()?.hub_args()
            } else {
                Vec::new()
            })
            .args(&l.args)
            .env("FRESHNESS_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting the hub")?;
        let server = Self {
            urls: vec![format!(
                "{}://127.0.0.1:{port}",
                if secure { "https" } else { "http" }
            )],
            pids: child.id().into_iter().collect(),
            fresh: true,
            child: Some(child),
            data_dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if server.hub_status().await.is_some() {
                return Ok(server);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the hub did not come up on {}", server.url());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address of the first (or only) server: the publisher's.
    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    /// The address node `i` connects to.
    pub fn node_url(&self, i: usize) -> &str {
        &self.urls[i % self.urls.len()]
    }

    /// The (first) hub's status, if it answers.
    pub async fn hub_status(&self) -> Option<pb::StatusResponse> {
        let channel = hub_endpoint(self.url()).ok()?.connect().await.ok()?;
        hub_client(self.url(), channel)
            .ok()?
            .status(pb::StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Stops a hub this run started.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        if let Some(dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
