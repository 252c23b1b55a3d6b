# syntax=docker/dockerfile:1
# The llmroute operator image: a Rust build stage, then the binary alone on a distroless base with
# glibc and CA certificates (gcr.io/distroless/cc: the binary links glibc dynamically; providers'
# TLS certificates are verified against /etc/ssl/certs). Not built in this repository's CI.
#
#   docker build -t ghcr.io/llmroute/llmroute:0.1.0 .
#   docker run --rm ghcr.io/llmroute/llmroute:0.1.0 --help

# Rust >= Cargo.toml's rust-version (tests/deploy.rs checks it).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# benches/ only because Cargo.toml names its targets.
COPY benches ./benches
COPY src ./src
# The other workspace members: cargo loads every member's manifest (the devkit's simulators are
# only dev-dependencies; sse-usage is the gateway's Envoy module, built below).
COPY devkit ./devkit
COPY sse-usage ./sse-usage
# Cache mounts keep the crates and the target directory between builds (BuildKit), so a change to the
# sources alone neither refetches nor rebuilds the dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin llmroute -p llmroute-sse-usage \
 && install -D -m 0755 target/release/llmroute /out/llmroute \
 && install -D -m 0755 target/release/libllmroute_sse_usage.so /out/libllmroute_sse_usage.so

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/llmroute /usr/local/bin/llmroute
# llmroute's Envoy module reading streamed answers' usage: the gateway Pod's init container
# (`llmroute gateway install-modules`) copies it into a volume Envoy's container mounts.
COPY --from=build /out/libllmroute_sse_usage.so /usr/local/lib/llmroute/libllmroute_sse_usage.so
# /metrics, /healthz, /readyz (llmroute run --http-addr, default 0.0.0.0:9090).
EXPOSE 9090
# The distroless "nonroot" user, by number: Kubernetes' runAsNonRoot can only verify a numeric USER.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/llmroute"]
CMD ["run"]
