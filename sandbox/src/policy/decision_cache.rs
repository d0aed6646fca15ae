//! The optional decision cache of a policy (`decision_cache_ttl_ms`): a
//! completed decision is reused, within the TTL, for the same version and
//! module digest and the same input up to JSON formatting (object keys
//! sorted, whitespace dropped). Failed evaluations are never cached.

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

    /// The key of `input` for one version; `None` when the input is not JSON
    /// (the evaluation reports it).
    pub fn key(version: &str, digest: &Digest, input: &[u8]) -> Option<[u8; 32]> {
        let document: serde_json::Value = serde_json::from_slice(input).ok()?;
        let mut hasher = sha2::Sha256::new();
        hasher.update(version.as_bytes());
        hasher.update([0]);
        hasher.update(digest.0);
        let mut canonical = Vec::with_capacity(input.len());
        write_canonical(&document, &mut canonical);
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

/// JSON with object keys in byte order and no whitespace, whatever order
/// `serde_json` keeps maps in.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &serde_json::Value, out: &mut Vec<u8>) {
    // Serialising a scalar into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
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
}
