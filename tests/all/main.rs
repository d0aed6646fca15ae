//! End-to-end tests of sandgate: one integration binary, one module per
//! behaviour. They run the real `sandgate` binary or the library against
//! real guests (the `examples/`, built for wasm32-wasip1 by the test run)
//! and tiny inline WAT modules for hostile and edge cases.

mod support;

mod abi;
mod bridge;
mod bridge_examples;
mod cache;
mod cedar;
mod cli;
mod config;
mod connections;
mod deploy;
mod enforcement;
mod engine;
mod examples;
mod forward_auth;
mod hostile_guest;
mod hostile_input;
mod lifecycle;
mod nginx;
mod probes;
mod proxy_wasm;
mod rego;
mod seccomp;
mod server;
mod snapshot;
mod tracing;
mod wasi;
