//! Envoy ext_authz over gRPC as Envoy itself asks: `CheckRequest`s built
//! from Envoy's own messages and a client that sends them to the daemon's
//! gRPC port. Used by the server, deploy and hostile-input tests.

use std::collections::HashMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};

/// An ext_authz client connected to one daemon's gRPC port.
pub struct ExtAuthzClient(AuthorizationClient<tonic::transport::Channel>);

impl ExtAuthzClient {
    /// Connects to the ext_authz service at `grpc`.
    pub async fn connect(grpc: SocketAddr) -> ExtAuthzClient {
        let client = AuthorizationClient::connect(format!("http://{grpc}"))
            .await
            .unwrap_or_else(|e| panic!("connect to ext_authz at {grpc}: {e}"));
        ExtAuthzClient(client)
    }

    /// Sends `request` and returns the daemon's answer; a gRPC error fails the test.
    pub async fn check(&mut self, request: CheckRequest) -> CheckResponse {
        self.0
            .check(request)
            .await
            .unwrap_or_else(|status| panic!("ext_authz check failed: {status}"))
            .into_inner()
    }
}

/// A CheckRequest naming `policy` in its context extensions.
pub fn check_request(
    policy: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> CheckRequest {
    let context_extensions = policy
        .map(|p| HashMap::from([("policy".to_owned(), p.to_owned())]))
        .unwrap_or_default();
    envoy_check_request(context_extensions, method, path, headers)
}

/// A CheckRequest as Envoy sends it: the original request's HTTP attributes
/// (pseudo-headers included), a peer address and the route's context extensions.
pub fn envoy_check_request(
    context_extensions: HashMap<String, String>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> CheckRequest {
    let mut header_map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    header_map.insert(":authority".into(), "shop.example".into());
    header_map.insert(":path".into(), path.into());
    header_map.insert(":method".into(), method.into());
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.1.2.3".into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: "shop.example".into(),
                    headers: header_map,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions,
            ..Default::default()
        }),
    }
}

/// The headers of an ext_authz answer (OK or denied), by name.
pub fn response_headers(response: &CheckResponse) -> HashMap<String, String> {
    let headers = match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => &ok.headers,
        Some(HttpResponse::DeniedResponse(denied)) => &denied.headers,
        _ => return HashMap::new(),
    };
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}
