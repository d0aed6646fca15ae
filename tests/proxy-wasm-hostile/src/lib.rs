//! Hostile proxy-wasm filters for the tests, one module whose misbehaviour
//! `plugin_config` picks: `bad-pointer` (a header map pointer outside its
//! memory), `pause-forever` (pauses with no call pending), `huge-response`
//! (a local response body of 64 MiB), `refused-call` (calls a host function
//! sandgate refuses). Never a policy anyone should run. One well-behaved
//! mode, `body`, shows what a filter reads: the request body (403 when it
//! says `forbidden`) and the properties it answers with as headers.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    mode: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.mode = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Hostile {
            mode: self.mode.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Hostile {
    mode: String,
}

impl Context for Hostile {}

impl HttpContext for Hostile {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match self.mode.as_str() {
            "bad-pointer" => {
                // SAFETY: nothing is dereferenced in the guest; the host is
                // handed a pointer far outside this module's memory on purpose.
                unsafe {
                    proxy_send_local_response(
                        403,
                        std::ptr::null(),
                        0,
                        std::ptr::null(),
                        0,
                        0xfff0_0000 as *const u8,
                        4096,
                        -1,
                    );
                }
                Action::Continue
            }
            "pause-forever" => Action::Pause,
            "huge-response" => {
                let body = vec![b'x'; 64 << 20];
                self.send_http_response(403, vec![], Some(&body));
                Action::Pause
            }
            "refused-call" => {
                let _ = proxy_wasm::hostcalls::register_shared_queue("q");
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode != "body" || !end_of_stream {
            return Action::Continue;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if body.windows(9).any(|w| w == b"forbidden") {
            self.send_http_response(403, vec![("x-reason", "body")], Some(b"forbidden body"));
            return Action::Pause;
        }
        let property = |path: Vec<&str>| {
            self.get_property(path)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| "(none)".into())
        };
        let seen = [
            ("x-body-bytes", body.len().to_string()),
            ("x-path", property(vec!["request", "path"])),
            ("x-method", property(vec!["request", "method"])),
            ("x-plugin", property(vec!["plugin_name"])),
            ("x-source", property(vec!["source", "address"])),
        ];
        for (name, value) in seen {
            self.set_http_request_header(name, Some(&value));
        }
        Action::Continue
    }
}
