//! Cross-region replication over real sockets, with a fault-injecting proxy
//! on every directed link (SPEC §3.3, G6).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use freshness::pb;
use freshness::pb::subscribe_response::Kind;
use freshness_tests::proxy::FaultProxy;
use freshness_tests::{
    NodeCursor, RawNode, TestHub, WAIT, bind, connect, hello, publish_request, test_config,
    wait_for,
};
use parking_lot::Mutex;

const REGIONS: [&str; 3] = ["a", "b", "c"];

/// Three hubs in full mesh; `links[(from, to)]` is the proxy `from` uses to
/// pull from `to`.
struct World {
    hubs: BTreeMap<&'static str, TestHub>,
    links: HashMap<(&'static str, &'static str), FaultProxy>,
}

impl World {
    async fn start() -> Self {
        let mut listeners = BTreeMap::new();
        for r in REGIONS {
            listeners.insert(r, bind().await);
        }
        let mut links = HashMap::new();
        for from in REGIONS {
            for to in REGIONS.into_iter().filter(|t| *t != from) {
                let target = listeners[to].local_addr().unwrap();
                links.insert((from, to), FaultProxy::start(target).await);
            }
        }
        let mut hubs = BTreeMap::new();
        for (r, listener) in listeners {
            hubs.insert(
                r,
                TestHub::start_with_listener(listener, Self::config(r, &links)),
            );
        }
        let world = Self { hubs, links };
        world.wait_connected().await;
        world
    }

    fn config(
        region: &'static str,
        links: &HashMap<(&'static str, &'static str), FaultProxy>,
    ) -> freshness_hub::Config {
        let mut c = test_config();
        c.region = region.into();
        c.hub_id = format!("hub-{region}");
        c.peers = REGIONS
            .into_iter()
            .filter(|p| *p != region)
            .map(|p| (p.to_owned(), links[&(region, p)].url()))
            .collect();
        c
    }

    /// Every link of every hub is up.
    async fn wait_connected(&self) {
        for hub in self.hubs.values() {
            wait_for(|| async {
                let s = hub.status().await;
                (s.peers.len() == 2 && s.peers.iter().all(|p| p.connected)).then_some(())
            })
            .await;
        }
    }

    fn url(&self, region: &str) -> String {
        self.hubs[region].url()
    }
}

/// A node that acks everything and records, per entity, the versions it saw
/// (asserting they only grow) and the resets it got.
#[derive(Default)]
struct Seen {
    latest: HashMap<String, u64>,
    resets: Vec<pb::Reset>,
    latencies_us: Vec<u64>,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn spawn_node(url: String, id: String) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut node = RawNode::connect(&url, hello(&id, &[], None)).await.unwrap();
    let out = seen.clone();
    tokio::spawn(async move {
        let mut cursor = NodeCursor::from_welcome(&node.welcome);
        while let Ok(Some(msg)) = node.next().await {
            cursor.apply(&msg);
            match &msg {
                Kind::Events(b) => {
                    let mut s = out.lock();
                    let now = now_us();
                    for d in &b.events {
                        let e = d.event.as_ref().unwrap();
                        let prev = s.latest.insert(e.entity.clone(), e.version).unwrap_or(0);
                        assert!(
                            e.version > prev,
                            "{id}: {} v{} after v{prev}",
                            e.entity,
                            e.version
                        );
                        s.latencies_us.push(now.saturating_sub(e.publish_time_us));
                    }
                }
                Kind::Reset(r) => {
                    let mut s = out.lock();
                    s.resets.push(r.clone());
                    // A reset drops the node's knowledge of those shards.
                    s.latest
                        .retain(|e, _| !r.all && !r.shards.contains(&freshness::shard(e, 64).0));
                }
                _ => {}
            }
            node.ack(cursor.cursor.clone()).await;
        }
    });
    seen
}

async fn wait_all_latest(nodes: &[Arc<Mutex<Seen>>], want: &HashMap<String, u64>) {
    for n in nodes {
        wait_for(|| async {
            let s = n.lock();
            want.iter()
                .all(|(e, v)| s.latest.get(e) == Some(v))
                .then_some(())
        })
        .await;
    }
}

/// Each writer publishes versions `round * 3 + w + 1` of the same entities,
/// so the same entity is written in every region.
async fn write_rounds(
    world: &World,
    entities: &[String],
    rounds: std::ops::Range<u64>,
) -> HashMap<String, u64> {
    let mut tasks = Vec::new();
    for (w, region) in REGIONS.into_iter().enumerate() {
        let url = world.url(region);
        let entities = entities.to_vec();
        let rounds = rounds.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            for round in rounds {
                let v = round * 3 + w as u64 + 1;
                let evs: Vec<(&str, u64)> = entities.iter().map(|e| (e.as_str(), v)).collect();
                client.publish(publish_request(&evs)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let newest = (rounds.end - 1) * 3 + 3;
    entities.iter().map(|e| (e.clone(), newest)).collect()
}

fn entities(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("item:{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_in_full_mesh_converge_on_the_newest_version() {
    let world = World::start().await;
    let mut nodes = Vec::new();
    for r in REGIONS {
        for i in 0..2 {
            nodes.push(spawn_node(world.url(r), format!("{r}-node-{i}")).await);
        }
    }
    let want = write_rounds(&world, &entities(30), 0..20).await;
    wait_all_latest(&nodes, &want).await;
    for n in &nodes {
        assert!(n.lock().resets.is_empty(), "no resets on a healthy mesh");
    }
    for r in REGIONS {
        let st = world.hubs[r].status().await;
        assert_eq!(st.region, r);
        assert!(
            st.peers
                .iter()
                .all(|p| p.connected && p.last_error.is_empty()),
            "{:?}",
            st.peers
        );
        // Every link has acked everything in the log it pulls from: on the
        // hub pulled from, each replicating stream's lag is its heads minus
        // its acked cursor, computed when the status is taken. (The lag a
        // hub shows for its peers is the link's view as of the last read of
        // the peer's heads, once a second, and is 0 before anything happens:
        // it proves nothing here. It is tested rising and falling below.)
        wait_for(|| async {
            let st = world.hubs[r].status().await;
            let links: Vec<_> = st.nodes.iter().filter(|n| n.replication).collect();
            (links.len() == 2 && links.iter().all(|n| n.lag_events == 0)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_catches_up_after_the_partition_heals() {
    let world = World::start().await;
    let mut nodes = Vec::new();
    for r in REGIONS {
        nodes.push(spawn_node(world.url(r), format!("{r}-node")).await);
    }
    let ents = entities(20);
    write_rounds(&world, &ents, 0..5).await;
    // Cut region c off, both ways.
    for other in ["a", "b"] {
        world.links[&("c", other)].partition();
        world.links[&(other, "c")].partition();
    }
    wait_for(|| async {
        let s = world.hubs["c"].status().await;
        s.peers.iter().all(|p| !p.connected).then_some(())
    })
    .await;
    write_rounds(&world, &ents, 5..15).await;
    for other in ["a", "b"] {
        world.links[&("c", other)].heal();
        world.links[&(other, "c")].heal();
    }
    let want = ents.iter().map(|e| (e.clone(), 45)).collect();
    wait_all_latest(&nodes, &want).await;
    for n in &nodes {
        let s = n.lock();
        assert!(
            s.resets.is_empty(),
            "resumed within the retained log: replay, no reset: {:?}",
            s.resets
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restarting_with_a_new_epoch_resets_the_other_regions_then_they_converge() {
    let mut world = World::start().await;
    let mut nodes = Vec::new();
    for r in ["a", "b"] {
        nodes.push(spawn_node(world.url(r), format!("{r}-node")).await);
    }
    let ents = entities(10);
    write_rounds(&world, &ents, 0..3).await;
    // Restart c on the same address: a new epoch.
    let c = world.hubs.remove("c").unwrap();
    let addr = c.addr;
    c.stop().await;
    world.hubs.insert(
        "c",
        TestHub::start_on(addr, World::config("c", &world.links)).await,
    );
    world.wait_connected().await;
    // a and b resume their link to c with a cursor of c's old epoch: each
    // resets its nodes for every shard, with reason REPLICATION_GAP.
    for n in &nodes {
        wait_for(|| async {
            let s = n.lock();
            let all: std::collections::BTreeSet<u32> = s
                .resets
                .iter()
                .filter(|r| r.reason == pb::ResetReason::ReplicationGap as i32)
                .flat_map(|r| r.shards.clone())
                .collect();
            (all.len() == 64).then_some(())
        })
        .await;
        let s = n.lock();
        assert!(
            s.resets
                .iter()
                .all(|r| r.reason == pb::ResetReason::ReplicationGap as i32),
            "only replication gaps: {:?}",
            s.resets
        );
    }
    let want = write_rounds(&world, &ents, 3..6).await;
    wait_all_latest(&nodes, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_acks_complete_when_every_region_applied_and_name_a_partitioned_region() {
    let world = World::start().await;
    for r in REGIONS {
        spawn_node(world.url(r), format!("{r}-node")).await;
    }
    let mut client = connect(&world.url("a")).await;
    let mut req = publish_request(&[("item:1", 1)]);
    req.ack = pb::AckLevel::Global as i32;
    req.timeout_ms = WAIT.as_millis() as u32;
    let resp = client.publish(req).await.unwrap().into_inner();
    assert!(resp.complete, "{resp:?}");
    assert_eq!(resp.applied_ack, pb::AckLevel::Global as i32);
    assert!(resp.pending_regions.is_empty() && resp.pending_nodes.is_empty());

    world.links[&("c", "a")].partition();
    let mut req = publish_request(&[("item:1", 2)]);
    req.ack = pb::AckLevel::Global as i32;
    // Long enough for region b and a's own node on a busy machine; c,
    // partitioned, stays pending however long it is.
    req.timeout_ms = 3_000;
    let resp = client.publish(req).await.unwrap().into_inner();
    assert!(!resp.complete);
    assert_eq!(resp.pending_regions, vec!["c"]);
    assert!(resp.pending_nodes.is_empty(), "region a's own node acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_shard_count_is_refused_and_shown_in_status() {
    let listener_a = bind().await;
    let listener_b = bind().await;
    let mut a = test_config();
    a.region = "a".into();
    a.peers.insert(
        "b".into(),
        format!("http://{}", listener_b.local_addr().unwrap()),
    );
    let mut b = test_config();
    b.region = "b".into();
    b.shards = 32;
    let hub_a = TestHub::start_with_listener(listener_a, a);
    let _hub_b = TestHub::start_with_listener(listener_b, b);
    let peer = wait_for(|| async {
        let s = hub_a.status().await;
        let p = s.peers.into_iter().next()?;
        (!p.last_error.is_empty()).then_some(p)
    })
    .await;
    assert!(!peer.connected);
    assert!(peer.last_error.contains("shard count"), "{peer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_keep_their_origin_and_publish_time_across_regions() {
    let world = World::start().await;
    let mut node = RawNode::connect(&world.url("b"), hello("b-watch", &[], None))
        .await
        .unwrap();
    let resp = connect(&world.url("a"))
        .await
        .publish(publish_request(&[("item:9", 3)]))
        .await
        .unwrap()
        .into_inner();
    let event = loop {
        if let Kind::Events(b) = node.expect().await {
            break b.events[0].clone();
        }
    };
    let e = event.event.unwrap();
    assert_eq!(
        (e.entity.as_str(), e.version, e.origin.as_str()),
        ("item:9", 3, "a")
    );
    assert!(e.publish_time_us > 0);
    assert_eq!(event.shard, resp.results[0].shard);
}

/// A link's lag while healthy, with watermarks every 50 ms.
const HEALTHY_MS: u64 = 500;

fn lag_config(region: &str) -> freshness_hub::Config {
    let mut c = test_config();
    c.region = region.into();
    c.hub_id = format!("hub-{region}");
    c.progress_interval = Duration::from_millis(50);
    c
}

/// Region `a` alone, and region `b` pulling from it through a proxy.
async fn pulled_through_proxy(a: freshness_hub::Config) -> (TestHub, FaultProxy, TestHub) {
    let a = TestHub::start_with(a).await;
    let proxy = FaultProxy::start(a.addr).await;
    let mut b = lag_config("b");
    b.peers.insert("a".into(), proxy.url());
    (a, proxy, TestHub::start_with(b).await)
}

/// What `hub` shows of its one peer.
async fn peer(hub: &TestHub) -> pb::PeerStatus {
    hub.status().await.peers.pop().expect("one peer")
}

/// Waits until `hub`'s one peer satisfies `pred`, and returns it.
async fn peer_until(hub: &TestHub, pred: impl Fn(&pb::PeerStatus) -> bool) -> pb::PeerStatus {
    wait_for(|| async {
        let p = peer(hub).await;
        pred(&p).then_some(p)
    })
    .await
}

async fn publish_versions(hub: &TestHub, n: usize, version: u64) -> HashMap<String, u64> {
    let mut client = hub.client().await;
    let ents = entities(n);
    for chunk in ents.chunks(1_000) {
        let evs: Vec<(&str, u64)> = chunk.iter().map(|e| (e.as_str(), version)).collect();
        client.publish(publish_request(&evs)).await.unwrap();
    }
    ents.into_iter().map(|e| (e, version)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_lag_rises_while_a_link_is_slow_or_cut_and_returns_to_zero() {
    // Region a lets a replicating stream have 8 x 64 = 512 events in flight,
    // so a link slowed by the proxy passes at most 512 events a round trip.
    let mut a = lag_config("a");
    a.max_in_flight = 64;
    let (a, proxy, b) = pulled_through_proxy(a).await;
    let node = spawn_node(b.url(), "b-node".into()).await;
    let healthy = |p: &pb::PeerStatus| p.connected && p.lag_events == 0 && p.lag_ms < HEALTHY_MS;
    peer_until(&b, healthy).await;

    // A slow link: 150 ms each way. 4,000 events published in a need about
    // eight round trips; b's view of a's heads, read once a second, shows
    // them not yet passed, while the link stays up.
    let delay = Duration::from_millis(150);
    proxy.set_delay(delay);
    let want = publish_versions(&a, 4_000, 1).await;
    let slow = peer_until(&b, |p| p.lag_events > 0).await;
    assert!(slow.connected, "{slow:?}");
    assert!(slow.lag_ms >= delay.as_millis() as u64, "{slow:?}");
    peer_until(&b, |p| p.connected && p.lag_events == 0).await;
    wait_all_latest(std::slice::from_ref(&node), &want).await;

    // A cut link: b stops hearing from a, and the age of a's last watermark
    // grows while a writes on.
    proxy.partition();
    peer_until(&b, |p| !p.connected).await;
    let want = publish_versions(&a, 4_000, 2).await;
    let cut = peer_until(&b, |p| p.lag_ms >= 2 * HEALTHY_MS).await;
    assert!(!cut.connected, "{cut:?}");

    // Healed (still slow): the link resumes from its cursor; the first read
    // of a's heads finds most of the 4,000 events not yet passed, then none.
    proxy.heal();
    let resumed = peer_until(&b, |p| p.connected && p.lag_events > 0).await;
    assert!(resumed.last_error.is_empty(), "{resumed:?}");
    peer_until(&b, |p| p.connected && p.lag_events == 0).await;
    wait_all_latest(std::slice::from_ref(&node), &want).await;
    // Resuming within a's log replays: the only resets b's node may have
    // seen are those of b's first contact with a, one per shard at most.
    let resets = node.lock().resets.clone();
    let mut shards: Vec<u32> = resets.iter().flat_map(|r| r.shards.clone()).collect();
    shards.sort_unstable();
    shards.dedup();
    assert!(
        resets
            .iter()
            .all(|r| r.reason == pb::ResetReason::ReplicationGap as i32 && !r.all)
            && shards.len() == resets.iter().map(|r| r.shards.len()).sum::<usize>(),
        "{resets:?}"
    );

    // Fast again: back to a healthy lag.
    proxy.set_delay(Duration::ZERO);
    let back = peer_until(&b, healthy).await;
    println!(
        "peer a as b sees it: slow {} events / {} ms, cut {} ms, resumed {} events, back {} events / {} ms",
        slow.lag_events, slow.lag_ms, cut.lag_ms, resumed.lag_events, back.lag_events, back.lag_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_never_reached_shows_its_lag_growing_until_it_is() {
    let (_a, proxy, b) = {
        let a = TestHub::start_with(lag_config("a")).await;
        let proxy = FaultProxy::start(a.addr).await;
        // Cut before b ever reaches a.
        proxy.partition();
        let mut b = lag_config("b");
        b.peers.insert("a".into(), proxy.url());
        (a, proxy, TestHub::start_with(b).await)
    };
    let never = peer_until(&b, |p| p.lag_ms >= 2 * HEALTHY_MS).await;
    assert!(
        !never.connected && !never.last_error.is_empty(),
        "{never:?}"
    );
    proxy.heal();
    peer_until(&b, |p| {
        p.connected && p.lag_events == 0 && p.lag_ms < HEALTHY_MS
    })
    .await;
}
