//! ARCHITECTURE.md's invariants that can be read off the sources, checked
//! so that they stay true: a change that breaks one fails here and has to
//! move the boundary on purpose (and update ARCHITECTURE.md with it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// Every `.rs` file under `dir`, relative to `dir`.
fn rust_files(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no sources under {}", dir.display());
    out
}

/// The text of a file without its comments (`//` to the end of a line), so
/// that a doc comment naming a type does not count as using it.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// "The root crate `freshness` never depends on tokio or any networking
/// crate beyond the generated tonic code": its direct dependencies, read
/// from `cargo metadata`, are the domain's and the generated code's.
#[test]
fn the_root_crate_depends_on_no_runtime_or_network_crate() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root_crate = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "freshness")
        .expect("the freshness package");
    let normal: BTreeSet<&str> = root_crate["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"].is_null())
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    // The domain (bytes, errors, the backoff's jitter) and the generated
    // protobuf and gRPC code.
    let allowed: BTreeSet<&str> = [
        "bytes",
        "prost",
        "prost-types",
        "rand",
        "thiserror",
        "tonic",
        "tonic-prost",
    ]
    .into();
    let extra: Vec<_> = normal.difference(&allowed).collect();
    assert!(
        extra.is_empty(),
        "the root crate gained dependencies {extra:?}: it holds the domain and the \
         generated code only (ARCHITECTURE.md, Architecture invariants)"
    );
    // And its sources use no runtime or transport of tonic's directly.
    for (file, text) in rust_files(&root().join("src")) {
        let code = code(&text);
        for banned in ["tokio::", "hyper::", "h2::", "tonic::transport"] {
            assert!(
                !code.contains(banned),
                "src/{file} uses {banned}: the root crate has no runtime or transport"
            );
        }
    }
}

/// "Only the adapter modules touch tonic types; the core sees validated
/// domain types and answers with domain types (`hub.rs` does not name
/// `pb`)."
#[test]
fn only_the_hub_adapters_name_tonic_and_the_core_names_no_wire_type() {
    let server = root().join("server/src");
    // The adapters: gRPC handlers and codes, the serving stack and its
    // transport, sessions (a node's stream), authentication (a request's
    // extensions), the peer link (a gRPC client) and its TLS settings, and
    // the status page's permission check, and the generated server with its
    // codec.
    let adapters = [
        "auth/",
        "codec.rs",
        "error.rs",
        "grpc.rs",
        "replication.rs",
        "server.rs",
        "session/",
        "tls.rs",
        "transport.rs",
        "web.rs",
    ];
    let core = [
        "hub.rs",
        "shard.rs",
        "log.rs",
        "reader.rs",
        "store.rs",
        "flow.rs",
        "status.rs",
        "clock.rs",
    ];
    let mut seen_core = 0;
    for (file, text) in rust_files(&server) {
        let code = code(&text);
        if code.contains("tonic::") {
            assert!(
                adapters.iter().any(|a| file.starts_with(a)),
                "server/src/{file} names tonic but is not an adapter module: move the \
                 wire handling into one, or update ARCHITECTURE.md and this list"
            );
        }
        if core.contains(&file.as_str()) {
            seen_core += 1;
            for wire in ["tonic", "pb::"] {
                assert!(
                    !code.contains(wire),
                    "server/src/{file} is core and names {wire}: it takes and returns domain types"
                );
            }
        }
    }
    assert_eq!(
        seen_core,
        core.len(),
        "a core module was renamed: update this list"
    );
}

/// "Time comes from `tokio::time`; `std::time::Instant` is banned by
/// `clippy.toml`" — and no crate opts into `unsafe`.
#[test]
fn instant_stays_banned_and_no_crate_allows_unsafe() {
    let clippy = std::fs::read_to_string(root().join("clippy.toml")).unwrap();
    assert!(
        clippy.contains("std::time::Instant") && clippy.contains("disallowed-types"),
        "clippy.toml no longer bans std::time::Instant"
    );
    for krate in [
        "src/lib.rs",
        "server/src/lib.rs",
        "client/src/lib.rs",
        "relay/src/lib.rs",
        "agent/src/lib.rs",
        "chaos/src/lib.rs",
        "telemetry/src/lib.rs",
        "bench/src/main.rs",
    ] {
        let text = std::fs::read_to_string(root().join(krate)).unwrap();
        assert!(
            text.contains("#![forbid(unsafe_code)]"),
            "{krate} does not forbid unsafe code"
        );
    }
}

/// The client's public API speaks in its own and the domain's types: no
/// public item or field of `client/src` names `pb::` or `tonic::`
/// (`freshctl`, a binary, is not API).
#[test]
fn the_client_api_names_no_wire_type() {
    let mut wrong = Vec::new();
    for (file, text) in rust_files(&root().join("client/src")) {
        if file.starts_with("bin/") {
            continue;
        }
        for line in code(&text).lines() {
            let l = line.trim_start();
            if l.starts_with("pub ") && (l.contains("pb::") || l.contains("tonic::")) {
                wrong.push(format!("client/src/{file}: {l}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "public wire types in the client: {wrong:#?}"
    );
}
