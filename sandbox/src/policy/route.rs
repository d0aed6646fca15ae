//! The versions of one policy and how a request picks the one that answers
//! it: the `x-sandgate-version` header when the policy honours it, else the
//! hash of the sticky key (a header or an input field) so one user keeps one
//! version, else a weighted draw. Weights are shares of the traffic; sticky
//! keys map to a point in [0, 1) laid over the versions in config order, so
//! moving weight between two versions moves only the users in between.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

use sha2::Digest as _;

use super::{LoadError, Policy};
use crate::audit::AuditLog;
use crate::config::{PolicySpec, Routing, StickyKey};
use crate::engine::Engine;

/// Request headers a route may read (names lower-case).
pub trait RequestHeaders: Sync {
    fn header(&self, name: &str) -> Option<&str>;
}

impl RequestHeaders for http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

impl RequestHeaders for HashMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl RequestHeaders for BTreeMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// No headers (the CLI, benchmarks).
impl RequestHeaders for () {
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
}

/// Why a version was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutedBy {
    /// The request named it in the version header.
    Header,
    /// The hash of the sticky key.
    Sticky,
    /// A weighted random draw.
    Weight,
}

impl RoutedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutedBy::Header => "header",
            RoutedBy::Sticky => "sticky",
            RoutedBy::Weight => "weight",
        }
    }
}

/// A request named a version the policy does not have.
#[derive(Debug, thiserror::Error)]
#[error(
    "policy `{policy}` has no version `{requested}` (versions: {known}); see the {header} header"
)]
pub struct UnknownVersion {
    pub policy: String,
    pub requested: String,
    pub known: String,
    pub header: &'static str,
}

/// Every loaded version of one policy, with its routing. Cheap to share
/// behind an `Arc`; a reload builds a new one.
pub struct Versions {
    name: String,
    routing: Routing,
    versions: Vec<(Policy, u32)>,
    total_weight: u64,
}

impl Versions {
    /// Loads every version of `spec`; the first failure is returned, so a
    /// policy serves all its versions or none. Init's refused WASI calls are
    /// audited to `audit`.
    pub async fn load(
        engine: &Engine,
        spec: &PolicySpec,
        audit: &AuditLog,
    ) -> Result<Versions, LoadError> {
        let mut versions = Vec::with_capacity(spec.versions.len());
        for version in &spec.versions {
            let policy = Policy::load_audited(engine, spec.for_version(version), audit).await?;
            versions.push((policy, version.weight));
        }
        Ok(Versions::new(spec, versions))
    }

    fn new(spec: &PolicySpec, versions: Vec<(Policy, u32)>) -> Versions {
        Versions {
            name: spec.name.clone(),
            routing: spec.routing.clone(),
            total_weight: versions.iter().map(|(_, w)| u64::from(*w)).sum(),
            versions,
        }
    }

    /// The loaded versions in config order, with their weights.
    pub fn iter(&self) -> impl Iterator<Item = (&Policy, u32)> {
        self.versions.iter().map(|(p, w)| (p, *w))
    }

    /// The first version (what `version` means for a single-version policy).
    pub fn primary(&self) -> &Policy {
        &self.versions[0].0
    }

    pub fn len(&self) -> usize {
        self.versions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// The version at `index` (as returned by [`Versions::pick`]).
    pub fn get(&self, index: usize) -> Option<&Policy> {
        self.versions.get(index).map(|(p, _)| p)
    }

    /// The index of the version that answers a request with `headers` and `input`.
    pub fn pick(
        &self,
        headers: &dyn RequestHeaders,
        input: &[u8],
    ) -> Result<(usize, RoutedBy), UnknownVersion> {
        if self.routing.version_header
            && let Some(requested) = headers.header(crate::config::defaults::VERSION_HEADER)
        {
            let requested = requested.trim();
            return match self
                .versions
                .iter()
                .position(|(p, _)| p.spec().version == requested)
            {
                Some(index) => Ok((index, RoutedBy::Header)),
                None => Err(UnknownVersion {
                    policy: self.name.clone(),
                    requested: requested.chars().take(64).collect(),
                    known: self
                        .versions
                        .iter()
                        .map(|(p, _)| p.spec().version.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    header: crate::config::defaults::VERSION_HEADER,
                }),
            };
        }
        if self.versions.len() == 1 {
            return Ok((0, RoutedBy::Weight));
        }
        if let Some(sticky) = &self.routing.sticky
            && let Some(key) = sticky_value(sticky, headers, input)
        {
            return Ok((self.at(sticky_point(&self.name, &key)), RoutedBy::Sticky));
        }
        Ok((self.at(random_point()), RoutedBy::Weight))
    }

    /// The index of the version whose share of [0, 1) contains `point`,
    /// shares laid out by weight in config order.
    fn at(&self, point: f64) -> usize {
        let target = point * self.total_weight as f64;
        let mut end = 0u64;
        for (index, (_, weight)) in self.versions.iter().enumerate() {
            end += u64::from(*weight);
            if *weight > 0 && target < end as f64 {
                return index;
            }
        }
        // Rounding at the very top: the last version with a weight.
        self.versions.iter().rposition(|(_, w)| *w > 0).unwrap_or(0)
    }
}

/// The sticky key of a request, when it carries one.
fn sticky_value(sticky: &StickyKey, headers: &dyn RequestHeaders, input: &[u8]) -> Option<String> {
    match sticky {
        StickyKey::Header(name) => headers
            .header(name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
        StickyKey::Input(path) => {
            let document: serde_json::Value = serde_json::from_slice(input).ok()?;
            let mut at = &document;
            for segment in path {
                at = match at {
                    serde_json::Value::Object(map) => map.get(segment)?,
                    serde_json::Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                    _ => return None,
                };
            }
            match at {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            }
        }
    }
}

/// A stable point in [0, 1) for a sticky key: the same on every daemon and
/// every restart, different per policy.
fn sticky_point(policy: &str, key: &str) -> f64 {
    let mut hasher = sha2::Sha256::new();
    hasher.update(policy.as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    unit(u64::from_le_bytes(first))
}

/// A uniformly random point in [0, 1), from a per-thread generator.
fn random_point() -> f64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()));
    }
    STATE.with(|state| {
        // splitmix64: fast, and uniform enough to split traffic.
        let next = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        unit(z ^ (z >> 31))
    })
}

/// Maps 64 random bits to [0, 1) (53 bits of precision).
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_points_are_stable_and_spread() {
        assert_eq!(
            sticky_point("orders", "alice"),
            sticky_point("orders", "alice")
        );
        assert_ne!(
            sticky_point("orders", "alice"),
            sticky_point("orders", "bob")
        );
        assert_ne!(
            sticky_point("orders", "alice"),
            sticky_point("billing", "alice")
        );
        let below_half = (0..1000)
            .filter(|i| sticky_point("orders", &format!("user-{i}")) < 0.5)
            .count();
        assert!((400..600).contains(&below_half), "{below_half}");
    }

    #[test]
    fn random_points_cover_the_unit_interval() {
        let points: Vec<f64> = (0..10_000).map(|_| random_point()).collect();
        assert!(points.iter().all(|p| (0.0..1.0).contains(p)));
        let low = points.iter().filter(|p| **p < 0.1).count();
        assert!((700..1300).contains(&low), "{low}");
    }

    #[test]
    fn sticky_input_fields_are_found_by_path() {
        let input = br#"{"subject":{"id":"alice","n":7,"roles":["a","b"]}}"#;
        let key = |path: &[&str]| {
            sticky_value(
                &StickyKey::Input(path.iter().map(|s| s.to_string()).collect()),
                &(),
                input,
            )
        };
        assert_eq!(key(&["subject", "id"]).as_deref(), Some("alice"));
        assert_eq!(key(&["subject", "n"]).as_deref(), Some("7"));
        assert_eq!(key(&["subject", "roles", "1"]).as_deref(), Some("b"));
        assert_eq!(key(&["subject", "missing"]), None);
        let mut headers = HashMap::new();
        headers.insert("x-user".to_owned(), "bob".to_owned());
        assert_eq!(
            sticky_value(&StickyKey::Header("x-user".into()), &headers, b"{}").as_deref(),
            Some("bob")
        );
    }
}
