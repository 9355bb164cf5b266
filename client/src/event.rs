//! What a subscriber hands to its [`Handler`](crate::Handler): batches of
//! invalidations and resets, converted from the wire and validated here so
//! that handlers only ever see valid entities and versions.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use freshness::validate::CheckedEvent;
use freshness::{Entity, ShardId, Version, pb};

/// One invalidation as delivered to a node: `entity` changed to `version` at
/// the source of truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// What changed.
    pub entity: Entity,
    /// Its new version: cached data read at an older version is stale.
    pub version: Version,
    /// The entity's shard (`shard(entity)` for the hub's shard count).
    pub shard: ShardId,
    /// The event's seq in its shard, within the hub's current epoch.
    pub seq: u64,
    /// Region the event was first accepted in.
    pub origin: String,
    /// Hub clock when the origin hub accepted the event (µs since the Unix
    /// epoch); 0 when unknown.
    pub publish_time_us: u64,
    /// The new value for refresh-in-place, when the writer sent one.
    pub payload: Option<Bytes>,
    /// W3C trace context of the publishing call, when the writer sent one
    /// (the subscriber's apply span joins it).
    pub traceparent: Option<String>,
    /// W3C trace state that goes with `traceparent`.
    pub tracestate: Option<String>,
}

/// A batch of invalidations, in seq order within each shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventBatch {
    /// The events to apply.
    pub events: Vec<Invalidation>,
    /// Set when this batch brought the node up to the hub's head: every event
    /// the hub appended before this (hub clock) time has now been delivered
    /// or reset.
    pub watermark: Option<SystemTime>,
}

/// Which shards a reset covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetScope {
    /// Every shard.
    All,
    /// Exactly these shards.
    Shards(BTreeSet<ShardId>),
}

/// Why a node must drop cached entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// The node's resume cursor is older than the hub's retained log.
    CursorExpired,
    /// The node's resume cursor names another incarnation of the hub's log.
    EpochChanged,
    /// The node fell behind further than the hub's retained log.
    SlowConsumer,
    /// The hub lost events replicated from a peer region.
    ReplicationGap,
    /// Local: the handler kept failing on events of these shards, so the
    /// subscriber dropped what depends on them rather than skip an
    /// invalidation.
    HandlerFailed,
    /// Local: the saved cursor could not be used (unreadable file, refused by
    /// the hub), so nothing cached can be trusted.
    CursorLost,
    /// Local: the hub sent an event the client could not read (malformed
    /// entity or version 0), so its shard is reset instead.
    MalformedEvent,
    /// The hub did not say.
    Unspecified,
}

impl ResetReason {
    /// A short lower-case name (`cursor_expired`, `epoch_changed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CursorExpired => "cursor_expired",
            Self::EpochChanged => "epoch_changed",
            Self::SlowConsumer => "slow_consumer",
            Self::ReplicationGap => "replication_gap",
            Self::HandlerFailed => "handler_failed",
            Self::CursorLost => "cursor_lost",
            Self::MalformedEvent => "malformed_event",
            Self::Unspecified => "unspecified",
        }
    }

    /// True for the reasons the client decides itself rather than the hub.
    pub fn is_local(self) -> bool {
        matches!(
            self,
            Self::HandlerFailed | Self::CursorLost | Self::MalformedEvent
        )
    }

    pub(crate) fn from_wire(r: i32) -> Self {
        match pb::ResetReason::try_from(r) {
            Ok(pb::ResetReason::CursorExpired) => Self::CursorExpired,
            Ok(pb::ResetReason::EpochChanged) => Self::EpochChanged,
            Ok(pb::ResetReason::SlowConsumer) => Self::SlowConsumer,
            Ok(pb::ResetReason::ReplicationGap) => Self::ReplicationGap,
            Ok(pb::ResetReason::Unspecified) | Err(_) => Self::Unspecified,
        }
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Drop every cached entry that depends on an entity in the covered shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    /// The shards covered.
    pub scope: ResetScope,
    /// Why.
    pub reason: ResetReason,
    /// The hub's shard count, to map entities to shards with
    /// [`freshness::shard`].
    pub shard_count: u32,
}

impl Reset {
    /// A reset of every shard.
    pub fn all(reason: ResetReason, shard_count: u32) -> Self {
        Self {
            scope: ResetScope::All,
            reason,
            shard_count,
        }
    }

    /// A reset of the given shards.
    pub fn shards(
        shards: impl IntoIterator<Item = ShardId>,
        reason: ResetReason,
        shard_count: u32,
    ) -> Self {
        Self {
            scope: ResetScope::Shards(shards.into_iter().collect()),
            reason,
            shard_count,
        }
    }

    /// True when the reset covers `shard`.
    pub fn covers_shard(&self, shard: ShardId) -> bool {
        match &self.scope {
            ResetScope::All => true,
            ResetScope::Shards(s) => s.contains(&shard),
        }
    }

    /// True when the reset covers the shard of `entity`: entries that depend
    /// on it must go.
    pub fn covers(&self, entity: &Entity) -> bool {
        match &self.scope {
            ResetScope::All => true,
            ResetScope::Shards(s) => s.contains(&entity.shard(self.shard_count)),
        }
    }

    /// True for a reset of every shard.
    pub fn is_all(&self) -> bool {
        matches!(self.scope, ResetScope::All)
    }

    /// The covered shards, listed (every shard for [`ResetScope::All`]).
    pub fn shard_list(&self) -> Vec<ShardId> {
        match &self.scope {
            ResetScope::All => (0..self.shard_count).map(ShardId).collect(),
            ResetScope::Shards(s) => s.iter().copied().collect(),
        }
    }
}

/// Converts a hub timestamp (µs since the Unix epoch, 0 = none).
pub(crate) fn hub_time(us: u64) -> Option<SystemTime> {
    (us != 0).then(|| UNIX_EPOCH + Duration::from_micros(us))
}

/// Converts a wire batch. Events the client cannot read (the hub validates
/// everything it accepts, so this means a broken hub) are left out and their
/// shards returned, to be reset rather than skipped.
pub(crate) fn batch_from_wire(batch: pb::EventBatch) -> (EventBatch, BTreeSet<ShardId>) {
    let mut bad = BTreeSet::new();
    let mut events = Vec::with_capacity(batch.events.len());
    for d in batch.events {
        let shard = ShardId(d.shard);
        let Some(e) = d.event else {
            bad.insert(shard);
            continue;
        };
        let Ok(e) = CheckedEvent::try_from(e) else {
            bad.insert(shard);
            continue;
        };
        events.push(Invalidation {
            entity: e.entity,
            version: e.version,
            shard,
            seq: d.seq,
            origin: e.origin,
            publish_time_us: e.publish_time_us,
            payload: (!e.payload.is_empty()).then_some(e.payload),
            traceparent: (!e.traceparent.is_empty()).then_some(e.traceparent),
            tracestate: (!e.tracestate.is_empty()).then_some(e.tracestate),
        });
    }
    (
        EventBatch {
            events,
            watermark: hub_time(batch.watermark_us),
        },
        bad,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_covers_by_shard_function() {
        let user42 = Entity::parse("user:42").unwrap();
        let post7 = Entity::parse("post:7").unwrap();
        // Pinned in the protocol crate: user:42 -> 2, post:7 -> 48 (S = 64).
        let r = Reset::shards([ShardId(2)], ResetReason::CursorExpired, 64);
        assert!(r.covers(&user42));
        assert!(!r.covers(&post7));
        assert!(Reset::all(ResetReason::EpochChanged, 64).covers(&post7));
        assert_eq!(
            Reset::all(ResetReason::EpochChanged, 3).shard_list().len(),
            3
        );
    }

    #[test]
    fn malformed_events_become_shards_to_reset() {
        let good = pb::Event {
            entity: "user:1".into(),
            version: 3,
            ..Default::default()
        };
        let zero = pb::Event {
            entity: "user:2".into(),
            version: 0,
            ..Default::default()
        };
        let batch = pb::EventBatch {
            events: vec![
                pb::DeliveredEvent {
                    shard: 1,
                    seq: 1,
                    event: Some(good),
                },
                pb::DeliveredEvent {
                    shard: 5,
                    seq: 9,
                    event: Some(zero),
                },
                pb::DeliveredEvent {
                    shard: 6,
                    seq: 2,
                    event: None,
                },
            ],
            watermark_us: 0,
            ack_requested: false,
        };
        let (b, bad) = batch_from_wire(batch);
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].payload, None);
        assert_eq!(b.watermark, None);
        assert_eq!(bad, [ShardId(5), ShardId(6)].into_iter().collect());
    }
}
