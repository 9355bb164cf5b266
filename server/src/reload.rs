//! Reloads the TLS and auth files when they change, and on SIGHUP.
//!
//! Changes are found by polling each file's modification time and length
//! every [`POLL_EVERY`]: simple, and it sees a Kubernetes Secret or
//! ConfigMap update (a symlink swap) as well as an edit in place, where
//! inotify watches would need re-arming. A revoked right thus takes effect
//! within [`POLL_EVERY`] plus a session's progress tick.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// How often the files are looked at.
pub const POLL_EVERY: Duration = Duration::from_millis(250);

/// What a file looked like: modification time and length (`None`: missing).
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// One reloadable thing: its files and what to do when one changes.
pub struct Watched {
    /// The files.
    pub files: Vec<PathBuf>,
    /// Reads them again.
    pub reload: Arc<dyn Fn() + Send + Sync>,
}

/// Polls every watched file until `shutdown`; calls a thing's reload when
/// one of its files changed, and every reload on SIGHUP.
pub async fn watch(watched: Vec<Watched>, shutdown: CancellationToken) {
    if watched.iter().all(|w| w.files.is_empty()) {
        return;
    }
    let mut stamps: Vec<Vec<_>> = watched
        .iter()
        .map(|w| w.files.iter().map(stamp).collect())
        .collect();
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hangup => {
                tracing::info!("SIGHUP: reloading TLS and auth files");
                for w in &watched {
                    (w.reload)();
                }
            }
            _ = tick.tick() => {
                for (w, old) in watched.iter().zip(stamps.iter_mut()) {
                    let now: Vec<_> = w.files.iter().map(stamp).collect();
                    if now != *old {
                        *old = now;
                        (w.reload)();
                    }
                }
            }
        }
    }
}
