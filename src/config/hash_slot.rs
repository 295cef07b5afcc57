//! Redis Cluster's hash slots: which slot a key lives in (CRC16 of the key, or of its first
//! non-empty `{tag}`), as the cluster specification defines it. Config validation needs it
//! (a broadcast stream's neighbour key), and so does the cluster sink.

/// Number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// The part of `key` that decides its slot: the first `{...}` with something inside, else the
/// whole key (the cluster specification's hash tags).
pub(crate) fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|b| *b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|b| *b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot of `key`.
pub(crate) fn slot_of(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key)) % SLOTS
}

/// A key named `base` + `suffix` that lives in `base`'s slot, for state kept next to a key a
/// script also writes; `None` when no such name can be made (`base` holds a `}` but no hash
/// tag, so neither appending nor wrapping keeps its slot).
pub(crate) fn same_slot_key(base: &str, suffix: &str) -> Option<String> {
    if hash_tag(base.as_bytes()).len() < base.len() {
        // `base`'s own tag comes first in the new name too.
        Some(format!("{base}{suffix}"))
    } else if !base.contains('}') {
        // The whole of `base` becomes the tag, so it hashes exactly as `base` does.
        Some(format!("{{{base}}}{suffix}"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
    }

    #[test]
    fn same_slot_keys_hash_like_their_base() {
        for base in ["walsweep:changes", "{orders}:changes", "a{b"] {
            let key = same_slot_key(base, ":last_lsn").expect(base);
            assert_eq!(
                slot_of(key.as_bytes()),
                slot_of(base.as_bytes()),
                "{base} -> {key}"
            );
        }
        assert_eq!(same_slot_key("a{}b", ":x"), None);
        assert_eq!(same_slot_key("a}b", ":x"), None);
    }
}
