//! The state of a node's invalidation feed, as a `tokio::sync::watch`, and the
//! staleness clock that freshness policies read.
//!
//! **How staleness is measured.** The hub's watermark `T` promises that every
//! event appended before `T` (hub clock) was delivered. Comparing `T` with
//! this node's wall clock would mix in the clock skew between the two
//! machines, which can be larger than the bound an operator wants to enforce.
//! So staleness is measured on this node's monotonic clock only: it is the
//! time since the node last *received* a watermark whose batch it has since
//! applied. It leaves out the one-way delivery delay from hub to node (a
//! fraction of a millisecond within a region). While the stream is healthy
//! it stays below the hub's progress interval (250 ms by default) plus the
//! handler's apply time; when the hub, the network or the node stalls, it
//! grows without bound.
//!
//! A watermark can also wait in buffers (the hub's outbound queue, the
//! stream's flow-control windows) while the node's handler is busy, and be
//! read long after the hub stamped it. So a watermark counts from when it
//! was current, not from when it was read: within one stream, hub time and
//! the node's clock differ by a fixed offset (both are monotonic; the hub's
//! wire clock never steps) plus the delivery delay, and the smallest
//! difference seen so far — the least delayed watermark — maps hub time onto
//! the node's clock. A watermark counts from `watermark + that offset`, and
//! never from later than it was read. The offset may creep up by 1 ms per
//! second to follow rate drift between the two clocks; a new stream (maybe
//! another hub) starts a new estimate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where the feed stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedState {
    /// A stream is being established (at start, or after the hub said goodbye
    /// or the stream broke) and no watermark has arrived on it yet.
    Connecting,
    /// The stream delivers watermarks: the node is caught up.
    Live {
        /// The newest hub watermark applied (hub clock).
        watermark: SystemTime,
        /// Staleness when this state was published: the time since that
        /// watermark was received, i.e. how long applying it took.
        staleness: Duration,
    },
    /// The stream is open but no watermark has arrived for longer than the
    /// subscriber's `stale_after` (the hub stalls, or the node is behind).
    Stale {
        /// Staleness when this state was published.
        staleness: Duration,
    },
    /// The hub cannot be reached (the subscriber keeps trying), or the
    /// subscriber has stopped for good (its handle then reports why).
    Down {
        /// The last error, one line.
        error: String,
    },
}

impl FeedState {
    /// True for [`FeedState::Live`].
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Live { .. })
    }

    /// True for [`FeedState::Down`].
    pub fn is_down(&self) -> bool {
        matches!(self, Self::Down { .. })
    }
}

/// The subscriber has stopped and no state will change any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the subscriber has stopped")]
pub struct FeedClosed;

/// The feed seen from a reader (a cache, a health check): the current
/// [`FeedState`], a watch of its changes and the staleness clock. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Feed {
    rx: watch::Receiver<FeedState>,
    clock: Arc<FeedClock>,
}

impl Feed {
    /// The current state.
    pub fn state(&self) -> FeedState {
        self.rx.borrow().clone()
    }

    /// A watch of the state: `changed().await` wakes on every change (for a
    /// live feed that is every watermark, at least every progress interval).
    pub fn watch(&self) -> watch::Receiver<FeedState> {
        self.rx.clone()
    }

    /// Waits until the state satisfies `pred`, returning that state.
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&FeedState) -> bool,
    ) -> Result<FeedState, FeedClosed> {
        self.rx
            .wait_for(|s| pred(s))
            .await
            .map(|s| s.clone())
            .map_err(|_| FeedClosed)
    }

    /// Time since the node last applied a watermark (see the module docs);
    /// `None` while no watermark has been applied yet, which a policy treats
    /// as unbounded staleness.
    pub fn staleness(&self) -> Option<Duration> {
        self.clock.staleness()
    }

    /// The newest hub watermark applied, if any.
    pub fn watermark(&self) -> Option<SystemTime> {
        *self.clock.watermark.lock()
    }

    /// True when a cached entry may be served under a bound of
    /// `max_staleness`: the feed is not down and its staleness is known and
    /// within the bound.
    pub fn is_fresh_within(&self, max_staleness: Duration) -> bool {
        !self.rx.borrow().is_down() && self.staleness().is_some_and(|s| s <= max_staleness)
    }
}

/// The monotonic instant of the newest applied watermark, lock-free for the
/// cache's read path.
#[derive(Debug)]
pub(crate) struct FeedClock {
    base: Instant,
    /// Microseconds since `base` plus one of the newest watermark's receipt;
    /// 0 while there is none.
    fresh_at: AtomicU64,
    watermark: Mutex<Option<SystemTime>>,
    /// This stream's smallest `(receipt µs since base) - (watermark µs since
    /// the Unix epoch)` and the receipt it was last updated at; see the
    /// module docs.
    offset: Mutex<Option<(i128, u64)>>,
}

/// How fast the hub-to-node offset may creep up: 1 ms per second (1,000 ppm,
/// far above the drift of real clocks).
const OFFSET_CREEP_PER_US: u64 = 1_000;

impl FeedClock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            fresh_at: AtomicU64::new(0),
            watermark: Mutex::new(None),
            offset: Mutex::new(None),
        }
    }

    fn staleness(&self) -> Option<Duration> {
        match self.fresh_at.load(Ordering::Acquire) {
            0 => None,
            at => {
                let at = self.base + Duration::from_micros(at - 1);
                Some(Instant::now().saturating_duration_since(at))
            }
        }
    }
}

/// The writing side, owned by the subscriber.
#[derive(Debug)]
pub(crate) struct FeedTx {
    tx: watch::Sender<FeedState>,
    clock: Arc<FeedClock>,
}

impl FeedTx {
    pub(crate) fn new() -> Self {
        let (tx, _) = watch::channel(FeedState::Connecting);
        Self {
            tx,
            clock: Arc::new(FeedClock::new()),
        }
    }

    pub(crate) fn feed(&self) -> Feed {
        Feed {
            rx: self.tx.subscribe(),
            clock: self.clock.clone(),
        }
    }

    pub(crate) fn state(&self) -> FeedState {
        self.tx.borrow().clone()
    }

    pub(crate) fn staleness(&self) -> Option<Duration> {
        self.clock.staleness()
    }

    /// Records a watermark received at `received` whose batch is now applied,
    /// and publishes `Live`.
    pub(crate) fn applied_watermark(&self, watermark: SystemTime, received: Instant) {
        let micros = received
            .saturating_duration_since(self.clock.base)
            .as_micros();
        let received_us = u64::try_from(micros).unwrap_or(u64::MAX - 2);
        let current_us = self.current_at(watermark, received_us);
        self.clock
            .fresh_at
            .fetch_max(current_us + 1, Ordering::AcqRel);
        let newest = {
            let mut w = self.clock.watermark.lock();
            let newest = w.map_or(watermark, |old| old.max(watermark));
            *w = Some(newest);
            newest
        };
        let staleness = self.clock.staleness().unwrap_or_default();
        // Prometheus computes staleness at scrape time as
        // `time() - freshness_subscriber_fresh_at_seconds`, exact whenever
        // it is scraped, without a timer here.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        metrics::gauge!("freshness_subscriber_fresh_at_seconds").set(now.as_secs_f64());
        self.tx.send_replace(FeedState::Live {
            watermark: newest,
            staleness,
        });
    }

    /// A new stream: its hub may have another clock, so the hub-to-node
    /// offset is estimated anew.
    pub(crate) fn new_stream(&self) {
        *self.clock.offset.lock() = None;
    }

    /// When (µs since the clock's base) `watermark`, read at `received_us`,
    /// was current on this node's clock: mapped through the smallest offset
    /// seen on this stream, and never later than it was read.
    fn current_at(&self, watermark: SystemTime, received_us: u64) -> u64 {
        let hub_us = watermark
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| {
                i128::try_from(d.as_micros()).unwrap_or(i128::MAX / 2)
            });
        let sample = i128::from(received_us) - hub_us;
        let mut offset = self.clock.offset.lock();
        let best = match *offset {
            Some((best, last_us)) => {
                let creep = received_us.saturating_sub(last_us) / OFFSET_CREEP_PER_US;
                (best + i128::from(creep)).min(sample)
            }
            None => sample,
        };
        *offset = Some((best, received_us));
        let mapped = u64::try_from((hub_us + best).max(0)).unwrap_or(u64::MAX);
        mapped.min(received_us)
    }

    /// Publishes `state` unless it is already the current one.
    pub(crate) fn set(&self, state: FeedState) {
        self.tx.send_if_modified(|s| {
            if *s == state {
                false
            } else {
                *s = state;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn staleness_counts_from_the_last_applied_watermark() {
        let tx = FeedTx::new();
        let feed = tx.feed();
        assert_eq!(feed.state(), FeedState::Connecting);
        assert_eq!(feed.staleness(), None);
        assert!(!feed.is_fresh_within(Duration::from_secs(3600)));

        let received = Instant::now();
        tokio::time::advance(Duration::from_millis(30)).await;
        tx.applied_watermark(SystemTime::UNIX_EPOCH + Duration::from_secs(5), received);
        assert!(matches!(
            feed.state(),
            FeedState::Live { staleness, .. } if staleness == Duration::from_millis(30)
        ));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(feed.staleness(), Some(Duration::from_millis(530)));
        assert!(feed.is_fresh_within(Duration::from_secs(1)));
        assert!(!feed.is_fresh_within(Duration::from_millis(100)));

        // An older watermark never moves the clock or the watermark back.
        tx.applied_watermark(SystemTime::UNIX_EPOCH, received);
        assert_eq!(
            feed.watermark(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5))
        );
        assert_eq!(feed.staleness(), Some(Duration::from_millis(530)));

        tx.set(FeedState::Down {
            error: "refused".into(),
        });
        assert!(!feed.is_fresh_within(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watermark_read_late_counts_from_when_it_was_current() {
        let tx = FeedTx::new();
        let feed = tx.feed();
        let hub_start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // Read 1 ms after the hub stamped it: the offset's first estimate.
        tx.applied_watermark(hub_start, Instant::now());
        tokio::time::advance(Duration::from_millis(100)).await;
        tx.applied_watermark(hub_start + Duration::from_millis(100), Instant::now());
        assert_eq!(feed.staleness(), Some(Duration::ZERO));
        // The handler stalls for 2 s; watermarks stamped just before it sat
        // in buffers and are read now.
        tokio::time::advance(Duration::from_secs(2)).await;
        tx.applied_watermark(hub_start + Duration::from_millis(110), Instant::now());
        let s = feed.staleness().unwrap();
        assert!(
            s >= Duration::from_millis(1_985),
            "the old watermark counts from when it was current: {s:?}"
        );
        assert!(!feed.is_fresh_within(Duration::from_secs(1)));
        // A watermark stamped now is current again.
        tx.applied_watermark(hub_start + Duration::from_millis(2_100), Instant::now());
        assert!(feed.staleness().unwrap() <= Duration::from_millis(3));
        // Never later than it was read, even against a hub clock running
        // ahead.
        tx.applied_watermark(hub_start + Duration::from_secs(60), Instant::now());
        assert_eq!(feed.staleness(), Some(Duration::ZERO));
        // A new stream (another hub, another clock) starts a new estimate.
        tx.new_stream();
        tokio::time::advance(Duration::from_millis(50)).await;
        tx.applied_watermark(SystemTime::UNIX_EPOCH, Instant::now());
        assert_eq!(feed.staleness(), Some(Duration::ZERO));
    }
}
