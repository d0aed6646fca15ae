//! The bridge's response cache: the key of a request (method, URL, headers
//! and body hashed) and the lifetime a response's `Cache-Control` allows.
//! `Bridge::send_checked` consults and fills the cache with these.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use sha2::Digest as _;
use url::Url;

/// A cached response document and when it expires.
#[derive(Clone)]
pub(super) struct CachedResponse {
    pub(super) expires: Instant,
    pub(super) document: Arc<Vec<u8>>,
}

/// What identifies a request in the cache.
pub(super) fn cache_key(
    method: &Method,
    url: &Url,
    headers: &[(HeaderName, HeaderValue)],
    body: Option<&[u8]>,
) -> [u8; 32] {
    let mut hasher = sha2::Sha256::new();
    hasher.update(method.as_str());
    hasher.update([0]);
    hasher.update(url.as_str());
    let mut sorted: Vec<_> = headers.iter().collect();
    sorted.sort_by(|a, b| {
        a.0.as_str()
            .cmp(b.0.as_str())
            .then(a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    for (name, value) in sorted {
        hasher.update([0]);
        hasher.update(name.as_str());
        hasher.update([b':']);
        hasher.update(value.as_bytes());
    }
    hasher.update([1]);
    hasher.update(body.unwrap_or_default());
    hasher.finalize().into()
}

/// What a response's `Cache-Control` allows.
pub(super) enum CacheControl {
    NoStore,
    MaxAge(Duration),
    Default,
}

/// The lifetime `headers` allow a response in the cache.
pub(super) fn cache_max_age(headers: &HeaderMap) -> CacheControl {
    let mut result = CacheControl::Default;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            if directive == "no-store" || directive == "no-cache" || directive == "private" {
                return CacheControl::NoStore;
            }
            if let Some(age) = directive.strip_prefix("max-age=")
                && let Ok(secs) = age.trim_matches('"').parse::<u64>()
            {
                result = CacheControl::MaxAge(Duration::from_secs(secs));
            }
        }
    }
    result
}
