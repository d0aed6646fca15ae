//! The `env` imports of a proxy-wasm filter: the host functions of ABI 0.2.x
//! that make sense for one decision (header maps, buffers, properties, the
//! local response, `dispatch_http_call` through the bridge, logging, the
//! clock under its grant, per-decision shared data and metrics), and a
//! refusal for the rest, audited as `wasi_denied` with the function's name.
//! Linked through accessors, like `wasi` and `bridge`, so it never names the
//! embedder's store type; every guest pointer goes through `abi::memory`.
//!
//! Over 600 lines: one ABI's host functions, each short; splitting them by
//! family would only scatter the status codes and the hand-back helper.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use wasmtime::{Caller, ExternType, Linker, Module};

use super::{CallResponse, FilterState, LocalResponse, MODULE, REFUSED, map};
use crate::abi::memory::{self, AbiViolation};
use crate::bridge::{self, EgressView};
use crate::config::OnDenied;
use crate::telemetry::traces::Scope;
use crate::wasi::{Denial, GuestOutput, WasiDenied};

/// Status codes of proxy-wasm 0.2.x (`WasmResult` in Envoy).
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const INTERNAL_FAILURE: i32 = 10;
const UNIMPLEMENTED: i32 = 12;

/// Map types (`MapType`).
const REQUEST_HEADERS: i32 = 0;
const REQUEST_TRAILERS: i32 = 1;
const CALL_RESPONSE_HEADERS: i32 = 6;
const CALL_RESPONSE_TRAILERS: i32 = 7;
/// Buffer types (`BufferType`).
const REQUEST_BODY: i32 = 0;
const CALL_RESPONSE_BODY: i32 = 4;
const VM_CONFIGURATION: i32 = 6;
const PLUGIN_CONFIGURATION: i32 = 7;
/// Stream type of the request (`StreamType::HttpRequest`).
const HTTP_REQUEST: i32 = 0;
/// Status of a local response sent by `close_stream` on the request.
const CLOSED_STATUS: u32 = 403;
/// Metrics a filter may define per decision.
const MAX_METRICS: usize = 256;
/// Shared-data entries a filter may set per decision.
const MAX_SHARED: usize = 1024;

/// What the proxy-wasm host functions reach in the embedder's store: the
/// filter's state, the evaluation's output and span, and its grants.
pub struct FilterView<'a> {
    pub state: &'a mut FilterState,
    pub output: &'a GuestOutput,
    pub trace: &'a Scope,
    /// Whether the policy is granted the clock (`get_current_time_nanoseconds`).
    pub clock: bool,
    pub on_denied: OnDenied,
}

/// How the host functions reach the embedder's store `T` without naming it.
pub struct Host<T> {
    pub view: fn(&mut T) -> FilterView<'_>,
    /// The bridge, for `dispatch_http_call`.
    pub egress: fn(&mut T) -> EgressView<'_>,
    /// Reports a refused call (audit, daemon log, trace), which the embedder owns.
    pub refused: fn(&mut T, &Denial),
}

impl<T> Clone for Host<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Host<T> {}

/// Adds the proxy-wasm host functions to `linker`, and a refusal for every
/// function of [`REFUSED`] that `module` imports.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    module: &Module,
    host: Host<T>,
) -> Result<(), String> {
    add_provided(linker, host).map_err(|e| format!("cannot link the proxy-wasm host: {e:#}"))?;
    for import in module.imports().filter(|i| i.module() == MODULE) {
        let Some(call) = REFUSED.iter().copied().find(|n| *n == import.name()) else {
            continue;
        };
        let ExternType::Func(ty) = import.ty() else {
            return Err(format!(
                "imports `{MODULE}::{call}` as something other than a function"
            ));
        };
        linker
            .func_new(MODULE, call, ty, move |mut caller, _params, results| {
                let status = refuse(
                    &mut caller,
                    host,
                    call,
                    "a proxy-wasm host call sandgate does not provide",
                )?;
                if let Some(first) = results.first_mut() {
                    *first = wasmtime::Val::I32(status);
                }
                Ok(())
            })
            .map_err(|e| format!("cannot link `{MODULE}::{call}`: {e:#}"))?;
    }
    Ok(())
}

/// Audits a refused host call; under `on_denied = "trap"` the filter stops
/// with `wasi_denied`, else it gets `Unimplemented`.
fn refuse<T>(
    caller: &mut Caller<'_, T>,
    host: Host<T>,
    call: &'static str,
    detail: &str,
) -> wasmtime::Result<i32> {
    (host.refused)(
        caller.data_mut(),
        &Denial {
            call,
            detail: detail.to_owned(),
            args: json!({}),
        },
    );
    let view = (host.view)(caller.data_mut());
    view.state.refused.push(call);
    match view.on_denied {
        OnDenied::Trap => Err(WasiDenied {
            call,
            detail: detail.to_owned(),
        }
        .into()),
        OnDenied::Errno => Ok(UNIMPLEMENTED),
    }
}

/// Copies `len` bytes at `ptr` out of the guest, at most `max`.
fn read<T>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    len: i32,
    max: usize,
    what: &str,
) -> wasmtime::Result<Vec<u8>> {
    let len =
        usize::try_from(len).map_err(|_| AbiViolation(format!("{what}: negative length {len}")))?;
    if len > max {
        return Err(AbiViolation(format!(
            "{what} of {len} bytes exceeds max_output_bytes = {max}"
        ))
        .into());
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    Ok(memory::read_guest(caller, ptr, len).map_err(|e| AbiViolation(format!("{what}: {e}")))?)
}

fn read_text<T>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    len: i32,
    max: usize,
    what: &str,
) -> wasmtime::Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len, max, what)?).into_owned())
}

/// Hands `bytes` to the guest the proxy-wasm way: memory from its
/// `proxy_on_memory_allocate` (or `malloc`), pointer and size written at
/// `ret_ptr` and `ret_size`.
async fn hand_back<T: Send>(
    caller: &mut Caller<'_, T>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<()> {
    let alloc = caller
        .get_export("proxy_on_memory_allocate")
        .or_else(|| caller.get_export("malloc"))
        .and_then(|e| e.into_func())
        .ok_or_else(|| AbiViolation("the filter exports no proxy_on_memory_allocate".into()))?
        .typed::<i32, i32>(&*caller)
        .map_err(|e| AbiViolation(format!("proxy_on_memory_allocate has the wrong type: {e}")))?;
    let len = i32::try_from(bytes.len())
        .map_err(|_| AbiViolation(format!("{} bytes do not fit a guest", bytes.len())))?;
    let ptr = alloc.call_async(&mut *caller, len).await?;
    if ptr == 0 {
        return Err(AbiViolation(format!(
            "proxy_on_memory_allocate returned 0 for {len} bytes"
        ))
        .into());
    }
    let bad = |e: AbiViolation| AbiViolation(format!("returning data to the filter: {e}"));
    memory::write_guest(caller, ptr, bytes).map_err(bad)?;
    memory::write_guest(caller, ret_ptr, &ptr.to_le_bytes()).map_err(bad)?;
    memory::write_guest(caller, ret_size, &len.to_le_bytes()).map_err(bad)?;
    Ok(())
}

fn max_bytes<T>(caller: &mut Caller<'_, T>, host: Host<T>) -> usize {
    (host.view)(caller.data_mut()).state.max_bytes
}

/// The header map `map_type` names, read-only.
fn header_map(state: &FilterState, map_type: i32) -> Option<Vec<(String, String)>> {
    match map_type {
        REQUEST_HEADERS => Some(state.headers.clone()),
        CALL_RESPONSE_HEADERS => state.delivering.as_ref().map(|r| r.headers.clone()),
        REQUEST_TRAILERS | CALL_RESPONSE_TRAILERS => Some(Vec::new()),
        _ => None,
    }
}

/// The request header map, the only one a filter may change here.
fn mutable_map(state: &mut FilterState, map_type: i32) -> Option<&mut Vec<(String, String)>> {
    (map_type == REQUEST_HEADERS).then_some(&mut state.headers)
}

fn add_provided<T: Send + 'static>(linker: &mut Linker<T>, host: Host<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "proxy_log",
        move |mut caller: Caller<'_, T>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let max = crate::abi::MAX_LOG_BYTES;
            let message = memory::read_guest_string(&mut caller, ptr, len, max)?;
            let view = (host.view)(caller.data_mut());
            // proxy-wasm has critical (5) above error; the output knows 0..=4.
            let level = level.clamp(0, 4);
            view.output.log(level, &message);
            view.state.log_calls += 1;
            if view.state.log_calls <= crate::abi::MAX_LOG_CALLS {
                view.trace.guest_log(level, &message);
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_get_log_level",
        move |mut caller: Caller<'_, T>, ret: i32| -> wasmtime::Result<i32> {
            // Every level is kept: the output is bounded per decision.
            memory::write_guest(&mut caller, ret, &0i32.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_get_current_time_nanoseconds",
        move |mut caller: Caller<'_, T>, ret: i32| -> wasmtime::Result<i32> {
            if !(host.view)(caller.data_mut()).clock {
                return refuse(
                    &mut caller,
                    host,
                    "proxy_get_current_time_nanoseconds",
                    "the clock is not granted (wasi.allow \"clock\"), or init is running",
                );
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            memory::write_guest(&mut caller, ret, &now.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_set_tick_period_milliseconds",
        // Accepted: an instance lives for one decision, so ticks never fire.
        |_: Caller<'_, T>, _period: i32| -> i32 { OK },
    )?;
    linker.func_wrap(MODULE, "proxy_done", |_: Caller<'_, T>| -> i32 { OK })?;
    linker.func_wrap(
        MODULE,
        "proxy_set_effective_context",
        |_: Caller<'_, T>, context: i32| -> i32 {
            if context == super::ROOT_CONTEXT || context == super::HTTP_CONTEXT {
                OK
            } else {
                BAD_ARGUMENT
            }
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "proxy_get_buffer_bytes",
        move |mut caller: Caller<'_, T>,
              (buffer, start, max, ret_ptr, ret_size): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let state = (host.view)(caller.data_mut()).state;
                let bytes: Vec<u8> = match buffer {
                    PLUGIN_CONFIGURATION => state
                        .settings
                        .as_ref()
                        .map(|s| s.plugin_config.as_bytes().to_vec())
                        .unwrap_or_default(),
                    VM_CONFIGURATION => Vec::new(),
                    REQUEST_BODY => state.request.body.clone(),
                    CALL_RESPONSE_BODY => match &state.delivering {
                        Some(response) => response.body.clone(),
                        None => return Ok(NOT_FOUND),
                    },
                    _ => return Ok(NOT_FOUND),
                };
                // Sizes are wasm32 `usize`: `usize::MAX` (all of it) is -1 here.
                let (start, max) = (start as u32 as usize, max as u32 as usize);
                let start = start.min(bytes.len());
                let end = start.saturating_add(max).min(bytes.len());
                hand_back(&mut caller, &bytes[start..end], ret_ptr, ret_size).await?;
                Ok(OK)
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "proxy_get_header_map_pairs",
        move |mut caller: Caller<'_, T>, (map_type, ret_ptr, ret_size): (i32, i32, i32)| {
            Box::new(async move {
                let Some(pairs) = header_map((host.view)(caller.data_mut()).state, map_type) else {
                    return Ok(NOT_FOUND);
                };
                hand_back(&mut caller, &map::encode(&pairs), ret_ptr, ret_size).await?;
                Ok(OK)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_set_header_map_pairs",
        move |mut caller: Caller<'_, T>,
              map_type: i32,
              ptr: i32,
              len: i32|
              -> wasmtime::Result<i32> {
            let max = max_bytes(&mut caller, host);
            let bytes = read(&mut caller, ptr, len, max, "header map")?;
            let pairs = map::decode(&bytes).map_err(AbiViolation)?;
            let state = (host.view)(caller.data_mut()).state;
            let Some(map) = mutable_map(state, map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            *map = pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            Ok(OK)
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "proxy_get_header_map_value",
        move |mut caller: Caller<'_, T>,
              (map_type, key_ptr, key_len, ret_ptr, ret_size): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let max = max_bytes(&mut caller, host);
                let key = read_text(&mut caller, key_ptr, key_len, max, "header name")?;
                let Some(pairs) = header_map((host.view)(caller.data_mut()).state, map_type) else {
                    return Ok(NOT_FOUND);
                };
                let Some((_, value)) = pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(&key))
                else {
                    return Ok(NOT_FOUND);
                };
                hand_back(&mut caller, value.as_bytes(), ret_ptr, ret_size).await?;
                Ok(OK)
            })
        },
    )?;
    for (name, replace) in [
        ("proxy_replace_header_map_value", true),
        ("proxy_add_header_map_value", false),
    ] {
        linker.func_wrap(
            MODULE,
            name,
            move |mut caller: Caller<'_, T>,
                  map_type: i32,
                  key_ptr: i32,
                  key_len: i32,
                  value_ptr: i32,
                  value_len: i32|
                  -> wasmtime::Result<i32> {
                let max = max_bytes(&mut caller, host);
                let key = read_text(&mut caller, key_ptr, key_len, max, "header name")?
                    .to_ascii_lowercase();
                let value = read_text(&mut caller, value_ptr, value_len, max, "header value")?;
                let state = (host.view)(caller.data_mut()).state;
                let Some(map) = mutable_map(state, map_type) else {
                    return Ok(BAD_ARGUMENT);
                };
                match map.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, old)) if replace => *old = value,
                    // Added to an existing header: one value, joined as HTTP does.
                    Some((_, old)) => *old = format!("{old}, {value}"),
                    None => map.push((key, value)),
                }
                if map.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > max {
                    return Err(AbiViolation(format!(
                        "request headers grew past max_output_bytes = {max}"
                    ))
                    .into());
                }
                Ok(OK)
            },
        )?;
    }
    linker.func_wrap(
        MODULE,
        "proxy_remove_header_map_value",
        move |mut caller: Caller<'_, T>,
              map_type: i32,
              key_ptr: i32,
              key_len: i32|
              -> wasmtime::Result<i32> {
            let max = max_bytes(&mut caller, host);
            let key = read_text(&mut caller, key_ptr, key_len, max, "header name")?;
            let state = (host.view)(caller.data_mut()).state;
            let Some(map) = mutable_map(state, map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            map.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
            Ok(OK)
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "proxy_get_property",
        move |mut caller: Caller<'_, T>,
              (path_ptr, path_len, ret_ptr, ret_size): (i32, i32, i32, i32)| {
            Box::new(async move {
                let max = max_bytes(&mut caller, host);
                let path = map::path(&read(
                    &mut caller,
                    path_ptr,
                    path_len,
                    max,
                    "property path",
                )?);
                let Some(value) = property((host.view)(caller.data_mut()).state, &path) else {
                    return Ok(NOT_FOUND);
                };
                hand_back(&mut caller, &value, ret_ptr, ret_size).await?;
                Ok(OK)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_set_property",
        move |mut caller: Caller<'_, T>,
              path_ptr: i32,
              path_len: i32,
              value_ptr: i32,
              value_len: i32|
              -> wasmtime::Result<i32> {
            let max = max_bytes(&mut caller, host);
            let path = map::path(&read(
                &mut caller,
                path_ptr,
                path_len,
                max,
                "property path",
            )?);
            let value = read(&mut caller, value_ptr, value_len, max, "property value")?;
            let state = (host.view)(caller.data_mut()).state;
            if state.properties.len() >= MAX_SHARED && !state.properties.contains_key(&path) {
                return Ok(INTERNAL_FAILURE);
            }
            state.properties.insert(path, value);
            Ok(OK)
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "proxy_get_shared_data",
        move |mut caller: Caller<'_, T>,
              (key_ptr, key_len, ret_ptr, ret_size, ret_cas): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let max = max_bytes(&mut caller, host);
                let key = read_text(&mut caller, key_ptr, key_len, max, "shared data key")?;
                let Some((value, cas)) = (host.view)(caller.data_mut())
                    .state
                    .shared
                    .get(&key)
                    .cloned()
                else {
                    return Ok(NOT_FOUND);
                };
                hand_back(&mut caller, &value, ret_ptr, ret_size).await?;
                memory::write_guest(&mut caller, ret_cas, &cas.to_le_bytes())?;
                Ok(OK)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_set_shared_data",
        move |mut caller: Caller<'_, T>,
              key_ptr: i32,
              key_len: i32,
              value_ptr: i32,
              value_len: i32,
              cas: i32|
              -> wasmtime::Result<i32> {
            const CAS_MISMATCH: i32 = 8;
            let max = max_bytes(&mut caller, host);
            let key = read_text(&mut caller, key_ptr, key_len, max, "shared data key")?;
            let value = read(&mut caller, value_ptr, value_len, max, "shared data value")?;
            let state = (host.view)(caller.data_mut()).state;
            let current = state.shared.get(&key).map(|(_, c)| *c);
            if cas != 0 && current.is_some_and(|c| c != cas as u32) {
                return Ok(CAS_MISMATCH);
            }
            if current.is_none() && state.shared.len() >= MAX_SHARED {
                return Ok(INTERNAL_FAILURE);
            }
            let next = current.unwrap_or(0).wrapping_add(1).max(1);
            state.shared.insert(key, (value, next));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_continue_stream",
        move |mut caller: Caller<'_, T>, stream: i32| -> i32 {
            if stream != HTTP_REQUEST {
                return BAD_ARGUMENT;
            }
            (host.view)(caller.data_mut()).state.resumed = true;
            OK
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_continue_request",
        move |mut caller: Caller<'_, T>| -> i32 {
            (host.view)(caller.data_mut()).state.resumed = true;
            OK
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_close_stream",
        move |mut caller: Caller<'_, T>, stream: i32| -> i32 {
            if stream != HTTP_REQUEST {
                return BAD_ARGUMENT;
            }
            let state = (host.view)(caller.data_mut()).state;
            state.local.get_or_insert(LocalResponse {
                status: CLOSED_STATUS,
                details: "the filter closed the request stream".into(),
                headers: Vec::new(),
                body: Vec::new(),
            });
            OK
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_send_local_response",
        move |mut caller: Caller<'_, T>,
              status: i32,
              details_ptr: i32,
              details_len: i32,
              body_ptr: i32,
              body_len: i32,
              headers_ptr: i32,
              headers_len: i32,
              _grpc_status: i32|
              -> wasmtime::Result<i32> {
            let max = max_bytes(&mut caller, host);
            let details = read_text(
                &mut caller,
                details_ptr,
                details_len,
                max,
                "local response details",
            )?;
            let body = read(&mut caller, body_ptr, body_len, max, "local response body")?;
            let bytes = read(
                &mut caller,
                headers_ptr,
                headers_len,
                max,
                "local response headers",
            )?;
            let headers = map::decode(&bytes)
                .map_err(|e| AbiViolation(format!("local response headers: {e}")))?;
            let status = u32::try_from(status)
                .ok()
                .filter(|s| (100..=599).contains(s))
                .ok_or_else(|| {
                    AbiViolation(format!(
                        "send_local_response with status {status}, not an HTTP status"
                    ))
                })?;
            (host.view)(caller.data_mut()).state.local = Some(LocalResponse {
                status,
                details,
                headers,
                body,
            });
            Ok(OK)
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "proxy_http_call",
        move |mut caller: Caller<'_, T>,
              (up_ptr, up_len, h_ptr, h_len, b_ptr, b_len, _t_ptr, _t_len, _timeout, ret_token): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
        )| {
            Box::new(async move {
                let max = max_bytes(&mut caller, host);
                let upstream = read_text(&mut caller, up_ptr, up_len, max, "dispatch_http_call upstream")?;
                let raw_headers = read(&mut caller, h_ptr, h_len, max, "dispatch_http_call headers")?;
                let headers = map::decode(&raw_headers)
                    .map_err(|e| AbiViolation(format!("dispatch_http_call headers: {e}")))?;
                let body = read(&mut caller, b_ptr, b_len, max, "dispatch_http_call body")?;
                let state = (host.view)(caller.data_mut()).state;
                let base = state.settings.as_ref().and_then(|s| s.clusters.get(&upstream).cloned());
                let Some(base) = base else {
                    tracing::warn!(cluster = %crate::telemetry::log::Escaped(&upstream), "dispatch_http_call to a cluster not in [policy.proxy_wasm.clusters]");
                    return Ok(BAD_ARGUMENT);
                };
                let document = request_document(&base, &headers, &body);
                let sent = bridge::send(caller.data_mut(), host.egress, &document).await;
                let response = match sent {
                    Ok(document) => response_of(&document).map_err(wasmtime::Error::msg)?,
                    Err(bridge::TIMEOUT | bridge::CONNECTION_ERROR | bridge::RESPONSE_TOO_LARGE) => {
                        // As Envoy does: the call is made, its response is empty.
                        CallResponse::default()
                    }
                    // Refused before it was sent (egress, budget, request).
                    Err(_) => return Ok(INTERNAL_FAILURE),
                };
                let state = (host.view)(caller.data_mut()).state;
                let token = state.next_token;
                state.next_token = state.next_token.wrapping_add(1);
                state.responses.push((token, response));
                memory::write_guest(&mut caller, ret_token, &token.to_le_bytes())?;
                Ok(OK)
            })
        },
    )?;
    add_metrics(linker, host)
}

/// Per-decision metrics: a filter may define, increment, record and read
/// them; they live as long as the decision's instance.
fn add_metrics<T: Send + 'static>(linker: &mut Linker<T>, host: Host<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "proxy_define_metric",
        move |mut caller: Caller<'_, T>,
              _kind: i32,
              name_ptr: i32,
              name_len: i32,
              ret: i32|
              -> wasmtime::Result<i32> {
            let max = max_bytes(&mut caller, host);
            let name = read_text(&mut caller, name_ptr, name_len, max, "metric name")?;
            let metrics = &mut (host.view)(caller.data_mut()).state.metrics;
            let id = match metrics.iter().position(|(n, _)| *n == name) {
                Some(id) => id,
                None if metrics.len() >= MAX_METRICS => return Ok(INTERNAL_FAILURE),
                None => {
                    metrics.push((name, 0));
                    metrics.len() - 1
                }
            };
            memory::write_guest(&mut caller, ret, &(id as u32).to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_increment_metric",
        move |mut caller: Caller<'_, T>, id: i32, offset: i64| -> i32 {
            let state = &mut (host.view)(caller.data_mut()).state;
            state.metric(id).map_or(NOT_FOUND, |value| {
                *value = value.saturating_add(offset);
                OK
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_record_metric",
        move |mut caller: Caller<'_, T>, id: i32, value: i64| -> i32 {
            let state = &mut (host.view)(caller.data_mut()).state;
            state.metric(id).map_or(NOT_FOUND, |slot| {
                *slot = value;
                OK
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proxy_get_metric",
        move |mut caller: Caller<'_, T>, id: i32, ret: i32| -> wasmtime::Result<i32> {
            let Some(value) = (host.view)(caller.data_mut()).state.metric(id).copied() else {
                return Ok(NOT_FOUND);
            };
            memory::write_guest(&mut caller, ret, &value.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    Ok(())
}

/// The properties filters commonly read, from the decision's request.
fn property(state: &FilterState, path: &[String]) -> Option<Vec<u8>> {
    if let Some(value) = state.properties.get(path) {
        return Some(value.clone());
    }
    let request = &state.request;
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    let text = match segments.as_slice() {
        ["request", "path"] => request.path.clone(),
        ["request", "url_path"] => request.path.split('?').next().unwrap_or("").to_owned(),
        ["request", "query"] => request
            .path
            .split_once('?')
            .map(|(_, q)| q.to_owned())
            .unwrap_or_default(),
        ["request", "method"] => request.method.clone(),
        ["request", "host"] => request.host.clone(),
        ["request", "scheme"] => request.scheme.clone(),
        ["request", "id"] => state.decision_id.clone(),
        ["request", "headers", name] => request
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())?,
        ["source", "address"] => request.source.clone()?,
        ["plugin_name"] => state.plugin_name.clone(),
        ["plugin_root_id"] | ["plugin_vm_id"] => String::new(),
        _ => return None,
    };
    Some(text.into_bytes())
}

/// The HttpRequest document of a dispatched call: `:method` and `:path`
/// against the cluster's base URL, the other headers as they are.
fn request_document(base: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let pseudo = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let method = pseudo(":method").unwrap_or("GET");
    let path = pseudo(":path").unwrap_or("/");
    let url = if path.starts_with('/') {
        format!("{base}{path}")
    } else {
        format!("{base}/{path}")
    };
    let plain: Vec<[&str; 2]> = headers
        .iter()
        .filter(|(k, _)| !k.starts_with(':') && !k.eq_ignore_ascii_case("content-length"))
        .map(|(k, v)| [k.as_str(), v.as_str()])
        .collect();
    let mut document = json!({"method": method, "url": url, "headers": plain});
    if !body.is_empty() {
        document["body"] = json!(base64::engine::general_purpose::STANDARD.encode(body));
    }
    serde_json::to_vec(&document).unwrap_or_default()
}

#[derive(Deserialize)]
struct BridgeResponse {
    status: u16,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: String,
}

/// The filter's view of a bridged response: `:status` and the headers, the
/// body. The bridge wrote the document, so a failure here is the host's
/// (`internal`), never the filter's.
fn response_of(document: &[u8]) -> anyhow::Result<CallResponse> {
    let response: BridgeResponse = serde_json::from_slice(document)
        .map_err(|e| anyhow::anyhow!("the bridge's response document is not readable: {e}"))?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(response.body)
        .map_err(|e| anyhow::anyhow!("the bridge's response body is not base64: {e}"))?;
    let mut headers = vec![(":status".to_owned(), response.status.to_string())];
    headers.extend(
        response
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v)),
    );
    Ok(CallResponse { headers, body })
}
