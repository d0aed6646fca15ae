//! A proxy-wasm filter, written as for Envoy, run as a sandgate policy: the
//! API key in a header (named by `plugin_config`) must be one of the
//! configured keys. A missing or unknown key is answered 401 with
//! `www-authenticate`; a known one continues with `x-user` set to its owner.
//!
//! `plugin_config`: `{"header": "x-api-key", "keys": {"<key>": "<user>"}}`.

use std::collections::BTreeMap;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Clone, Default, Deserialize)]
struct Config {
    header: String,
    keys: BTreeMap<String, String>,
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
        let Some(bytes) = self.get_plugin_configuration() else {
            proxy_wasm::hostcalls::log(LogLevel::Error, "no plugin configuration").ok();
            return false;
        };
        match serde_json::from_slice(&bytes) {
            Ok(config) => {
                self.config = config;
                true
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(
                    LogLevel::Error,
                    &format!("bad plugin configuration: {e}"),
                )
                .ok();
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ApiKey {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ApiKey {
    config: Config,
}

impl Context for ApiKey {}

impl HttpContext for ApiKey {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let user = self
            .get_http_request_header(&self.config.header)
            .and_then(|key| self.config.keys.get(&key).cloned());
        match user {
            Some(user) => {
                self.set_http_request_header("x-user", Some(&user));
                Action::Continue
            }
            None => {
                let path = self.get_http_request_header(":path").unwrap_or_default();
                proxy_wasm::hostcalls::log(
                    LogLevel::Info,
                    &format!("refused {path}: no valid API key"),
                )
                .ok();
                self.send_http_response(
                    401,
                    vec![("www-authenticate", "ApiKey realm=\"sandgate\"")],
                    Some(b"missing or unknown API key"),
                );
                Action::Pause
            }
        }
    }
}
