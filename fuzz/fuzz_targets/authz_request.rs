//! Forward-auth (`/v1/authz/{name}`): a request head, as a proxy sends it,
//! becomes the guest's input document. The input is the head in text form:
//! `METHOD TARGET` on the first line, then `name: value` lines (values may
//! hold any bytes a header value can). The first byte picks the trusted
//! header convention (`server.forward_auth_headers`).
#![no_main]

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use sandgate::config::ForwardAuthHeaders;
use serde_json::Value;

const AUTHZ_PREFIX: &str = "/v1/authz/";

fuzz_target!(|data: &[u8]| {
    let Some((&convention, data)) = data.split_first() else {
        return;
    };
    let trusted = match convention % 3 {
        0 => ForwardAuthHeaders::Any,
        1 => ForwardAuthHeaders::XOriginal,
        _ => ForwardAuthHeaders::XForwarded,
    };
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(first) = lines.next() else {
        return;
    };
    let Some((method, target)) = first
        .iter()
        .position(|&b| b == b' ')
        .map(|i| (&first[..i], &first[i + 1..]))
    else {
        return;
    };
    // What hyper accepts before the handler runs.
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(target)) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    // The handler's own split of `/v1/authz/{name}[/…]`.
    let rest = uri.path().strip_prefix(AUTHZ_PREFIX).unwrap_or_default();
    let own_path = rest.find('/').map_or("/", |i| &rest[i..]);
    let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
    let input = sandgate::server::forward_auth_input(
        method.as_str(),
        own_path,
        uri.query().unwrap_or_default(),
        &headers,
        Some(peer),
        trusted,
    );
    // A refusal (the two conventions disagree under `any`) is an answer.
    if let Ok(input) = input {
        check_document(&input);
    }
});

/// The input is `{"request": {…}}` with an upper-case method and lower-case
/// header names whose values are strings.
fn check_document(input: &[u8]) {
    let document: Value = serde_json::from_slice(input).expect("the input is JSON");
    let request = &document["request"];
    let method = request["method"].as_str().expect("a method");
    assert!(
        !method.bytes().any(|b| b.is_ascii_lowercase()),
        "method {method}"
    );
    assert!(request["path"].is_string() && request["query"].is_string());
    assert!(request["host"].is_string());
    let headers = request["headers"].as_object().expect("a header object");
    for (name, value) in headers {
        assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "header {name}"
        );
        assert!(value.is_string(), "header {name}");
    }
}
