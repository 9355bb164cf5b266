//! The region's link lease: with hub replicas on JetStream, exactly one
//! replica at a time runs the replication links to the peer regions
//! (ARCHITECTURE.md, "Hub replicas on NATS JetStream").
//!
//! The lease is one record in JetStream (`jetstream::LeaseRecord`: the
//! last message of a stream `<stream>_LINKS` that keeps one), written only
//! with a revision condition, so of two replicas that try at once exactly
//! one wins. Its value names the
//! holder, the region's epoch, and where each link stands (the peer's epoch
//! and how far this region appended its events).
//!
//! - The holder renews it every [`RENEW_EVERY`] with its links' cursors.
//!   A renewal refused because the revision moved means another replica
//!   took over: the links stop at once. A holder that could not renew for
//!   [`TAKEOVER_AFTER`] (JetStream away) stops them too.
//! - Every other replica reads the key every [`RENEW_EVERY`]; when its
//!   revision has not moved for [`TAKEOVER_AFTER`] (the holder died or lost
//!   NATS), it takes the lease over and starts every link from the cursors
//!   of the last renewal. What it fetches again was appended already and is
//!   answered `DUPLICATE` by the shard actors, so a takeover costs neither
//!   a gap nor a duplicate.
//! - A holder that shuts down releases the lease (an empty holder) with its
//!   final cursors, so a rolling update hands the links over at once; so
//!   does a replica that restarts under its own hub id.
//!
//! The lease saves work, not correctness: were two replicas to run links at
//! once (a holder that has not yet noticed it lost the lease), every peer
//! event would still be appended once, because appends are conditional on
//! the shard's last message and versions are checked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use freshness::pb;
use parking_lot::Mutex;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::jetstream::{AppendError, LeaseRecord, Replica};

/// How often the holder renews the lease and the others read it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How long a lease that did not move stays its holder's.
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(3);
/// The longest a lease request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A holder none of whose links has been up for this long (it reaches
/// NATS, but no replica of any peer region) hands the lease over, so that
/// a replica with a way to the peers can run the links...
pub const HAND_OVER_AFTER: Duration = Duration::from_secs(10);
/// ...and does not take it back for this long.
const HAND_OVER_COOLDOWN: Duration = Duration::from_secs(10);

/// Where each link stands, by peer region: shared by the running links
/// (which raise it after each append) and the holder's renewals.
#[derive(Debug, Default)]
pub struct LinkCursors {
    map: Mutex<BTreeMap<String, pb::Cursor>>,
    /// A link started afresh or was reset: renew now, so that a takeover
    /// does not begin that again (and mark another gap).
    urgent: tokio::sync::Notify,
}

impl LinkCursors {
    /// Records where the link to `region` stands; `urgent` when it started
    /// afresh or was reset, rather than moved on.
    pub fn set(&self, region: &str, cursor: pb::Cursor, urgent: bool) {
        self.map.lock().insert(region.to_owned(), cursor);
        if urgent {
            self.urgent.notify_one();
        }
    }
}

/// The lease's value.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Lease {
    /// The holder's hub id; empty when released.
    holder: String,
    /// The holding process, drawn at its start: tells this replica's own
    /// write from a previous process of the same hub id (restarted) and
    /// from another process wrongly given the same id.
    #[serde(default)]
    incarnation: u64,
    /// The region's epoch the cursors belong to: cursors written in another
    /// epoch of this region point into a log that is gone.
    epoch: u64,
    /// Per peer region: the peer's epoch and how far this region appended
    /// its events, shard by shard.
    cursors: BTreeMap<String, (u64, Vec<u64>)>,
}

impl Lease {
    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }

    fn link_cursors(&self) -> BTreeMap<String, pb::Cursor> {
        self.cursors
            .iter()
            .map(|(region, (epoch, seqs))| {
                (
                    region.clone(),
                    pb::Cursor {
                        epoch: *epoch,
                        seqs: seqs.clone(),
                    },
                )
            })
            .collect()
    }
}

/// What a replica that does not hold the lease remembers of it.
#[derive(Default)]
struct Watch {
    /// The revision last read and when it was first seen.
    seen: Option<(u64, Instant)>,
    /// This process has read the lease at least once.
    read_once: bool,
    /// Another process holds it under this replica's own hub id (said once).
    twin_reported: bool,
    /// When this replica last handed the lease over (its links were down).
    handed_over: Option<Instant>,
}

/// The lease as this replica holds it.
struct Held {
    revision: u64,
    renewed: Instant,
    /// Stops this replica's links.
    links: CancellationToken,
    cursors: Arc<LinkCursors>,
    /// Since when none of the links has been up.
    down_since: Option<Instant>,
}

impl Held {
    fn lease(&self, holder: &str, epoch: u64) -> Lease {
        Lease {
            holder: holder.to_owned(),
            incarnation: incarnation(),
            epoch,
            cursors: self
                .cursors
                .map
                .lock()
                .iter()
                .map(|(r, c)| (r.clone(), (c.epoch, c.seqs.clone())))
                .collect(),
        }
    }
}

/// This process's incarnation (drawn once).
fn incarnation() -> u64 {
    static ONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| rand::random::<u64>() | 1)
}

/// Runs the lease for `hub` until it shuts down: renews it while held,
/// takes it over when it lapses, and starts and stops the links with it.
pub async fn run(hub: Arc<Hub>, replica: Arc<Replica>, tracker: TaskTracker) {
    let Some(bucket) = replica.link_lease().cloned() else {
        return;
    };
    let me = replica.hub_id().to_owned();
    let mut held: Option<Held> = None;
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let urgent = held.as_ref().map(|h| h.cursors.clone());
        tokio::select! {
            _ = tick.tick() => {}
            () = async {
                match &urgent {
                    Some(c) => c.urgent.notified().await,
                    None => std::future::pending().await,
                }
            } => {}
            () = hub.shutdown.cancelled() => {
                if let Some(h) = held {
                    release(&bucket, &hub, &me, h).await;
                }
                return;
            }
        }
        if let Some(h) = held.as_mut()
            && links_down_too_long(&hub, h)
        {
            tracing::warn!(
                "no replication link has been up for {HAND_OVER_AFTER:?}: handing the \
                 region's link lease to another replica"
            );
            if let Some(h) = held.take() {
                release(&bucket, &hub, &me, h).await;
            }
            watch.handed_over = Some(Instant::now());
            continue;
        }
        held = match held.take() {
            Some(h) => renew(&bucket, &hub, &me, h).await,
            None => take(&bucket, &hub, &me, &mut watch, &tracker).await,
        };
    }
}

/// Whether no link of `h` has been up for [`HAND_OVER_AFTER`] (a region
/// with no peers never hands over).
fn links_down_too_long(hub: &Hub, h: &mut Held) -> bool {
    if hub.any_peer_connected() || hub.config.peers.is_empty() {
        h.down_since = None;
        return false;
    }
    h.down_since.get_or_insert_with(Instant::now).elapsed() >= HAND_OVER_AFTER
}

/// Renews a held lease; `None` when it is lost (its links stopped).
async fn renew(bucket: &LeaseRecord, hub: &Hub, me: &str, mut h: Held) -> Option<Held> {
    let value = h.lease(me, hub.epoch).encode();
    match tokio::time::timeout(REQUEST_TIMEOUT, bucket.write(value, h.revision)).await {
        Ok(Ok(revision)) => {
            h.revision = revision;
            h.renewed = Instant::now();
            Some(h)
        }
        Ok(Err(AppendError::Conflict)) => {
            tracing::warn!("another replica took the region's link lease: stopping the links");
            h.links.cancel();
            None
        }
        failed => {
            tracing::debug!(?failed, "renewing the link lease failed");
            if h.renewed.elapsed() < TAKEOVER_AFTER {
                return Some(h);
            }
            let error = match failed {
                Ok(Err(AppendError::Failed(e))) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            tracing::warn!(%error, "cannot renew the region's link lease: stopping the links");
            h.links.cancel();
            None
        }
    }
}

/// Reads the lease, and takes it when it is free, released, written by this
/// process (a renewal that timed out yet landed), left by a previous
/// process of this hub id (found at the first read after a restart), or
/// has not moved for [`TAKEOVER_AFTER`].
async fn take(
    bucket: &LeaseRecord,
    hub: &Arc<Hub>,
    me: &str,
    watch: &mut Watch,
    tracker: &TaskTracker,
) -> Option<Held> {
    if watch
        .handed_over
        .is_some_and(|at| at.elapsed() < HAND_OVER_COOLDOWN)
    {
        return None;
    }
    let fresh = Lease {
        holder: me.to_owned(),
        incarnation: incarnation(),
        epoch: hub.epoch,
        cursors: BTreeMap::new(),
    };
    let read = match tokio::time::timeout(REQUEST_TIMEOUT, bucket.read()).await {
        Ok(Ok(read)) => read,
        _ => return None,
    };
    let Some((revision, value)) = read else {
        // Nobody ever held it.
        let made = tokio::time::timeout(REQUEST_TIMEOUT, bucket.write(fresh.encode(), 0));
        return match made.await {
            Ok(Ok(revision)) => Some(start(hub, tracker, revision, &fresh)),
            _ => None,
        };
    };
    let current = Lease::decode(&value).unwrap_or_default();
    let now = Instant::now();
    let lapsed = match watch.seen {
        Some((seen_revision, since)) if seen_revision == revision => {
            now.duration_since(since) >= TAKEOVER_AFTER
        }
        _ => {
            watch.seen = Some((revision, now));
            false
        }
    };
    let first_read = !std::mem::replace(&mut watch.read_once, true);
    if !current.holder.is_empty() {
        let holder = current.holder.clone();
        hub.update_peers(|p| p.linked_by = Some(holder.clone()));
    }
    let mine = current.holder == me && (current.incarnation == incarnation() || first_read);
    if current.holder == me && !mine && !watch.twin_reported {
        watch.twin_reported = true;
        tracing::error!(
            hub_id = me,
            "another process holds the region's link lease under this replica's hub id: \
             every replica of a region needs its own hub_id"
        );
    }
    if !(current.holder.is_empty() || mine || lapsed) {
        return None;
    }
    let lease = if current.epoch == hub.epoch {
        Lease {
            holder: me.to_owned(),
            incarnation: incarnation(),
            ..current.clone()
        }
    } else {
        if !current.cursors.is_empty() {
            tracing::info!(
                their_epoch = current.epoch,
                "the link lease's cursors are of another epoch of this region: links start afresh"
            );
        }
        fresh
    };
    let updated = tokio::time::timeout(REQUEST_TIMEOUT, bucket.write(lease.encode(), revision));
    match updated.await {
        Ok(Ok(revision)) => {
            if !current.holder.is_empty() && current.holder != me {
                tracing::warn!(from = %current.holder, "took over the region's link lease");
            }
            Some(start(hub, tracker, revision, &lease))
        }
        // Another replica was quicker.
        _ => {
            watch.seen = None;
            None
        }
    }
}

/// Starts the links of a lease just taken.
fn start(hub: &Arc<Hub>, tracker: &TaskTracker, revision: u64, lease: &Lease) -> Held {
    let cursors = Arc::new(LinkCursors {
        map: Mutex::new(lease.link_cursors()),
        urgent: tokio::sync::Notify::new(),
    });
    let links = hub.shutdown.child_token();
    tracing::info!(
        peers = hub.config.peers.len(),
        "holding the region's link lease: running the replication links"
    );
    hub.update_peers(|p| p.linked_by = Some(lease.holder.clone()));
    crate::replication::start_links(
        hub,
        cursors.map.lock().clone(),
        Some(cursors.clone()),
        links.clone(),
        tracker,
    );
    Held {
        revision,
        renewed: Instant::now(),
        links,
        cursors,
        down_since: None,
    }
}

/// Hands the lease back at shutdown, with the links' final cursors, so
/// another replica takes it over without waiting for it to lapse.
async fn release(bucket: &LeaseRecord, hub: &Hub, me: &str, h: Held) {
    h.links.cancel();
    let mut lease = h.lease(me, hub.epoch);
    lease.holder.clear();
    let released = tokio::time::timeout(REQUEST_TIMEOUT, bucket.write(lease.encode(), h.revision));
    if !matches!(released.await, Ok(Ok(_))) {
        tracing::info!("could not release the region's link lease: it lapses by itself");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_survives_its_encoding() {
        let mut lease = Lease {
            holder: "hub-2".into(),
            incarnation: 3,
            epoch: 7,
            cursors: BTreeMap::new(),
        };
        lease.cursors.insert("eu".into(), (9, vec![1, 2, 3]));
        let back = Lease::decode(&lease.encode()).expect("decodes");
        assert_eq!(back, lease);
        assert_eq!(
            back.link_cursors()["eu"],
            pb::Cursor {
                epoch: 9,
                seqs: vec![1, 2, 3]
            }
        );
        assert_eq!(Lease::decode(b"not json"), None);
    }
}
