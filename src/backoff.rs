//! Jittered exponential backoff: the one policy of every retry loop, the
//! hub's replication links and the client's reconnects, handler retries
//! and publish retries.

use std::time::Duration;

use rand::Rng;

/// How long to wait between attempts: `initial`, doubling up to `max`, each
/// wait drawn uniformly from `[d/2, d]` ("equal jitter") so that many nodes
/// that lost the same hub do not come back in lock step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait (before jitter).
    pub initial: Duration,
    /// The longest wait (before jitter).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// A backoff from `initial` to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The un-jittered wait before retry number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
            .max(self.initial.min(self.max))
    }

    /// The jittered wait before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(rand::rng().random_range(0..=spread))
    }
}

/// Counts attempts and hands out jittered delays.
#[derive(Debug, Clone)]
pub struct Attempts {
    backoff: Backoff,
    attempt: u32,
}

impl Attempts {
    /// Attempts from the first delay on.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            attempt: 0,
        }
    }

    /// The next delay; every call doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_with_jitter_in_range() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(4), Duration::from_secs(1));
        assert_eq!(b.ceiling(200), Duration::from_secs(1));
        for attempt in 0..10 {
            let d = b.delay(attempt);
            let c = b.ceiling(attempt);
            assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
        }
    }

    #[test]
    fn attempts_reset() {
        let mut a = Attempts::new(Backoff::new(
            Duration::from_millis(10),
            Duration::from_secs(1),
        ));
        for _ in 0..5 {
            a.next_delay();
        }
        assert!(a.next_delay() >= Duration::from_millis(160));
        a.reset();
        assert!(a.next_delay() <= Duration::from_millis(10));
    }
}
