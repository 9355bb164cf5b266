//! Unit tests of the versioned cache's pure behaviour (no hub involved).

use std::sync::atomic::AtomicUsize;
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::*;
use crate::event::ResetReason;
use crate::feed::FeedTx;

fn e(s: &str) -> Entity {
    Entity::parse(s).unwrap()
}

fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

fn cache() -> VersionedCache<String, String> {
    VersionedCache::builder().build()
}

fn k(s: &str) -> String {
    s.to_owned()
}

#[tokio::test]
async fn invalidation_drops_entries_that_read_an_older_version() {
    let c = cache();
    c.insert(k("old"), k("a"), [Dep::at(e("user:1"), v(3))])
        .await
        .unwrap();
    c.insert(k("same"), k("b"), [Dep::at(e("user:1"), v(5))])
        .await
        .unwrap();
    c.insert(k("blind"), k("c"), [Dep::unversioned(e("user:1"))])
        .await
        .unwrap();
    c.insert(k("other"), k("d"), [Dep::at(e("user:2"), v(1))])
        .await
        .unwrap();
    c.invalidate(&e("user:1"), v(5)).await;
    assert_eq!(c.get(&k("old")).await, None);
    assert_eq!(c.get(&k("blind")).await, None);
    assert_eq!(c.get(&k("same")).await.as_deref(), Some("b"));
    assert_eq!(c.get(&k("other")).await.as_deref(), Some("d"));
    let s = c.stats();
    assert_eq!((s.invalidated, s.hits, s.misses), (2, 2, 2));
    // The eviction listener keeps the index in step with the entries.
    c.sync().await;
    assert_eq!(c.index_len(), 2);
}

#[tokio::test]
async fn fills_older_than_a_seen_invalidation_are_refused() {
    let c = cache();
    c.invalidate(&e("user:1"), v(7)).await;
    assert_eq!(c.invalidated_version(&e("user:1")), Some(v(7)));
    // An older invalidation never lowers what was seen.
    c.invalidate(&e("user:1"), v(2)).await;
    assert_eq!(c.invalidated_version(&e("user:1")), Some(v(7)));
    let refused = c
        .insert(
            k("p"),
            k("x"),
            [Dep::at(e("user:2"), v(1)), Dep::at(e("user:1"), v(6))],
        )
        .await;
    assert_eq!(
        refused,
        Err(FillRefused::StaleRead {
            entity: e("user:1"),
            read: v(6),
            invalidated: v(7)
        })
    );
    assert_eq!(c.get(&k("p")).await, None);
    c.insert(k("p"), k("x"), [Dep::at(e("user:1"), v(7))])
        .await
        .unwrap();
    assert_eq!(c.get(&k("p")).await.as_deref(), Some("x"));
    assert_eq!(c.stats().refused_fills, 1);
    c.sync().await;
    assert_eq!(c.index_len(), 1);
}

#[tokio::test]
async fn a_load_overtaken_by_an_invalidation_is_not_stored() {
    let c = cache();
    let (started_tx, started_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let loader_cache = c.clone();
    let load = tokio::spawn(async move {
        loader_cache
            .get_or_load(k("p"), || async move {
                // Reads the old row, then stalls before it can store it.
                let _ = started_tx.send(());
                let _ = go_rx.await;
                Ok::<_, std::io::Error>(Loaded::new(k("old"), [Dep::unversioned(e("user:1"))]))
            })
            .await
    });
    started_rx.await.unwrap();
    c.invalidate(&e("user:1"), v(2)).await;
    go_tx.send(()).unwrap();
    // The caller still gets what it read ...
    assert_eq!(load.await.unwrap().unwrap(), "old");
    // ... but it is not served to anyone after it.
    assert_eq!(c.get(&k("p")).await, None);
    assert_eq!(c.stats().refused_fills, 1);
}

#[tokio::test]
async fn a_reset_during_a_load_refuses_it_and_drops_only_its_shards() {
    let c = cache();
    // Pinned by the protocol crate: with 64 shards user:42 is in shard 2 and
    // post:7 in shard 48.
    c.insert(k("u"), k("u"), [Dep::at(e("user:42"), v(1))])
        .await
        .unwrap();
    c.insert(k("p"), k("p"), [Dep::at(e("post:7"), v(1))])
        .await
        .unwrap();
    c.insert(
        k("both"),
        k("b"),
        [Dep::at(e("post:7"), v(1)), Dep::at(e("user:42"), v(1))],
    )
    .await
    .unwrap();
    let t = c.ticket();
    c.reset(&Reset::shards([ShardId(2)], ResetReason::CursorExpired, 64))
        .await;
    assert_eq!(c.get(&k("u")).await, None);
    assert_eq!(c.get(&k("both")).await, None);
    assert_eq!(c.get(&k("p")).await.as_deref(), Some("p"));
    assert_eq!(
        c.insert_with_ticket(t, k("u"), k("u"), [Dep::at(e("user:42"), v(1))])
            .await,
        Err(FillRefused::ResetDuringLoad {
            entity: e("user:42")
        })
    );
    c.insert_with_ticket(t, k("p2"), k("p"), [Dep::at(e("post:7"), v(1))])
        .await
        .unwrap();
    c.insert(k("u"), k("u"), [Dep::at(e("user:42"), v(1))])
        .await
        .unwrap();
    c.reset(&Reset::all(ResetReason::EpochChanged, 64)).await;
    assert_eq!(c.get(&k("p")).await, None);
    assert_eq!(c.get(&k("u")).await, None);
    c.sync().await;
    assert_eq!(c.index_len(), 0);
    assert_eq!(c.stats().resets, 2);
}

#[tokio::test]
async fn concurrent_misses_share_one_load() {
    let c = cache();
    let loads = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = c.clone();
        let loads = loads.clone();
        let mut go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            c.get_or_load(k("p"), || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                let _ = go.wait_for(|g| *g).await;
                Ok::<_, std::io::Error>(Loaded::new(k("v"), [Dep::at(e("user:1"), v(1))]))
            })
            .await
        }));
    }
    // Every caller is either loading or waiting once the flight map holds the
    // key and the coalesced counter has counted the other seven.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.stats().coalesced < 7 {
        assert!(
            Instant::now() < deadline,
            "callers did not coalesce: {:?}",
            c.stats()
        );
        tokio::task::yield_now().await;
    }
    go_tx.send(true).unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "v");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(c.get(&k("p")).await.as_deref(), Some("v"));
}

#[tokio::test]
async fn waiters_load_themselves_when_the_leader_fails() {
    let c = cache();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let leader = {
        let c = c.clone();
        tokio::spawn(async move {
            c.get_or_load(k("p"), || async move {
                let _ = go_rx.await;
                Err::<Loaded<String>, _>("source down")
            })
            .await
        })
    };
    while c.inner.flights.len() == 0 {
        tokio::task::yield_now().await;
    }
    let follower = {
        let c = c.clone();
        tokio::spawn(async move {
            c.get_or_load(k("p"), || async {
                Ok::<_, &str>(Loaded::new(k("mine"), [Dep::at(e("user:1"), v(1))]))
            })
            .await
        })
    };
    while c.stats().coalesced == 0 {
        tokio::task::yield_now().await;
    }
    go_tx.send(()).unwrap();
    assert_eq!(leader.await.unwrap(), Err("source down"));
    assert_eq!(follower.await.unwrap(), Ok(k("mine")));
}

#[tokio::test]
async fn payload_events_refresh_in_place_when_newer() {
    let c: VersionedCache<String, String> = VersionedCache::builder()
        .refresh_with(|_key, _old, inv| {
            inv.payload
                .as_ref()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        })
        .build();
    c.insert(k("u"), k("v1"), [Dep::at(e("user:1"), v(1))])
        .await
        .unwrap();
    let inv = |version: u64, payload: Option<&'static str>| Invalidation {
        entity: e("user:1"),
        version: v(version),
        shard: ShardId(0),
        seq: version,
        origin: "eu".into(),
        publish_time_us: 0,
        payload: payload.map(|p: &'static str| Bytes::from_static(p.as_bytes())),
        traceparent: None,
        tracestate: None,
    };
    c.apply(&inv(2, Some("v2"))).await;
    assert_eq!(c.get(&k("u")).await.as_deref(), Some("v2"));
    // Older or equal versions leave the refreshed entry alone.
    c.apply(&inv(2, Some("stale"))).await;
    c.apply(&inv(1, Some("older"))).await;
    assert_eq!(c.get(&k("u")).await.as_deref(), Some("v2"));
    // A newer version without a payload drops it; the index follows.
    c.apply(&inv(3, None)).await;
    assert_eq!(c.get(&k("u")).await, None);
    let s = c.stats();
    assert_eq!((s.refreshed, s.invalidated), (1, 1));
    c.sync().await;
    assert_eq!(c.index_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn fail_closed_namespaces_miss_while_the_feed_is_stale() {
    let c: VersionedCache<String, String> = VersionedCache::builder()
        .policy(
            "price",
            FreshnessPolicy::FailClosed {
                max_staleness: Duration::from_secs(2),
            },
        )
        .build();
    c.insert(k("price"), k("9.99"), [Dep::at(e("price:1"), v(1))])
        .await
        .unwrap();
    c.insert(k("bio"), k("hi"), [Dep::at(e("user:1"), v(1))])
        .await
        .unwrap();
    c.insert(
        k("mixed"),
        k("m"),
        [Dep::at(e("user:1"), v(1)), Dep::at(e("price:1"), v(1))],
    )
    .await
    .unwrap();
    // No feed bound: nothing vouches for freshness.
    assert_eq!(c.get(&k("price")).await, None);
    let tx = FeedTx::new();
    c.bind_feed(tx.feed());
    // The hub's wire clock advances with tokio's (server/src/clock.rs).
    let (hub_base, start) = (SystemTime::now(), Instant::now());
    let hub_now = || hub_base + start.elapsed();
    tx.applied_watermark(hub_now(), Instant::now());
    assert_eq!(c.get(&k("price")).await.as_deref(), Some("9.99"));
    assert_eq!(c.get(&k("mixed")).await.as_deref(), Some("m"));
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(c.get(&k("price")).await, None);
    assert_eq!(c.get(&k("mixed")).await, None);
    assert_eq!(c.get(&k("bio")).await.as_deref(), Some("hi"));
    tx.applied_watermark(hub_now(), Instant::now());
    assert_eq!(c.get(&k("price")).await.as_deref(), Some("9.99"));
    tx.set(crate::FeedState::Down {
        error: "unreachable".into(),
    });
    assert_eq!(c.get(&k("price")).await, None);
    let s = c.stats();
    assert_eq!(s.fail_closed, 4);
    assert_eq!(s.misses, 4);
}

#[tokio::test]
async fn replacing_an_entry_keeps_the_index_exact() {
    let c = cache();
    c.insert(
        k("p"),
        k("1"),
        [Dep::at(e("user:1"), v(1)), Dep::at(e("user:2"), v(1))],
    )
    .await
    .unwrap();
    c.insert(
        k("p"),
        k("2"),
        [Dep::at(e("user:2"), v(1)), Dep::at(e("user:3"), v(1))],
    )
    .await
    .unwrap();
    c.sync().await;
    assert_eq!(c.index_len(), 2);
    // user:1 no longer concerns the entry.
    c.invalidate(&e("user:1"), v(9)).await;
    assert_eq!(c.get(&k("p")).await.as_deref(), Some("2"));
    c.invalidate(&e("user:2"), v(9)).await;
    assert_eq!(c.get(&k("p")).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_cache_that_outlives_its_subscriber_follows_the_new_feed() {
    // A node whose cache outlives its subscriber (cursor file, restart in
    // process) binds the new subscriber's feed.
    let c: VersionedCache<String, String> = VersionedCache::builder()
        .policy(
            "price",
            FreshnessPolicy::FailClosed {
                max_staleness: Duration::from_secs(1),
            },
        )
        .build();
    c.insert(k("price"), k("9.99"), [Dep::at(e("price:1"), v(1))])
        .await
        .unwrap();
    let first = FeedTx::new();
    c.bind_feed(first.feed());
    first.applied_watermark(SystemTime::now(), Instant::now());
    assert_eq!(c.get(&k("price")).await.as_deref(), Some("9.99"));
    // The first subscriber stops for good.
    first.set(crate::FeedState::Down {
        error: "subscriber stopped".into(),
    });
    drop(first);
    assert_eq!(c.get(&k("price")).await, None);
    let second = FeedTx::new();
    c.bind_feed(second.feed());
    assert_eq!(
        c.get(&k("price")).await,
        None,
        "no watermark on the new feed yet: staleness unknown"
    );
    second.applied_watermark(SystemTime::now(), Instant::now());
    assert_eq!(c.get(&k("price")).await.as_deref(), Some("9.99"));
}
