//! The gRPC adapter: the only place that knows tonic requests and responses.
//! It validates at the edge, calls the core, and maps errors to codes once.

use std::sync::Arc;
use std::time::Duration;

use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::validate::{self, PublishLimits};
use freshness::wire;
use freshness::{pb, validate::AckLevel};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use tracing::field::Empty;

use crate::auth::Auth;
use crate::auth::layer::principal;
use crate::error::{HubError, ProtocolError, map_decode_status};
use crate::hub::Hub;
use crate::shard::Outcome;
use crate::telemetry::{Adopt, num};

/// How long a new stream may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Implements `freshness.v1.Hub` over a [`Hub`].
#[derive(Debug, Clone)]
pub struct HubService {
    hub: Arc<Hub>,
    auth: Arc<Auth>,
}

impl HubService {
    /// A service over `hub`, without authentication. A subscribe stream is
    /// served by the HTTP/2 stream's own task ([`crate::session::Session`]).
    pub fn new(hub: Arc<Hub>) -> Self {
        Self::with_auth(hub, Auth::disabled())
    }

    /// A service over `hub` that checks each call's principal (put in the
    /// request by [`crate::auth::layer::AuthLayer`]) against `auth`.
    pub fn with_auth(hub: Arc<Hub>, auth: Arc<Auth>) -> Self {
        Self { hub, auth }
    }
}

fn outcome_to_wire(o: Outcome) -> pb::PublishOutcome {
    match o {
        Outcome::Applied => pb::PublishOutcome::Applied,
        Outcome::Duplicate => pb::PublishOutcome::Duplicate,
        Outcome::Superseded => pb::PublishOutcome::Superseded,
    }
}

/// A metadata value of the request, when present and text.
fn header<'r, T>(request: &'r Request<T>, key: &str) -> Option<&'r str> {
    request.metadata().get(key).and_then(|v| v.to_str().ok())
}

/// Marks the call's span as failed with the status it answers.
fn failed(span: &tracing::Span, status: Status) -> Status {
    span.record("otel.status_description", status.message());
    status
}

/// Counts a refused publish by the code it gets.
fn refused(e: HubError) -> Status {
    let status = Status::from(e);
    let code = match status.code() {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        _ => "other",
    };
    metrics::counter!(crate::metrics::PUBLISH_REFUSED, "code" => code).increment(1);
    status
}

#[tonic::async_trait]
impl crate::codec::raw::hub_server::Hub for HubService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let span = tracing::info_span!(
            "hub.publish",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = "Publish",
            region = %self.hub.region,
            events = Empty,
            ack = Empty,
            applied = Empty,
            duplicate = Empty,
            superseded = Empty,
            complete = Empty,
            otel.status_description = Empty,
        );
        // Parent: the caller's gRPC `traceparent` header if it sent one, else
        // the first event's context; the other events' contexts are linked.
        let mut adopt = Adopt::new(&span);
        if let Some(tp) = header(&request, "traceparent") {
            adopt.wire(tp, header(&request, "tracestate").unwrap_or_default());
        }
        let caller = principal(&self.auth, &request).map_err(|s| failed(&span, s))?;
        let limits = PublishLimits {
            max_events: self.hub.config.max_events_per_publish,
            max_payload_bytes: self.hub.config.max_payload_bytes,
        };
        let req = match validate::publish(request.into_inner(), limits) {
            Ok(req) => req,
            Err(e) => return Err(failed(&span, refused(HubError::from(e)))),
        };
        // All or nothing: one event outside the caller's namespaces refuses
        // the whole call before any of it reaches a shard.
        self.auth
            .check_publish(&caller, req.events.iter().map(|e| e.entity.namespace()))
            .map_err(|s| failed(&span, s))?;
        for e in &req.events {
            if !adopt.wire(&e.traceparent, &e.tracestate) {
                break;
            }
        }
        let events = req.events.len();
        let ack = req.ack;
        span.record("events", num(events));
        span.record("ack", tracing::field::debug(ack));
        let published = self
            .hub
            .publish(req)
            .instrument(span.clone())
            .await
            .map_err(|e| failed(&span, refused(e)))?;
        let counts = published.by_outcome;
        span.record("applied", num(counts[Outcome::Applied as usize]));
        span.record("duplicate", num(counts[Outcome::Duplicate as usize]));
        span.record("superseded", num(counts[Outcome::Superseded as usize]));
        span.record("complete", published.complete);
        span.in_scope(|| tracing::debug!(events, ?ack, complete = published.complete, "publish"));
        Ok(Response::new(pb::PublishResponse {
            results: published
                .results
                .iter()
                .map(|(o, shard)| pb::EventResult {
                    outcome: outcome_to_wire(o.outcome) as i32,
                    shard: shard.0,
                    seq: o.seq,
                    current_version: o.current_version.get(),
                })
                .collect(),
            complete: published.complete,
            pending_nodes: published.pending_nodes,
            pending_regions: published.pending_regions,
            applied_ack: match published.applied {
                AckLevel::Accepted => pb::AckLevel::Accepted,
                AckLevel::Region => pb::AckLevel::Region,
                AckLevel::Global => pb::AckLevel::Global,
            } as i32,
            note: published.note,
            epoch: self.hub.epoch,
        }))
    }

    type SubscribeStream = crate::session::Session;

    async fn subscribe(
        &self,
        request: Request<Streaming<wire::Request>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = principal(&self.auth, &request)?;
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = tokio::select! {
            first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next()) => first,
            () = self.hub.shutdown.cancelled() => return Err(HubError::ShuttingDown.into()),
        };
        let hello = match first {
            Err(_) => return Err(HubError::from(ProtocolError::NoHello(HELLO_TIMEOUT)).into()),
            Ok(None) => return Err(HubError::from(ProtocolError::EndedBeforeHello).into()),
            Ok(Some(Err(s))) => return Err(map_decode_status(s)),
            Ok(Some(Ok(wire::Request(pb::SubscribeRequest {
                kind: Some(ReqKind::Hello(hello)),
            })))) => hello,
            Ok(Some(Ok(_))) => return Err(HubError::from(ProtocolError::HelloNotFirst).into()),
        };
        // A hello that is not valid is refused by `open` with its reason; a
        // valid one is checked against the caller's rights first, before
        // it can register (and replace a node of the same id).
        let access = match validate::hello_filter(&hello) {
            Ok(filter) => Some(
                self.auth
                    .check_subscribe(&caller, &filter, hello.replication)?,
            ),
            Err(_) => None,
        };
        let mut session = crate::session::open(self.hub.clone(), hello, peer, inbound)?;
        if self.auth.enabled()
            && let Some(access) = access
        {
            session.set_access(access);
        }
        Ok(Response::new(session))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let caller = principal(&self.auth, &request)?;
        self.auth.check_status(&caller)?;
        Ok(Response::new(self.hub.status().into()))
    }
}
