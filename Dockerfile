# syntax=docker/dockerfile:1
#
# portcullis container image.
#
#   docker build -t portcullis:dev .
#   docker run --rm -p 9191:9191 -p 9192:9192 \
#     -v "$PWD/deploy/compose:/etc/portcullis:ro" -e PORTCULLIS_STORE_KEY=... portcullis:dev
#
# Build: a Debian bookworm Rust image. bookworm on purpose: the runtime is distroless cc-debian12 (bookworm),
# and a binary linked against a newer glibc (trixie) would not start there. No protoc (protox compiles the
# protos in build.rs) and no OpenSSL (rustls/ring) are needed, only the C compiler the slim image ships.
#
# Dependency caching: cargo-chef turns Cargo.toml/Cargo.lock into a recipe and builds the dependencies in
# their own layer, which is reused until the manifests change. (A hand-made stub `src/main.rs` layer breaks
# as soon as Cargo.toml declares explicit targets such as [[bench]], and can ship the stub binary when the
# real sources have older mtimes; cargo-chef handles both.)

ARG RUST_VERSION=1.95.0
ARG CARGO_CHEF_VERSION=0.1.78

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
ARG CARGO_CHEF_VERSION
WORKDIR /build
# The toolchain (and components) pinned by rust-toolchain.toml, installed once for both stages below.
COPY rust-toolchain.toml ./
RUN rustup toolchain install \
 && cargo install --locked cargo-chef --version "${CARGO_CHEF_VERSION}" \
 && rm -rf "${CARGO_HOME}/registry"

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# Dependencies only: this layer changes when Cargo.toml, Cargo.lock or rust-toolchain.toml change.
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin portcullis
# The application itself.
COPY . .
RUN cargo build --release --locked --bin portcullis \
 && install -D -m 0755 target/release/portcullis /out/usr/local/bin/portcullis \
 && mkdir -p /out/var/lib/portcullis /out/etc/portcullis

# Runtime: glibc + libgcc + CA certificates, no shell, no package manager; user `nonroot` (65532).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="External authorization service for Envoy ext_authz v3, modelled on API Management gateway security" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/usr/local/bin/portcullis /usr/local/bin/portcullis
# Default location of the credential store (store.path), owned by the runtime user so a fresh volume
# mounted here is writable. The config directory stays root-owned and read-only.
COPY --from=builder --chown=65532:65532 /out/var/lib/portcullis /var/lib/portcullis
COPY --from=builder /out/etc/portcullis /etc/portcullis
USER 65532:65532
WORKDIR /var/lib/portcullis
# 9191: gRPC (ext_authz v3 Check, grpc.health.v1, reflection). 9192: HTTP (/healthz, /readyz, /metrics,
# forward-auth under /authz/). The config must listen on 0.0.0.0 to be reachable from outside the container.
EXPOSE 9191 9192
ENTRYPOINT ["portcullis"]
CMD ["serve", "--config", "/etc/portcullis/portcullis.yaml"]
