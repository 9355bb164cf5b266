//! The freshness checker: judges every read against the source of truth.
//!
//! **The bound.** `BOUND = MAX_STALENESS + ALLOWANCE` = 500 ms + 1,300 ms =
//! 1.8 s. `MAX_STALENESS` is the fail-closed bound of the `price` namespace
//! (hubs send progress every 100 ms, so a healthy feed stays far below it);
//! `ALLOWANCE` is the propagation allowance: 1 s for publish → append →
//! fan-out → apply on a loaded machine, plus twice the longest delay a fault
//! injects on a link (150 ms, on the node's link and on a region link).
//!
//! **When a commit is due at a node.** The clock of a commit starts when its
//! hub accepted the publish (the writer's `publish` returned; writers publish
//! right after committing). At a node of another region it starts when the
//! replication link from the commit's region is up: a commit accepted less
//! than `LINK_WINDOW` before its link went down (partition, either hub
//! restarting) is due only once the link is back, and a link counts as back
//! `min(5 s, 2·down + 50 ms) + 500 ms` after the fault healed (the link's
//! reconnect backoff doubles up to 5 s while it fails). This is the contract:
//! a hub's watermark covers what that hub appended (SPEC §1, G4), and events
//! of a cut-off region arrive, or are reset, after the link heals (G6).
//!
//! **A read** of entity `e` at node `n` that began at `t` and returned
//! version `u`:
//! - is *late* when some commit of `e` newer than `u` was due at `n` more
//!   than `BOUND` before `t`;
//! - is a **violation** when it is late and either `e`'s namespace fails
//!   closed (`price`), or the node's own feed was fresh within
//!   `MAX_STALENESS` when the read began (it had no reason to doubt its
//!   cache);
//! - is **`stale_served_by_policy`** when it is late, its namespace serves
//!   stale (`user`), and the node's feed was not fresh within
//!   `MAX_STALENESS` (down, connecting, stalled): the namespace opted into
//!   serving during outages;
//! - is **`stale_excused`** when it is not late, yet a newer version had been
//!   committed more than `BOUND` before `t`: the writer's publish was held up
//!   (its hub was down) or the region link was down, which no node can see.
//!
//! **Staleness of a read**: 0 when `u` is at least every version committed
//! before `t`; otherwise `t` minus the commit time of the oldest version
//! newer than `u` committed before `t` — how long the source of truth had
//! held something newer than what the read returned.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::plan::MAX_DELAY;
use crate::truth::{Commit, Truth};

/// The fail-closed bound of the `price` namespace, and the bound the
/// `user` namespace (serve stale) is measured against.
pub const MAX_STALENESS: Duration = Duration::from_millis(500);
/// Propagation allowance on top of `MAX_STALENESS`.
pub const ALLOWANCE: Duration = Duration::from_millis(1_000 + 2 * MAX_DELAY.as_millis() as u64);
/// A read is late when a newer version was due more than this before it.
pub const BOUND: Duration =
    Duration::from_millis(MAX_STALENESS.as_millis() as u64 + ALLOWANCE.as_millis() as u64);
/// A region link must stay up this long after a commit's acceptance for the
/// commit to count as due at the other region.
pub const LINK_WINDOW: Duration = Duration::from_millis(500);
/// Slack after a replication link's reconnect backoff.
const LINK_SLACK: Duration = Duration::from_millis(500);
/// The longest reconnect backoff of a replication link.
const LINK_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// When a link was down: `(from, until)`, `until` unset while it still is.
type Down = (Instant, Option<Instant>);

/// The down intervals of every directed replication link, `(to, from)`:
/// region `to` pulls from region `from`.
#[derive(Debug, Default)]
pub struct Links {
    down: Mutex<HashMap<(usize, usize), Vec<Down>>>,
}

impl Links {
    /// Marks both directions between `a` and `b` down from now; returns the
    /// start, for [`up`](Self::up).
    pub fn down(&self, a: usize, b: usize) -> Instant {
        let now = Instant::now();
        let mut d = self.down.lock();
        d.entry((a, b)).or_default().push((now, None));
        d.entry((b, a)).or_default().push((now, None));
        now
    }

    /// Marks both directions between `a` and `b` as back up, counting the
    /// reconnect backoff of a link that was down since `since`.
    pub fn up(&self, a: usize, b: usize, since: Instant) {
        let now = Instant::now();
        let down_for = now.saturating_duration_since(since);
        let backoff = (down_for * 2 + Duration::from_millis(50)).min(LINK_BACKOFF_MAX);
        let until = now + backoff + LINK_SLACK;
        let mut d = self.down.lock();
        for key in [(a, b), (b, a)] {
            if let Some(i) = d
                .get_mut(&key)
                .and_then(|v| v.iter_mut().find(|i| i.0 == since && i.1.is_none()))
            {
                i.1 = Some(until);
            }
        }
    }

    /// When a commit from region `from` accepted at `accepted` is due at
    /// region `to`; `None` while it is not (its link is still down).
    pub fn due(&self, from: usize, to: usize, accepted: Instant) -> Option<Instant> {
        if from == to {
            return Some(accepted);
        }
        let d = self.down.lock();
        let Some(intervals) = d.get(&(to, from)) else {
            return Some(accepted);
        };
        let mut due = accepted;
        // Push `due` past every down interval that overlaps the window after
        // it, until none does.
        loop {
            let window_end = due + LINK_WINDOW;
            let blocking = intervals
                .iter()
                .filter(|(s, e)| *s < window_end && e.is_none_or(|e| e > due))
                .map(|(_, e)| *e)
                .max_by_key(|e| e.map_or(u128::MAX, |e| e.duration_since(due).as_nanos()));
            match blocking {
                None => return Some(due),
                Some(None) => return None,
                Some(Some(e)) => due = e,
            }
        }
    }
}

/// What the checker makes of one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Current, or behind by less than the bound.
    Fresh,
    /// Behind by more than the bound, counted from when the newer version
    /// was due at the node.
    Late {
        /// The newer commit that was due longest ago.
        commit: CommitRef,
        /// When it was due at the node.
        due: Instant,
    },
    /// Behind by more than the bound counted from the commit, but not from
    /// when it was due (publish held up, region link down).
    Excused,
}

/// The identity of a commit in a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitRef {
    /// Its version.
    pub version: u64,
    /// Its region.
    pub region: usize,
    /// When it was committed.
    pub committed_at: Instant,
}

impl From<&Commit> for CommitRef {
    fn from(c: &Commit) -> Self {
        Self {
            version: c.version,
            region: c.region,
            committed_at: c.committed_at,
        }
    }
}

/// Judges a read of `e` by a node of `region` that began at `began` and
/// returned `served`; also returns the read's staleness (module docs).
pub fn judge(
    truth: &Truth,
    links: &Links,
    e: usize,
    served: u64,
    region: usize,
    began: Instant,
) -> (Verdict, Duration) {
    let newer = truth.newer_commits(e, served, began);
    let Some(first) = newer.iter().map(|c| c.committed_at).min() else {
        return (Verdict::Fresh, Duration::ZERO);
    };
    let staleness = began.saturating_duration_since(first);
    let due = newer
        .iter()
        .filter_map(|c| {
            let accepted = c.accepted_at?;
            Some((links.due(c.region, region, accepted)?, c))
        })
        .min_by_key(|(due, _)| *due);
    let verdict = match due {
        Some((due, c)) if began.saturating_duration_since(due) > BOUND => Verdict::Late {
            commit: c.into(),
            due,
        },
        _ if staleness > BOUND => Verdict::Excused,
        _ => Verdict::Fresh,
    };
    (verdict, staleness)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_commit_is_due_across_regions_only_while_the_link_is_up() {
        let links = Links::default();
        let long_before = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        assert_eq!(links.due(0, 0, t0), Some(t0));
        assert_eq!(links.due(0, 1, t0), Some(t0), "no fault: due at once");

        tokio::time::advance(Duration::from_millis(100)).await;
        let since = links.down(0, 1);
        // Accepted 100 ms before the link went down: within the window.
        assert_eq!(links.due(0, 1, t0), None, "link still down");
        assert_eq!(links.due(1, 0, t0), None, "both directions");
        assert_eq!(links.due(0, 2, t0), Some(t0), "other links unaffected");
        assert_eq!(
            links.due(0, 1, long_before),
            Some(long_before),
            "accepted well before the partition: due at once"
        );

        tokio::time::advance(Duration::from_millis(1_000)).await;
        links.up(0, 1, since);
        let healed = Instant::now();
        // Down 1 s: reconnect backoff at most 2.05 s, plus 0.5 s slack.
        assert_eq!(
            links.due(0, 1, t0),
            Some(healed + Duration::from_millis(2_550))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reads_are_judged_from_when_the_newer_version_was_due() {
        let truth = Truth::new(&["price:1".to_owned()]);
        let links = Links::default();
        let v1 = truth.commit(0, 0);
        truth.accepted(0, v1, 0, "applied");
        let began = Instant::now();
        assert_eq!(
            judge(&truth, &links, 0, 1, 0, began),
            (Verdict::Fresh, Duration::ZERO)
        );
        let v2 = truth.commit(0, 0);
        tokio::time::advance(Duration::from_millis(300)).await;
        let (v, s) = judge(&truth, &links, 0, v1, 0, Instant::now());
        assert_eq!((v, s), (Verdict::Fresh, Duration::from_millis(300)));
        // Not accepted for a long time (hub down): excused.
        tokio::time::advance(BOUND).await;
        assert_eq!(
            judge(&truth, &links, 0, v1, 0, Instant::now()).0,
            Verdict::Excused
        );
        truth.accepted(0, v2, 0, "applied");
        let accepted = Instant::now();
        tokio::time::advance(BOUND + Duration::from_millis(1)).await;
        assert!(matches!(
            judge(&truth, &links, 0, v1, 0, Instant::now()).0,
            Verdict::Late { due, commit } if due == accepted && commit.version == v2
        ));
        assert_eq!(
            judge(&truth, &links, 0, v2, 0, Instant::now()).0,
            Verdict::Fresh
        );
    }
}
