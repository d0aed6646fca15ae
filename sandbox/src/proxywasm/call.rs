//! How the host drives a filter (DESIGN §2b): at load, the root context,
//! `on_vm_start` and `on_configure` with the plugin configuration (then the
//! policy's snapshot holds the configured filter); per decision, a fresh
//! instance gets an HTTP context fed the request's headers (and body), and
//! its answer becomes the decision: Continue → allow with the headers it
//! added or replaced, `send_local_response` → deny with its status, headers
//! and body. Dispatched calls are answered through `on_http_call_response`.

use std::collections::BTreeMap;

use wasmtime::{AsContextMut, Instance, Trap};

use super::{FilterState, HTTP_CONTEXT, LocalResponse, ROOT_CONTEXT};
use crate::abi::memory::AbiViolation;
use crate::decision::Decision;
use crate::wasi::WasiDenied;

/// `Action::Continue`.
const CONTINUE: i32 = 0;

/// Runs the root context's start and configuration. `Ok(Err(why))` when the
/// filter refused its configuration (`on_vm_start`/`on_configure` false).
pub async fn configure<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
    get: fn(&mut T) -> &mut FilterState,
) -> anyhow::Result<Result<(), String>> {
    let create =
        instance.get_typed_func::<(i32, i32), ()>(&mut store, "proxy_on_context_create")?;
    create.call_async(&mut store, (ROOT_CONTEXT, 0)).await?;
    if let Ok(start) = instance.get_typed_func::<(i32, i32), i32>(&mut store, "proxy_on_vm_start")
        && start.call_async(&mut store, (ROOT_CONTEXT, 0)).await? == 0
    {
        return Ok(Err("the filter's on_vm_start returned false".into()));
    }
    if let Ok(configure) =
        instance.get_typed_func::<(i32, i32), i32>(&mut store, "proxy_on_configure")
    {
        let mut context = store.as_context_mut();
        let size = get(context.data_mut())
            .settings
            .as_ref()
            .map_or(0, |s| s.plugin_config.len()) as i32;
        if configure
            .call_async(&mut store, (ROOT_CONTEXT, size))
            .await?
            == 0
        {
            return Ok(Err(
                "the filter's on_configure returned false: it refused plugin_config".into(),
            ));
        }
    }
    Ok(Ok(()))
}

/// One decision in a fresh instance of the configured filter: the request
/// already fed into the store's [`FilterState`].
pub async fn decide<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
    get: fn(&mut T) -> &mut FilterState,
) -> anyhow::Result<Decision> {
    let result = run(&mut store, instance, get).await;
    // A refused host call the filter could not take (the SDK panics on an
    // unexpected status) is the cause of the trap that follows it.
    match result {
        Err(e) if e.downcast_ref::<Trap>().is_some() => {
            match get(store.as_context_mut().data_mut()).refused.first() {
                Some(call) => Err(WasiDenied {
                    call,
                    detail: format!("the filter stopped after the refusal: {e:#}"),
                }
                .into()),
                None => Err(e),
            }
        }
        other => other,
    }
}

async fn run<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
    get: fn(&mut T) -> &mut FilterState,
) -> anyhow::Result<Decision> {
    let create =
        instance.get_typed_func::<(i32, i32), ()>(&mut store, "proxy_on_context_create")?;
    create
        .call_async(&mut store, (HTTP_CONTEXT, ROOT_CONTEXT))
        .await?;
    let (headers, body) = {
        let mut context = store.as_context_mut();
        let filter = get(context.data_mut());
        (
            filter.headers.len() as i32,
            filter.request.body.len() as i32,
        )
    };
    let on_headers =
        instance.get_typed_func::<(i32, i32, i32), i32>(&mut store, "proxy_on_request_headers")?;
    let action = on_headers
        .call_async(&mut store, (HTTP_CONTEXT, headers, i32::from(body == 0)))
        .await?;
    if let Some(local) = settle(&mut store, instance, get, action, "on_request_headers").await? {
        return Ok(denied(local));
    }
    let on_body = instance
        .get_typed_func::<(i32, i32, i32), i32>(&mut store, "proxy_on_request_body")
        .ok()
        .filter(|_| body > 0);
    if let Some(on_body) = on_body {
        get(store.as_context_mut().data_mut()).resumed = false;
        let action = on_body
            .call_async(&mut store, (HTTP_CONTEXT, body, 1))
            .await?;
        if let Some(local) = settle(&mut store, instance, get, action, "on_request_body").await? {
            return Ok(denied(local));
        }
    }
    let headers = get(store.as_context_mut().data_mut()).changed_headers();
    Ok(Decision {
        allow: true,
        reason: None,
        status: None,
        headers,
        extra: Default::default(),
        error: None,
    })
}

/// Carries a callback's answer to its end: the local response if the filter
/// sent one, else `None` once it continued. A paused filter is handed the
/// responses of its dispatched calls, one `on_http_call_response` each; a
/// filter paused with nothing pending can never be resumed here.
async fn settle<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
    get: fn(&mut T) -> &mut FilterState,
    mut action: i32,
    callback: &str,
) -> anyhow::Result<Option<LocalResponse>> {
    loop {
        let mut context = store.as_context_mut();
        let filter = get(context.data_mut());
        if let Some(local) = filter.local.take() {
            return Ok(Some(local));
        }
        if action == CONTINUE || filter.resumed {
            return Ok(None);
        }
        if filter.responses.is_empty() {
            return Err(AbiViolation(format!(
                "the filter paused the request in {callback} with no dispatched call pending: nothing can resume it"
            ))
            .into());
        }
        let (token, response) = filter.responses.remove(0);
        let (headers, body) = (response.headers.len() as i32, response.body.len() as i32);
        filter.delivering = Some(response);
        let on_response = instance
            .get_typed_func::<(i32, i32, i32, i32, i32), ()>(
                &mut store,
                "proxy_on_http_call_response",
            )
            .map_err(|_| {
                AbiViolation(
                    "the filter dispatched a call but exports no proxy_on_http_call_response"
                        .into(),
                )
            })?;
        on_response
            .call_async(&mut store, (HTTP_CONTEXT, token as i32, headers, body, 0))
            .await?;
        get(store.as_context_mut().data_mut()).delivering = None;
        // Still paused unless the callback resumed the request.
        action = 1;
    }
}

/// The deny of a local response: its status, headers and body (the body is
/// the reason, as forward-auth and ext_authz send it back).
fn denied(local: LocalResponse) -> Decision {
    let reason = if local.body.is_empty() {
        (!local.details.is_empty()).then(|| local.details.clone())
    } else {
        Some(String::from_utf8_lossy(&local.body).into_owned())
    };
    let headers: BTreeMap<String, String> = local
        .headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    Decision {
        allow: false,
        reason,
        status: Some(local.status as u16),
        headers,
        extra: Default::default(),
        error: None,
    }
}
