# syntax=docker/dockerfile:1
#
# The sandgate daemon and the example policies in one small image.
#
#   docker build -t sandgate:0.1.0 .
#   docker run --rm -p 8181:8181 -p 9191:9191 sandgate:0.1.0
#
# Layout of the image (the manifests in deploy/ and their tests rely on it):
#   /usr/local/bin/sandgate              the daemon and CLI
#   /usr/share/sandgate/policies/*.wasm  the example guests (rbac, abac_owner, snoop,
#                                        introspect, remote_decision)
#   /usr/share/sandgate/data/rbac/       the rbac example's role table
#   /etc/sandgate/sandgate.toml          the default config (deploy/docker/sandgate.toml);
#                                        mount your own over it
#   /var/cache/sandgate                  compiled-module cache (SANDGATE_CACHE_DIR);
#                                        mount an emptyDir/volume here when the root
#                                        filesystem is read-only
# See docs/deploy.md.

ARG RUST_IMAGE=rust:1.95-slim-trixie
ARG RUNTIME_IMAGE=debian:trixie-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
RUN rustup target add wasm32-wasip1
COPY . .
# The cache mounts keep the registry and incremental artifacts between builds;
# the results are copied out of them in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p sandgate --bin sandgate \
 && cargo build --release --locked --target wasm32-wasip1 --target-dir target/guests \
      -p rbac -p abac-owner -p snoop -p introspect -p remote-decision \
 && mkdir -p /out/bin /out/policies \
 && cp target/release/sandgate /out/bin/ \
 && cp target/guests/wasm32-wasip1/release/rbac.wasm \
       target/guests/wasm32-wasip1/release/abac_owner.wasm \
       target/guests/wasm32-wasip1/release/snoop.wasm \
       target/guests/wasm32-wasip1/release/introspect.wasm \
       target/guests/wasm32-wasip1/release/remote_decision.wasm \
       /out/policies/

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: https:// module URLs, OTLP over https and bridged https calls.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 sandgate \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin sandgate \
 && install -d -o 65532 -g 65532 -m 0700 /var/cache/sandgate
COPY --from=build /out/bin/sandgate /usr/local/bin/sandgate
COPY --from=build /out/policies/ /usr/share/sandgate/policies/
COPY examples/rbac/data/ /usr/share/sandgate/data/rbac/
COPY deploy/docker/sandgate.toml /etc/sandgate/sandgate.toml
ENV SANDGATE_CACHE_DIR=/var/cache/sandgate \
    SANDGATE_LOG=info
USER 65532:65532
# 8181: HTTP API, forward-auth, /healthz, /readyz, /metrics. 9191: Envoy ext_authz gRPC.
EXPOSE 8181 9191
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sandgate", "serve", "--config", "/etc/sandgate/sandgate.toml"]
