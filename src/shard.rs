//! The protocol's one shard function (SPEC §1). Hub and nodes must agree on it
//! bit for bit: a node uses it to tell which cached entries a scoped reset
//! covers.

/// Name of the hash announced in the welcome message.
pub const HASH_NAME: &str = "fnv1a64";

/// A shard index in `0..S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u32);

impl ShardId {
    /// The index as a `usize`, for slices indexed by shard.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// FNV-1a, 64 bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// `shard(entity) = fnv1a64(entity bytes) mod shards`.
///
/// `shards` must be non-zero; configuration validation guarantees it, and a
/// zero here is treated as one shard rather than a panic.
pub fn shard(entity: &str, shards: u32) -> ShardId {
    let s = u64::from(shards.max(1));
    // The remainder is below `shards`, which is a u32: the cast is lossless.
    ShardId((fnv1a64(entity.as_bytes()) % s) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_answers() {
        // Reference vectors of the FNV specification.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shard_known_answers() {
        assert_eq!(
            shard("user:42", 64),
            ShardId((fnv1a64(b"user:42") % 64) as u32)
        );
        assert_eq!(fnv1a64(b"user:42") % 64, u64::from(shard("user:42", 64).0));
        // Pinned values: changing them breaks every deployed node.
        assert_eq!(shard("user:42", 64), ShardId(2));
        assert_eq!(shard("post:7", 64), ShardId(48));
        assert_eq!(shard("user:42", 1), ShardId(0));
        assert_eq!(shard("user:42", 0), ShardId(0));
    }
}
