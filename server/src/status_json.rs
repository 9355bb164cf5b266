//! `/status.json`: the Status RPC's answer as JSON, with what the status
//! page adds (uptime, the freshness SLI, rates, resets by reason), and an
//! optional cut of the node list to the worst few matching a filter so
//! that a page over 10,000 nodes stays small.
//!
//! The fields are documented in the hub's README section "The status page"
//! (`README.md`); names follow the proto's (`StatusResponse`, `NodeStatus`,
//! `PeerStatus`, `ShardStatus`). 64-bit identifiers (`epoch`) are strings,
//! as in protobuf's JSON mapping, because JavaScript numbers are exact only
//! to 2^53; counters and times are numbers.

use std::cmp::Reverse;

use freshness::pb;
use serde::Serialize;

use crate::stats::{StatsView, Totals};

/// What a request asks of the node list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only the `n` worst nodes (laggards first); all, in node id order,
    /// when absent.
    pub worst: Option<usize>,
    /// Only nodes whose id, peer address or namespaces contain this text
    /// (case-insensitive).
    pub filter: String,
}

/// The most nodes `worst` may ask for.
pub const MAX_WORST: usize = 10_000;

/// Why a query string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    /// `worst` is not a whole number within bounds.
    #[error("worst must be a whole number from 1 to {MAX_WORST}, got {0:?}")]
    Worst(String),
    /// A parameter the endpoint does not know.
    #[error("unknown parameter {0:?}: /status.json takes worst and filter")]
    Unknown(String),
}

impl Query {
    /// Parses `worst=N&filter=TEXT` (form-encoded).
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let mut q = Query::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "worst" => {
                    let n = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_WORST).contains(n))
                        .ok_or_else(|| QueryError::Worst(value.to_string()))?;
                    q.worst = Some(n);
                }
                "filter" => q.filter = value.trim().to_lowercase(),
                other => return Err(QueryError::Unknown(other.to_owned())),
            }
        }
        Ok(q)
    }
}

/// The document.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    /// This hub's id.
    pub hub_id: String,
    /// Its region.
    pub region: String,
    /// The log's incarnation, as a decimal string.
    pub epoch: String,
    /// Shard count.
    pub shard_count: u32,
    /// Hub clock now, microseconds since the Unix epoch.
    pub now_us: u64,
    /// Hub clock at start.
    pub started_us: u64,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Events in the retained log.
    pub retained_events: u64,
    /// Bytes in the retained log.
    pub retained_bytes: u64,
    /// The log is kept on disk (false: in memory only).
    pub durable: bool,
    /// Why the durable log cannot be written now; empty while it can.
    pub log_error: String,
    /// Sum of the shards' head seqs: events appended this epoch.
    pub head_events: u64,
    /// Per shard: head and first retained seq.
    pub shards: Vec<ShardJson>,
    /// Connected streams, cache nodes and replicating hubs.
    pub nodes_total: usize,
    /// Those that match the filter.
    pub nodes_matched: usize,
    /// Nodes that are not live (parked, blocked or resetting).
    pub nodes_not_live: usize,
    /// The nodes: all in node id order, or the worst first.
    pub nodes: Vec<NodeJson>,
    /// Replication links to peer regions.
    pub peers: Vec<PeerJson>,
    /// The freshness SLI.
    pub sli: Sli,
    /// Rates over the last few seconds.
    pub rates: Rates,
    /// Resets sent since start, by reason.
    pub resets: serde_json::Map<String, serde_json::Value>,
}

/// One shard.
#[derive(Debug, Serialize)]
pub struct ShardJson {
    /// Shard number.
    pub shard: u32,
    /// Seq of the newest event; 0 when empty.
    pub head_seq: u64,
    /// Oldest retained seq.
    pub first_seq: u64,
}

/// A cursor.
#[derive(Debug, Serialize)]
pub struct CursorJson {
    /// Epoch, as a decimal string.
    pub epoch: String,
    /// Seq per shard.
    pub seqs: Vec<u64>,
}

/// One connected stream.
#[derive(Debug, Serialize)]
pub struct NodeJson {
    /// The node's stable id.
    pub node_id: String,
    /// Its filter; empty means all.
    pub namespaces: Vec<String>,
    /// Its acked cursor.
    pub acked: Option<CursorJson>,
    /// Events appended and not acked, over all shards.
    pub lag_events: u64,
    /// Hub clock minus the newest watermark the node acked.
    pub staleness_ms: u64,
    /// Unacked events in flight.
    pub in_flight: u32,
    /// Its in-flight limit.
    pub max_in_flight: u32,
    /// Held back by its in-flight limit.
    pub parked: bool,
    /// `live`, `parked`, `blocked` or `resetting` (see [`node_state`]).
    pub state: &'static str,
    /// Hub time since which the node has been in `state`.
    pub state_since_us: u64,
    /// A replicating hub rather than a cache node.
    pub replication: bool,
    /// Remote address.
    pub peer: String,
    /// Hub time of its hello.
    pub connected_at_us: u64,
}

/// One replication link.
#[derive(Debug, Serialize)]
pub struct PeerJson {
    /// The peer's region.
    pub region: String,
    /// Its URL.
    pub address: String,
    /// The link's stream is up.
    pub connected: bool,
    /// Events the link has not passed yet.
    pub lag_events: u64,
    /// Age of the peer's last watermark.
    pub lag_ms: u64,
    /// Why the link last failed.
    pub last_error: String,
    /// With hub replicas: the replica that runs the region's links.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linked_by: Option<String>,
}

/// The SLI over two windows.
#[derive(Debug, Serialize)]
pub struct Sli {
    /// Since the hub started.
    pub since_start: SliWindow,
    /// Over the last minute (less while the hub is younger).
    pub last_minute: SliWindow,
}

/// Deliveries acked in one window, and the share acked in time.
#[derive(Debug, Serialize)]
pub struct SliWindow {
    /// Length of the window in seconds.
    pub seconds: f64,
    /// Deliveries acked.
    pub acked: u64,
    /// Of those, acked within 100 ms of the publish.
    pub within_100ms: u64,
    /// Of those, acked within 1 s.
    pub within_1s: u64,
    /// `within_100ms / acked`; null without deliveries.
    pub ratio_100ms: Option<f64>,
    /// `within_1s / acked`; null without deliveries.
    pub ratio_1s: Option<f64>,
}

impl SliWindow {
    fn from(t: &Totals) -> Self {
        let ratio = |n: u64| (t.acked > 0).then(|| n as f64 / t.acked as f64);
        Self {
            seconds: t.at_us as f64 / 1e6,
            acked: t.acked,
            within_100ms: t.within_100ms,
            within_1s: t.within_1s,
            ratio_100ms: ratio(t.within_100ms),
            ratio_1s: ratio(t.within_1s),
        }
    }
}

/// Per-second rates.
#[derive(Debug, Serialize)]
pub struct Rates {
    /// The window they are taken over, in seconds.
    pub window_s: f64,
    /// Events answered by publish.
    pub publish_per_s: f64,
    /// Deliveries written to nodes.
    pub delivery_per_s: f64,
    /// Deliveries acked by nodes.
    pub ack_per_s: f64,
}

/// The state a node is shown in: the Status RPC's `state` in lower case;
/// where it is unspecified, `parked` while its in-flight limit holds it
/// back, else `live`.
pub fn node_state(n: &pb::NodeStatus) -> &'static str {
    match pb::NodeState::try_from(n.state) {
        Ok(pb::NodeState::Live) => "live",
        Ok(pb::NodeState::Parked) => "parked",
        Ok(pb::NodeState::Blocked) => "blocked",
        Ok(pb::NodeState::Resetting) => "resetting",
        Ok(pb::NodeState::Unspecified) | Err(_) if n.parked => "parked",
        Ok(pb::NodeState::Unspecified) | Err(_) => "live",
    }
}

/// Builds the document from a status snapshot and the hub's totals.
pub fn build(status: pb::StatusResponse, stats: &StatsView, query: &Query) -> StatusJson {
    let nodes_total = status.nodes.len();
    let mut nodes: Vec<pb::NodeStatus> = status
        .nodes
        .into_iter()
        .filter(|n| matches(n, &query.filter))
        .collect();
    let nodes_matched = nodes.len();
    let nodes_not_live = nodes.iter().filter(|n| node_state(n) != "live").count();
    if let Some(worst) = query.worst {
        // Laggards first: not live, then the most events behind, then the
        // stalest; the id keeps the order stable between refreshes.
        nodes.sort_by(|a, b| {
            (
                node_state(a) == "live",
                Reverse(a.lag_events),
                Reverse(a.staleness_ms),
                &a.node_id,
            )
                .cmp(&(
                    node_state(b) == "live",
                    Reverse(b.lag_events),
                    Reverse(b.staleness_ms),
                    &b.node_id,
                ))
        });
        nodes.truncate(worst);
    }
    let rates = &stats.recent;
    let per_s = |n: u64| {
        if rates.at_us == 0 {
            0.0
        } else {
            n as f64 * 1e6 / rates.at_us as f64
        }
    };
    StatusJson {
        hub_id: status.hub_id,
        region: status.region,
        epoch: status.epoch.to_string(),
        shard_count: status.shard_count,
        now_us: status.now_us,
        started_us: status.now_us.saturating_sub(stats.since_start.at_us),
        uptime_s: stats.since_start.at_us as f64 / 1e6,
        retained_events: status.retained_events,
        retained_bytes: status.retained_bytes,
        durable: status.durable,
        log_error: status.log_error,
        head_events: status.shards.iter().map(|s| s.head_seq).sum(),
        shards: status
            .shards
            .into_iter()
            .map(|s| ShardJson {
                shard: s.shard,
                head_seq: s.head_seq,
                first_seq: s.first_seq,
            })
            .collect(),
        nodes_total,
        nodes_matched,
        nodes_not_live,
        nodes: nodes.into_iter().map(node).collect(),
        peers: status
            .peers
            .into_iter()
            .map(|p| PeerJson {
                region: p.region,
                address: p.address,
                connected: p.connected,
                lag_events: p.lag_events,
                lag_ms: p.lag_ms,
                last_error: p.last_error,
                linked_by: Some(p.linked_by).filter(|l| !l.is_empty()),
            })
            .collect(),
        sli: Sli {
            since_start: SliWindow::from(&stats.since_start),
            last_minute: SliWindow::from(&stats.last_minute),
        },
        rates: Rates {
            window_s: rates.at_us as f64 / 1e6,
            publish_per_s: per_s(rates.published),
            delivery_per_s: per_s(rates.delivered),
            ack_per_s: per_s(rates.acked),
        },
        resets: stats
            .resets
            .iter()
            .map(|(reason, n)| ((*reason).to_owned(), (*n).into()))
            .collect(),
    }
}

fn matches(n: &pb::NodeStatus, filter: &str) -> bool {
    filter.is_empty()
        || n.node_id.to_lowercase().contains(filter)
        || n.peer.to_lowercase().contains(filter)
        || n.namespaces.iter().any(|ns| ns.contains(filter))
}

fn node(n: pb::NodeStatus) -> NodeJson {
    let state = node_state(&n);
    NodeJson {
        acked: n.acked.map(|c| CursorJson {
            epoch: c.epoch.to_string(),
            seqs: c.seqs,
        }),
        node_id: n.node_id,
        namespaces: n.namespaces,
        lag_events: n.lag_events,
        staleness_ms: n.staleness_ms,
        in_flight: n.in_flight,
        max_in_flight: n.max_in_flight,
        parked: n.parked,
        state,
        state_since_us: n.state_since_us,
        replication: n.replication,
        peer: n.peer,
        connected_at_us: n.connected_at_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::HubStats;

    fn status(nodes: &[(&str, u64, u64, bool)]) -> pb::StatusResponse {
        pb::StatusResponse {
            epoch: u64::MAX,
            now_us: 5_000_000,
            nodes: nodes
                .iter()
                .map(|(id, lag, stale, parked)| pb::NodeStatus {
                    node_id: (*id).into(),
                    lag_events: *lag,
                    staleness_ms: *stale,
                    parked: *parked,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn worst_puts_parked_then_laggards_first_and_counts_the_rest() {
        let s = status(&[
            ("a", 0, 10, false),
            ("b", 5, 10, false),
            ("c", 5, 900, false),
            ("d", 0, 10, true),
            ("e", 1, 10, false),
        ]);
        let stats = HubStats::new(1_000_000).view(5_000_000);
        let q = Query::parse(Some("worst=3")).unwrap();
        let doc = build(s, &stats, &q);
        let ids: Vec<&str> = doc.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["d", "c", "b"]);
        assert_eq!((doc.nodes_total, doc.nodes_matched), (5, 5));
        assert_eq!(doc.nodes_not_live, 1);
        assert_eq!(doc.epoch, u64::MAX.to_string());
        assert_eq!(doc.uptime_s, 4.0);
        assert_eq!(doc.started_us, 1_000_000);
        assert_eq!(doc.sli.since_start.ratio_1s, None);
    }

    #[test]
    fn filter_matches_ids_case_insensitively_and_keeps_id_order_without_worst() {
        let s = status(&[("Cache-1", 0, 0, false), ("db-2", 0, 0, false)]);
        let stats = HubStats::new(0).view(1);
        let q = Query::parse(Some("filter=CACHE")).unwrap();
        let doc = build(s, &stats, &q);
        assert_eq!(doc.nodes.len(), 1);
        assert_eq!((doc.nodes_total, doc.nodes_matched), (2, 1));
        let all = build(
            status(&[("b", 9, 0, false), ("a", 0, 0, false)]),
            &stats,
            &Query::default(),
        );
        let ids: Vec<&str> = all.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["b", "a"], "the RPC's order is kept");
    }

    #[test]
    fn bad_queries_name_the_parameter() {
        assert_eq!(
            Query::parse(Some("worst=0")),
            Err(QueryError::Worst("0".into()))
        );
        assert_eq!(
            Query::parse(Some("worst=x")),
            Err(QueryError::Worst("x".into()))
        );
        assert_eq!(
            Query::parse(Some("limit=3")),
            Err(QueryError::Unknown("limit".into()))
        );
        assert_eq!(Query::parse(Some("filter=a+b%21")).unwrap().filter, "a b!");
    }
}
