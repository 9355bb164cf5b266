//! Two things the hub's build does:
//! - generates its gRPC server once more from `proto/` (with `protox`, no
//!   system `protoc`), on the hub's own wire types and codec
//!   (`src/codec.rs`);
//! - stamps the binary with the git revision it was built from
//!   (`freshness_build_info{revision}`): `FRESHNESS_REVISION` from the
//!   environment when set (a build outside git, e.g. a container image),
//!   else `git rev-parse`, else `unknown`.

use std::path::PathBuf;
use std::process::Command;

/// The hub service with `SubscribeResponse` as `freshness::wire::Frame`,
/// `SubscribeRequest` as `freshness::wire::Request` and `codec::LeanCodec`
/// as its codec; every other type is the protocol crate's (`freshness::pb`).
fn raw_server() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    let raw = PathBuf::from(std::env::var("OUT_DIR")?).join("raw");
    std::fs::create_dir_all(&raw)?;
    let fds = protox::compile(["freshness/v1/freshness.proto"], ["../proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&raw)
        .extern_path(
            ".freshness.v1.SubscribeResponse",
            "::freshness::wire::Frame",
        )
        .extern_path(
            ".freshness.v1.SubscribeRequest",
            "::freshness::wire::Request",
        )
        .codec_path("crate::codec::LeanCodec")
        .extern_path(".freshness.v1", "::freshness::pb")
        .compile_fds(fds)?;
    Ok(())
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    raw_server()?;
    println!("cargo:rerun-if-env-changed=FRESHNESS_REVISION");
    let revision = std::env::var("FRESHNESS_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves: HEAD itself, and the branch it points at.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])),
    ]
    .into_iter()
    .flatten()
    .filter(|p| std::path::Path::new(p).exists())
    {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rustc-env=FRESHNESS_REVISION={revision}");
    Ok(())
}
