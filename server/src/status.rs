//! The hub's status as the core knows it (`Hub::status`): what the
//! `Status` call (`grpc.rs`), the status page and `/status.json` (`web.rs`)
//! and the metrics sampler show, each in its own form.

use freshness::Cursor;

use crate::hub::NodeState;

/// A snapshot of the hub.
#[derive(Debug, Clone, PartialEq)]
pub struct HubStatus {
    /// This hub's name.
    pub hub_id: String,
    /// Its region.
    pub region: String,
    /// Its log's epoch.
    pub epoch: u64,
    /// Its shard count.
    pub shard_count: u32,
    /// Every shard, in order.
    pub shards: Vec<ShardStatus>,
    /// Every connected stream, by node id.
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
    /// The first shard whose log writes fail, and why.
    pub log_error: Option<String>,
}

/// One shard's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u32,
    /// Its newest seq.
    pub head_seq: u64,
    /// Its oldest retained seq (memory or disk).
    pub first_seq: u64,
}

/// One connected stream.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: String,
    /// Its filter; empty means all.
    pub namespaces: Vec<String>,
    /// What it acked.
    pub acked: Cursor,
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
    /// What it is doing.
    pub state: NodeState,
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
}
