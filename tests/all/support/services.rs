//! Small HTTP services a guest's bridged calls reach in the tests, served by
//! axum on a loopback port of their own for as long as the test's runtime
//! lives.

use std::net::SocketAddr;

/// Serves `app` on a free loopback port; returns its address.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// An external decision service answering every `POST /decide` with
/// `{"allow":true}`; returns the URL a policy's bridged call names.
pub async fn decide_service() -> String {
    let app = axum::Router::new().route(
        "/decide",
        axum::routing::post(|| async {
            ([("content-type", "application/json")], r#"{"allow":true}"#)
        }),
    );
    format!("http://{}/decide", serve(app).await)
}
