//! The decision a policy returns (DESIGN §2) and the error codes of a failed
//! evaluation (DESIGN §3). Owned here so every surface — CLI, HTTP, gRPC,
//! audit, metrics — renders the same decision and the same code.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The contract error codes of DESIGN §3. Serialised in `snake_case`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    PolicyNotFound,
    InvalidInput,
    EvalTimeout,
    MemoryLimit,
    GuestTrap,
    AbiViolation,
    EgressDenied,
    WasiDenied,
    ModuleInvalid,
    Internal,
}

impl ErrorCode {
    /// Every code, in contract order.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::PolicyNotFound,
        ErrorCode::InvalidInput,
        ErrorCode::EvalTimeout,
        ErrorCode::MemoryLimit,
        ErrorCode::GuestTrap,
        ErrorCode::AbiViolation,
        ErrorCode::EgressDenied,
        ErrorCode::WasiDenied,
        ErrorCode::ModuleInvalid,
        ErrorCode::Internal,
    ];

    /// The code as written in decisions, audit lines, spans and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::PolicyNotFound => "policy_not_found",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::EvalTimeout => "eval_timeout",
            ErrorCode::MemoryLimit => "memory_limit",
            ErrorCode::GuestTrap => "guest_trap",
            ErrorCode::AbiViolation => "abi_violation",
            ErrorCode::EgressDenied => "egress_denied",
            ErrorCode::WasiDenied => "wasi_denied",
            ErrorCode::ModuleInvalid => "module_invalid",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an evaluation failed: the `error` member of a failed decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionError {
    pub code: ErrorCode,
    pub message: String,
}

/// What the host does when an evaluation fails (`fail_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// A failed evaluation denies (the default).
    #[default]
    Closed,
    /// A failed evaluation allows; the error is still reported everywhere.
    Open,
}

/// A validated decision document.
///
/// Guest fields the host does not interpret (`obligations`, anything else)
/// are kept in `extra` and rendered back unchanged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub allow: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<DecisionError>,
}

/// Status used on deny when the decision names none.
pub const DEFAULT_DENY_STATUS: u16 = 403;

impl Decision {
    /// Parses and validates the decision document a guest returned.
    ///
    /// Refuses anything that is not a JSON object with a boolean `allow`, a
    /// `status` outside 100..=599, non-string header values or a guest-set
    /// `error` member (only the host reports errors).
    pub fn from_guest(bytes: &[u8]) -> Result<Decision, String> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("decision is not valid JSON: {e}"))?;
        let Value::Object(mut doc) = value else {
            return Err(format!(
                "decision must be a JSON object, got {}",
                json_kind(&value)
            ));
        };
        let allow = match doc.remove("allow") {
            Some(Value::Bool(b)) => b,
            Some(other) => {
                return Err(format!(
                    "decision field `allow` must be a boolean, got {}",
                    json_kind(&other)
                ));
            }
            None => return Err("decision has no `allow` field".to_owned()),
        };
        let reason = match doc.remove("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(format!(
                    "decision field `reason` must be a string, got {}",
                    json_kind(&other)
                ));
            }
        };
        let status = match doc.remove("status") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(s @ 100..=599) => Some(s as u16),
                _ => {
                    return Err(format!(
                        "decision field `status` must be an HTTP status 100..=599, got {n}"
                    ));
                }
            },
            Some(other) => {
                return Err(format!(
                    "decision field `status` must be a number, got {}",
                    json_kind(&other)
                ));
            }
        };
        let headers = match doc.remove("headers") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => {
                let mut headers = BTreeMap::new();
                for (name, value) in map {
                    let Value::String(value) = value else {
                        return Err(format!(
                            "decision header `{name}` must be a string, got {}",
                            json_kind(&value)
                        ));
                    };
                    headers.insert(name, value);
                }
                headers
            }
            Some(other) => {
                return Err(format!(
                    "decision field `headers` must be an object, got {}",
                    json_kind(&other)
                ));
            }
        };
        if doc.contains_key("error") {
            return Err("decision must not set `error`: the host reports errors".to_owned());
        }
        Ok(Decision {
            allow,
            reason,
            status,
            headers,
            extra: doc,
            error: None,
        })
    }

    /// The decision of a failed evaluation: deny (or allow with
    /// `fail_mode = "open"`), carrying the error code and message.
    pub fn failed(code: ErrorCode, message: impl Into<String>, fail_mode: FailMode) -> Decision {
        let message = message.into();
        Decision {
            allow: fail_mode == FailMode::Open,
            reason: Some(format!("evaluation failed ({code}): {message}")),
            status: None,
            headers: BTreeMap::new(),
            extra: Map::new(),
            error: Some(DecisionError { code, message }),
        }
    }

    /// The error code when the evaluation failed.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }

    /// The HTTP status to answer with on deny.
    pub fn deny_status(&self) -> u16 {
        self.status.unwrap_or(DEFAULT_DENY_STATUS)
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_render_as_the_contract_spells_them() {
        let rendered: Vec<String> = ErrorCode::ALL
            .iter()
            .map(|c| serde_json::to_value(c).map(|v| v.as_str().unwrap_or("").to_owned()))
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        assert_eq!(
            rendered,
            [
                "policy_not_found",
                "invalid_input",
                "eval_timeout",
                "memory_limit",
                "guest_trap",
                "abi_violation",
                "egress_denied",
                "wasi_denied",
                "module_invalid",
                "internal"
            ]
        );
        for code in ErrorCode::ALL {
            assert_eq!(code.to_string(), code.as_str());
        }
    }

    #[test]
    fn guest_fields_are_validated_and_kept() {
        let d = Decision::from_guest(
            br#"{"allow":false,"status":401,"reason":"no","headers":{"x-u":"a"},"obligations":{"k":1}}"#,
        )
        .expect("valid decision");
        assert!(!d.allow);
        assert_eq!(d.deny_status(), 401);
        assert_eq!(d.headers["x-u"], "a");
        assert_eq!(d.extra["obligations"]["k"], 1);
        let rendered = serde_json::to_value(&d).expect("serialises");
        assert_eq!(rendered["obligations"]["k"], 1);
        assert!(rendered.get("error").is_none());
    }

    #[test]
    fn numbers_a_guest_writes_are_passed_on_as_written() {
        // Found by the abi_decode fuzz target: without exact float parsing,
        // 5e32 came back as 5.0000000000000004e32.
        let d = Decision::from_guest(br#"{"allow":false,"score":5e32,"ratio":0.1}"#)
            .expect("valid decision");
        let rendered = serde_json::to_vec(&d).expect("serialises");
        assert_eq!(Decision::from_guest(&rendered), Ok(d.clone()));
        assert_eq!(d.extra["score"].as_f64(), Some(5e32));
        assert_eq!(d.extra["ratio"].as_f64(), Some(0.1));
    }

    #[test]
    fn malformed_decisions_are_refused_with_the_field_named() {
        for (doc, needle) in [
            (&b"not json"[..], "not valid JSON"),
            (b"[1]", "must be a JSON object"),
            (b"{}", "no `allow`"),
            (br#"{"allow":"yes"}"#, "`allow` must be a boolean"),
            (br#"{"allow":false,"status":42}"#, "`status`"),
            (br#"{"allow":true,"headers":{"a":1}}"#, "header `a`"),
            (br#"{"allow":true,"error":{}}"#, "must not set `error`"),
        ] {
            let err = Decision::from_guest(doc).expect_err("must be refused");
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn failed_decisions_follow_the_fail_mode() {
        let closed = Decision::failed(ErrorCode::EvalTimeout, "deadline", FailMode::Closed);
        assert!(!closed.allow);
        assert_eq!(closed.error_code(), Some(ErrorCode::EvalTimeout));
        let open = Decision::failed(ErrorCode::GuestTrap, "trap", FailMode::Open);
        assert!(open.allow);
        assert_eq!(open.error_code(), Some(ErrorCode::GuestTrap));
    }
}
