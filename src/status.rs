//! A hub's status in domain types: what the hub's core reports
//! (`Hub::status`), what its `Status` call, status page and metrics show,
//! and what the client's `Publisher::status` returns, with the one
//! conversion each way to the wire's `StatusResponse`.

use crate::{Cursor, pb};

/// A snapshot of a hub.
#[derive(Debug, Clone, PartialEq)]
pub struct HubStatus {
    /// The hub's name.
    pub hub_id: String,
    /// Its region.
    pub region: String,
    /// Its log's epoch.
    pub epoch: u64,
    /// Its shard count.
    pub shard_count: u32,
    /// Every shard, in order.
    pub shards: Vec<ShardStatus>,
    /// Every connected stream.
    pub nodes: Vec<NodeStatus>,
    /// Every peer region's replication link.
    pub peers: Vec<PeerStatus>,
    /// Events held in memory.
    pub retained_events: u64,
    /// Their bytes.
    pub retained_bytes: u64,
    /// Hub time of the snapshot, µs since the Unix epoch.
    pub now_us: u64,
    /// The log is on disk.
    pub durable: bool,
    /// Why the log's writes fail, if they do.
    pub log_error: Option<String>,
}

/// One shard's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u32,
    /// Its newest seq.
    pub head_seq: u64,
    /// Its oldest retained seq.
    pub first_seq: u64,
}

/// What a node's stream is doing. The discriminants rank the states in the
/// order a hub tests them (a hub keeps the last one in an atomic); the
/// wire numbers them otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeState {
    /// Its stream has no send capacity: nothing reaches it, whatever else
    /// holds (the node does not read).
    Blocked = 1,
    /// A reset was sent (or waits to go) that the node has not acked.
    Resetting = 2,
    /// At its in-flight limit: nothing is sent until it acks.
    Parked = 3,
    /// Receiving.
    Live = 4,
}

impl NodeState {
    /// As status shows it: `live`, `parked`, `blocked`, `resetting`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Parked => "parked",
            Self::Blocked => "blocked",
            Self::Resetting => "resetting",
        }
    }
}

/// One connected stream.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: String,
    /// Its filter; empty means all.
    pub namespaces: Vec<String>,
    /// What it acked (always given by a hub of this version; `None` when
    /// a status read off the wire did not say).
    pub acked: Option<Cursor>,
    /// Events appended that it has not acked.
    pub lag_events: u64,
    /// Since the newest watermark it acked.
    pub staleness_ms: u64,
    /// Events sent and not acked.
    pub in_flight: u32,
    /// Its in-flight limit.
    pub max_in_flight: u32,
    /// At that limit.
    pub parked: bool,
    /// A replicating hub rather than a cache node.
    pub replication: bool,
    /// Its address.
    pub peer: String,
    /// Hub time of its hello.
    pub connected_at_us: u64,
    /// What it is doing (always given by a hub of this version; `None`
    /// from one that does not report it).
    pub state: Option<NodeState>,
    /// Hub time since which it does that.
    pub state_since_us: u64,
}

/// One peer region's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The region.
    pub region: String,
    /// Its hub's URL.
    pub address: String,
    /// The link's stream is up.
    pub connected: bool,
    /// Events of the peer's log the link has not passed.
    pub lag_events: u64,
    /// Since the peer's newest watermark.
    pub lag_ms: u64,
    /// Why the link last failed, if it did.
    pub last_error: String,
    /// With hub replicas: the replica that runs the region's links (this
    /// hub's own id when it does); `None` for a hub without replicas.
    pub linked_by: Option<String>,
}

impl HubStatus {
    /// A status read off the wire (a `Status` answer).
    pub fn from_wire(s: pb::StatusResponse) -> Self {
        let shards = s.shard_count;
        Self {
            hub_id: s.hub_id,
            region: s.region,
            epoch: s.epoch,
            shard_count: s.shard_count,
            shards: s
                .shards
                .into_iter()
                .map(|h| ShardStatus {
                    shard: h.shard,
                    head_seq: h.head_seq,
                    first_seq: h.first_seq,
                })
                .collect(),
            nodes: s
                .nodes
                .into_iter()
                .map(|n| NodeStatus {
                    acked: n
                        .acked
                        .as_ref()
                        .and_then(|c| Cursor::from_wire(c, shards).ok()),
                    state: match pb::NodeState::try_from(n.state) {
                        Ok(pb::NodeState::Live) => Some(NodeState::Live),
                        Ok(pb::NodeState::Parked) => Some(NodeState::Parked),
                        Ok(pb::NodeState::Blocked) => Some(NodeState::Blocked),
                        Ok(pb::NodeState::Resetting) => Some(NodeState::Resetting),
                        _ => None,
                    },
                    node_id: n.node_id,
                    namespaces: n.namespaces,
                    lag_events: n.lag_events,
                    staleness_ms: n.staleness_ms,
                    in_flight: n.in_flight,
                    max_in_flight: n.max_in_flight,
                    parked: n.parked,
                    replication: n.replication,
                    peer: n.peer,
                    connected_at_us: n.connected_at_us,
                    state_since_us: n.state_since_us,
                })
                .collect(),
            peers: s
                .peers
                .into_iter()
                .map(|p| PeerStatus {
                    region: p.region,
                    address: p.address,
                    connected: p.connected,
                    lag_events: p.lag_events,
                    lag_ms: p.lag_ms,
                    last_error: p.last_error,
                    linked_by: Some(p.linked_by).filter(|l| !l.is_empty()),
                })
                .collect(),
            retained_events: s.retained_events,
            retained_bytes: s.retained_bytes,
            now_us: s.now_us,
            durable: s.durable,
            log_error: Some(s.log_error).filter(|e| !e.is_empty()),
        }
    }
}

impl From<HubStatus> for pb::StatusResponse {
    fn from(s: HubStatus) -> Self {
        Self {
            hub_id: s.hub_id,
            region: s.region,
            epoch: s.epoch,
            shard_count: s.shard_count,
            shards: s
                .shards
                .into_iter()
                .map(|h| pb::ShardStatus {
                    shard: h.shard,
                    head_seq: h.head_seq,
                    first_seq: h.first_seq,
                })
                .collect(),
            nodes: s.nodes.into_iter().map(node_to_wire).collect(),
            peers: s
                .peers
                .into_iter()
                .map(|p| pb::PeerStatus {
                    region: p.region,
                    address: p.address,
                    connected: p.connected,
                    lag_events: p.lag_events,
                    lag_ms: p.lag_ms,
                    last_error: p.last_error,
                    linked_by: p.linked_by.unwrap_or_default(),
                })
                .collect(),
            retained_events: s.retained_events,
            retained_bytes: s.retained_bytes,
            now_us: s.now_us,
            durable: s.durable,
            log_error: s.log_error.unwrap_or_default(),
        }
    }
}

fn node_to_wire(n: NodeStatus) -> pb::NodeStatus {
    pb::NodeStatus {
        node_id: n.node_id,
        namespaces: n.namespaces,
        acked: n.acked.map(|c| c.to_wire()),
        lag_events: n.lag_events,
        staleness_ms: n.staleness_ms,
        in_flight: n.in_flight,
        max_in_flight: n.max_in_flight,
        parked: n.parked,
        replication: n.replication,
        peer: n.peer,
        connected_at_us: n.connected_at_us,
        state: n.state.map_or(pb::NodeState::Unspecified, |s| match s {
            NodeState::Blocked => pb::NodeState::Blocked,
            NodeState::Resetting => pb::NodeState::Resetting,
            NodeState::Parked => pb::NodeState::Parked,
            NodeState::Live => pb::NodeState::Live,
        }) as i32,
        state_since_us: n.state_since_us,
    }
}
