//! Envoy ext_authz over gRPC: a CheckRequest's protobuf bytes decode to the
//! guest's input document or to a decode error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(input)) = sandgate::server::check_request_input(data) else {
        return;
    };
    let document: Value = serde_json::from_slice(&input).expect("the input is JSON");
    let request = &document["request"];
    let method = request["method"].as_str().expect("a method");
    assert!(
        !method.bytes().any(|b| b.is_ascii_lowercase()),
        "method {method}"
    );
    let headers = request["headers"].as_object().expect("a header object");
    for (name, value) in headers {
        assert!(
            !name.starts_with(':'),
            "pseudo-header {name} passed through"
        );
        assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "header {name}"
        );
        assert!(value.is_string(), "header {name}");
    }
});
