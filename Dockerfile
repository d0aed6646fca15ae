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
# The eBPF probes (ebpf-probes/, embedded in the binary) are built with
# nightly + rust-src and linked by bpf-linker against LLVM 22 (apt.llvm.org).
# Build with --build-arg EBPF_PROBES=off for an image without probes
# (AYA_BUILD_SKIP=1; the daemon then says so in /v1/probes).
ARG EBPF_PROBES=on
ARG BPF_LINKER_VERSION=0.13.0
RUN if [ "$EBPF_PROBES" = on ]; then \
      rustup toolchain install nightly --profile minimal --component rust-src \
   && apt-get update \
   && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
   && curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/llvm.gpg \
   && . /etc/os-release \
   && echo "deb [signed-by=/usr/share/keyrings/llvm.gpg] http://apt.llvm.org/$VERSION_CODENAME/ llvm-toolchain-$VERSION_CODENAME-22 main" \
        > /etc/apt/sources.list.d/llvm.list \
   && apt-get update \
   && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
   && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
   && rm -rf /var/lib/apt/lists/*; \
    fi
COPY . .
# The cache mounts keep the registry and incremental artifacts between builds;
# the results are copied out of them in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    if [ "$EBPF_PROBES" = off ]; then export AYA_BUILD_SKIP=1; fi \
 && cargo build --release --locked -p sandgate --bin sandgate \
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
