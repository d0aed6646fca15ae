//! The optional decision cache of a policy (`decision_cache_ttl_ms`): a
//! completed decision is reused, within the TTL, for the same version and
//! module digest and the same input up to JSON formatting (object keys
//! sorted, whitespace dropped, one string escaping; numbers as written).
//! Input a guest could read two ways (duplicate keys, invalid UTF-8, lone
//! surrogates) has no key: it is refused before evaluation. Failed
//! evaluations are never cached.

use sha2::Digest as _;

use crate::config::{DecisionCacheSettings, Digest};
use crate::decision::Decision;

/// Decisions of one policy by canonical input. Cheap to clone.
#[derive(Clone)]
pub struct DecisionCache {
    entries: moka::future::Cache<[u8; 32], Decision>,
}

impl DecisionCache {
    pub fn new(settings: &DecisionCacheSettings) -> DecisionCache {
        DecisionCache {
            entries: moka::future::Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(settings.ttl)
                .build(),
        }
    }

    /// The key of `input` for one version: its canonical form
    /// ([`input::canonical`]), so formatting does not matter but anything a
    /// guest could read differently does. `None` when the input is refused
    /// (the evaluation reports why, with the same parser).
    pub fn key(version: &str, digest: &Digest, input: &[u8]) -> Option<[u8; 32]> {
        let canonical = super::input::canonical(input).ok()?;
        let mut hasher = sha2::Sha256::new();
        hasher.update(version.as_bytes());
        hasher.update([0]);
        hasher.update(digest.0);
        hasher.update(&canonical);
        Some(hasher.finalize().into())
    }

    pub async fn get(&self, key: &[u8; 32]) -> Option<Decision> {
        self.entries.get(key).await
    }

    /// Keeps `decision` when it completed without error.
    pub async fn insert(&self, key: [u8; 32], decision: &Decision) {
        if decision.error.is_none() {
            self.entries.insert(key, decision.clone()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_formatting_and_key_order_but_not_values_or_versions() {
        let digest = Digest::of(b"module");
        let key = |v: &str, input: &str| DecisionCache::key(v, &digest, input.as_bytes());
        let a = key("v1", r#"{"a":1,"b":{"y":[1,2],"x":"s"}}"#);
        assert!(a.is_some());
        assert_eq!(
            a,
            key("v1", "{ \"b\" : {\"x\":\"s\", \"y\":[1, 2]}, \"a\":1 }")
        );
        assert_ne!(a, key("v1", r#"{"a":2,"b":{"y":[1,2],"x":"s"}}"#));
        assert_ne!(a, key("v1", r#"{"a":1,"b":{"y":[2,1],"x":"s"}}"#));
        assert_ne!(a, key("v2", r#"{"a":1,"b":{"y":[1,2],"x":"s"}}"#));
        assert_ne!(
            a,
            DecisionCache::key(
                "v1",
                &Digest::of(b"other"),
                br#"{"a":1,"b":{"y":[1,2],"x":"s"}}"#
            )
        );
        assert_eq!(key("v1", "{not json"), None);
    }

    #[test]
    fn input_a_guest_could_read_two_ways_has_no_key() {
        let digest = Digest::of(b"module");
        let key = |input: &[u8]| DecisionCache::key("v1", &digest, input);
        // A duplicated key used to share the key of its last value.
        assert!(key(br#"{"user":"bob","user":"alice"}"#).is_none());
        assert!(key(br#"{"user":"alice"}"#).is_some());
        assert!(key(b"{\"a\":\"\xff\"}").is_none());
        assert!(key(br#"{"a":"\ud800"}"#).is_none());
        // Numbers an f64 cannot tell apart are different inputs.
        assert_ne!(
            key(br#"{"id":12345678901234567890123}"#),
            key(br#"{"id":12345678901234567890124}"#)
        );
        assert_ne!(key(br#"{"n":1}"#), key(br#"{"n":1.0}"#));
    }
}
