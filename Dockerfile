# syntax=docker/dockerfile:1
# Breakwater image: breakwater-operator (the entrypoint) and breakwater-agent (the per-pod
# sidecar, started with `--entrypoint /usr/local/bin/breakwater-agent` / `command:`).
#   docker build -t ghcr.io/breakwater-dev/breakwater:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src

# 1. Dependencies. Only the manifests and the lock file reach this layer, so the download
#    is cached until they change. Cargo needs a target in each member to read the
#    workspace: empty stubs stand in and are removed before the real sources arrive.
#    (A new workspace member needs its Cargo.toml copied here too.)
COPY Cargo.toml Cargo.lock ./
COPY crds/Cargo.toml crds/
COPY operator/Cargo.toml operator/
COPY policy-agent/Cargo.toml policy-agent/
COPY tests/Cargo.toml tests/
RUN for member in crds operator policy-agent tests; do \
        mkdir -p "$member/src" && touch "$member/src/lib.rs"; \
    done \
 && cargo fetch --locked \
 && rm -rf crds/src operator/src policy-agent/src tests/src

# 2. Build. The target directory is a BuildKit cache, so a source change recompiles only
#    the workspace crates; the binaries are copied out of it in the same step.
COPY . .
RUN --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p breakwater-operator -p breakwater-agent \
 && install -m 0755 target/release/breakwater-operator target/release/breakwater-agent /usr/local/bin/

# 3. Runtime: glibc + libgcc only, no shell, no package manager, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="breakwater" \
      org.opencontainers.image.description="Breakwater resilience operator and policy agent" \
      org.opencontainers.image.source="https://github.com/breakwater-dev/breakwater" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /usr/local/bin/breakwater-operator /usr/local/bin/breakwater-operator
COPY --from=builder /usr/local/bin/breakwater-agent /usr/local/bin/breakwater-agent
USER 65532:65532
# 8080: metrics and health probes.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/breakwater-operator"]
