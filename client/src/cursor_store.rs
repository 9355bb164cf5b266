//! Where a subscriber keeps its cursor between runs.
//!
//! In memory by default: a node whose cache dies with the process has nothing
//! to resume, and starts at the hub's head with an empty cache. A node whose
//! cache outlives the process (an on-disk cache, a shared-memory segment)
//! persists the cursor to a file, so that after a restart it resumes where it
//! stopped instead of flushing everything.
//!
//! The file is written atomically (a temporary file in the same directory,
//! flushed, then renamed over the old one), so a crash leaves either the old
//! cursor or the new one. The subscriber only ever saves a cursor it has
//! applied, so the saved cursor is never ahead of the cache: at worst a
//! restart replays a few events (which handlers take idempotently).
//!
//! A node whose cache lives elsewhere (a Redis, a database) keeps the cursor
//! beside it with a [`CursorBackend`], so that the cursor and the cache are
//! lost together or not at all.

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use freshness::Cursor;
use serde::{Deserialize, Serialize};

/// A cursor could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CursorStoreError {
    /// Reading, writing or renaming the file failed.
    #[error("cursor file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a cursor.
    #[error("cursor file {path} is not a cursor: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A [`CursorBackend`] failed.
    #[error("cursor store {store}: {reason}")]
    Backend {
        /// The backend's name ([`CursorBackend::name`]).
        store: String,
        /// What failed, on one line.
        reason: String,
    },
}

/// A future returned by a [`CursorBackend`].
pub type BackendFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, CursorStoreError>> + Send + 'a>>;

/// A cursor kept beside a cache that outlives the node's process, for
/// example in the same Redis as the cached values.
///
/// `save` must be atomic (a reader sees the old cursor or the new one), and
/// `load` must return `None` when the cache behind it may have lost data
/// since the cursor was saved, since the node then starts clean.
pub trait CursorBackend: Send + Sync + 'static {
    /// A short name for errors and logs (`redis://host:6379/0`).
    fn name(&self) -> String;
    /// The saved cursor, `None` when there is none.
    fn load(&self) -> BackendFuture<'_, Option<Cursor>>;
    /// Replaces the saved cursor.
    fn save<'a>(&'a self, cursor: &'a Cursor) -> BackendFuture<'a, ()>;
    /// Forgets the saved cursor.
    fn clear(&self) -> BackendFuture<'_, ()>;
}

/// Where the cursor lives.
#[derive(Clone, Default)]
pub enum CursorStore {
    /// Only in memory: a restart starts at the hub's head.
    #[default]
    Memory,
    /// In this file, written atomically.
    File(PathBuf),
    /// In a store of the node's own.
    Backend(Arc<dyn CursorBackend>),
}

impl fmt::Debug for CursorStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("Memory"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Backend(b) => f.debug_tuple("Backend").field(&b.name()).finish(),
        }
    }
}

impl PartialEq for CursorStore {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Memory, Self::Memory) => true,
            (Self::File(a), Self::File(b)) => a == b,
            (Self::Backend(a), Self::Backend(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for CursorStore {}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    epoch: u64,
    seqs: Vec<u64>,
}

impl CursorStore {
    /// Loads the saved cursor: `None` in memory or when the file does not
    /// exist yet.
    pub async fn load(&self) -> Result<Option<Cursor>, CursorStoreError> {
        let path = match self {
            Self::Memory => return Ok(None),
            Self::Backend(b) => return b.load().await,
            Self::File(path) => path,
        };
        let bytes = match tokio::fs::read(path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CursorStoreError::Io {
                    path: path.clone(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| CursorStoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let d: OnDisk = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if d.epoch == 0 || d.seqs.is_empty() {
            return Err(corrupt("epoch 0 or no shards".into()));
        }
        Ok(Some(Cursor {
            epoch: d.epoch,
            seqs: d.seqs,
        }))
    }

    /// Saves `cursor` (a no-op in memory).
    pub async fn save(&self, cursor: &Cursor) -> Result<(), CursorStoreError> {
        let path = match self {
            Self::Memory => return Ok(()),
            Self::Backend(b) => return b.save(cursor).await,
            Self::File(path) => path,
        };
        let body = serde_json::to_vec(&OnDisk {
            epoch: cursor.epoch,
            seqs: cursor.seqs.clone(),
        })
        .map_err(|e| CursorStoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&target, &body))
            .await
            .map_err(|e| CursorStoreError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| CursorStoreError::Io {
                path: path.clone(),
                source,
            })
    }

    /// Forgets the saved cursor (after the hub refused it).
    pub async fn clear(&self) -> Result<(), CursorStoreError> {
        let path = match self {
            Self::Memory => return Ok(()),
            Self::Backend(b) => return b.clear().await,
            Self::File(path) => path,
        };
        match tokio::fs::remove_file(path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CursorStoreError::Io {
                path: path.clone(),
                source,
            }),
        }
    }
}

fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cursor".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every platform can open a
        // directory, and the cursor is still correct without it.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.cursor");
        let store = CursorStore::File(path.clone());
        assert_eq!(store.load().await.unwrap(), None);
        let c = Cursor {
            epoch: 9,
            seqs: vec![1, 0, 7],
        };
        store.save(&c).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(c.clone()));
        let newer = Cursor {
            epoch: 9,
            seqs: vec![2, 0, 7],
        };
        store.save(&newer).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(newer));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        std::fs::write(&path, b"{\"epoch\":").unwrap();
        assert!(matches!(
            store.load().await,
            Err(CursorStoreError::Corrupt { .. })
        ));
        store.clear().await.unwrap();
        assert_eq!(store.load().await.unwrap(), None);
        assert_eq!(CursorStore::Memory.load().await.unwrap(), None);
        CursorStore::Memory.save(&c).await.unwrap();
    }
}
