# syntax=docker/dockerfile:1
# Breakwater images. The default (last) stage: breakwater-operator (the entrypoint),
# breakwater-agent (the per-pod sidecar, started with
# `--entrypoint /usr/local/bin/breakwater-agent` / `command:`) and breakwater-relay (the
# outbox relay, which the operator runs as a Deployment per OutboxRelay with `command:`).
#   docker build -t ghcr.io/breakwater-dev/breakwater:0.1.0 .
# Stage `capture`: breakwater-capture and iptables, the init container that installs the
# pod's traffic capture (docs/capture.md).
#   docker build --target capture -t ghcr.io/breakwater-dev/breakwater-capture:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The whole workspace (what .dockerignore leaves; tests/tests/docker_context.rs checks that it
# is a complete workspace), so no list of members is kept here. BuildKit caches hold the
# registry and the target directory between builds: a source change recompiles only the
# workspace crates. The binaries (the agent's package builds breakwater-agent and
# breakwater-capture) are copied out of the cache in the same step.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p breakwater-operator -p breakwater-agent -p breakwater-relay \
 && install -m 0755 target/release/breakwater-operator target/release/breakwater-agent \
      target/release/breakwater-capture target/release/breakwater-relay /usr/local/bin/

# The capture init container. Distroless has no iptables and no way to add it, so Debian
# slim (the builder's release, so its glibc fits the binary) with the iptables package and
# its libraries, nothing recommended; Debian's iptables is the nft backend. No USER: the
# injector runs it as root with NET_ADMIN and NET_RAW; it installs the rules and exits.
FROM debian:bookworm-slim AS capture
LABEL org.opencontainers.image.title="breakwater-capture" \
      org.opencontainers.image.description="Breakwater's pod traffic capture (iptables init container)" \
      org.opencontainers.image.source="https://github.com/breakwater-dev/breakwater" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /usr/local/bin/breakwater-capture /usr/local/bin/breakwater-capture
ENTRYPOINT ["/usr/local/bin/breakwater-capture"]

# The default image. Runtime: glibc + libgcc only, no shell, no package manager, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="breakwater" \
      org.opencontainers.image.description="Breakwater resilience operator, policy agent and outbox relay" \
      org.opencontainers.image.source="https://github.com/breakwater-dev/breakwater" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /usr/local/bin/breakwater-operator /usr/local/bin/breakwater-operator
COPY --from=builder /usr/local/bin/breakwater-agent /usr/local/bin/breakwater-agent
COPY --from=builder /usr/local/bin/breakwater-relay /usr/local/bin/breakwater-relay
USER 65532:65532
# 8080: metrics and health probes.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/breakwater-operator"]
