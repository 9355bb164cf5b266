//! The hub's status as the core knows it (`Hub::status`): what the
//! `Status` call (`grpc.rs`), the status page and `/status.json` (`web.rs`)
//! and the metrics sampler show, each in its own form. The types are the
//! root crate's, shared with the client, which reads them off the wire.

pub use freshness::status::{HubStatus, NodeState, NodeStatus, PeerStatus, ShardStatus};
