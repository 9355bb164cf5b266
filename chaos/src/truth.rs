//! The simulated source of truth: a versioned in-memory store, entity →
//! (version, committed_at), with a short history of commits per entity for
//! the checker and a bounded ring of what happened to each entity (commits,
//! publishes, invalidations applied by nodes) for violation reports.

use std::collections::{HashMap, VecDeque};

use freshness::Entity;
use parking_lot::Mutex;
use tokio::time::Instant;

/// Commits remembered per entity. A read older than all of them is judged
/// against the oldest one kept, which only understates how stale it was.
const HISTORY: usize = 64;
/// Trace items kept per entity.
const TRACE: usize = 48;

/// One commit of one entity.
#[derive(Debug, Clone, Copy)]
pub struct Commit {
    /// The version committed.
    pub version: u64,
    /// When the store bumped the version.
    pub committed_at: Instant,
    /// The region whose writer committed it (and published it to its hub).
    pub region: usize,
    /// When that hub accepted the publish (the writer's `publish` returned).
    pub accepted_at: Option<Instant>,
}

/// Something that happened to an entity.
#[derive(Debug, Clone)]
pub enum Trace {
    /// A writer committed a version.
    Commit { version: u64, region: usize },
    /// The writer's publish of it was accepted.
    Accepted {
        version: u64,
        region: usize,
        outcome: &'static str,
    },
    /// A fault published a version again, or an older one.
    Republished {
        version: u64,
        region: usize,
        outcome: &'static str,
        why: &'static str,
    },
    /// A node's handler applied an invalidation.
    Invalidated { node: usize, version: u64 },
}

/// A trace item with its time.
#[derive(Debug, Clone)]
pub struct TraceItem {
    /// When.
    pub at: Instant,
    /// What.
    pub what: Trace,
}

#[derive(Debug, Default)]
struct EntityState {
    version: u64,
    history: VecDeque<Commit>,
    trace: VecDeque<TraceItem>,
}

impl EntityState {
    fn trace(&mut self, what: Trace) {
        if self.trace.len() == TRACE {
            self.trace.pop_front();
        }
        self.trace.push_back(TraceItem {
            at: Instant::now(),
            what,
        });
    }
}

/// The store. Entities are addressed by index into the key space.
#[derive(Debug)]
pub struct Truth {
    /// The start of the run, the origin of every time in reports.
    pub start: Instant,
    entities: Vec<Entity>,
    index: HashMap<String, usize>,
    states: Vec<Mutex<EntityState>>,
}

impl Truth {
    /// A store with these entities, every one at version 0 (never written).
    pub fn new(names: &[String]) -> Self {
        let entities: Vec<Entity> = names
            .iter()
            .map(|n| Entity::parse(n).expect("the key space is made of valid entities"))
            .collect();
        Self {
            start: Instant::now(),
            index: names.iter().cloned().zip(0..).collect(),
            states: entities
                .iter()
                .map(|_| Mutex::new(EntityState::default()))
                .collect(),
            entities,
        }
    }

    /// Entities in the key space.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// True for an empty key space.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// The entity at `e`.
    pub fn entity(&self, e: usize) -> &Entity {
        &self.entities[e]
    }

    /// The index of an entity of the key space.
    pub fn index_of(&self, entity: &Entity) -> Option<usize> {
        self.index.get(entity.as_str()).copied()
    }

    /// Commits a new version of `e` in `region`; returns it.
    pub fn commit(&self, e: usize, region: usize) -> u64 {
        let mut s = self.states[e].lock();
        s.version += 1;
        let version = s.version;
        if s.history.len() == HISTORY {
            s.history.pop_front();
        }
        s.history.push_back(Commit {
            version,
            committed_at: Instant::now(),
            region,
            accepted_at: None,
        });
        s.trace(Trace::Commit { version, region });
        version
    }

    /// Records that the hub of `region` accepted the writer's publish.
    pub fn accepted(&self, e: usize, version: u64, region: usize, outcome: &'static str) {
        let mut s = self.states[e].lock();
        let now = Instant::now();
        if let Some(c) = s.history.iter_mut().find(|c| c.version == version) {
            c.accepted_at.get_or_insert(now);
        }
        s.trace(Trace::Accepted {
            version,
            region,
            outcome,
        });
    }

    /// Records a publish made by a fault.
    pub fn republished(
        &self,
        e: usize,
        version: u64,
        region: usize,
        outcome: &'static str,
        why: &'static str,
    ) {
        self.states[e].lock().trace(Trace::Republished {
            version,
            region,
            outcome,
            why,
        });
    }

    /// Records an invalidation applied by `node`.
    pub fn invalidated(&self, e: usize, node: usize, version: u64) {
        self.states[e]
            .lock()
            .trace(Trace::Invalidated { node, version });
    }

    /// What a load reads now: the committed version (0: never written).
    pub fn read(&self, e: usize) -> u64 {
        self.states[e].lock().version
    }

    /// The newest version whose publish was accepted, if any.
    pub fn newest_accepted(&self, e: usize) -> Option<u64> {
        self.states[e]
            .lock()
            .history
            .iter()
            .rev()
            .find(|c| c.accepted_at.is_some())
            .map(|c| c.version)
    }

    /// The commits of `e` newer than `served` made before `before`.
    pub fn newer_commits(&self, e: usize, served: u64, before: Instant) -> Vec<Commit> {
        self.states[e]
            .lock()
            .history
            .iter()
            .filter(|c| c.version > served && c.committed_at <= before)
            .copied()
            .collect()
    }

    /// The trace of `e`.
    pub fn trace(&self, e: usize) -> Vec<TraceItem> {
        self.states[e].lock().trace.iter().cloned().collect()
    }
}
