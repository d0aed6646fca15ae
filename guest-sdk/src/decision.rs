//! The decision document a guest returns (ABI v1): `allow`, and optionally `reason`, `status`,
//! `headers` and `obligations`. Built by policy functions, serialised by the export glue.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The answer of a policy: allow or deny, with what the host should do about it.
///
/// Serialises to the ABI v1 decision document, leaving out what is unset:
/// `Decision::deny().reason("no role grants it").status(403)` becomes
/// `{"allow":false,"reason":"no role grants it","status":403}`.
///
/// ```
/// use sandgate_guest::Decision;
///
/// let decision = Decision::allow()
///     .header("x-user", "alice")
///     .obligation("audit", serde_json::json!({"level": "high"}));
/// assert!(decision.allow);
/// assert_eq!(decision.headers["x-user"], "alice");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request is allowed. The only field the host requires.
    pub allow: bool,
    /// Why: shown to the caller on deny (forward-auth sends it as the response body) and logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The HTTP status the host answers with on deny; the host uses 403 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Headers the host adds to the upstream request on allow (forward-auth returns them as
    /// response headers). Use lower-case names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Free-form JSON the caller receives with the decision (for example what to redact).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub obligations: Map<String, Value>,
}

impl Decision {
    /// A decision that allows the request.
    pub fn allow() -> Self {
        Self::with_allow(true)
    }

    /// A decision that denies the request (status 403 unless [`status`](Self::status) is set).
    pub fn deny() -> Self {
        Self::with_allow(false)
    }

    fn with_allow(allow: bool) -> Self {
        Self {
            allow,
            reason: None,
            status: None,
            headers: BTreeMap::new(),
            obligations: Map::new(),
        }
    }

    /// Sets the reason, replacing any earlier one.
    #[must_use]
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Sets the HTTP status the host answers with on deny.
    #[must_use]
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Adds a header for the upstream request (on allow), replacing one of the same name.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Adds an obligation, replacing one with the same key.
    #[must_use]
    pub fn obligation(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.obligations.insert(key.into(), value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn to_json(decision: &Decision) -> Value {
        serde_json::to_value(decision).expect("a decision always serialises")
    }

    #[test]
    fn bare_allow_serialises_to_allow_only() {
        assert_eq!(to_json(&Decision::allow()), json!({"allow": true}));
        assert_eq!(to_json(&Decision::deny()), json!({"allow": false}));
    }

    #[test]
    fn builder_sets_every_field() {
        let decision = Decision::deny()
            .reason("first")
            .reason("alice may not delete orders")
            .status(451)
            .header("x-user", "alice")
            .header("x-user", "bob")
            .obligation("redact", json!(["ssn"]))
            .obligation("count", 3);
        assert_eq!(
            to_json(&decision),
            json!({
                "allow": false,
                "reason": "alice may not delete orders",
                "status": 451,
                "headers": {"x-user": "bob"},
                "obligations": {"redact": ["ssn"], "count": 3}
            })
        );
    }

    #[test]
    fn parses_a_minimal_document() {
        let decision: Decision = serde_json::from_str(r#"{"allow":true}"#).expect("valid");
        assert_eq!(decision, Decision::allow());
    }
}
