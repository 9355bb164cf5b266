//! The disk's own flush, measured in the same run as a durable hub: the
//! reference the durable `Publish` is judged against (`--fsync-probe`).
//!
//! A child process of this binary (`--fsync-probe-child`), pinned to the
//! hub's CPUs when the hub is, writes 256-byte records each followed by
//! `fdatasync` into a file in the directory the started hubs keep their
//! logs in, two ways:
//! - into a file filled with zeros and flushed beforehand: the cheapest
//!   durable append the disk offers, and how the hub's log writes (its
//!   segments are written ahead as zeros);
//! - into a file each write extends, which also commits the new size
//!   through the filesystem's journal: how a log that appends grows.
//!
//! The placement matters as much as the disk: on a VM whose disk interrupts
//! go to another core, a flush waited for on the hub's core pays a
//! cross-core wake-up that the same flush elsewhere does not.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Bytes of each probe record: about one small event in the hub's log.
const RECORD: usize = 256;

/// What one probe measured, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Flush {
    /// Into a file written ahead with zeros.
    pub p50_us: u64,
    pub p99_us: u64,
    /// Into a file each write extends.
    pub extended_p50_us: u64,
    pub extended_p99_us: u64,
}

/// Runs the probe in a child process pinned to `cpus` (a `taskset -c`
/// list) when given, for `each` per file.
pub async fn measure_pinned(cpus: Option<&str>, each: Duration) -> Result<Flush> {
    let me = std::env::current_exe().context("cannot find this binary")?;
    let mut cmd = match cpus {
        Some(c) => {
            let mut t = tokio::process::Command::new("taskset");
            t.arg("-c").arg(c).arg(&me);
            t
        }
        None => tokio::process::Command::new(&me),
    };
    cmd.arg("--fsync-probe-child")
        .arg(humantime::format_duration(each).to_string())
        .kill_on_drop(true);
    let out = cmd.output().await.context("cannot run the fsync probe")?;
    if !out.status.success() {
        bail!(
            "the fsync probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("the fsync probe's answer")
}

/// The probe itself (the child's work): prints one JSON [`Flush`].
pub fn child(each: Duration) -> Result<()> {
    let dir = std::env::temp_dir();
    let zeroed = run(&dir, true, each)?;
    let extended = run(&dir, false, each)?;
    let f = Flush {
        p50_us: zeroed.0,
        p99_us: zeroed.1,
        extended_p50_us: extended.0,
        extended_p99_us: extended.1,
    };
    println!("{}", serde_json::to_string(&f)?);
    Ok(())
}

/// p50 and p99 of `pwrite` + `fdatasync` for `each`.
fn run(dir: &Path, zeroed: bool, each: Duration) -> Result<(u64, u64)> {
    let path = dir.join(format!("freshness-fsync-probe-{}", std::process::id()));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let result = (|| -> std::io::Result<(u64, u64)> {
        // Enough room for every write at a disk's best (some 20 µs each).
        let room = (each.as_micros() as u64 / 20 + 1) * RECORD as u64;
        if zeroed {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < room {
                file.write_all_at(&zeros, at)?;
                at += zeros.len() as u64;
            }
            file.sync_all()?;
        }
        let record = [b'x'; RECORD];
        let mut lat = Vec::new();
        let start = Instant::now();
        let mut at = 0;
        while start.elapsed() < each && at + (RECORD as u64) <= room {
            let t = Instant::now();
            file.write_all_at(&record, at)?;
            file.sync_data()?;
            lat.push(t.elapsed().as_micros() as u64);
            at += RECORD as u64;
        }
        if lat.is_empty() {
            return Err(std::io::Error::other(
                "no flush measured: give the probe some time",
            ));
        }
        lat.sort_unstable();
        let pick = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
        Ok((pick(0.5), pick(0.99)))
    })();
    let _ = std::fs::remove_file(&path);
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_flushes_both_files_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        for zeroed in [true, false] {
            let (p50, p99) = run(dir.path(), zeroed, Duration::from_millis(100)).unwrap();
            // On tmpfs a flush takes under a microsecond: no lower bound.
            assert!(p50 <= p99, "p50 {p50} p99 {p99}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let err = run(dir.path(), true, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("no flush measured"), "{err}");
    }
}
