//! Pure helpers: latency histograms and their summaries, the rate search of
//! B2, the Zipf sampler of B4 and a bitset of received events. Nothing here
//! does I/O, so it is unit tested below.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram records (60 s, in microseconds); larger
/// values are clamped to it.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy hdrhistogram's preconditions
    // (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

/// Records `us`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// The percentiles every run reports, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
}

impl Summary {
    /// Summarises a histogram; all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The search of B2 for the highest rate that meets the objective.
///
/// Doubling from a start rate goes on past a failure: a system that batches
/// can fail at a moderate rate (every event its own frame, the core busy)
/// and pass at a higher one (many events per frame), so the scan stops only
/// after [`RateSearch::STOP_AFTER`] failures in a row, or at the cap. Then it
/// bisects between the highest passing rate and the lowest failing rate
/// above it, until they are within `precision` of each other or the step
/// budget is spent. When nothing passes on the way up, it halves from the
/// start rate instead.
#[derive(Debug, Clone)]
pub struct RateSearch {
    /// Highest rate that passed.
    pub best: Option<u64>,
    /// Lowest failing rate above `best` (or anywhere, when none passed).
    pub failed: Option<u64>,
    next: Option<u64>,
    start: u64,
    fails_in_a_row: u32,
    scanning: bool,
    steps_left: u32,
    max_rate: u64,
    precision: f64,
}

impl RateSearch {
    /// Consecutive failures that end the doubling scan.
    pub const STOP_AFTER: u32 = 3;

    /// A search starting at `start` events/s, at most `steps` steps, never
    /// above `max_rate`, stopping when failing/passing < 1 + `precision`.
    pub fn new(start: u64, max_rate: u64, steps: u32, precision: f64) -> Self {
        let start = start.clamp(1, max_rate);
        Self {
            best: None,
            failed: None,
            next: Some(start),
            start,
            fails_in_a_row: 0,
            scanning: true,
            steps_left: steps,
            max_rate,
            precision,
        }
    }

    /// The rate to try now; `None` when the search is over.
    pub fn next_rate(&self) -> Option<u64> {
        if self.steps_left == 0 {
            return None;
        }
        self.next
    }

    /// Records the outcome of trying `rate` and picks the next rate.
    pub fn record(&mut self, rate: u64, passed: bool) {
        self.steps_left = self.steps_left.saturating_sub(1);
        if passed {
            self.fails_in_a_row = 0;
            if self.best.is_none_or(|b| rate > b) {
                self.best = Some(rate);
                // A failure below the new best no longer bounds it.
                if self.failed.is_some_and(|f| f <= rate) {
                    self.failed = None;
                }
            }
        } else {
            self.fails_in_a_row += 1;
            if self.best.is_none_or(|b| rate > b) {
                self.failed = Some(self.failed.map_or(rate, |f| f.min(rate)));
            }
        }
        if self.scanning {
            let stop = self.fails_in_a_row >= Self::STOP_AFTER || rate >= self.max_rate;
            if !stop {
                self.next = Some((rate * 2).min(self.max_rate));
                return;
            }
            self.scanning = false;
            if self.best.is_none() {
                // Nothing passed on the way up: halve below the start.
                self.failed = Some(self.start);
                self.next = (self.start > 1).then_some(self.start / 2);
                return;
            }
        }
        self.next = match (self.best, self.failed) {
            (None, Some(f)) if f <= 1 => None,
            (None, Some(f)) => Some(f / 2),
            (Some(b), None) if b >= self.max_rate => None,
            (Some(b), None) => Some((b * 2).min(self.max_rate)),
            (Some(b), Some(f)) if (f as f64) < (b as f64) * (1.0 + self.precision) => None,
            (Some(b), Some(f)) => Some(b + (f - b) / 2),
            (None, None) => None,
        };
    }
}

/// Samples ranks `0..n` with probability proportional to `1 / (rank+1)^s`
/// (rank 0 is the hottest entity), by inverting a precomputed CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// A sampler over `n >= 1` ranks with exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n.max(1));
        let mut acc = 0.0;
        for k in 1..=n.max(1) {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// The rank for a uniform draw `u` in `[0, 1)`.
    pub fn sample(&self, u: f64) -> usize {
        self.cdf
            .partition_point(|c| *c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// A small xorshift generator: the load generator only needs cheap,
/// reproducible draws.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeded; a zero seed is replaced.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A uniform draw in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Which events a node has received (bit `i` = event index `i`), to count
/// duplicates and never count one delivery twice.
#[derive(Debug, Clone, Default)]
pub struct Bitset(Vec<u64>);

impl Bitset {
    /// Room for `n` events.
    pub fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }

    /// Sets bit `i`; true when it was not set before. Out of range is false.
    pub fn insert(&mut self, i: usize) -> bool {
        let Some(word) = self.0.get_mut(i / 64) else {
            return false;
        };
        let bit = 1u64 << (i % 64);
        let new = *word & bit == 0;
        *word |= bit;
        new
    }
}

/// Events an open-loop publisher at `rate` events/s owes by `elapsed_secs`
/// into the run.
pub fn due(rate: u64, elapsed_secs: f64) -> u64 {
    (rate as f64 * elapsed_secs).floor() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_percentiles() {
        let mut h = histogram();
        for v in 1..=1000 {
            record(&mut h, v);
        }
        let s = Summary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((499..=501).contains(&s.p50), "{s:?}");
        assert!((989..=991).contains(&s.p99), "{s:?}");
        assert!((998..=1000).contains(&s.p999), "{s:?}");
        assert_eq!(Summary::of(&histogram()), Summary::default());
        record(&mut h, u64::MAX);
        assert!(Summary::of(&h).max >= MAX_LATENCY_US);
    }

    /// Runs a search against a system that passes up to `limit`.
    fn search(start: u64, limit: u64) -> (Option<u64>, Vec<u64>) {
        let mut s = RateSearch::new(start, 1_000_000, 20, 0.1);
        let mut tried = Vec::new();
        while let Some(r) = s.next_rate() {
            tried.push(r);
            s.record(r, r <= limit);
        }
        (s.best, tried)
    }

    #[test]
    fn rate_search_doubles_then_bisects() {
        let (best, tried) = search(1000, 10_000);
        assert_eq!(&tried[..6], &[1000, 2000, 4000, 8000, 16_000, 32_000]);
        let best = best.unwrap();
        assert!(best <= 10_000 && best as f64 >= 10_000.0 / 1.1, "{best}");
        // Nothing passes: it halves and reports nothing.
        let (best, tried) = search(1000, 0);
        assert_eq!(best, None);
        assert_eq!(tried[..5], [1000, 2000, 4000, 500, 250]);
        // Everything passes: it stops at the cap.
        let (best, _) = search(1000, u64::MAX);
        assert_eq!(best, Some(1_000_000));
        // A start above the limit halves, then bisects upwards.
        let (best, _) = search(64_000, 10_000);
        assert!(best.unwrap() as f64 >= 10_000.0 / 1.1);
    }

    #[test]
    fn rate_search_finds_a_passing_band_above_a_failing_one() {
        // Fails at 1000..=3000 (unbatched, the core busy), passes from 4000
        // to 40,000 (batched).
        let mut s = RateSearch::new(1000, 1_000_000, 20, 0.1);
        let mut tried = Vec::new();
        while let Some(r) = s.next_rate() {
            tried.push(r);
            s.record(r, (4000..=40_000).contains(&r));
        }
        assert_eq!(&tried[..3], &[1000, 2000, 4000]);
        let best = s.best.unwrap();
        assert!(
            best <= 40_000 && best as f64 >= 40_000.0 / 1.1,
            "{best} {tried:?}"
        );
    }

    #[test]
    fn rate_search_respects_its_step_budget() {
        let mut s = RateSearch::new(1, 1_000_000, 3, 0.01);
        let mut n = 0;
        while let Some(r) = s.next_rate() {
            s.record(r, true);
            n += 1;
        }
        assert_eq!((n, s.best), (3, Some(4)));
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let z = Zipf::new(1000, 1.1);
        let mut rng = XorShift::new(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[z.sample(rng.next_f64())] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[500]);
        assert_eq!(z.sample(0.0), 0);
        assert_eq!(z.sample(0.999_999_999), 999);
        assert_eq!(Zipf::new(1, 1.0).sample(0.5), 0);
    }

    #[test]
    fn bitset_counts_each_index_once() {
        let mut b = Bitset::new(130);
        assert!(b.insert(0) && b.insert(129) && !b.insert(129));
        assert!(!b.insert(130 + 64));
    }

    #[test]
    fn due_is_open_loop() {
        assert_eq!(due(1000, 0.0), 0);
        assert_eq!(due(1000, 0.0015), 1);
        assert_eq!(due(1000, 2.5), 2500);
    }
}
