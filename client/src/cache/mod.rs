//! The versioned cache: a [`moka`] cache whose entries know which entities
//! they were read from, at which versions, so that invalidations and resets
//! drop exactly what they make stale.
//!
//! - Every entry records its dependencies ([`Dep`]: an entity and, when the
//!   reader knows it, the version it read), like surrogate keys on a CDN.
//!   An invalidation of `(entity, v)` drops every entry that read `entity` at
//!   a version older than `v` (or at an unknown version). With a
//!   [refresher](VersionedCacheBuilder::refresh_with), an event that carries a
//!   payload replaces such entries in place instead.
//! - The cache remembers, per entity, the highest version invalidated
//!   (bounded in count and time), and refuses a fill read at an older version
//!   with [`FillRefused::StaleRead`] (SPEC G3).
//! - [`get_or_load`](VersionedCache::get_or_load) coalesces concurrent misses
//!   of one key into one load, and does not store a load that began before an
//!   invalidation (or a reset) of any of its dependencies landed, even when
//!   the loader cannot tell versions: it takes a [`Ticket`] before loading and
//!   the store is refused if a dependency was invalidated after it.
//! - A reset drops exactly the entries that depend on an entity in the reset's
//!   shards.
//! - Per namespace, a [`FreshnessPolicy`] decides what happens when the feed
//!   falls behind: [`FailClosed`](FreshnessPolicy::FailClosed) makes `get`
//!   miss while the feed's staleness exceeds the bound (or the feed is down),
//!   [`ServeStale`](FreshnessPolicy::ServeStale) keeps serving.
//!
//! The cache is a [`Handler`]: give it to a
//! [`Subscriber`](crate::Subscriber) and [bind](VersionedCache::bind_feed)
//! the subscriber's feed.
//!
//! ```
//! use freshness::{Entity, Version};
//! use freshness_client::{Dep, Loaded, VersionedCache};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let cache: VersionedCache<String, String> = VersionedCache::builder().max_capacity(10_000).build();
//! let user = Entity::parse("user:42").unwrap();
//! let v3 = Version::new(3).unwrap();
//!
//! // A read-through fill: the loader reports what it read, at which version.
//! let name = cache
//!     .get_or_load("profile:42".to_string(), || async {
//!         Ok::<_, std::io::Error>(Loaded::new("Ada".to_string(), [Dep::at(user.clone(), v3)]))
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!(name, "Ada");
//! assert_eq!(cache.get(&"profile:42".to_string()).await.as_deref(), Some("Ada"));
//!
//! // The writer commits version 4 and publishes it: the entry goes ...
//! cache.invalidate(&user, Version::new(4).unwrap()).await;
//! assert_eq!(cache.get(&"profile:42".to_string()).await, None);
//! // ... and a late fill that read version 3 is refused.
//! let refused = cache
//!     .insert("profile:42".to_string(), "Ada".to_string(), [Dep::at(user, v3)])
//!     .await;
//! assert!(refused.is_err());
//! # }
//! ```

mod flight;
mod index;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use freshness::{Entity, ShardId, Version};
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use self::flight::{Flight, Flights, Join};
use self::index::DepIndex;
use crate::event::{EventBatch, Invalidation, Reset, ResetReason, ResetScope};
use crate::feed::Feed;
use crate::subscriber::{Handler, HandlerError};

/// One thing a cached value was read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dep {
    /// The entity read.
    pub entity: Entity,
    /// The version read, when the reader knows it. Without it, any
    /// invalidation of the entity drops the entry.
    pub version: Option<Version>,
}

impl Dep {
    /// `entity` read at `version`.
    pub fn at(entity: Entity, version: Version) -> Self {
        Self {
            entity,
            version: Some(version),
        }
    }

    /// `entity` read at a version the reader cannot tell.
    pub fn unversioned(entity: Entity) -> Self {
        Self {
            entity,
            version: None,
        }
    }

    /// True when an invalidation of `entity` at `version` makes this read
    /// stale.
    fn stale_after(&self, entity: &Entity, version: Version) -> bool {
        self.entity == *entity && self.version.is_none_or(|r| r < version)
    }
}

/// What a loader returns: the value and what it was read from.
#[derive(Debug, Clone)]
pub struct Loaded<V> {
    /// The value to cache.
    pub value: V,
    /// What it depends on.
    pub deps: Vec<Dep>,
}

impl<V> Loaded<V> {
    /// A value and its dependencies.
    pub fn new(value: V, deps: impl IntoIterator<Item = Dep>) -> Self {
        Self {
            value,
            deps: deps.into_iter().collect(),
        }
    }
}

/// Why a fill was not stored. The value itself may still be used for the
/// request that read it; it just must not be served to later ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillRefused {
    /// The fill read an entity at a version older than one already
    /// invalidated (SPEC G3).
    #[error(
        "fill read {entity} at version {read}, but version {invalidated} was already invalidated"
    )]
    StaleRead {
        /// The entity.
        entity: Entity,
        /// The version the fill read.
        read: Version,
        /// The newest version invalidated.
        invalidated: Version,
    },
    /// An entity the fill read (at an unknown version) was invalidated after
    /// the fill's ticket was taken.
    #[error("{entity} was invalidated while the fill was loading")]
    InvalidatedDuringLoad {
        /// The entity.
        entity: Entity,
    },
    /// The shard of an entity the fill read was reset after the fill's
    /// ticket was taken: an invalidation of it may have been lost.
    #[error("the shard of {entity} was reset while the fill was loading")]
    ResetDuringLoad {
        /// The entity.
        entity: Entity,
    },
    /// The cache no longer remembers every invalidation since the ticket was
    /// taken (its memory of them is bounded in count and time), so it cannot
    /// vouch for the fill.
    #[error("the fill's ticket is older than what the cache remembers of invalidations")]
    TicketTooOld,
}

/// What to do with a namespace's entries while the feed is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreshnessPolicy {
    /// Keep serving cached entries, however stale the feed (the default).
    ServeStale,
    /// Miss (and so read the source of truth) while the feed's staleness
    /// exceeds `max_staleness`, the feed is down, or no feed is bound.
    FailClosed {
        /// The most staleness tolerated.
        max_staleness: Duration,
    },
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `get` calls answered from the cache.
    pub hits: u64,
    /// `get` calls answered with nothing (including the fail-closed ones).
    pub misses: u64,
    /// Misses because a fail-closed namespace's bound was exceeded.
    pub fail_closed: u64,
    /// Fills refused ([`FillRefused`]).
    pub refused_fills: u64,
    /// Loads run by `get_or_load`.
    pub loads: u64,
    /// `get_or_load` misses that waited for another caller's load.
    pub coalesced: u64,
    /// Entries dropped by invalidations.
    pub invalidated: u64,
    /// Entries refreshed in place by payload events.
    pub refreshed: u64,
    /// Resets applied.
    pub resets: u64,
    /// Entries now (approximate).
    pub entries: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fail_closed: AtomicU64,
    refused_fills: AtomicU64,
    loads: AtomicU64,
    coalesced: AtomicU64,
    invalidated: AtomicU64,
    refreshed: AtomicU64,
    resets: AtomicU64,
}

/// The same counters through the `metrics` facade (no-ops without a
/// recorder).
struct Meters {
    hits: metrics::Counter,
    misses: metrics::Counter,
    fail_closed: metrics::Counter,
    refused_fills: metrics::Counter,
    invalidated: metrics::Counter,
    resets: metrics::Counter,
}

impl Meters {
    fn new(name: &str) -> Self {
        let name = name.to_owned();
        Self {
            hits: metrics::counter!("freshness_cache_hits_total", "cache" => name.clone()),
            misses: metrics::counter!("freshness_cache_misses_total", "cache" => name.clone()),
            fail_closed: metrics::counter!("freshness_cache_fail_closed_total", "cache" => name.clone()),
            refused_fills: metrics::counter!("freshness_cache_refused_fills_total", "cache" => name.clone()),
            invalidated: metrics::counter!("freshness_cache_invalidated_total", "cache" => name.clone()),
            resets: metrics::counter!("freshness_cache_resets_total", "cache" => name),
        }
    }
}

/// Taken before reading the source of truth; a fill stored with it is
/// refused if a dependency was invalidated (or its shard reset) after it was
/// taken. See [`VersionedCache::ticket`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    tick: u64,
    taken: Instant,
}

/// The newest invalidation of one entity.
#[derive(Debug, Clone, Copy)]
struct Tomb {
    version: Version,
    tick: u64,
}

/// When shards were last reset.
#[derive(Debug, Default)]
struct ResetTicks {
    all: u64,
    shard_count: u32,
    shards: Vec<u64>,
}

impl ResetTicks {
    fn last(&self, entity: &Entity) -> u64 {
        let shard = if self.shard_count == 0 {
            0
        } else {
            self.shards
                .get(entity.shard(self.shard_count).index())
                .copied()
                .unwrap_or(0)
        };
        self.all.max(shard)
    }

    fn record(&mut self, reset: &Reset, tick: u64) {
        match &reset.scope {
            ResetScope::All => self.all = tick,
            ResetScope::Shards(shards) => {
                if reset.shard_count != self.shard_count {
                    // Another shard count: what the old ticks mean is lost, so
                    // keep the newest of them as a full reset.
                    self.all = self.all.max(self.shards.iter().copied().max().unwrap_or(0));
                    self.shard_count = reset.shard_count;
                    self.shards = vec![0; reset.shard_count as usize];
                }
                for s in shards {
                    if let Some(t) = self.shards.get_mut(s.index()) {
                        *t = tick;
                    }
                }
            }
        }
    }
}

struct Entry<V> {
    value: V,
    deps: Box<[Dep]>,
    id: u64,
    /// The tightest fail-closed bound of the namespaces it depends on.
    bound: Option<Duration>,
}

/// Rebuilds an entry's value from an event's payload (refresh in place):
/// `Some(new)` replaces the entry, `None` drops it. See
/// [`VersionedCacheBuilder::refresh_with`].
pub type Refresher<K, V> = Arc<dyn Fn(&K, &V, &Invalidation) -> Option<V> + Send + Sync>;

/// Configures a [`VersionedCache`].
#[must_use]
pub struct VersionedCacheBuilder<K, V> {
    name: String,
    max_capacity: u64,
    time_to_live: Option<Duration>,
    remembered_invalidations: u64,
    remember_for: Duration,
    policies: HashMap<String, FreshnessPolicy>,
    default_policy: FreshnessPolicy,
    refresher: Option<Refresher<K, V>>,
}

impl<K, V> fmt::Debug for VersionedCacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionedCacheBuilder")
            .field("name", &self.name)
            .field("max_capacity", &self.max_capacity)
            .field("policies", &self.policies)
            .finish_non_exhaustive()
    }
}

/// moka refuses durations over 1000 years; nothing here needs more than one.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl<K, V> VersionedCacheBuilder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Names the cache in metrics (label `cache`; `default` otherwise).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Most entries (10,000 by default).
    pub fn max_capacity(mut self, n: u64) -> Self {
        self.max_capacity = n;
        self
    }

    /// Drops entries this long after they were stored, invalidated or not
    /// (none by default).
    pub fn time_to_live(mut self, d: Duration) -> Self {
        self.time_to_live = Some(d.min(MAX_DURATION));
        self
    }

    /// How many entities' newest invalidated versions are remembered
    /// (100,000 by default) and for how long (10 minutes by default). Fills
    /// read before an invalidation the cache has forgotten cannot be refused;
    /// tickets older than `remember_for` are refused.
    pub fn remember_invalidations(mut self, entities: u64, remember_for: Duration) -> Self {
        self.remembered_invalidations = entities;
        self.remember_for = remember_for.min(MAX_DURATION);
        self
    }

    /// The policy of `namespace`'s entries (an entry follows the strictest
    /// policy among the namespaces of its dependencies).
    pub fn policy(mut self, namespace: impl Into<String>, policy: FreshnessPolicy) -> Self {
        self.policies.insert(namespace.into(), policy);
        self
    }

    /// The policy of namespaces without one of their own
    /// ([`FreshnessPolicy::ServeStale`] by default).
    pub fn default_policy(mut self, policy: FreshnessPolicy) -> Self {
        self.default_policy = policy;
        self
    }

    /// Refresh in place: for an event with a payload, `f(key, old_value,
    /// event)` may return the entry's new value, which replaces it (now
    /// depending on the event's version) instead of dropping it.
    pub fn refresh_with(
        mut self,
        f: impl Fn(&K, &V, &Invalidation) -> Option<V> + Send + Sync + 'static,
    ) -> Self {
        self.refresher = Some(Arc::new(f));
        self
    }

    /// Builds the cache.
    pub fn build(self) -> VersionedCache<K, V> {
        let index = Arc::new(DepIndex::<K>::new());
        let listener_index = index.clone();
        let mut entries = moka::future::Cache::builder()
            .max_capacity(self.max_capacity)
            .eviction_listener(move |key: Arc<K>, entry: Arc<Entry<V>>, _cause| {
                for dep in entry.deps.iter() {
                    listener_index.unregister(&dep.entity, &*key, entry.id);
                }
            });
        if let Some(ttl) = self.time_to_live {
            entries = entries.time_to_live(ttl);
        }
        let forgotten = Arc::new(AtomicU64::new(0));
        let listener_forgotten = forgotten.clone();
        let tombs = moka::sync::Cache::builder()
            .max_capacity(self.remembered_invalidations)
            .time_to_live(self.remember_for)
            .eviction_listener(move |_: Arc<Entity>, tomb: Tomb, cause| {
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    listener_forgotten.fetch_max(tomb.tick, Ordering::AcqRel);
                }
            })
            .build();
        VersionedCache {
            inner: Arc::new(Inner {
                entries: entries.build(),
                index,
                tombs,
                forgotten,
                remember_for: self.remember_for,
                resets: Mutex::new(ResetTicks::default()),
                clock: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                flights: Flights::new(),
                policies: self.policies,
                default_policy: self.default_policy,
                refresher: self.refresher,
                feed: RwLock::new(None),
                counters: Counters::default(),
                meters: Meters::new(&self.name),
            }),
        }
    }
}

struct Inner<K, V> {
    entries: moka::future::Cache<K, Arc<Entry<V>>>,
    index: Arc<DepIndex<K>>,
    tombs: moka::sync::Cache<Entity, Tomb>,
    /// The newest tick of a tombstone evicted for size or age.
    forgotten: Arc<AtomicU64>,
    remember_for: Duration,
    resets: Mutex<ResetTicks>,
    /// Ticks order invalidations and resets against tickets.
    clock: AtomicU64,
    next_id: AtomicU64,
    flights: Flights<K, V>,
    policies: HashMap<String, FreshnessPolicy>,
    default_policy: FreshnessPolicy,
    refresher: Option<Refresher<K, V>>,
    /// The feed bound last (`bind_feed`).
    feed: RwLock<Option<Feed>>,
    counters: Counters,
    meters: Meters,
}

/// A cache of `K → V` kept fresh by invalidations; see the
/// [module docs](self). Cheap to clone (shared).
pub struct VersionedCache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for VersionedCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V> fmt::Debug for VersionedCache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionedCache")
            .field("entries", &self.inner.entries.entry_count())
            .finish_non_exhaustive()
    }
}

impl<K, V> VersionedCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A builder with the defaults.
    pub fn builder() -> VersionedCacheBuilder<K, V> {
        VersionedCacheBuilder {
            name: "default".into(),
            max_capacity: 10_000,
            time_to_live: None,
            remembered_invalidations: 100_000,
            remember_for: Duration::from_secs(600),
            policies: HashMap::new(),
            default_policy: FreshnessPolicy::ServeStale,
            refresher: None,
        }
    }

    /// Follows `feed` for the fail-closed policies. A cache follows the feed
    /// bound last: a cache that outlives its subscriber (restarted in the
    /// same process, resuming from its cursor file) follows the new one, and
    /// fails closed until the new feed has applied a watermark.
    pub fn bind_feed(&self, feed: Feed) {
        *self.inner.feed.write() = Some(feed);
    }

    /// The cached value of `key`, unless it is missing or its namespace
    /// fails closed now.
    pub async fn get(&self, key: &K) -> Option<V> {
        let c = &self.inner.counters;
        let m = &self.inner.meters;
        match self.lookup(key).await {
            Lookup::Hit(v) => {
                c.hits.fetch_add(1, Ordering::Relaxed);
                m.hits.increment(1);
                Some(v)
            }
            Lookup::FailClosed => {
                c.fail_closed.fetch_add(1, Ordering::Relaxed);
                c.misses.fetch_add(1, Ordering::Relaxed);
                m.fail_closed.increment(1);
                m.misses.increment(1);
                None
            }
            Lookup::Miss => {
                c.misses.fetch_add(1, Ordering::Relaxed);
                m.misses.increment(1);
                None
            }
        }
    }

    async fn lookup(&self, key: &K) -> Lookup<V> {
        let Some(entry) = self.inner.entries.get(key).await else {
            return Lookup::Miss;
        };
        if let Some(bound) = entry.bound {
            let fresh = self
                .inner
                .feed
                .read()
                .as_ref()
                .is_some_and(|f| f.is_fresh_within(bound));
            if !fresh {
                return Lookup::FailClosed;
            }
        }
        Lookup::Hit(entry.value.clone())
    }

    /// A ticket to take *before* reading the source of truth, for
    /// [`insert_with_ticket`](Self::insert_with_ticket).
    pub fn ticket(&self) -> Ticket {
        Ticket {
            tick: self.inner.clock.load(Ordering::SeqCst),
            taken: Instant::now(),
        }
    }

    /// Stores a fill whose versions the reader knows: refused with
    /// [`FillRefused::StaleRead`] if a dependency was read at a version older
    /// than one already invalidated.
    pub async fn insert(
        &self,
        key: K,
        value: V,
        deps: impl IntoIterator<Item = Dep>,
    ) -> Result<(), FillRefused> {
        self.insert_with_ticket(self.ticket(), key, value, deps)
            .await
    }

    /// Stores a fill read after `ticket` was taken: refused as
    /// [`insert`](Self::insert) does, and also when a dependency read at an
    /// unknown version was invalidated, or its shard reset, after the ticket.
    pub async fn insert_with_ticket(
        &self,
        ticket: Ticket,
        key: K,
        value: V,
        deps: impl IntoIterator<Item = Dep>,
    ) -> Result<(), FillRefused> {
        let deps: Box<[Dep]> = deps.into_iter().collect();
        let refused = |e: FillRefused| {
            self.inner
                .counters
                .refused_fills
                .fetch_add(1, Ordering::Relaxed);
            self.inner.meters.refused_fills.increment(1);
            tracing::debug!(error = %e, "fill refused");
            e
        };
        self.vouch(ticket, &deps).map_err(refused)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Register before storing and check again after: an invalidation
        // either lands before the second check (which refuses) or scans the
        // index after the registration (and drops the entry).
        for d in deps.iter() {
            self.inner.index.register(&d.entity, &key, id);
        }
        let entry = Arc::new(Entry {
            value,
            bound: self.bound(&deps),
            deps,
            id,
        });
        self.inner.entries.insert(key.clone(), entry.clone()).await;
        if let Err(e) = self.vouch(ticket, &entry.deps) {
            self.remove_if(&key, |cur| cur.id == id).await;
            for d in entry.deps.iter() {
                self.inner.index.unregister(&d.entity, &key, id);
            }
            return Err(refused(e));
        }
        Ok(())
    }

    /// The value of `key`, loading it with `loader` on a miss. Concurrent
    /// misses of one key share one load. The load is stored unless a
    /// dependency was invalidated (or its shard reset) after the load began
    /// or is older than an invalidation already seen; either way the loaded
    /// value is returned to the callers that waited for it.
    ///
    /// When the leading caller's loader fails, each waiting caller runs its
    /// own loader.
    pub async fn get_or_load<F, Fut, E>(&self, key: K, loader: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<V>, E>>,
    {
        if let Some(v) = self.get(&key).await {
            return Ok(v);
        }
        let leader = match self.inner.flights.join(&key) {
            Join::Leader(l) => Some(l),
            Join::Follower(rx) => {
                self.inner
                    .counters
                    .coalesced
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(v) = flight::wait(rx).await {
                    return Ok(v);
                }
                None
            }
        };
        let ticket = self.ticket();
        self.inner.counters.loads.fetch_add(1, Ordering::Relaxed);
        match loader().await {
            Ok(loaded) => {
                let value = loaded.value.clone();
                // Refused or not, the value answers this request and the
                // ones that waited for it.
                let _ = self
                    .insert_with_ticket(ticket, key, loaded.value, loaded.deps)
                    .await;
                if let Some(l) = leader {
                    l.finish(Flight::Done(value.clone()));
                }
                Ok(value)
            }
            Err(e) => {
                if let Some(l) = leader {
                    l.finish(Flight::Failed);
                }
                Err(e)
            }
        }
    }

    /// Applies one invalidation: drops (or, with a refresher and a payload,
    /// refreshes) every entry that read `inv.entity` at an older version.
    pub async fn apply(&self, inv: &Invalidation) {
        self.remember(&inv.entity, inv.version);
        let refresher = self
            .inner
            .refresher
            .as_ref()
            .filter(|_| inv.payload.is_some());
        let (mut dropped, mut refreshed) = (0u64, 0u64);
        for key in self.inner.index.keys(&inv.entity) {
            let inner = &self.inner;
            let outcome = inner
                .entries
                .entry(key.clone())
                .and_compute_with(|cur| {
                    let op = match cur.map(|e| e.into_value()) {
                        Some(cur)
                            if cur
                                .deps
                                .iter()
                                .any(|d| d.stale_after(&inv.entity, inv.version)) =>
                        {
                            match refresher.and_then(|f| f(&key, &cur.value, inv)) {
                                Some(value) => Op::Put(Arc::new(Self::refreshed(
                                    inner, &key, &cur, value, inv,
                                ))),
                                None => Op::Remove,
                            }
                        }
                        _ => Op::Nop,
                    };
                    std::future::ready(op)
                })
                .await;
            match outcome {
                moka::ops::compute::CompResult::Removed(_) => dropped += 1,
                moka::ops::compute::CompResult::ReplacedWith(_) => refreshed += 1,
                _ => {}
            }
        }
        self.inner
            .counters
            .invalidated
            .fetch_add(dropped, Ordering::Relaxed);
        self.inner
            .counters
            .refreshed
            .fetch_add(refreshed, Ordering::Relaxed);
        self.inner.meters.invalidated.increment(dropped);
    }

    /// Builds the refreshed entry and registers it under a new id (so that
    /// the removal of the old one does not unregister it).
    fn refreshed(
        inner: &Inner<K, V>,
        key: &K,
        old: &Entry<V>,
        value: V,
        inv: &Invalidation,
    ) -> Entry<V> {
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let deps: Box<[Dep]> = old
            .deps
            .iter()
            .map(|d| {
                if d.stale_after(&inv.entity, inv.version) {
                    Dep::at(d.entity.clone(), inv.version)
                } else {
                    d.clone()
                }
            })
            .collect();
        for d in deps.iter() {
            inner.index.register(&d.entity, key, id);
        }
        Entry {
            value,
            deps,
            id,
            bound: old.bound,
        }
    }

    /// Invalidates `entity` at `version` by hand (what an event does).
    pub async fn invalidate(&self, entity: &Entity, version: Version) {
        let inv = Invalidation {
            entity: entity.clone(),
            version,
            shard: ShardId(0),
            seq: 0,
            origin: String::new(),
            publish_time_us: 0,
            payload: None,
            traceparent: None,
            tracestate: None,
        };
        self.apply(&inv).await;
    }

    /// Applies a reset: drops every entry that depends on an entity in the
    /// reset's shards, and refuses fills that began before it.
    pub async fn reset(&self, reset: &Reset) {
        let tick = self.inner.clock.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.resets.lock().record(reset, tick);
        self.inner.counters.resets.fetch_add(1, Ordering::Relaxed);
        self.inner.meters.resets.increment(1);
        if reset.is_all() {
            // Lazy in moka, but immediate for readers; the eviction listener
            // cleans the index.
            self.inner.entries.invalidate_all();
            return;
        }
        let keys = self.inner.index.keys_where(|e| reset.covers(e));
        let mut dropped = 0;
        for key in keys {
            if self
                .remove_if(&key, |cur| cur.deps.iter().any(|d| reset.covers(&d.entity)))
                .await
            {
                dropped += 1;
            }
        }
        self.inner
            .counters
            .invalidated
            .fetch_add(dropped, Ordering::Relaxed);
        self.inner.meters.invalidated.increment(dropped);
    }

    /// Drops `key` whatever it depends on.
    pub async fn remove(&self, key: &K) {
        self.inner.entries.invalidate(key).await;
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: l(&c.hits),
            misses: l(&c.misses),
            fail_closed: l(&c.fail_closed),
            refused_fills: l(&c.refused_fills),
            loads: l(&c.loads),
            coalesced: l(&c.coalesced),
            invalidated: l(&c.invalidated),
            refreshed: l(&c.refreshed),
            resets: l(&c.resets),
            entries: self.inner.entries.entry_count(),
        }
    }

    /// Runs the cache's pending maintenance (evictions, listener calls), so
    /// that [`stats`](Self::stats) counts entries exactly.
    pub async fn sync(&self) {
        self.inner.entries.run_pending_tasks().await;
        self.inner.tombs.run_pending_tasks();
    }

    /// The newest version invalidated of `entity`, while remembered.
    pub fn invalidated_version(&self, entity: &Entity) -> Option<Version> {
        self.inner.tombs.get(entity).map(|t| t.version)
    }

    /// Records the invalidation of `entity` at `version` (keeping the highest
    /// version) and advances the clock.
    fn remember(&self, entity: &Entity, version: Version) {
        let tick = self.inner.clock.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner
            .tombs
            .entry(entity.clone())
            .and_compute_with(|old| {
                let version = old.map_or(version, |o| o.into_value().version.max(version));
                Op::Put(Tomb { version, tick })
            });
    }

    /// Checks a fill against what the cache knows of invalidations and
    /// resets since `ticket`.
    fn vouch(&self, ticket: Ticket, deps: &[Dep]) -> Result<(), FillRefused> {
        if deps.is_empty() {
            return Ok(());
        }
        if ticket.taken.elapsed() >= self.inner.remember_for
            || self.inner.forgotten.load(Ordering::Acquire) > ticket.tick
        {
            return Err(FillRefused::TicketTooOld);
        }
        {
            let resets = self.inner.resets.lock();
            if let Some(d) = deps.iter().find(|d| resets.last(&d.entity) > ticket.tick) {
                return Err(FillRefused::ResetDuringLoad {
                    entity: d.entity.clone(),
                });
            }
        }
        for d in deps {
            let Some(tomb) = self.inner.tombs.get(&d.entity) else {
                continue;
            };
            match d.version {
                Some(read) if read < tomb.version => {
                    return Err(FillRefused::StaleRead {
                        entity: d.entity.clone(),
                        read,
                        invalidated: tomb.version,
                    });
                }
                None if tomb.tick > ticket.tick => {
                    return Err(FillRefused::InvalidatedDuringLoad {
                        entity: d.entity.clone(),
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The tightest fail-closed bound among the namespaces of `deps`.
    fn bound(&self, deps: &[Dep]) -> Option<Duration> {
        deps.iter()
            .filter_map(|d| {
                match self
                    .inner
                    .policies
                    .get(d.entity.namespace())
                    .unwrap_or(&self.inner.default_policy)
                {
                    FreshnessPolicy::FailClosed { max_staleness } => Some(*max_staleness),
                    FreshnessPolicy::ServeStale => None,
                }
            })
            .min()
    }

    /// Removes `key` if its entry satisfies `pred`; true when removed.
    async fn remove_if(&self, key: &K, pred: impl FnOnce(&Entry<V>) -> bool) -> bool {
        let outcome = self
            .inner
            .entries
            .entry(key.clone())
            .and_compute_with(|cur| {
                let op = match cur {
                    Some(e) if pred(e.value()) => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        matches!(outcome, moka::ops::compute::CompResult::Removed(_))
    }

    #[cfg(test)]
    fn index_len(&self) -> usize {
        self.inner.index.len()
    }
}

enum Lookup<V> {
    Hit(V),
    Miss,
    FailClosed,
}

impl<K, V> Handler for VersionedCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        for inv in &batch.events {
            self.apply(inv).await;
        }
        Ok(())
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        self.reset(reset).await;
        Ok(())
    }

    /// Drops every entry and refuses fills begun before now: without a
    /// cursor, nothing cached so far is covered by the stream.
    async fn on_start_at_head(&self) -> Result<(), HandlerError> {
        self.reset(&Reset::all(ResetReason::CursorLost, 0)).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
