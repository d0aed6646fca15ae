//! HTTP egress for guests (`sandgate.http_send` / `http_read`, DESIGN §2).
//!
//! This build has no outbound HTTP client yet: every request is refused with
//! `-1` (egress denied) and written to the audit log as `egress_denied` with
//! its URL and the reason, so a guest that asks is visible to the operator.
//! Malformed requests answer `-5`. `sandgate check` warns about policies that
//! list egress prefixes, since nothing will be sent.

use serde::Deserialize;
use wasmtime::{Caller, Linker};

use crate::abi::{self, Invocation};
use crate::audit::AuditRecord;

/// `http_send`: the request was refused by the egress policy.
pub const EGRESS_DENIED: i64 = -1;
/// `http_send`/`http_read`: the request is malformed, or nothing is pending.
pub const INVALID_REQUEST: i64 = -5;
/// Largest request document a guest may hand the bridge.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Why this build refuses requests to allowed prefixes.
pub const UNAVAILABLE: &str = "the HTTP bridge is not available in this build";

#[derive(Deserialize)]
struct HttpRequest {
    #[serde(default)]
    method: Option<String>,
    url: String,
}

/// Adds `http_send` and `http_read` to the `sandgate` import module.
pub fn add_to_linker(linker: &mut Linker<Invocation>) -> wasmtime::Result<()> {
    linker.func_wrap(
        abi::MODULE,
        "http_send",
        |mut caller: Caller<'_, Invocation>, ptr: i32, len: i32| -> wasmtime::Result<i64> {
            let len = usize::try_from(len).map_err(|_| abi::AbiViolation(format!("negative length {len}")))?;
            if len > MAX_REQUEST_BYTES {
                return Ok(INVALID_REQUEST);
            }
            let bytes = abi::read_guest(&mut caller, ptr, len)?;
            let Ok(request) = serde_json::from_slice::<HttpRequest>(&bytes) else {
                return Ok(INVALID_REQUEST);
            };
            let inv = caller.data_mut();
            let reason = if inv.egress_allow.is_empty() {
                "no egress is granted to this policy (egress.allow is empty)"
            } else {
                UNAVAILABLE
            };
            tracing::warn!(
                policy = %inv.subject.policy,
                decision_id = %inv.subject.decision_id,
                method = request.method.as_deref().unwrap_or("GET"),
                url = %request.url,
                "egress refused: {reason}"
            );
            inv.audit.record(
                &inv.subject,
                &AuditRecord::EgressDenied {
                    url: request.url,
                    reason: reason.to_owned(),
                },
            );
            inv.egress_denied += 1;
            Ok(EGRESS_DENIED)
        },
    )?;
    linker.func_wrap(
        abi::MODULE,
        "http_read",
        |_caller: Caller<'_, Invocation>, _ptr: i32, _len: i32| -> i32 { INVALID_REQUEST as i32 },
    )?;
    Ok(())
}
