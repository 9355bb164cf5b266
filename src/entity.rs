//! Entities and versions, validated at construction (SPEC §1).

use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;

use crate::limits::MAX_ENTITY_BYTES;

/// Why a string is not a valid entity or namespace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityError {
    /// Empty entity.
    #[error("entity is empty")]
    Empty,
    /// Longer than 512 bytes.
    #[error("entity is {0} bytes, more than the limit of 512")]
    TooLong(usize),
    /// Contains a control character.
    #[error("entity contains a control character at byte {0}")]
    ControlCharacter(usize),
    /// No `:` separating namespace and id.
    #[error("entity has no ':' between namespace and id (expected namespace:id)")]
    MissingColon,
    /// Nothing after the first `:`.
    #[error("entity id (after the first ':') is empty")]
    EmptyId,
    /// The namespace does not match `[a-z0-9][a-z0-9_.-]{0,62}`.
    #[error("namespace {0:?} must match [a-z0-9][a-z0-9_.-]{{0,62}}")]
    BadNamespace(String),
}

/// Checks a namespace against `[a-z0-9][a-z0-9_.-]{0,62}`.
pub fn validate_namespace(ns: &str) -> Result<(), EntityError> {
    let b = ns.as_bytes();
    let first_ok = b
        .first()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = b.iter().skip(1).all(|&c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'.' || c == b'-'
    });
    if first_ok && rest_ok && b.len() <= 63 {
        Ok(())
    } else {
        Err(EntityError::BadNamespace(ns.chars().take(80).collect()))
    }
}

/// A valid `namespace:id`. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entity {
    text: Arc<str>,
    /// Byte offset of the first `:`.
    colon: u16,
}

impl Entity {
    /// Validates `text` as an entity.
    pub fn parse(text: &str) -> Result<Self, EntityError> {
        if text.is_empty() {
            return Err(EntityError::Empty);
        }
        if text.len() > MAX_ENTITY_BYTES {
            return Err(EntityError::TooLong(text.len()));
        }
        if let Some((i, _)) = text.char_indices().find(|(_, c)| c.is_control()) {
            return Err(EntityError::ControlCharacter(i));
        }
        let colon = text.find(':').ok_or(EntityError::MissingColon)?;
        validate_namespace(&text[..colon])?;
        if colon + 1 == text.len() {
            return Err(EntityError::EmptyId);
        }
        Ok(Self {
            text: Arc::from(text),
            // At most 512 bytes long, so the offset fits in a u16.
            colon: colon as u16,
        })
    }

    /// The whole `namespace:id`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The text before the first `:`.
    pub fn namespace(&self) -> &str {
        &self.text[..usize::from(self.colon)]
    }

    /// The text after the first `:`.
    pub fn id(&self) -> &str {
        &self.text[usize::from(self.colon) + 1..]
    }

    /// The entity's shard for a deployment of `shards` shards.
    pub fn shard(&self, shards: u32) -> crate::ShardId {
        crate::shard(&self.text, shards)
    }
}

impl fmt::Debug for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Entity {
    type Err = EntityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl std::borrow::Borrow<str> for Entity {
    fn borrow(&self) -> &str {
        &self.text
    }
}

/// A version `>= 1`, strictly increasing per entity at the source of truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(NonZeroU64);

impl Version {
    /// `None` for 0.
    pub fn new(v: u64) -> Option<Self> {
        NonZeroU64::new(v).map(Self)
    }

    /// The raw value.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_entities() {
        let e = Entity::parse("user:42").unwrap();
        assert_eq!((e.namespace(), e.id()), ("user", "42"));
        let e = Entity::parse("a.b-c_d:x:y").unwrap();
        assert_eq!((e.namespace(), e.id()), ("a.b-c_d", "x:y"));
        assert!(Entity::parse(&format!("{}:{}", "n", "é".repeat(255))).is_ok());
    }

    #[test]
    fn rejects_bad_entities() {
        assert_eq!(Entity::parse(""), Err(EntityError::Empty));
        assert_eq!(Entity::parse("user"), Err(EntityError::MissingColon));
        assert_eq!(Entity::parse("user:"), Err(EntityError::EmptyId));
        assert!(matches!(
            Entity::parse("User:1"),
            Err(EntityError::BadNamespace(_))
        ));
        assert!(matches!(
            Entity::parse(":1"),
            Err(EntityError::BadNamespace(_))
        ));
        assert!(matches!(
            Entity::parse("_a:1"),
            Err(EntityError::BadNamespace(_))
        ));
        assert!(matches!(
            Entity::parse(&format!("{}:1", "a".repeat(64))),
            Err(EntityError::BadNamespace(_))
        ));
        assert!(Entity::parse(&format!("{}:1", "a".repeat(63))).is_ok());
        // C0, DEL and C1, each reported at its byte offset.
        for (text, at) in [
            ("user:4\n2", 6),
            ("user:\x7f", 5),
            ("user:é\t", 7),
            ("user:é\u{85}", 7),
        ] {
            assert_eq!(
                Entity::parse(text),
                Err(EntityError::ControlCharacter(at)),
                "{text:?}"
            );
        }
        assert_eq!(
            Entity::parse(&format!("user:{}", "x".repeat(508))),
            Err(EntityError::TooLong(513))
        );
        assert_eq!(Version::new(0), None);
    }
}
