//! The agent against real parts: real Redis servers, real hubs on loopback
//! and the `freshness-agent` binary as a process.

mod common;

use common::{Agent, Redis, publish};
use freshness::{Entity, pb};
use freshness_tests::{TestHub, test_config, wait_for};

/// Entities of `namespace` whose shard (out of `shards`) is `shard`.
fn in_shard(namespace: &str, shards: u32, shard: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{namespace}:{i}"))
        .filter(|e| Entity::parse(e).unwrap().shard(shards).0 == shard)
        .take(n)
        .collect()
}

#[tokio::test]
async fn publish_deletes_templated_and_dependent_keys_and_older_versions_do_nothing() {
    let redis = Redis::shared(1).await;
    let hub = TestHub::start().await;
    let _agent = Agent::start(
        &hub.url(),
        &redis,
        "agent-publish",
        &[
            "--map",
            "user=cache:user:{id}",
            "--map",
            "user=cache:user:{id}:profile",
        ],
    )
    .await;
    redis.wait_ready().await;

    // Templated keys written with a plain SET, a page filled through the
    // library with two dependencies, and keys the agent does not manage.
    redis.set("cache:user:1", "ada").await;
    redis.set("cache:user:1:profile", "ada's profile").await;
    assert_eq!(
        redis
            .fill("page:home", "<html>", &[("user:1", 3), ("post:9", 1)])
            .await,
        (1, "stored".into())
    );
    redis.set("cache:user:2", "bob").await;
    redis.set("unmanaged", "x").await;

    let r = publish(&hub, &[("user:1", 4)]).await;
    assert_eq!(r[0].outcome(), pb::PublishOutcome::Applied);
    for key in ["cache:user:1", "cache:user:1:profile", "page:home"] {
        redis.wait_gone(key).await;
    }
    assert!(redis.exists("cache:user:2").await);
    assert!(redis.exists("unmanaged").await);

    // A fill that read version 3 is refused; one at 4 is stored.
    let (stored, reason) = redis.fill("page:home", "<old>", &[("user:1", 3)]).await;
    assert_eq!(stored, 0);
    assert_eq!(reason, "stale user:1 read 3 invalidated 4");
    assert_eq!(
        redis.fill("page:home", "<new>", &[("user:1", 4)]).await.0,
        1
    );

    // An older version afterwards deletes nothing: the hub supersedes it,
    // and a later event (applied in order) proves the agent has moved on.
    redis.set("cache:user:1", "ada v4").await;
    let r = publish(&hub, &[("user:1", 2), ("user:77", 1)]).await;
    assert_eq!(r[0].outcome(), pb::PublishOutcome::Superseded);
    redis.set("cache:user:77", "x").await;
    publish(&hub, &[("user:77", 2)]).await;
    redis.wait_gone("cache:user:77").await;
    assert!(redis.exists("cache:user:1").await);
    assert!(redis.exists("page:home").await);
    assert_eq!(
        redis.fill("page:home", "<old>", &[("user:1", 2)]).await.0,
        0
    );
}

#[tokio::test]
async fn the_library_applies_versions_in_order_and_ignores_older_or_equal() {
    let redis = Redis::shared(2).await;
    let hub = TestHub::start().await;
    let _agent = Agent::start(&hub.url(), &redis, "agent-order", &[]).await;
    redis.wait_ready().await;
    let mut c = redis.conn().await;
    let apply = |v: u64| {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("freshness_apply")
            .arg(0)
            .arg(60_000)
            .arg("user:5")
            .arg(v)
            .arg(Entity::parse("user:5").unwrap().shard(64).0)
            .arg(1)
            .arg("cache:user:5");
        cmd
    };
    redis.set("cache:user:5", "a").await;
    let r: (u64, u64, u64) = apply(7).query_async(&mut c).await.unwrap();
    assert_eq!(r, (1, 0, 1));
    redis.set("cache:user:5", "b").await;
    // Redelivered (equal) and older versions are ignored: the key stays.
    let r: (u64, u64, u64) = apply(7).query_async(&mut c).await.unwrap();
    assert_eq!(r, (0, 1, 0));
    let r: (u64, u64, u64) = apply(6).query_async(&mut c).await.unwrap();
    assert_eq!(r, (0, 1, 0));
    assert!(redis.exists("cache:user:5").await);
    // Versions are u64 compared as numbers, beyond what a double holds.
    let r: (u64, u64, u64) = apply(u64::MAX - 1).query_async(&mut c).await.unwrap();
    assert_eq!(r, (1, 0, 1));
    assert_eq!(
        redis.fill("k", "v", &[("user:5", u64::MAX - 2)]).await.0,
        0,
        "a fill below a u64 tombstone is refused"
    );
    assert_eq!(redis.fill("k", "v", &[("user:5", u64::MAX)]).await.0, 1);
}

#[tokio::test]
async fn the_library_shards_like_the_hub_and_rejects_bad_fills() {
    let redis = Redis::shared(3).await;
    let hub = TestHub::start().await;
    let _agent = Agent::start(&hub.url(), &redis, "agent-shard", &["--shards", "64"]).await;
    redis.wait_live().await;
    let mut c = redis.conn().await;
    let mut entities: Vec<String> = (0..300).map(|i| format!("user:{i}")).collect();
    entities.extend(["post:7", "user:42", "ns.x:é-ü", "a:日本", "z:~!@#$%^&*()"].map(String::from));
    for e in &entities {
        let lua: u32 = redis::cmd("FCALL_RO")
            .arg("freshness_shard")
            .arg(0)
            .arg(e)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(lua, freshness::shard(e, 64).0, "{e}");
    }
    for (args, expect) in [
        (vec!["v", "x"], "TTL_MS"),
        (vec!["v", "0"], "ENTITY VERSION"),
        (vec!["v", "0", "User:1", "1"], "argument 3"),
        (vec!["v", "0", "user:1", "-1"], "argument 4"),
        (
            vec!["v", "0", "user:1", "18446744073709551616"],
            "argument 4",
        ),
    ] {
        let e = redis::cmd("FCALL")
            .arg("freshness_fill")
            .arg(1)
            .arg("k")
            .arg(&args)
            .query_async::<i64>(&mut c)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect), "{args:?}: {e}");
    }
    assert!(!redis.exists("k").await, "nothing stored by a bad fill");
    let e = redis
        .try_fill("freshness:config", "v", &[("user:1", 1)])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("the library's own"), "{e}");

    // A key with a TTL: its dependency set expires with it, not before.
    let stored: i64 = redis::cmd("FCALL")
        .arg("freshness_fill")
        .arg(1)
        .arg("t:1")
        .arg("v")
        .arg(5000)
        .arg("user:1")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    for key in ["t:1", "freshness:d:user:1"] {
        let left: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!((1..=5000).contains(&left), "{key}: {left}");
    }
}

#[tokio::test]
async fn the_fill_race_a_fill_that_read_3_landing_after_4_is_refused() {
    let redis = Redis::shared(4).await;
    let hub = TestHub::start().await;
    let _agent = Agent::start(&hub.url(), &redis, "agent-race", &["--map", "user=u:{id}"]).await;
    redis.wait_ready().await;
    // Version 3 applied (its key dropped), so that the marker below is
    // dropped by version 4 and nothing else.
    redis.set("u:8", "marker").await;
    publish(&hub, &[("user:8", 3)]).await;
    redis.wait_gone("u:8").await;
    // The reader reads the row at version 3 ... the writer commits 4 and
    // publishes; the agent applies it ... and the reader's fill lands.
    redis.set("u:8", "marker").await;
    publish(&hub, &[("user:8", 4)]).await;
    redis.wait_gone("u:8").await;
    let (stored, reason) = redis.fill("u:8", "version 3", &[("user:8", 3)]).await;
    assert_eq!(
        (stored, reason.as_str()),
        (0, "stale user:8 read 3 invalidated 4")
    );
    assert!(!redis.exists("u:8").await);
    assert_eq!(
        redis.hget("freshness:stats", "refused").await.as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn a_scoped_reset_removes_exactly_the_keys_of_its_shards() {
    let redis = Redis::shared(5).await;
    // 8 shards of 2 retained events each: 5 events into one shard while the
    // agent is away expire its cursor there, and only there.
    let hub = TestHub::start_with(freshness_hub::Config {
        shards: 8,
        log_max_events: 16,
        ..test_config()
    })
    .await;
    let args = ["--shards", "8", "--map", "user=cache:user:{id}"];
    let agent = Agent::start(&hub.url(), &redis, "agent-reset", &args).await;
    redis.wait_ready().await;
    publish(&hub, &[("warmup:1", 1)]).await;
    wait_for(|| async { redis.exists("freshness:cursor").await.then_some(()) }).await;

    let a = in_shard("user", 8, 3, 8);
    let b = in_shard("user", 8, 5, 2);
    // Filled keys and plain templated keys in shard 3 (not published: only
    // the reset can remove them), the same in shard 5, and unmanaged keys.
    for e in [&a[0], &b[0]] {
        assert_eq!(redis.fill(&format!("page:{e}"), "v", &[(e, 1)]).await.0, 1);
    }
    for e in [&a[1], &b[1]] {
        redis.set(&format!("cache:{e}"), "v").await;
    }
    redis.set("unmanaged:1", "v").await;
    redis.set("cache:post:1", "v").await;

    agent.kill().await;
    let burst: Vec<(&str, u64)> = a[2..7].iter().map(|e| (e.as_str(), 1)).collect();
    publish(&hub, &burst).await;
    // A long tombstone TTL this time: the reset's fence is checked below.
    let args = [&args[..], &["--tombstone-ttl", "20s"]].concat();
    let _agent = Agent::start(&hub.url(), &redis, "agent-reset", &args).await;

    redis.wait_gone(&format!("page:{}", a[0])).await;
    redis.wait_gone(&format!("cache:{}", a[1])).await;
    // The reset is applied before the agent acks it, and its fence refuses
    // fills on the shard for the tombstone TTL.
    assert_eq!(
        redis.fill("p", "v", &[(&a[7], 1)]).await.1,
        format!("reset {} shard 3", a[7])
    );
    assert!(redis.exists(&format!("page:{}", b[0])).await);
    assert!(redis.exists(&format!("cache:{}", b[1])).await);
    assert!(redis.exists("unmanaged:1").await);
    assert!(redis.exists("cache:post:1").await);
    assert!(redis.exists("freshness:config").await);
}

#[tokio::test]
async fn a_killed_agent_resumes_from_its_cursor_in_redis_and_misses_nothing() {
    let redis = Redis::shared(6).await;
    let hub = TestHub::start().await;
    let args = ["--map", "user=cache:user:{id}"];
    let agent = Agent::start(&hub.url(), &redis, "agent-resume", &args).await;
    redis.wait_live().await;
    redis.set("cache:user:1", "v").await;
    publish(&hub, &[("user:1", 1)]).await;
    redis.wait_gone("cache:user:1").await;
    // The cursor in Redis covers that event before the agent is killed.
    let seq = |text: Option<String>| -> u64 {
        text.map_or(0, |t| {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            v["seqs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_u64().unwrap())
                .sum()
        })
    };
    wait_for(|| async {
        let mut c = redis.conn().await;
        let t: Option<String> = redis::cmd("GET")
            .arg("freshness:cursor")
            .query_async(&mut c)
            .await
            .unwrap();
        (seq(t) >= 1).then_some(())
    })
    .await;
    agent.kill().await;

    // While it is away: keys filled, then their entities change; and a key
    // whose entity does not change, which a start at the head would delete.
    for i in 2..=5 {
        redis.set(&format!("cache:user:{i}"), "old").await;
    }
    redis.set("cache:user:7", "still fresh").await;
    let events: Vec<(String, u64)> = (2..=5).map(|i| (format!("user:{i}"), 1)).collect();
    let events: Vec<(&str, u64)> = events.iter().map(|(e, v)| (e.as_str(), *v)).collect();
    publish(&hub, &events).await;

    let agent = Agent::start(&hub.url(), &redis, "agent-resume", &args).await;
    for i in 2..=5 {
        redis.wait_gone(&format!("cache:user:{i}")).await;
    }
    redis.wait_live().await;
    assert!(redis.exists("cache:user:7").await, "resumed, not reset");
    assert!(agent.stop().await.success(), "SIGTERM is a clean stop");
    assert_eq!(
        redis.hget("freshness:feed", "state").await.as_deref(),
        Some("stopped")
    );
}

#[tokio::test]
async fn a_redis_restarted_with_its_data_gone_makes_the_agent_start_clean() {
    let mut redis = Redis::own().await;
    let hub = TestHub::start().await;
    let args = ["--map", "user=cache:user:{id}", "--tombstone-ttl", "5s"];
    let agent = Agent::start(&hub.url(), &redis, "agent-lost", &args).await;
    redis.wait_live().await;

    // A reader reads user:1 at version 1; the writer commits 2, the agent
    // applies it (tombstone 2) ... and Redis restarts empty, tombstone gone.
    publish(&hub, &[("user:1", 2)]).await;
    wait_for(|| async { redis.exists("freshness:v:user:1").await.then_some(()) }).await;
    let before = redis.run_id().await;
    redis.restart_empty().await;
    assert_ne!(redis.run_id().await, before);

    // The late fill is refused: first because nothing is initialised, then
    // by the fence the agent puts up when it finds the new Redis.
    match redis.try_fill("cache:user:1", "v1", &[("user:1", 1)]).await {
        Err(e) => assert!(e.to_string().contains("Function not found"), "{e}"),
        Ok((stored, reason)) => assert_eq!(stored, 0, "{reason}"),
    }
    let run_id = redis.run_id().await;
    wait_for(|| async {
        (redis.hget("freshness:config", "run_id").await.as_deref() == Some(run_id.as_str()))
            .then_some(())
    })
    .await;
    assert_eq!(
        redis.fill("cache:user:1", "v1", &[("user:1", 1)]).await,
        (0, "fenced".into())
    );
    // The agent kept its place at the hub: the next change is applied.
    redis.wait_live().await;
    redis.set("cache:user:3", "old").await;
    publish(&hub, &[("user:3", 1)]).await;
    redis.wait_gone("cache:user:3").await;
    // Once the fence is past, fills are stored again.
    wait_for(|| async { (redis.fill("k", "v", &[("user:9", 1)]).await.0 == 1).then_some(()) })
        .await;

    // The agent stopped, Redis restarted empty, an app writes a key: the
    // agent finds no cursor, starts at the head and deletes every managed
    // key, since nothing it missed is covered.
    agent.kill().await;
    redis.restart_empty().await;
    redis
        .set("cache:user:4", "written while nobody watched")
        .await;
    redis.set("unmanaged", "x").await;
    let _agent = Agent::start(&hub.url(), &redis, "agent-lost", &args).await;
    redis.wait_gone("cache:user:4").await;
    redis.wait_live().await;
    assert!(redis.exists("unmanaged").await);
}

#[tokio::test]
async fn a_namespace_fails_closed_when_the_feed_is_stale() {
    let redis = Redis::shared(7).await;
    let hub = TestHub::start().await;
    let addr = hub.addr;
    // Well above the hub's 250 ms progress interval, so that the first
    // fill finds the feed fresh on a busy machine.
    let args = ["--map", "price=price:{id}", "--fail-closed", "price=1500ms"];
    let _agent = Agent::start(&hub.url(), &redis, "agent-closed", &args).await;
    redis.wait_ready().await;
    assert_eq!(redis.fill("price:1", "9.99", &[("price:1", 1)]).await.0, 1);
    assert_eq!(redis.fill("user-page", "x", &[("user:1", 1)]).await.0, 1);

    hub.stop().await;
    redis.wait_gone("price:1").await;
    // The library refuses from the same clock the agent closes on, so by
    // the time the key is gone fills are refused.
    let (stored, reason) = redis.fill("price:1", "9.99", &[("price:1", 1)]).await;
    assert_eq!((stored, reason.as_str()), (0, "fail_closed price"));
    assert!(
        redis.exists("user-page").await,
        "other namespaces keep serving"
    );
    assert_ne!(
        redis.hget("freshness:feed", "state").await.as_deref(),
        Some("live")
    );

    // A hub again (a new epoch: the agent is reset, then live): fills pass.
    let _hub = TestHub::start_on(addr, test_config()).await;
    redis.wait_live().await;
    wait_for(|| async {
        (redis.fill("price:1", "9.99", &[("price:1", 5)]).await.0 == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn invalid_configuration_exits_64_naming_the_setting() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_freshness-agent"))
        .args(["--map", "user=cache:user", "--no-metrics"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`map`") && err.contains("cache:user"), "{err}");
}

#[tokio::test]
async fn metrics_count_what_the_agent_applied() {
    let redis = Redis::shared(9).await;
    let hub = TestHub::start().await;
    let port = freshness_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--map", "user=cache:user:{id}", "--metrics-listen", &listen];
    let _agent = Agent::start(&hub.url(), &redis, "agent-metrics", &args).await;
    redis.wait_ready().await;
    redis.set("cache:user:1", "v").await;
    publish(&hub, &[("user:1", 1)]).await;
    redis.wait_gone("cache:user:1").await;
    assert_eq!(redis.fill("p", "v", &[("user:1", 0)]).await.0, 0);
    let scrape = || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&listen).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    wait_for(|| async {
        let body = scrape().await?;
        (body.contains("freshness_agent_applied_total 1")
            && body.contains("freshness_agent_deleted_keys_total 1")
            && body.contains("freshness_agent_refused_fills 1")
            && body.contains("freshness_agent_redis_seconds_bucket"))
        .then_some(())
    })
    .await;
}
