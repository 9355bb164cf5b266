//! The hub's own running totals for its status page: publishes, deliveries,
//! the freshness SLI (acks within 100 ms and 1 s of the publish) and resets
//! by reason, with a once-a-second history of the last minute for rates and
//! the recent SLI.
//!
//! The Prometheus recorder is process-wide and absent in tests, so the page
//! cannot read it; these counters belong to one hub. They are fed where the
//! recorder is (a session's tally flush, a reset, a publish), at most a few
//! atomic adds per flush or call, never per delivery.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use freshness::pb;
use parking_lot::Mutex;

/// Samples kept: a minute and one more, so a full minute is covered.
const HISTORY: usize = 61;
/// The window, in samples, over which rates are taken.
const RATE_WINDOW: usize = 5;

/// The counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Hub time of the sample.
    pub at_us: u64,
    /// Events answered by publish (applied, duplicate or superseded).
    pub published: u64,
    /// Event deliveries written to node streams.
    pub delivered: u64,
    /// Deliveries acked by nodes.
    pub acked: u64,
    /// Deliveries acked within 100 ms of their publish.
    pub within_100ms: u64,
    /// Deliveries acked within 1 s of their publish.
    pub within_1s: u64,
}

impl Totals {
    fn minus(&self, earlier: &Totals) -> Totals {
        Totals {
            at_us: self.at_us.saturating_sub(earlier.at_us),
            published: self.published.saturating_sub(earlier.published),
            delivered: self.delivered.saturating_sub(earlier.delivered),
            acked: self.acked.saturating_sub(earlier.acked),
            within_100ms: self.within_100ms.saturating_sub(earlier.within_100ms),
            within_1s: self.within_1s.saturating_sub(earlier.within_1s),
        }
    }
}

/// One hub's totals since it started.
#[derive(Debug)]
pub struct HubStats {
    /// Hub time at start.
    pub started_us: u64,
    published: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    within_100ms: AtomicU64,
    within_1s: AtomicU64,
    /// Indexed by `pb::ResetReason as usize`.
    resets: [AtomicU64; RESET_REASONS.len()],
    /// One sample a second, oldest first, at most [`HISTORY`].
    history: Mutex<VecDeque<Totals>>,
}

/// Every reset reason, in `pb::ResetReason` order.
const RESET_REASONS: [pb::ResetReason; 5] = [
    pb::ResetReason::Unspecified,
    pb::ResetReason::CursorExpired,
    pb::ResetReason::EpochChanged,
    pb::ResetReason::SlowConsumer,
    pb::ResetReason::ReplicationGap,
];

impl HubStats {
    /// Totals at zero, started at `now_us`.
    pub fn new(now_us: u64) -> Self {
        let mut history = VecDeque::with_capacity(HISTORY);
        history.push_back(Totals {
            at_us: now_us,
            ..Totals::default()
        });
        Self {
            started_us: now_us,
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            within_100ms: AtomicU64::new(0),
            within_1s: AtomicU64::new(0),
            resets: std::array::from_fn(|_| AtomicU64::new(0)),
            history: Mutex::new(history),
        }
    }

    /// `n` events answered by a publish.
    pub fn published(&self, n: u64) {
        self.published.fetch_add(n, Ordering::Relaxed);
    }

    /// A session's flushed tally: deliveries written, and deliveries acked
    /// in all, within 100 ms and within 1 s.
    pub fn flushed(&self, delivered: u64, acked: u64, within_100ms: u64, within_1s: u64) {
        if delivered > 0 {
            self.delivered.fetch_add(delivered, Ordering::Relaxed);
        }
        if acked > 0 {
            self.acked.fetch_add(acked, Ordering::Relaxed);
            self.within_100ms.fetch_add(within_100ms, Ordering::Relaxed);
            self.within_1s.fetch_add(within_1s, Ordering::Relaxed);
        }
    }

    /// One reset sent.
    pub fn reset(&self, reason: pb::ResetReason) {
        if let Some(n) = self.resets.get(reason as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resets sent since start, by reason name (`SLOW_CONSUMER`, ...),
    /// every reason listed.
    pub fn resets(&self) -> Vec<(&'static str, u64)> {
        RESET_REASONS
            .iter()
            .filter(|r| **r != pb::ResetReason::Unspecified)
            .map(|r| {
                let name = r.as_str_name();
                let name = name.strip_prefix("RESET_REASON_").unwrap_or(name);
                (name, self.resets[*r as usize].load(Ordering::Relaxed))
            })
            .collect()
    }

    /// The totals now.
    pub fn totals(&self, now_us: u64) -> Totals {
        Totals {
            at_us: now_us,
            published: self.published.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            within_100ms: self.within_100ms.load(Ordering::Relaxed),
            within_1s: self.within_1s.load(Ordering::Relaxed),
        }
    }

    /// Records the totals now in the history (once a second).
    pub fn sample(&self, now_us: u64) {
        let t = self.totals(now_us);
        let mut h = self.history.lock();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(t);
    }

    /// What the totals were `samples` samples ago (or at the oldest kept),
    /// against the totals now.
    fn since(&self, now: &Totals, samples: usize) -> Totals {
        let h = self.history.lock();
        let back = h.len().saturating_sub(samples + 1);
        let earlier = h.get(back).copied().unwrap_or_default();
        now.minus(&earlier)
    }

    /// The figures the status page shows.
    pub fn view(&self, now_us: u64) -> StatsView {
        let now = self.totals(now_us);
        StatsView {
            since_start: now.minus(&Totals {
                at_us: self.started_us,
                ..Totals::default()
            }),
            last_minute: self.since(&now, HISTORY - 1),
            recent: self.since(&now, RATE_WINDOW),
            resets: self.resets(),
        }
    }
}

/// Differences of [`Totals`] over three windows, and the resets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsView {
    /// Since the hub started.
    pub since_start: Totals,
    /// Over the last minute (less while the hub is younger).
    pub last_minute: Totals,
    /// Over the last few seconds: rates.
    pub recent: Totals,
    /// Resets since start by reason.
    pub resets: Vec<(&'static str, u64)>,
}

/// Samples the hub's totals once a second until it shuts down.
pub async fn sample_every_second(hub: std::sync::Arc<crate::hub::Hub>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the start is already in the history.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => hub.stats.sample(hub.clock.now_us()),
            () = hub.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_subtract_the_sample_a_minute_back() {
        let s = HubStats::new(0);
        for sec in 1..=100u64 {
            s.published(10);
            s.flushed(10, 10, if sec > 90 { 0 } else { 10 }, 10);
            s.sample(sec * 1_000_000);
        }
        let v = s.view(100_000_000);
        assert_eq!(v.since_start.published, 1000);
        assert_eq!(v.since_start.at_us, 100_000_000);
        assert_eq!(v.last_minute.at_us, 60_000_000);
        assert_eq!(v.last_minute.acked, 600);
        // The last ten seconds' deliveries were slow.
        assert_eq!(v.last_minute.within_100ms, 500);
        assert_eq!(v.recent.at_us, 5_000_000);
        assert_eq!(v.recent.delivered, 50);
    }

    #[test]
    fn a_young_hub_looks_back_to_its_start() {
        let s = HubStats::new(7);
        s.flushed(3, 3, 3, 3);
        let v = s.view(1_000_007);
        assert_eq!(v.last_minute.acked, 3);
        assert_eq!(v.last_minute.at_us, 1_000_000);
        s.reset(pb::ResetReason::SlowConsumer);
        assert!(v.resets.iter().all(|(_, n)| *n == 0));
        assert!(s.resets().contains(&("SLOW_CONSUMER", 1)));
        assert_eq!(s.resets().len(), 4);
    }
}
