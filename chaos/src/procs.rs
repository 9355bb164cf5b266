//! Real processes for the relay and agent worlds: the `freshness-relay` and
//! `freshness-agent` binaries, a PostgreSQL cluster and Redis servers of the
//! world's own on free loopback ports (never the machine's shared ones), and
//! a proxy that can pause a connection the way a stopped process does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

/// Where a world's binaries are found: `FRESHNESS_CHAOS_BIN_DIR`, else the
/// directory of the running executable or its parent (`target/debug` for
/// both `freshness-chaos` and the test binaries in `target/debug/deps`).
pub fn binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FRESHNESS_CHAOS_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{} not found (FRESHNESS_CHAOS_BIN_DIR)", p.display());
    }
    let exe = std::env::current_exe().context("the path of this executable")?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
        dir = d.parent();
    }
    bail!(
        "{name} not found next to {}: build it with `cargo build -p {package}` (the same profile), or set FRESHNESS_CHAOS_BIN_DIR",
        exe.display()
    )
}

/// A free loopback port (bound and released) for a server of the world's
/// own, below the ephemeral range for the reason [`bind_restartable`]
/// gives: PostgreSQL and Redis restart on the same port.
pub fn free_port() -> anyhow::Result<u16> {
    use rand::Rng;
    for _ in 0..200 {
        let port = rand::rng().random_range(20_000..32_000u16);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between 20000 and 32000 on 127.0.0.1")
}

/// A listener for a server that will restart on the same address: a port
/// below Linux' ephemeral range (32768 and up), so that while the server is
/// down no outgoing connection of this machine takes its port as its own
/// local one and keeps it from binding again.
pub async fn bind_restartable() -> anyhow::Result<TcpListener> {
    use rand::Rng;
    for _ in 0..200 {
        let port = rand::rng().random_range(20_000..32_000u16);
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
            return Ok(l);
        }
    }
    bail!("no free port between 20000 and 32000 on 127.0.0.1")
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`) to a child.
pub async fn signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let pid = child.id().context("the process has exited")?;
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// SIGKILL, and wait until the process is gone.
pub async fn kill(mut child: Child) {
    let _ = child.kill().await;
    let _ = child.wait().await;
}

/// Polls `f` with a backoff from 5 ms to 100 ms until it is true.
pub async fn poll_until<F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    while !f().await {
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    Ok(())
}

/// Children write their logs only when `FRESHNESS_CHAOS_LOG` is set (to a
/// `FRESHNESS_LOG` filter).
pub fn child_log() -> (String, Stdio) {
    match std::env::var("FRESHNESS_CHAOS_LOG") {
        Ok(filter) => (filter, Stdio::inherit()),
        Err(_) => ("off".into(), Stdio::null()),
    }
}

/// A PostgreSQL cluster of the world's own: `initdb` in a temporary
/// directory, served on a free port with the cluster binaries found under
/// `/usr/lib/postgresql/*/bin`; stopped (immediate) when dropped.
pub struct OwnPostgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    root: bool,
}

impl OwnPostgres {
    /// A new cluster, started, trust authentication for `postgres`.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is installed under /usr/lib/postgresql")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .context("an initdb under /usr/lib/postgresql/*/bin")?;
        let dir = tempfile::Builder::new()
            .prefix("freshness-chaos-pg-")
            .tempdir()
            .context("a directory for the cluster")?;
        let root = Command::new("id")
            .arg("-u")
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if root {
            // PostgreSQL refuses to run as root: the directory goes to
            // `postgres`, and every tool runs as that user.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .await
                .context("chown")?;
            if !status.success() {
                bail!("chown the cluster directory to postgres");
            }
        }
        let pg = Self {
            port: free_port()?,
            dir,
            bin,
            root,
        };
        let data = pg.data();
        pg.tool(&[
            &pg.bin.join("initdb").to_string_lossy(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-D",
            &data.to_string_lossy(),
        ])
        .await?;
        pg.pg_ctl("start").await?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `host=127.0.0.1 port=… user=postgres dbname=postgres`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// `pg_ctl start | stop | restart` (fast shutdown), waiting for it.
    pub async fn pg_ctl(&self, action: &str) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.path().display()
        );
        let data = self.data().to_string_lossy().into_owned();
        let log = self.dir.path().join("log").to_string_lossy().into_owned();
        let pg_ctl = self.bin.join("pg_ctl").to_string_lossy().into_owned();
        let mut args = vec![pg_ctl.as_str(), "-D", &data, "-w", "-m", "fast", "-l", &log];
        if action != "stop" {
            args.extend(["-o", &options]);
        }
        args.push(action);
        self.tool(&args).await
    }

    async fn tool(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(args);
            c
        } else {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        };
        let out = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {}", args[0]))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data().to_string_lossy().into_owned();
        let pg_ctl = self.bin.join("pg_ctl").to_string_lossy().into_owned();
        let args = [pg_ctl.as_str(), "-D", &data, "-m", "immediate", "stop"];
        let mut cmd = if self.root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(args);
            c
        } else {
            let mut c = std::process::Command::new(args[0]);
            c.args(&args[1..]);
            c
        };
        let _ = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A Redis server of the world's own on a free port, no persistence: a
/// restart loses its data and gives it a new run id.
pub struct OwnRedis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts one and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let mut r = Self {
            port: free_port()?,
            child: None,
        };
        r.spawn().await?;
        Ok(r)
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("redis-server on PATH")?;
        self.child = Some(child);
        let client = redis::Client::open(self.url()).context("redis url")?;
        poll_until(Duration::from_secs(20), "redis-server answers", || {
            let client = client.clone();
            async move {
                let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            }
        })
        .await
    }

    /// Kills the server (SIGKILL: its data is gone).
    pub async fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child).await;
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn().await
    }
}

/// A TCP proxy to one target that can pause: while paused it reads nothing
/// from either side, so bytes wait in the sockets' buffers and connections
/// stay open, as with a process stopped by SIGSTOP.
pub struct PauseProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    paused: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl PauseProxy {
    /// Starts a proxy to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the pause proxy")?;
        let addr = listener.local_addr().context("proxy address")?;
        let paused = watch::Sender::new(false);
        let rx = paused.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    // A paused process accepts nothing either: the client
                    // waits in the backlog.
                    let mut gate = rx.clone();
                    let _ = gate.wait_for(|p| !*p).await;
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::select! {
                        () = pipe(cr, uw, rx.clone()) => {}
                        () = pipe(ur, cw, rx) => {}
                    }
                });
            }
        });
        Ok(Self { addr, paused, task })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding in both directions.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

impl Drop for PauseProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Paused while waiting for bytes: go back to the gate.
            _ = paused.wait_for(|p| *p) => continue,
        };
        // Bytes already read are held until the pause ends, as a stopped
        // process holds what it had read.
        if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The path of a file in a directory, as a string for a flag.
pub fn path_arg(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}
