//! The README's Python example (`examples/readthrough.py`, redis-py only)
//! reads through a Redis kept fresh by the real agent: after every change,
//! through an agent restart, while the agent is down and through a reset of
//! every shard (a hub that lost its log), it never serves a stale value past
//! its bound.

mod common;

use std::path::{Path, PathBuf};

use common::{Agent, Redis, publish};
use freshness_tests::{TestHub, wait_for};

/// A venv with redis-py under `target/`, made once and reused.
fn python() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let venv = target.join("python-venv");
    let python = venv.join("bin/python");
    let ready = |p: &Path| {
        std::process::Command::new(p)
            .args(["-c", "import redis"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "python3 -m venv {}", venv.display());
        let ok = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "redis"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install redis");
    }
    python
}

struct Example {
    python: PathBuf,
    redis: String,
    store: PathBuf,
}

impl Example {
    /// Commits a row: a new version in the store file, written atomically.
    fn commit(&self, entity: &str, version: u64, name: &str) {
        let body = format!(r#"{{"{entity}": {{"version": {version}, "name": "{name}"}}}}"#);
        let tmp = self.store.with_extension("tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &self.store).unwrap();
    }

    /// Runs `readthrough.py get ENTITY`: (value, source).
    async fn get(&self, entity: &str) -> (String, String) {
        let out = tokio::process::Command::new(&self.python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/readthrough.py"
            ))
            .args(["--redis", &self.redis, "--store"])
            .arg(&self.store)
            .args(["get", entity])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["value"].as_str().unwrap().to_owned(),
            v["source"].as_str().unwrap().to_owned(),
        )
    }
}

#[tokio::test]
async fn a_python_app_reads_through_a_redis_that_is_never_silently_stale() {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let redis = Redis::shared(8).await;
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = Example {
        python,
        redis: redis.url.clone(),
        store: dir.path().join("store.json"),
    };
    let args = ["--map", "user=cache:user:{id}"];
    let agent = Agent::start(&hub.url(), &redis, "agent-python", &args).await;
    redis.wait_ready().await;

    app.commit("user:1", 1, "Ada");
    assert_eq!(
        app.get("user:1").await,
        ("Ada".into(), "source (stored)".into())
    );
    assert_eq!(app.get("user:1").await, ("Ada".into(), "cache".into()));

    // Commit, then invalidate: the next read sees the change.
    app.commit("user:1", 2, "Ada Lovelace");
    publish(&hub, &[("user:1", 2)]).await;
    redis.wait_gone("cache:user:1").await;
    assert_eq!(
        app.get("user:1").await,
        ("Ada Lovelace".into(), "source (stored)".into())
    );

    // The agent dies and the row changes: the cache cannot be told, so
    // once the feed is past the app's bound (1 s) it reads the source.
    agent.kill().await;
    app.commit("user:1", 3, "Countess of Lovelace");
    publish(&hub, &[("user:1", 3)]).await;
    let (value, source) = wait_for(|| async {
        let got = app.get("user:1").await;
        (got.1 != "cache").then_some(got)
    })
    .await;
    assert_eq!(value, "Countess of Lovelace");
    assert_eq!(source, "source (feed stale: not cached)");

    // The agent comes back, resumes from its cursor in Redis, deletes the
    // stale key, and the app caches the new row again.
    let _agent = Agent::start(&hub.url(), &redis, "agent-python", &args).await;
    redis.wait_gone("cache:user:1").await;
    redis.wait_live().await;
    wait_for(|| async { (app.get("user:1").await.1 == "source (stored)").then_some(()) }).await;
    assert_eq!(
        app.get("user:1").await,
        ("Countess of Lovelace".into(), "cache".into())
    );

    // The hub restarts without its log (a new epoch) while the row changes:
    // the agent is reset, every key it manages goes, and the app caches the
    // new row once the reset's fence is past.
    let addr = hub.addr;
    hub.stop().await;
    app.commit("user:1", 4, "Ada, Countess of Lovelace");
    let hub = TestHub::start_on(addr, freshness_tests::test_config()).await;
    publish(&hub, &[("user:1", 4)]).await;
    redis.wait_gone("cache:user:1").await;
    wait_for(|| async { (app.get("user:1").await.1 == "source (stored)").then_some(()) }).await;
    assert_eq!(
        app.get("user:1").await,
        ("Ada, Countess of Lovelace".into(), "cache".into())
    );
}
