//! From any scope key to a key every backend accepts, and to the server that holds it.

use sha2::{Digest, Sha256};

use crate::Error;

/// The longest key memcached accepts.
pub const MAX_KEY_LEN: usize = 250;

/// Length of the hashed part of a mapped key: SHA-256 in lowercase hex.
const DIGEST_HEX_LEN: usize = 64;

/// The longest namespace: what is left of [`MAX_KEY_LEN`] after the hashed part.
pub const MAX_NAMESPACE_LEN: usize = MAX_KEY_LEN - DIGEST_HEX_LEN;

/// Maps cache keys (any text: spaces, control characters, unicode, kilobytes long) to keys
/// memcached and Redis accept: `namespace` followed by the SHA-256 of the key in hex.
///
/// Every mapped key is at most [`MAX_KEY_LEN`] bytes of printable ASCII without spaces. Two
/// distinct keys map to distinct keys (short of a SHA-256 collision), and since the part after
/// the namespace is always 64 hex digits, no input can spell a key outside the namespace: an
/// application whose namespace is not a prefix of another's cannot reach the other's keys.
///
/// Which server of several holds a key is decided from the same digest with jump consistent
/// hashing ([`server_index`](Self::server_index)): the answer depends only on the key and the
/// number of servers, never on the Rust release or the process, so every app server agrees, and
/// adding a server moves only about `1/n` of the keys.
///
/// ```
/// use distributed_memcache::KeyMapper;
///
/// let keys = KeyMapper::new("myapp:")?;
/// let key = keys.map("session with spaces\n and ünïcode");
/// assert!(key.starts_with("myapp:") && key.len() == 6 + 64);
/// assert!(key.bytes().all(|b| b.is_ascii_graphic()));
/// assert!(keys.server_index("session-abc", 3) < 3);
/// # Ok::<(), distributed_memcache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMapper {
    namespace: String,
}

impl KeyMapper {
    /// The default namespace.
    pub const DEFAULT_NAMESPACE: &'static str = "distributed:";

    /// A mapper putting every key under `namespace`.
    ///
    /// # Errors
    /// [`Error::InvalidNamespace`] when `namespace` is longer than [`MAX_NAMESPACE_LEN`] bytes
    /// or holds anything but printable ASCII without spaces.
    pub fn new(namespace: impl Into<String>) -> Result<Self, Error> {
        let namespace = namespace.into();
        if namespace.len() > MAX_NAMESPACE_LEN {
            return Err(Error::InvalidNamespace(
                "longer than 186 bytes: the mapped key would pass memcached's 250",
            ));
        }
        if !namespace.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidNamespace(
                "only printable ASCII without spaces is a valid memcached key",
            ));
        }
        Ok(Self { namespace })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The backend key for `key`.
    pub fn map(&self, key: &str) -> String {
        self.mapped(key).text
    }

    /// Which of `servers` servers holds `key` (`0` when there are none or one).
    pub fn server_index(&self, key: &str, servers: usize) -> usize {
        server_for_digest(&digest(key), servers)
    }

    pub(crate) fn mapped(&self, key: &str) -> MappedKey {
        let digest = digest(key);
        let mut text = String::with_capacity(self.namespace.len() + DIGEST_HEX_LEN);
        text.push_str(&self.namespace);
        for byte in digest {
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        MappedKey { text, digest }
    }
}

impl Default for KeyMapper {
    fn default() -> Self {
        Self {
            namespace: Self::DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A key as a backend sees it, with the digest that places it.
#[derive(Debug, Clone)]
pub(crate) struct MappedKey {
    pub(crate) text: String,
    pub(crate) digest: [u8; 32],
}

impl MappedKey {
    pub(crate) fn server(&self, servers: usize) -> usize {
        server_for_digest(&self.digest, servers)
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn server_for_digest(digest: &[u8; 32], servers: usize) -> usize {
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    let buckets = i64::try_from(servers).unwrap_or(i64::MAX);
    usize::try_from(jump_consistent_hash(u64::from_be_bytes(first), buckets)).unwrap_or(0)
}

/// Lamping and Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm" (2014): the bucket
/// of `key` among `buckets`, moving only `1/n` of the keys when a bucket is added.
///
/// Plain integer and IEEE-754 double arithmetic, so the same on every platform and release.
fn jump_consistent_hash(mut key: u64, buckets: i64) -> i64 {
    let (mut bucket, mut next) = (-1_i64, 0_i64);
    while next < buckets {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // Exact as written in the paper; the casts are the algorithm.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        {
            next = ((bucket + 1) as f64 * ((1_u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
        }
    }
    bucket.max(0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn hostile_keys() -> Vec<String> {
        vec![
            String::new(),
            " ".into(),
            "a b".into(),
            "a\r\nset evil 0 0 1\r\nx".into(),
            "\0\u{1}\u{7f}".into(),
            "ключ 🔑 鍵".into(),
            "x".repeat(10 * 1024),
            "x".repeat(10 * 1024 - 1) + "y",
        ]
    }

    #[test]
    fn every_mapped_key_is_a_valid_memcached_key() {
        let long_namespace = "n".repeat(MAX_NAMESPACE_LEN);
        for namespace in ["", "app:", long_namespace.as_str()] {
            let keys = KeyMapper::new(namespace).unwrap();
            for key in hostile_keys() {
                let mapped = keys.map(&key);
                assert!(mapped.len() <= MAX_KEY_LEN, "{} bytes", mapped.len());
                assert!(mapped.bytes().all(|b| b.is_ascii_graphic()), "{mapped:?}");
                assert!(mapped.starts_with(namespace));
            }
        }
    }

    #[test]
    fn distinct_keys_map_to_distinct_keys() {
        let keys = KeyMapper::default();
        let mapped: HashSet<_> = hostile_keys().iter().map(|k| keys.map(k)).collect();
        assert_eq!(mapped.len(), hostile_keys().len());
    }

    #[test]
    fn mapping_is_fixed() {
        // SHA-256 of "session-abc"; a change here strands every pin and session in production.
        let keys = KeyMapper::new("app:").unwrap();
        assert_eq!(
            keys.map("session-abc"),
            "app:df98a8544084cba1bfbcf00faea193bf73d10ae13eada8c8bacf2c7f1e1d92f4"
        );
    }

    #[test]
    fn rejects_namespaces_that_would_break_keys() {
        for bad in [
            "has space",
            "tab\t",
            "ü",
            &"n".repeat(MAX_NAMESPACE_LEN + 1),
        ] {
            assert!(
                matches!(KeyMapper::new(bad), Err(Error::InvalidNamespace(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn placement_is_stable() {
        // Fixed expectations, computed apart from this code (Python, from the paper): two app
        // servers built with any compiler must agree with these.
        let keys = KeyMapper::default();
        let placed: Vec<usize> = ["a", "b", "c", "session-abc", "user:42", ""]
            .iter()
            .map(|k| keys.server_index(k, 5))
            .collect();
        assert_eq!(placed, vec![1, 3, 1, 0, 1, 2]);
        assert_eq!(jump_consistent_hash(0, 1), 0);
        assert_eq!(jump_consistent_hash(1, 10), 6);
        assert_eq!(jump_consistent_hash(0xdead_beef, 10), 5);
        assert_eq!(jump_consistent_hash(u64::MAX, 1000), 313);
    }

    #[test]
    fn placement_spreads_and_moves_little() {
        let keys = KeyMapper::default();
        let names: Vec<String> = (0..10_000).map(|i| format!("session-{i}")).collect();
        let mut counts = [0_usize; 4];
        for name in &names {
            counts[keys.server_index(name, 4)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (2_000..3_000).contains(&c)),
            "{counts:?}"
        );
        let moved = names
            .iter()
            .filter(|n| keys.server_index(n, 4) != keys.server_index(n, 5))
            .count();
        // About a fifth move to the new server, and only to it.
        assert!((1_500..2_500).contains(&moved), "{moved}");
        assert!(
            names
                .iter()
                .filter(|n| keys.server_index(n, 4) != keys.server_index(n, 5))
                .all(|n| keys.server_index(n, 5) == 4)
        );
    }

    #[test]
    fn no_servers_is_server_zero() {
        assert_eq!(KeyMapper::default().server_index("a", 0), 0);
        assert_eq!(KeyMapper::default().server_index("a", 1), 0);
    }
}
