//! The hub's one clock. Wall time is read once at start-up; everything after
//! advances with `tokio::time`, so tests can pause and advance it, and every
//! timestamp the hub puts on the wire comes from here.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Microseconds since the Unix epoch, advancing with tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_us: u64,
    start: Instant,
}

impl Clock {
    /// A clock anchored at the current wall time.
    pub fn new() -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Self {
            base_us,
            start: Instant::now(),
        }
    }

    /// Now, in microseconds since the Unix epoch.
    pub fn now_us(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.base_us.saturating_add(elapsed)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
