//! Generates the `freshness.v1` code from `proto/` with `protox`, so that a
//! fresh machine needs no system `protoc`: every message, the client and the
//! server (module `pb`). The hub generates its own server once more, on its
//! pre-encoded frames and its codec (`server/build.rs`).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["freshness/v1/freshness.proto"], ["proto"])?;
    std::fs::write(out.join("freshness_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .bytes(".freshness.v1.Event.payload")
        .compile_fds(fds)?;
    Ok(())
}
