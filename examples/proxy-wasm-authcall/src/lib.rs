//! A proxy-wasm filter, written as for Envoy, run as a sandgate policy: it
//! asks an auth service through `dispatch_http_call` (the cluster and path
//! from `plugin_config`), passing the caller's `authorization` header. A 200
//! continues the request with the `x-user` the service named; anything else
//! is answered 403 with the service's body.
//!
//! `plugin_config`: `{"cluster": "authsvc", "path": "/check"}`.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Clone, Default, Deserialize)]
struct Config {
    cluster: String,
    path: String,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Config,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self
            .get_plugin_configuration()
            .map(|b| serde_json::from_slice(&b))
        {
            Some(Ok(config)) => {
                self.config = config;
                true
            }
            _ => false,
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AuthCall {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AuthCall {
    config: Config,
}

impl HttpContext for AuthCall {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let authorization = self
            .get_http_request_header("authorization")
            .unwrap_or_default();
        let original = self.get_http_request_header(":path").unwrap_or_default();
        let dispatched = self.dispatch_http_call(
            &self.config.cluster,
            vec![
                (":method", "GET"),
                (":path", &self.config.path),
                (":authority", &self.config.cluster),
                ("authorization", &authorization),
                ("x-original-uri", &original),
            ],
            None,
            vec![],
            Duration::from_secs(1),
        );
        match dispatched {
            Ok(_) => Action::Pause,
            Err(status) => {
                let body = format!("auth service unreachable: {status:?}");
                self.send_http_response(503, vec![], Some(body.as_bytes()));
                Action::Pause
            }
        }
    }
}

impl Context for AuthCall {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = self.get_http_call_response_header(":status");
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        if status.as_deref() == Some("200") {
            let user = self
                .get_http_call_response_header("x-user")
                .unwrap_or_default();
            self.set_http_request_header("x-user", Some(&user));
            self.resume_http_request();
        } else {
            let status = status.unwrap_or_else(|| "none".into());
            proxy_wasm::hostcalls::log(LogLevel::Info, &format!("auth service answered {status}"))
                .ok();
            self.send_http_response(403, vec![("x-auth-status", &status)], Some(&body));
        }
    }
}
