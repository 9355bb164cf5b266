//! Generated hostile clients against a live hub over real sockets (issue 7:
//! every door, SPEC §4).
//!
//! Each case is one subscribe stream driven through a script of arbitrary
//! requests — hellos with every field arbitrary (filters, resume cursors of
//! this or another epoch, shard counts, replication, in-flight limits),
//! acks with arbitrary cursors and `applied`, empty requests, bytes that are
//! not protobuf, oversized messages, a second stream with the same node id —
//! interleaved with arbitrary publishes, publish bodies and status bodies.
//! An oracle written from the contract says what each must get: served, or
//! closed with the SPEC §4 code; never `INTERNAL`, never a hang (every
//! answer is awaited for at most [`WAIT`]). While served, the stream must
//! keep the protocol: a welcome first, only the events its filter wants,
//! with the hub's origin and in seq order, versions only growing, and never
//! more unacked events than its in-flight limit.
//!
//! A well-behaved node and writer share the hub throughout: after every case
//! the writer's event reaches the node, and the registry is back to that one
//! node.

mod raw;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind;
use freshness::pb::{self, PublishOutcome, hub_client::HubClient};
use freshness::validate::{self, PublishLimits};
use freshness_tests::{NodeCursor, RawNode, TestHub, WAIT, hello, test_config, wait_for};
use parking_lot::Mutex;
use proptest::prelude::*;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Code;
use tonic::transport::Channel;

const SHARDS: usize = 64;
/// The fuzzed hub's message limit, small so that oversized messages are
/// cheap to make.
const MAX_MESSAGE: usize = 64 * 1024;
const MAX_PAYLOAD: usize = 16 * 1024;
/// The hub's default in-flight limit; a node may ask for up to 8 times it.
const MAX_IN_FLIGHT: u32 = 8_192;
const REGION: &str = "local";
const STEADY: &str = "steady-node";
/// Seqs this far ahead are beyond anything this hub appends in the test.
const FAR: u64 = 1 << 40;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// The hub under fire, its well-behaved node and writer, and what the test
/// knows the hub has accepted.
struct Fixture {
    hub: TestHub,
    channel: Channel,
    epoch: u64,
    writer: HubClient<Channel>,
    steady_seen: watch::Receiver<HashSet<String>>,
    steady_errors: Arc<Mutex<Vec<String>>>,
    steady_count: AtomicU64,
    /// Newest version the hub accepted per entity (the hub's G3 state).
    newest: Mutex<HashMap<String, u64>>,
}

fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| runtime().block_on(Fixture::start()))
}

impl Fixture {
    async fn start() -> Self {
        let mut config = test_config();
        config.max_message_bytes = MAX_MESSAGE;
        config.max_payload_bytes = MAX_PAYLOAD;
        config.progress_interval = std::time::Duration::from_millis(20);
        let hub = TestHub::start_with(config).await;
        let channel = hub.channel().await;
        let mut node = RawNode::connect(&hub.url(), hello(STEADY, &[], None))
            .await
            .expect("steady node");
        let epoch = node.welcome.epoch;
        let (seen_tx, steady_seen) = watch::channel(HashSet::new());
        let steady_errors = Arc::new(Mutex::new(Vec::new()));
        let errors = steady_errors.clone();
        tokio::spawn(async move {
            let mut cursor = NodeCursor::from_welcome(&node.welcome);
            let mut newest: HashMap<String, u64> = HashMap::new();
            loop {
                let msg = match node.rx.message().await {
                    Ok(Some(m)) => m.kind,
                    other => {
                        errors
                            .lock()
                            .push(format!("steady node's stream ended: {other:?}"));
                        return;
                    }
                };
                let Some(msg) = msg else { continue };
                cursor.apply(&msg);
                match &msg {
                    Kind::Events(b) => {
                        for d in &b.events {
                            let e = d.event.as_ref().expect("event body");
                            let prev = newest.insert(e.entity.clone(), e.version).unwrap_or(0);
                            if e.version <= prev || e.origin != REGION {
                                errors
                                    .lock()
                                    .push(format!("steady node got {e:?} after v{prev}"));
                            }
                        }
                        seen_tx.send_modify(|s| {
                            s.extend(b.events.iter().map(|d| d.event.clone().unwrap().entity));
                        });
                    }
                    Kind::Reset(r) => errors.lock().push(format!("steady node reset: {r:?}")),
                    Kind::Goodbye(g) => errors.lock().push(format!("steady node goodbye: {g:?}")),
                    _ => {}
                }
                node.ack(cursor.cursor.clone()).await;
            }
        });
        Self {
            writer: hub.client().await,
            hub,
            channel,
            epoch,
            steady_seen,
            steady_errors,
            steady_count: AtomicU64::new(0),
            newest: Mutex::new(HashMap::new()),
        }
    }

    async fn heads(&self) -> Vec<u64> {
        self.hub
            .status()
            .await
            .shards
            .iter()
            .map(|s| s.head_seq)
            .collect()
    }
}

// ---------------------------------------------------------------- the cases

/// A cursor's epoch, chosen relative to the hub's (unknown when generated).
#[derive(Debug, Clone)]
enum EpochGen {
    Hub,
    Other(u64),
}

/// A cursor's seqs, chosen relative to what the stream has seen.
#[derive(Debug, Clone)]
enum SeqsGen {
    /// What the stream received (for a resume: the hub's heads).
    Seen,
    Zeros,
    /// One shard far past anything appended.
    Beyond(usize),
    /// Another number of shards.
    Len(usize),
    Arbitrary(Vec<u64>),
}

#[derive(Debug, Clone)]
struct CursorGen {
    epoch: EpochGen,
    seqs: SeqsGen,
}

#[derive(Debug, Clone)]
enum Msg {
    /// A hello; its resume cursor is made from the generator at send time.
    Hello(Box<pb::Hello>, Option<CursorGen>),
    Ack(Option<CursorGen>, Option<CursorGen>),
    Empty,
    /// Bytes that may or may not decode.
    Garbage(Vec<u8>),
    /// A request over the hub's message limit.
    Oversize,
}

#[derive(Debug, Clone)]
enum Step {
    Send(Msg),
    Publish(pb::PublishRequest),
    /// A publish body that may not decode.
    RawPublish(Vec<u8>),
    /// A status body that may not decode.
    RawStatus(Vec<u8>),
    /// A second stream with the same node id and a valid hello.
    Replace,
    /// Waits until the stream has everything the hub can send it: caught up
    /// to the heads, or parked at its in-flight limit.
    Settle,
}

#[derive(Debug, Clone)]
struct Case {
    /// The stream's first message; none: the stream ends before any.
    first: Option<Msg>,
    steps: Vec<Step>,
}

fn any_cursor() -> impl Strategy<Value = CursorGen> {
    (
        prop_oneof![4 => Just(EpochGen::Hub), 1 => any::<u64>().prop_map(EpochGen::Other)],
        prop_oneof![
            4 => Just(SeqsGen::Seen),
            2 => Just(SeqsGen::Zeros),
            2 => (0..SHARDS).prop_map(SeqsGen::Beyond),
            1 => prop_oneof![0usize..4, 63usize..=65]
                .prop_filter("not the hub's shard count", |n| *n != SHARDS)
                .prop_map(SeqsGen::Len),
            1 => proptest::collection::vec(
                prop_oneof![4 => 0u64..3, 1 => FAR..FAR * 2, 1 => any::<u64>()],
                SHARDS,
            )
            .prop_map(SeqsGen::Arbitrary),
        ],
    )
        .prop_map(|(epoch, seqs)| CursorGen { epoch, seqs })
}

fn any_namespace() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop_oneof![Just("user"), Just("post"), Just("item")].prop_map(String::from),
        1 => "[a-z0-9][a-z0-9_.-]{0,6}",
        1 => any::<String>(),
    ]
}

fn any_hello() -> impl Strategy<Value = Msg> {
    (
        prop_oneof![
            8 => "fuzz-[a-z0-9]{1,6}",
            1 => Just(String::new()),
            1 => any::<String>(),
            1 => (257usize..300).prop_map(|n| "n".repeat(n)),
        ],
        prop_oneof![
            8 => proptest::collection::vec(any_namespace(), 0..3),
            1 => proptest::collection::vec("[a-z]{1,3}", 1025..=1026),
        ],
        proptest::option::of(any_cursor()),
        prop_oneof![Just(0u32), 1u32..4, 4u32..100, any::<u32>()],
        prop_oneof![4 => Just(false), 1 => Just(true)],
        prop_oneof![4 => Just(0u32), 2 => Just(SHARDS as u32), 1 => any::<u32>()],
        prop_oneof![Just(String::new()), "[a-z]{1,6}", any::<String>()],
    )
        .prop_map(
            |(node_id, namespaces, resume, max_in_flight, replication, shard_count, region)| {
                let node_id = if node_id == STEADY {
                    format!("{node_id}-not")
                } else {
                    node_id
                };
                Msg::Hello(
                    Box::new(pb::Hello {
                        node_id,
                        namespaces,
                        resume: None,
                        max_in_flight,
                        replication,
                        shard_count,
                        region,
                    }),
                    resume,
                )
            },
        )
}

fn any_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        2 => any_hello(),
        6 => (
            prop_oneof![8 => any_cursor().prop_map(Some), 1 => Just(None)],
            prop_oneof![4 => Just(None), 1 => any_cursor().prop_map(Some)],
        )
            .prop_map(|(c, a)| Msg::Ack(c, a)),
        1 => Just(Msg::Empty),
        1 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(Msg::Garbage),
        1 => Just(Msg::Oversize),
    ]
}

fn any_event() -> impl Strategy<Value = pb::Event> {
    (
        prop_oneof![
            40 => prop_oneof![
                Just("user:1"), Just("user:2"), Just("post:1"), Just("item:é"), Just("other:1")
            ]
            .prop_map(String::from),
            1 => Just("User:1".to_owned()),
            1 => Just("user:".to_owned()),
            1 => any::<String>(),
        ],
        prop_oneof![1 => Just(0u64), 40 => 1u64..6, 2 => any::<u64>()],
        prop_oneof![
            Just(String::new()),
            Just("elsewhere".to_owned()),
            any::<String>()
        ],
        any::<u64>(),
        prop_oneof![
            40 => 0usize..8,
            2 => Just(MAX_PAYLOAD),
            1 => Just(MAX_PAYLOAD + 1),
        ],
        prop_oneof![
            40 => Just(String::new()),
            1 => "[ -~]{513}",
            1 => "[\\x00-\\x1f]{1,3}",
        ],
    )
        .prop_map(
            |(entity, version, origin, publish_time_us, payload, traceparent)| pb::Event {
                entity,
                version,
                origin,
                publish_time_us,
                payload: vec![7; payload].into(),
                traceparent,
                ..Default::default()
            },
        )
}

fn any_publish() -> impl Strategy<Value = pb::PublishRequest> {
    (
        prop_oneof![
            1 => Just(Vec::new()),
            8 => proptest::collection::vec(any_event(), 1..4),
            2 => proptest::collection::vec(any_event(), 4..8),
        ],
        prop_oneof![20 => 0i32..4, 1 => any::<i32>()],
        // REGION waits up to the timeout for nodes that may never ack: keep
        // it short. 0 would mean the 2 s default.
        prop_oneof![20 => 1u32..40, 1 => Just(60_001u32), 1 => any::<u32>()],
    )
        .prop_map(|(events, ack, timeout_ms)| pb::PublishRequest {
            events,
            ack,
            timeout_ms,
        })
}

fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => any_msg().prop_map(Step::Send),
        4 => any_publish().prop_map(Step::Publish),
        1 => prop_oneof![
            any_publish().prop_map(|p| p.encode_to_vec()),
            proptest::collection::vec(any::<u8>(), 0..48),
        ]
        .prop_map(Step::RawPublish),
        1 => proptest::collection::vec(any::<u8>(), 0..16).prop_map(Step::RawStatus),
        1 => Just(Step::Replace),
        3 => Just(Step::Settle),
    ]
}

fn any_case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            8 => any_hello().prop_map(Some),
            2 => any_msg().prop_map(Some),
            1 => Just(None),
        ],
        proptest::collection::vec(any_step(), 0..10),
    )
        .prop_map(|(first, steps)| Case { first, steps })
}

// --------------------------------------------------------------- the oracle

/// What a stream must end with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Still open: ends cleanly when the node half-closes.
    Open,
    /// Closed by the hub with this code.
    Closed(Code),
    /// Either, where the test cannot know what the hub sent (an ack between
    /// what the node saw and what the hub's log holds).
    Either(Code),
    /// Replaced by a newer stream: a goodbye, then a clean end.
    Replaced,
}

/// How one cursor of an ack or resume compares with what was sent.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Within {
    Yes,
    No,
    Unsure,
}

fn make_cursor(g: &CursorGen, epoch: u64, seen: &[u64]) -> pb::Cursor {
    let epoch = match g.epoch {
        EpochGen::Hub => epoch,
        EpochGen::Other(e) if e == epoch => e.wrapping_add(1),
        EpochGen::Other(e) => e,
    };
    let seqs = match &g.seqs {
        SeqsGen::Seen => seen.to_vec(),
        SeqsGen::Zeros => vec![0; SHARDS],
        SeqsGen::Beyond(s) => {
            let mut v = seen.to_vec();
            v[*s] += FAR;
            v
        }
        SeqsGen::Len(n) => vec![0; *n],
        SeqsGen::Arbitrary(v) => v.clone(),
    };
    pb::Cursor { epoch, seqs }
}

/// Whether `c` is within `sent` (known to be at most what the hub sent) of
/// this epoch; seqs at or past [`FAR`] are certainly beyond.
fn within(c: &pb::Cursor, epoch: u64, sent: &[u64]) -> Within {
    if c.epoch != epoch || c.seqs.len() != SHARDS {
        Within::No
    } else if c.seqs.iter().zip(sent).all(|(a, s)| a <= s) {
        Within::Yes
    } else if c.seqs.iter().any(|a| *a >= FAR) {
        Within::No
    } else {
        Within::Unsure
    }
}

/// What the hub must answer a stream's first message (SPEC §3.2, §4).
fn first_answer(bytes: Option<&[u8]>, epoch: u64, heads: &[u64]) -> Result<Opened, Code> {
    let Some(bytes) = bytes else {
        return Err(Code::FailedPrecondition);
    };
    if bytes.len() > MAX_MESSAGE {
        return Err(Code::ResourceExhausted);
    }
    match pb::SubscribeRequest::decode(bytes) {
        Err(_) => Err(Code::InvalidArgument),
        Ok(pb::SubscribeRequest {
            kind: Some(ReqKind::Hello(h)),
        }) => hello_answer(&h, epoch, heads),
        Ok(_) => Err(Code::FailedPrecondition),
    }
}

/// What a served stream was promised in its welcome.
#[derive(Debug, Clone)]
struct Opened {
    hello: pb::Hello,
    filter: Vec<String>,
    resumed: bool,
    reset_all: bool,
}

fn hello_answer(h: &pb::Hello, epoch: u64, heads: &[u64]) -> Result<Opened, Code> {
    // Identity and filter: the validator, itself checked against the spec
    // in the root crate's property tests.
    let filter = validate::hello_filter(h).map_err(|_| Code::InvalidArgument)?;
    if h.shard_count != 0 && h.shard_count as usize != SHARDS {
        return Err(Code::FailedPrecondition);
    }
    let (resumed, reset_all) = match &h.resume {
        None => (false, false),
        Some(c) if c.epoch == epoch => match within(c, epoch, heads) {
            Within::Yes => (true, false),
            // Heads are exact here: nobody publishes while a hello is read.
            Within::No | Within::Unsure => return Err(Code::InvalidArgument),
        },
        Some(_) => (false, true),
    };
    Ok(Opened {
        hello: h.clone(),
        filter,
        resumed,
        reset_all,
    })
}

/// What a message on a served stream does to it.
fn later_answer(bytes: &[u8], epoch: u64, seen: &[u64], replication: bool) -> Fate {
    if bytes.len() > MAX_MESSAGE {
        return Fate::Closed(Code::ResourceExhausted);
    }
    let ack = match pb::SubscribeRequest::decode(bytes) {
        Err(_) => return Fate::Closed(Code::InvalidArgument),
        Ok(pb::SubscribeRequest { kind: None }) => return Fate::Closed(Code::InvalidArgument),
        Ok(pb::SubscribeRequest {
            kind: Some(ReqKind::Hello(_)),
        }) => return Fate::Closed(Code::FailedPrecondition),
        Ok(pb::SubscribeRequest {
            kind: Some(ReqKind::Ack(a)),
        }) => a,
    };
    let Some(cursor) = &ack.cursor else {
        return Fate::Closed(Code::InvalidArgument);
    };
    let mut answers = vec![within(cursor, epoch, seen)];
    if let Some(applied) = &ack.applied {
        // `applied` is for replicating hubs only.
        answers.push(if replication {
            within(applied, epoch, seen)
        } else {
            Within::No
        });
    }
    if answers.contains(&Within::No) {
        Fate::Closed(Code::InvalidArgument)
    } else if answers.contains(&Within::Unsure) {
        Fate::Either(Code::InvalidArgument)
    } else {
        Fate::Open
    }
}

fn encode_msg(msg: &Msg, epoch: u64, seen: &[u64]) -> Vec<u8> {
    let kind = match msg {
        Msg::Hello(h, resume) => {
            let mut h = (**h).clone();
            h.resume = resume.as_ref().map(|g| make_cursor(g, epoch, seen));
            Some(ReqKind::Hello(h))
        }
        Msg::Ack(cursor, applied) => Some(ReqKind::Ack(pb::Ack {
            cursor: cursor.as_ref().map(|g| make_cursor(g, epoch, seen)),
            applied: applied.as_ref().map(|g| make_cursor(g, epoch, seen)),
        })),
        Msg::Empty => None,
        Msg::Garbage(b) => return b.clone(),
        Msg::Oversize => Some(ReqKind::Hello(pb::Hello {
            node_id: "oversize".into(),
            region: "r".repeat(MAX_MESSAGE),
            ..Default::default()
        })),
    };
    pb::SubscribeRequest { kind }.encode_to_vec()
}

// ---------------------------------------------------------------- a stream

/// What the node side of a served stream saw, checked as it arrives.
#[derive(Debug)]
struct View {
    /// What the node received: every seq here was sent by the hub.
    seen: Vec<u64>,
    /// The highest cursor the node acked (updated before the ack is sent).
    acked: Vec<u64>,
    /// Events received and not covered by `acked`.
    unacked: Vec<(u32, u64)>,
    max_in_flight: u32,
    newest: HashMap<String, u64>,
    goodbye: Option<i32>,
    violations: Vec<String>,
}

struct Live {
    tx: mpsc::Sender<Vec<u8>>,
    view: Arc<Mutex<View>>,
    reader: tokio::task::JoinHandle<Result<(), tonic::Status>>,
    opened: Opened,
    fate: Fate,
}

/// Reads a served stream to its end, checking the protocol on the way.
async fn read(
    mut stream: tonic::Streaming<Vec<u8>>,
    view: Arc<Mutex<View>>,
    opened: Opened,
    epoch: u64,
) -> Result<(), tonic::Status> {
    let mut index = 0usize;
    let mut last_seq = [0u64; SHARDS];
    while let Some(bytes) = stream.message().await? {
        let mut v = view.lock();
        let Ok(pb::SubscribeResponse { kind: Some(msg) }) = pb::SubscribeResponse::decode(&*bytes)
        else {
            v.violations
                .push(format!("message {index} is not a subscribe response"));
            return Ok(());
        };
        match (index, &msg) {
            (0, Kind::Welcome(w)) => check_welcome(&mut v, w, &opened, epoch),
            (0, other) => v.violations.push(format!("first message {other:?}")),
            (_, Kind::Welcome(_)) => v.violations.push("a second welcome".into()),
            (1, Kind::Reset(r)) if opened.reset_all => {
                if !(r.all && r.reason == pb::ResetReason::EpochChanged as i32) {
                    v.violations.push(format!("reset for another epoch {r:?}"));
                }
                apply_reset(&mut v, r);
            }
            (1, other) if opened.reset_all => {
                v.violations
                    .push(format!("no reset for another epoch: {other:?}"));
            }
            (_, Kind::Reset(r)) => {
                // No eviction, no peers: nothing else may reset this node.
                v.violations.push(format!("unexpected reset {r:?}"));
                apply_reset(&mut v, r);
            }
            (_, Kind::Events(b)) => check_events(&mut v, b, &opened, &mut last_seq),
            (_, Kind::Progress(p)) => {
                let c = p
                    .cursor
                    .as_ref()
                    .map(|c| c.seqs.clone())
                    .unwrap_or_default();
                if c.len() != SHARDS {
                    v.violations.push(format!("progress cursor {c:?}"));
                } else {
                    for (s, q) in v.seen.iter_mut().zip(c) {
                        *s = (*s).max(q);
                    }
                }
            }
            (_, Kind::Goodbye(g)) => v.goodbye = Some(g.reason),
        }
        if v.goodbye.is_some() && !matches!(msg, Kind::Goodbye(_)) {
            v.violations.push(format!("{msg:?} after a goodbye"));
        }
        index += 1;
    }
    Ok(())
}

fn check_welcome(v: &mut View, w: &pb::Welcome, opened: &Opened, epoch: u64) {
    let want_in_flight = match opened.hello.max_in_flight {
        0 => MAX_IN_FLIGHT,
        n => n.min(MAX_IN_FLIGHT * 8),
    };
    let cursor = w.cursor.clone().unwrap_or_default();
    if (
        w.epoch,
        w.shard_count as usize,
        w.hash.as_str(),
        w.region.as_str(),
    ) != (epoch, SHARDS, "fnv1a64", REGION)
        || w.resumed != opened.resumed
        || w.max_in_flight != want_in_flight
        || cursor.epoch != epoch
        || cursor.seqs.len() != SHARDS
    {
        v.violations.push(format!("welcome {w:?} for {opened:?}"));
        return;
    }
    v.max_in_flight = w.max_in_flight;
    v.seen.clone_from(&cursor.seqs);
    v.acked = cursor.seqs;
}

fn apply_reset(v: &mut View, r: &pb::Reset) {
    let Some(c) = r.cursor.as_ref().filter(|c| c.seqs.len() == SHARDS) else {
        v.violations
            .push(format!("reset without a whole cursor {r:?}"));
        return;
    };
    for s in 0..SHARDS {
        if r.all || r.shards.contains(&(s as u32)) {
            v.seen[s] = v.seen[s].max(c.seqs[s]);
        }
    }
}

fn check_events(v: &mut View, b: &pb::EventBatch, opened: &Opened, last_seq: &mut [u64]) {
    if b.events.is_empty() {
        v.violations.push("an empty batch".into());
    }
    for d in &b.events {
        let Some(e) = &d.event else {
            v.violations.push(format!("event without a body {d:?}"));
            continue;
        };
        let shard = d.shard as usize;
        let ns = e.entity.split_once(':').map(|(ns, _)| ns).unwrap_or("");
        let prev = v.newest.insert(e.entity.clone(), e.version).unwrap_or(0);
        if shard >= SHARDS
            || d.shard != freshness::shard(&e.entity, SHARDS as u32).0
            || d.seq <= last_seq[shard]
            || e.version <= prev
            || e.origin != REGION
            || e.publish_time_us == 0
            || !(opened.filter.is_empty() || opened.filter.iter().any(|f| f == ns))
        {
            v.violations
                .push(format!("event {d:?} (after v{prev}) for {opened:?}"));
            continue;
        }
        last_seq[shard] = d.seq;
        v.seen[shard] = v.seen[shard].max(d.seq);
        v.unacked.push((d.shard, d.seq));
    }
    if v.unacked.len() > v.max_in_flight as usize {
        let n = v.unacked.len();
        let max = v.max_in_flight;
        v.violations
            .push(format!("{n} events unacked, the node's limit is {max}"));
    }
}

impl Live {
    /// Opens a stream with `first` (already encoded) and checks the hub's
    /// answer. `Ok(None)`: refused as the oracle said.
    async fn open(fx: &Fixture, first: Option<Vec<u8>>) -> Result<Option<Self>, TestCaseError> {
        let heads = fx.heads().await;
        let want = first_answer(first.as_deref(), fx.epoch, &heads);
        let (tx, opened) = tokio::time::timeout(WAIT, raw::subscribe(&fx.channel, first))
            .await
            .map_err(|_| TestCaseError::fail("the hub never answered a stream's first message"))?;
        match (want, opened) {
            (Err(code), Err(status)) => {
                prop_assert_eq!(status.code(), code, "{:?}", status);
                Ok(None)
            }
            (Ok(o), Ok(stream)) => {
                let view = Arc::new(Mutex::new(View {
                    seen: vec![0; SHARDS],
                    acked: vec![0; SHARDS],
                    unacked: Vec::new(),
                    max_in_flight: 0,
                    newest: HashMap::new(),
                    goodbye: None,
                    violations: Vec::new(),
                }));
                let reader = tokio::spawn(read(stream, view.clone(), o.clone(), fx.epoch));
                Ok(Some(Self {
                    tx,
                    view,
                    reader,
                    opened: o,
                    fate: Fate::Open,
                }))
            }
            (want, got) => Err(TestCaseError::fail(format!(
                "first message answered {:?}, the contract says {want:?}",
                got.map(|_| "served")
            ))),
        }
    }

    /// Sends one message, unless the stream is already on its way out.
    async fn send(&mut self, msg: &Msg, epoch: u64) {
        if self.fate != Fate::Open {
            return;
        }
        let bytes = {
            let mut v = self.view.lock();
            let bytes = encode_msg(msg, epoch, &v.seen);
            self.fate = later_answer(&bytes, epoch, &v.seen, self.opened.hello.replication);
            if self.fate == Fate::Open
                && let Ok(pb::SubscribeRequest {
                    kind: Some(ReqKind::Ack(a)),
                }) = pb::SubscribeRequest::decode(&*bytes)
            {
                // Count the ack before the hub can act on it.
                let seqs = a.cursor.map(|c| c.seqs).unwrap_or_default();
                for (mine, theirs) in v.acked.iter_mut().zip(seqs) {
                    *mine = (*mine).max(theirs);
                }
                let acked = v.acked.clone();
                v.unacked.retain(|(s, q)| *q > acked[*s as usize]);
            }
            bytes
        };
        // A stream the hub closed refuses further sends; its end says why.
        let _ = self.tx.send(bytes).await;
    }

    /// Waits until the node saw everything up to the hub's heads, or the hub
    /// parked it at its in-flight limit.
    async fn settle(&self, fx: &Fixture) -> Result<(), TestCaseError> {
        let node_id = self.opened.hello.node_id.clone();
        let settled = tokio::time::timeout(WAIT, async {
            loop {
                let status = fx.hub.status().await;
                let heads: Vec<u64> = status.shards.iter().map(|s| s.head_seq).collect();
                let parked = status
                    .nodes
                    .iter()
                    .any(|n| n.node_id == node_id && n.parked);
                if parked || self.view.lock().seen == heads || self.reader.is_finished() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
        .await;
        prop_assert!(
            settled.is_ok(),
            "stream {:?} never caught up nor parked",
            self.opened
        );
        Ok(())
    }

    /// Half-closes and checks how the stream ended.
    async fn finish(self) -> Result<(), TestCaseError> {
        drop(self.tx);
        let end = tokio::time::timeout(WAIT, self.reader)
            .await
            .map_err(|_| TestCaseError::fail(format!("stream never ended; fate {:?}", self.fate)))?
            .map_err(|e| TestCaseError::fail(format!("reader panicked: {e}")))?;
        let v = self.view.lock();
        prop_assert!(
            v.violations.is_empty(),
            "{:?} for {:?}",
            v.violations,
            self.opened
        );
        let replaced = Some(pb::GoodbyeReason::Replaced as i32);
        match (self.fate, &end) {
            (Fate::Open, Ok(())) => prop_assert_eq!(v.goodbye, None),
            (Fate::Replaced, Ok(())) => prop_assert_eq!(v.goodbye, replaced),
            (Fate::Closed(code) | Fate::Either(code), Err(s)) => {
                prop_assert_eq!(s.code(), code, "{:?}", s);
                prop_assert_eq!(v.goodbye, None);
            }
            (Fate::Either(_), Ok(())) => prop_assert_eq!(v.goodbye, None),
            (fate, end) => {
                return Err(TestCaseError::fail(format!(
                    "stream ended {end:?}, the contract says {fate:?}"
                )));
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------ the publishes

/// Checks one publish body against the oracle; keeps the model of accepted
/// versions in step with the hub.
async fn publish(fx: &Fixture, body: Vec<u8>) -> Result<(), TestCaseError> {
    let limits = PublishLimits {
        max_events: freshness::limits::MAX_EVENTS_PER_PUBLISH,
        max_payload_bytes: MAX_PAYLOAD,
    };
    let want: Result<pb::PublishRequest, (Code, String)> = if body.len() > MAX_MESSAGE {
        Err((Code::ResourceExhausted, String::new()))
    } else {
        match pb::PublishRequest::decode(&*body) {
            Err(_) => Err((Code::InvalidArgument, String::new())),
            Ok(req) => match validate::publish(req.clone(), limits) {
                Ok(_) => Ok(req),
                Err(e) => Err((Code::InvalidArgument, e.to_string())),
            },
        }
    };
    let before = fx.heads().await;
    let got = tokio::time::timeout(WAIT, raw::unary(&fx.channel, raw::PUBLISH, body))
        .await
        .map_err(|_| TestCaseError::fail("publish never answered"))?;
    match (want, got) {
        (Err((code, message)), Err(status)) => {
            prop_assert_eq!(status.code(), code, "{:?}", status);
            prop_assert!(
                status.message().contains(&message),
                "{:?} for {}",
                status,
                message
            );
            prop_assert_eq!(
                fx.heads().await,
                before,
                "nothing of a refused call applied"
            );
        }
        (Ok(req), Ok(resp)) => {
            let resp = pb::PublishResponse::decode(&*resp)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_published(fx, &req, &resp)?;
        }
        (want, got) => {
            return Err(TestCaseError::fail(format!(
                "publish answered {got:?}, the contract says {want:?}"
            )));
        }
    }
    Ok(())
}

fn check_published(
    fx: &Fixture,
    req: &pb::PublishRequest,
    resp: &pb::PublishResponse,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(resp.epoch, fx.epoch);
    prop_assert_eq!(resp.results.len(), req.events.len());
    let mut newest = fx.newest.lock();
    for (e, r) in req.events.iter().zip(&resp.results) {
        let had = newest.get(&e.entity).copied();
        let (outcome, current) = match had {
            Some(n) if n > e.version => (PublishOutcome::Superseded, n),
            Some(n) if n == e.version => (PublishOutcome::Duplicate, n),
            _ => (PublishOutcome::Applied, e.version),
        };
        newest.insert(e.entity.clone(), current);
        prop_assert_eq!(
            (r.outcome, r.current_version, r.shard),
            (
                outcome as i32,
                current,
                freshness::shard(&e.entity, SHARDS as u32).0
            ),
            "{:?}",
            e
        );
        prop_assert!(r.seq >= 1);
    }
    let (applied, noted) = match req.ack {
        0 | 1 => (pb::AckLevel::Accepted, false),
        2 => (pb::AckLevel::Region, false),
        // No peers: GLOBAL is applied as REGION, and the answer says so.
        _ => (pb::AckLevel::Region, true),
    };
    prop_assert_eq!(resp.applied_ack, applied as i32);
    prop_assert_eq!(!resp.note.is_empty(), noted);
    prop_assert!(resp.pending_regions.is_empty());
    Ok(())
}

async fn status(fx: &Fixture, body: Vec<u8>) -> Result<(), TestCaseError> {
    let decodes = pb::StatusRequest::decode(&*body).is_ok();
    let got = tokio::time::timeout(WAIT, raw::unary(&fx.channel, raw::STATUS, body))
        .await
        .map_err(|_| TestCaseError::fail("status never answered"))?;
    match got {
        Ok(resp) => {
            prop_assert!(decodes);
            let s = pb::StatusResponse::decode(&*resp)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(s.epoch, fx.epoch);
        }
        Err(status) => {
            prop_assert!(!decodes, "{:?}", status);
            prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
        }
    }
    Ok(())
}

// -------------------------------------------------------------------- a case

async fn run_case(fx: &Fixture, case: Case) -> Result<(), TestCaseError> {
    // A resume cursor made of what the stream "saw" is the hub's heads.
    let heads = fx.heads().await;
    let first = case.first.as_ref().map(|m| encode_msg(m, fx.epoch, &heads));
    let mut live = Live::open(fx, first).await?;
    for step in case.steps {
        match step {
            Step::Send(msg) => {
                if let Some(l) = &mut live {
                    l.send(&msg, fx.epoch).await;
                }
            }
            Step::Publish(req) => publish(fx, req.encode_to_vec()).await?,
            Step::RawPublish(body) => publish(fx, body).await?,
            Step::RawStatus(body) => status(fx, body).await?,
            Step::Settle => {
                if let Some(l) = live.as_ref().filter(|l| l.fate == Fate::Open) {
                    l.settle(fx).await?;
                }
            }
            Step::Replace => {
                let Some(mut old) = live.take_if(|l| l.fate == Fate::Open) else {
                    continue;
                };
                let mut h = old.opened.hello.clone();
                h.resume = None;
                h.shard_count = 0;
                let first = pb::SubscribeRequest {
                    kind: Some(ReqKind::Hello(h)),
                }
                .encode_to_vec();
                let new = Live::open(fx, Some(first)).await?;
                prop_assert!(new.is_some(), "a valid hello is served");
                old.fate = Fate::Replaced;
                old.finish().await?;
                live = new;
            }
        }
    }
    if let Some(l) = live {
        l.finish().await?;
    }

    // The well-behaved writer and node are still served.
    let n = fx.steady_count.fetch_add(1, Ordering::Relaxed);
    let entity = format!("steady:{n}");
    let resp = fx
        .writer
        .clone()
        .publish(freshness_tests::publish_request(&[(entity.as_str(), 1)]))
        .await
        .map_err(|s| TestCaseError::fail(format!("steady writer refused: {s:?}")))?
        .into_inner();
    prop_assert_eq!(resp.results[0].outcome, PublishOutcome::Applied as i32);
    let mut seen = fx.steady_seen.clone();
    tokio::time::timeout(WAIT, seen.wait_for(|s| s.contains(&entity)))
        .await
        .map_err(|_| TestCaseError::fail(format!("steady node never got {entity}")))?
        .map_err(|_| TestCaseError::fail("steady node gone"))?;
    let errors = fx.steady_errors.lock().clone();
    prop_assert!(errors.is_empty(), "{:?}", errors);
    // Every stream of the case has left the registry.
    wait_for(|| async {
        let nodes = fx.hub.status().await.nodes;
        (nodes.len() == 1 && nodes[0].node_id == STEADY).then_some(())
    })
    .await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 160,
        max_shrink_iters: 256,
        // A failure prints its minimal case; integration tests have no
        // lib.rs for proptest to keep regressions next to.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_clients_get_their_answer_and_the_others_stay_served(case in any_case()) {
        let fx = fixture();
        runtime().block_on(run_case(fx, case))?;
    }
}
