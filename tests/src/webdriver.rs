//! A real headless browser for tests of the hub's status page: Debian's
//! Chromium driven by its `chromedriver` over the W3C WebDriver HTTP API,
//! with a few plain HTTP/1.1 calls (hyper) and no client crate.
//!
//! Both binaries come from `scripts/install-chromium.sh`. A test that needs
//! them fails, naming the script, when they are missing: it never skips.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The longest one WebDriver command may take (starting the browser on a
/// busy machine is the slowest).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One HTTP/1.1 request on a fresh connection: the status and the body.
pub async fn http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// A `chromedriver` process and one browser session in it. Dropping it
/// ends the session's processes (chromedriver and the Chromium it started
/// share a process group of their own).
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
    log: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width` × `height`,
    /// its profile in a fresh directory under `scratch`.
    pub async fn start(scratch: &Path, width: u32, height: u32) -> anyhow::Result<Self> {
        for (bin, what) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")] {
            if !Path::new(bin).exists() {
                bail!("{what} is missing at {bin}: run scripts/install-chromium.sh");
            }
        }
        // Below the ephemeral range: between this choice and chromedriver's
        // bind, no outgoing connection can take it as its source port.
        let port = crate::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = scratch.join(format!("chromedriver-{}.log", std::process::id()));
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd.spawn().context("start chromedriver")?;
        let profile = scratch.join(format!("chromium-profile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
            profile,
            log,
        };
        // chromedriver answers /status once it listens.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let probe = http(addr, Method::GET, "/status", None);
            if let Ok(Ok((StatusCode::OK, body))) =
                tokio::time::timeout(Duration::from_secs(5), probe).await
            {
                let v: Value = serde_json::from_slice(&body)?;
                if v["value"]["ready"] == json!(true) {
                    break;
                }
            }
            if let Some(status) = browser.driver.try_wait()? {
                bail!("chromedriver exited at start: {status}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("chromedriver did not answer on {addr} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-background-networking".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", browser.profile.display()),
            format!("--window-size={width},{height}"),
        ];
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                }
            }
        });
        let v = browser.call(Method::POST, "/session", Some(&caps)).await?;
        browser.session = v["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("new session without an id: {v}"))?
            .to_owned();
        Ok(browser)
    }

    /// One WebDriver command; its `value`, or the driver's error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, http(self.addr, method, path, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "webdriver {path}: no answer within {COMMAND_TIMEOUT:?}; chromedriver's log ends:\n{}",
                    self.log_tail()
                )
            })?;
        let (status, bytes) = answer?;
        let v: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("webdriver {path}: not JSON: {bytes:?}"))?;
        if !status.is_success() {
            bail!(
                "webdriver {path}: {status}: {} {}; chromedriver's log ends:\n{}",
                v["value"]["error"],
                v["value"]["message"],
                self.log_tail()
            );
        }
        Ok(v["value"].clone())
    }

    /// The last lines of chromedriver's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn path(&self, tail: &str) -> String {
        format!("/session/{}{tail}", self.session)
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call(
            Method::POST,
            &self.path("/url"),
            Some(&json!({ "url": url })),
        )
        .await?;
        Ok(())
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn eval(&self, script: &str) -> anyhow::Result<Value> {
        self.call(
            Method::POST,
            &self.path("/execute/sync"),
            Some(&json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Types `text` into the element that `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let el = self
            .call(
                Method::POST,
                &self.path("/element"),
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .await?;
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("no element {css}: {el}"))?
            .to_owned();
        self.call(
            Method::POST,
            &self.path(&format!("/element/{id}/value")),
            Some(&json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let v = self
            .call(Method::GET, &self.path("/screenshot"), None)
            .await?;
        let b64 = v
            .as_str()
            .ok_or_else(|| anyhow!("screenshot is not a string"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
    }

    /// Ends the session (the browser exits) and chromedriver.
    pub async fn quit(mut self) -> anyhow::Result<()> {
        let ended = self.call(Method::DELETE, &self.path(""), None).await;
        self.session.clear();
        ended.map(|_| ())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browser it started. The
        // group's id is chromedriver's pid (`process_group(0)`). `--` is
        // required: procps' `kill -KILL -PID` reads `-PID` as an option and
        // signals pid -1, every process on the machine.
        let pgid = self.driver.id();
        if pgid > 1 {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pgid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
        let _ = std::fs::remove_file(&self.log);
    }
}
