//! Coalescing of concurrent misses: the first caller of a key loads, the
//! others wait for its value instead of hitting the source of truth too.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::watch;

/// The state of one load.
#[derive(Clone)]
pub(crate) enum Flight<V> {
    Loading,
    Done(V),
    /// The leader's loader failed: each waiter loads for itself (loaders
    /// have their own error types, which cannot be shared).
    Failed,
}

/// A load in progress: its id and where its outcome appears.
type InFlight<V> = (u64, watch::Receiver<Flight<V>>);

/// Loads in progress, one per key. Bounded by the number of concurrent
/// callers.
pub(crate) struct Flights<K, V> {
    map: Mutex<HashMap<K, InFlight<V>>>,
    next: AtomicU64,
}

/// What a caller of a missing key does.
pub(crate) enum Join<'a, K: Hash + Eq + Clone, V> {
    /// Load, then [`Leader::finish`].
    Leader(Leader<'a, K, V>),
    /// Wait for the leader.
    Follower(watch::Receiver<Flight<V>>),
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn join(&self, key: &K) -> Join<'_, K, V> {
        let mut map = self.map.lock();
        if let Some((_, rx)) = map.get(key) {
            return Join::Follower(rx.clone());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Flight::Loading);
        map.insert(key.clone(), (id, rx));
        Join::Leader(Leader {
            flights: self,
            key: key.clone(),
            id,
            tx,
        })
    }

    /// Loads in progress.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }
}

/// The caller that loads. Dropping it without [`finish`](Leader::finish)
/// (the caller was cancelled) releases the waiters, who then load
/// themselves.
pub(crate) struct Leader<'a, K: Hash + Eq + Clone, V> {
    flights: &'a Flights<K, V>,
    key: K,
    id: u64,
    tx: watch::Sender<Flight<V>>,
}

impl<K: Hash + Eq + Clone, V> Leader<'_, K, V> {
    pub(crate) fn finish(self, outcome: Flight<V>) {
        self.tx.send_replace(outcome);
    }
}

impl<K: Hash + Eq + Clone, V> Drop for Leader<'_, K, V> {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock();
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

/// Waits for a leader: `Some(value)` when it loaded one, `None` when the
/// follower must load itself.
pub(crate) async fn wait<V: Clone>(mut rx: watch::Receiver<Flight<V>>) -> Option<V> {
    match rx.wait_for(|f| !matches!(f, Flight::Loading)).await {
        Ok(f) => match &*f {
            Flight::Done(v) => Some(v.clone()),
            Flight::Loading | Flight::Failed => None,
        },
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_value_or_load_themselves() {
        let flights: Flights<&str, u32> = Flights::new();
        let Join::Leader(leader) = flights.join(&"k") else {
            panic!("first caller leads");
        };
        let Join::Follower(rx) = flights.join(&"k") else {
            panic!("second caller follows");
        };
        let waiter = tokio::spawn(wait(rx));
        leader.finish(Flight::Done(7));
        assert_eq!(waiter.await.unwrap(), Some(7));
        assert_eq!(flights.len(), 0);

        let Join::Leader(leader) = flights.join(&"k") else {
            panic!("a new flight after the first finished");
        };
        let Join::Follower(rx) = flights.join(&"k") else {
            panic!("follows");
        };
        drop(leader);
        assert_eq!(wait(rx).await, None);
        assert_eq!(flights.len(), 0);
    }
}
