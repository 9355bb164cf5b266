//! The examples' "source of truth": a small versioned key-value store in a
//! JSON file, shared by the `writer` and `cache_node` processes.
//!
//! A commit rewrites the whole file atomically (temporary file, then rename),
//! so a reader sees either the old or the new state, and bumps the entity's
//! version: the version a real database would give as a row version or
//! commit LSN. Good enough for a demo on one machine; not a database.

// Each example uses part of the store.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One row: its value and the version of its last commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub version: u64,
    pub value: String,
}

/// The store at a path.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> anyhow::Result<BTreeMap<String, Row>> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(serde_json::from_slice(&b)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads one row.
    pub fn read(&self, entity: &str) -> anyhow::Result<Option<Row>> {
        Ok(self.load()?.remove(entity))
    }

    /// Commits a new value, returning the new version.
    pub fn commit(&self, entity: &str, value: &str) -> anyhow::Result<u64> {
        let mut rows = self.load()?;
        let version = rows.get(entity).map_or(1, |r| r.version + 1);
        rows.insert(
            entity.to_owned(),
            Row {
                version,
                value: value.to_owned(),
            },
        );
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&rows)?)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(version)
    }
}
