//! Generates the `freshness.v1` code from `proto/` with `protox`, so that a
//! fresh machine needs no system `protoc`.
//!
//! Two passes over the same descriptors:
//! 1. every message, the client and the server (module `pb`);
//! 2. the server alone again, with `SubscribeResponse` mapped to
//!    [`wire::Frame`](src/wire.rs), so that the hub can send event batches it
//!    encoded once and shares between streams, `SubscribeRequest` mapped to
//!    [`wire::Request`](src/wire.rs) (acks decoded straight from the buffer)
//!    and tonic's codec replaced by [`wire::LeanCodec`](src/wire.rs) (small
//!    per-stream buffers); module `pb::raw`. Every other type of pass 2 refers
//!    back to pass 1.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["freshness/v1/freshness.proto"], ["proto"])?;
    std::fs::write(out.join("freshness_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .bytes(".freshness.v1.Event.payload")
        .compile_fds(fds.clone())?;

    let raw = out.join("raw");
    std::fs::create_dir_all(&raw)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&raw)
        .extern_path(".freshness.v1.SubscribeResponse", "crate::wire::Frame")
        .extern_path(".freshness.v1.SubscribeRequest", "crate::wire::Request")
        .codec_path("crate::wire::LeanCodec")
        .extern_path(".freshness.v1", "crate::pb")
        .compile_fds(fds)?;
    Ok(())
}
