//! The dependency index: for every entity, the cached keys that read it.
//!
//! Striped by the entity's hash so that invalidations of different entities
//! rarely meet on a lock. Every registration carries the id of the cache
//! entry it belongs to, so that the removal of an old entry (replaced,
//! evicted, invalidated) never unregisters a newer entry under the same key.
//!
//! Lock discipline: a stripe lock is a leaf. Nothing calls into the cache
//! (moka) while holding one, so the cache's eviction listener, which takes
//! stripe locks, can never deadlock with this code.

use std::collections::HashMap;
use std::hash::Hash;

use freshness::{Entity, fnv1a64};
use parking_lot::Mutex;

const STRIPES: usize = 64;

type Stripe<K> = HashMap<Entity, HashMap<K, u64>>;

/// Entity → keys (with entry ids) that depend on it.
pub(crate) struct DepIndex<K> {
    stripes: Box<[Mutex<Stripe<K>>]>,
}

impl<K: Hash + Eq + Clone> DepIndex<K> {
    pub(crate) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn stripe(&self, entity: &Entity) -> &Mutex<Stripe<K>> {
        // The remainder is below STRIPES: the cast is lossless.
        &self.stripes[(fnv1a64(entity.as_str().as_bytes()) % STRIPES as u64) as usize]
    }

    /// Registers `key` (entry `id`) as depending on `entity`, replacing an
    /// older registration of the same key.
    pub(crate) fn register(&self, entity: &Entity, key: &K, id: u64) {
        self.stripe(entity)
            .lock()
            .entry(entity.clone())
            .or_default()
            .insert(key.clone(), id);
    }

    /// Removes the registration of `key` under `entity` if it still belongs
    /// to entry `id`.
    pub(crate) fn unregister(&self, entity: &Entity, key: &K, id: u64) {
        let mut stripe = self.stripe(entity).lock();
        if let Some(keys) = stripe.get_mut(entity) {
            if keys.get(key) == Some(&id) {
                keys.remove(key);
            }
            if keys.is_empty() {
                stripe.remove(entity);
            }
        }
    }

    /// The keys that depend on `entity`.
    pub(crate) fn keys(&self, entity: &Entity) -> Vec<K> {
        self.stripe(entity)
            .lock()
            .get(entity)
            .map(|keys| keys.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The keys that depend on any entity for which `covered` holds.
    pub(crate) fn keys_where(&self, covered: impl Fn(&Entity) -> bool) -> Vec<K> {
        let mut out = Vec::new();
        for stripe in self.stripes.iter() {
            let stripe = stripe.lock();
            for (entity, keys) in stripe.iter() {
                if covered(entity) {
                    out.extend(keys.keys().cloned());
                }
            }
        }
        out
    }

    /// Registrations in all, for tests and stats.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().values().map(HashMap::len).sum::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_protect_newer_registrations() {
        let idx = DepIndex::new();
        let e = Entity::parse("user:1").unwrap();
        idx.register(&e, &"k", 1);
        idx.register(&e, &"k", 2);
        idx.unregister(&e, &"k", 1);
        assert_eq!(idx.keys(&e), vec!["k"]);
        idx.unregister(&e, &"k", 2);
        assert!(idx.keys(&e).is_empty());
        assert_eq!(idx.len(), 0);
        idx.register(&e, &"a", 3);
        idx.register(&Entity::parse("post:1").unwrap(), &"b", 4);
        let mut got = idx.keys_where(|e| e.namespace() == "post");
        got.sort();
        assert_eq!(got, vec!["b"]);
    }
}
