//! The proxy-wasm host (ABI 0.2.x as Envoy runs it, DESIGN §2b): a filter
//! written for Envoy, Istio or Higress runs as a policy. This module owns the
//! per-store state of one filter instance (`FilterState`: the request's
//! header map and body, the local response, the dispatched calls, per-decision
//! shared data and metrics); `host` links the `env` imports through accessors
//! (never naming the embedder's store), `call` drives the root context at load
//! and one HTTP context per decision, `map` is the wire form of header maps.

use std::collections::BTreeMap;

use serde_json::Value;
use wasmtime::{ExternType, Module};

use crate::config::ProxyWasmSettings;

pub mod call;
mod host;
pub mod map;

pub use host::{FilterView, Host, add_to_linker};

/// The import module of proxy-wasm host functions.
pub const MODULE: &str = "env";
/// The ABI version exports a filter may carry (one of them is required).
pub const ABI_VERSIONS: [&str; 3] = [
    "proxy_abi_version_0_2_1",
    "proxy_abi_version_0_2_0",
    "proxy_abi_version_0_1_0",
];
/// Exports a filter must have.
pub const REQUIRED_EXPORTS: [&str; 3] = [
    "proxy_on_context_create",
    "proxy_on_request_headers",
    "memory",
];

/// Host functions of proxy-wasm 0.2.x that sandgate provides.
pub const SUPPORTED: [&str; 26] = [
    "proxy_done",
    "proxy_set_effective_context",
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_continue_stream",
    "proxy_continue_request",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
];

/// Host functions of proxy-wasm 0.2.x that sandgate links as refusals: a
/// call is audited as `wasi_denied` with the function's name.
pub const REFUSED: [&str; 16] = [
    "proxy_set_buffer_bytes",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_call_foreign_function",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_send_http_response",
    "proxy_get_configuration",
];

/// The root context the filter is configured in (at load).
pub const ROOT_CONTEXT: i32 = 1;
/// The HTTP context of a decision.
pub const HTTP_CONTEXT: i32 = 2;

/// The request a decision feeds the filter.
#[derive(Clone, Debug, Default)]
pub struct FilterRequest {
    pub method: String,
    /// Path with the query, as `:path` carries it.
    pub path: String,
    pub host: String,
    pub scheme: String,
    /// Lower-case names, in the caller's order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub source: Option<String>,
}

impl FilterRequest {
    /// The request of an evaluation input: its `request` object, as
    /// forward-auth, ext_authz and JSON callers give it (DESIGN §2).
    pub fn from_input(input: &[u8]) -> Result<FilterRequest, String> {
        let value: Value =
            serde_json::from_slice(input).map_err(|e| format!("input is not valid JSON: {e}"))?;
        let Some(Value::Object(request)) = value.get("request") else {
            return Err(
                "a proxy-wasm policy needs the input's `request` object (method, path, headers …)"
                    .into(),
            );
        };
        let text = |key: &str| -> Result<Option<String>, String> {
            match request.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("request.{key} must be a string")),
            }
        };
        let mut headers = Vec::new();
        match request.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (name, value) in map {
                    let Value::String(value) = value else {
                        return Err(format!("request.headers.{name} must be a string"));
                    };
                    headers.push((name.to_ascii_lowercase(), value.clone()));
                }
            }
            Some(_) => return Err("request.headers must be an object of strings".into()),
        }
        let path = text("path")?.unwrap_or_else(|| "/".into());
        let path = match text("query")? {
            Some(q) if !q.is_empty() && !path.contains('?') => format!("{path}?{q}"),
            _ => path,
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let host = text("host")?.or_else(|| header("host")).unwrap_or_default();
        let scheme = text("scheme")?
            .or_else(|| header("x-forwarded-proto"))
            .unwrap_or_else(|| "http".into());
        let source = match request.get("source").and_then(|s| s.get("address")) {
            Some(Value::String(a)) => Some(a.clone()),
            _ => None,
        };
        Ok(FilterRequest {
            method: text("method")?.unwrap_or_else(|| "GET".into()),
            path,
            host,
            scheme,
            headers,
            body: text("body")?.unwrap_or_default().into_bytes(),
            source,
        })
    }

    /// The header map `on_request_headers` sees: pseudo-headers first.
    fn header_map(&self) -> Vec<(String, String)> {
        let mut map = vec![
            (":method".to_owned(), self.method.clone()),
            (":path".to_owned(), self.path.clone()),
            (":authority".to_owned(), self.host.clone()),
            (":scheme".to_owned(), self.scheme.clone()),
        ];
        map.extend(self.headers.iter().filter(|(n, _)| n != "host").cloned());
        map
    }
}

/// The response a filter answered with (`send_local_response`).
#[derive(Clone, Debug)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The response of a dispatched call, as the filter reads it.
#[derive(Clone, Debug, Default)]
pub struct CallResponse {
    /// `:status` first, then the response's headers; empty when it failed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The state of one filter instance (one store).
#[derive(Default)]
pub struct FilterState {
    /// What `on_configure` reads, and the clusters of `dispatch_http_call`
    /// (`None` in a store of an ABI v1 guest: nothing is allocated for it).
    pub settings: Option<ProxyWasmSettings>,
    /// The policy's name (`plugin_name`) and the decision id (`request.id`).
    pub plugin_name: String,
    pub decision_id: String,
    pub request: FilterRequest,
    /// The request header map as the filter changed it.
    pub headers: Vec<(String, String)>,
    pub local: Option<LocalResponse>,
    /// Set by `continue_stream` on the request.
    pub resumed: bool,
    /// Responses of dispatched calls not yet delivered, by token.
    pub responses: Vec<(u32, CallResponse)>,
    /// The response being delivered in `on_http_call_response`.
    pub delivering: Option<CallResponse>,
    pub next_token: u32,
    /// Shared data (per decision, seeded from what init set).
    pub shared: BTreeMap<String, (Vec<u8>, u32)>,
    pub properties: BTreeMap<Vec<String>, Vec<u8>>,
    /// Metrics defined by the filter (per decision): name, value.
    pub metrics: Vec<(String, i64)>,
    /// Largest body a local response or a header map may have.
    pub max_bytes: usize,
    /// Host calls refused so far (names).
    pub refused: Vec<&'static str>,
    /// `proxy_log` calls made (span events stop at `MAX_LOG_CALLS`).
    pub log_calls: u32,
}

impl FilterState {
    /// The value of metric `id` (what `proxy_define_metric` handed the
    /// filter), if the filter defined it in this decision.
    pub fn metric(&mut self, id: i32) -> Option<&mut i64> {
        self.metrics
            .get_mut(id as u32 as usize)
            .map(|(_, value)| value)
    }

    /// The state of a store of a filter configured with `plugin_config`.
    pub fn new(
        settings: &crate::config::ProxyWasmSettings,
        plugin_name: &str,
        decision_id: &str,
        max_bytes: u64,
    ) -> FilterState {
        FilterState {
            settings: Some(settings.clone()),
            plugin_name: plugin_name.to_owned(),
            decision_id: decision_id.to_owned(),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            next_token: 1,
            ..FilterState::default()
        }
    }

    /// Feeds `request` to this store's decision.
    pub fn feed(&mut self, request: FilterRequest) {
        self.headers = request.header_map();
        self.request = request;
    }

    /// The headers the filter added or replaced (pseudo-headers aside).
    pub fn changed_headers(&self) -> BTreeMap<String, String> {
        let original = self.request.header_map();
        self.headers
            .iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .filter(|pair| !original.contains(pair))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect()
    }
}

/// Checks a module is a proxy-wasm filter this host can run, before it is
/// ever instantiated: an ABI version export, the required exports, and
/// imports only from `env` (proxy-wasm host functions) and WASI preview 1.
pub fn validate(module: &Module) -> Result<(), String> {
    if abi_version(module).is_none() {
        return Err(format!(
            "not a proxy-wasm filter: it exports none of {}",
            ABI_VERSIONS.join(", ")
        ));
    }
    for name in REQUIRED_EXPORTS {
        if module.get_export(name).is_none() {
            return Err(format!("missing required proxy-wasm export `{name}`"));
        }
    }
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(m)) if !m.is_64()) {
        return Err("export `memory` must be a 32-bit memory".into());
    }
    if module.get_export("proxy_on_memory_allocate").is_none()
        && module.get_export("malloc").is_none()
    {
        return Err("missing required export `proxy_on_memory_allocate` (or `malloc`): the host cannot hand the filter data".into());
    }
    for import in module.imports() {
        match import.module() {
            MODULE if SUPPORTED.contains(&import.name()) || REFUSED.contains(&import.name()) => {}
            MODULE => {
                return Err(format!(
                    "imports `{MODULE}::{}`, which is not a proxy-wasm 0.2.x host function",
                    import.name()
                ));
            }
            crate::wasi::MODULE => {}
            other => {
                return Err(format!(
                    "imports `{other}::{}`: a proxy-wasm filter may import only from `{MODULE}` and `{}`",
                    import.name(),
                    crate::wasi::MODULE
                ));
            }
        }
    }
    Ok(())
}

/// The proxy-wasm ABI version a module declares, if any (`0.2.1`, …).
pub fn abi_version(module: &Module) -> Option<&'static str> {
    ABI_VERSIONS
        .iter()
        .position(|name| module.get_export(name).is_some())
        .map(|i| ["0.2.1", "0.2.0", "0.1.0"][i])
}
