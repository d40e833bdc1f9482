# syntax=docker/dockerfile:1
# Breakwater image: breakwater-operator (the entrypoint) and breakwater-agent (the per-pod
# sidecar, started with `--entrypoint /usr/local/bin/breakwater-agent` / `command:`).
#   docker build -t ghcr.io/breakwater-dev/breakwater:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The whole workspace (what .dockerignore leaves; tests/tests/docker_context.rs checks that it
# is a complete workspace), so no list of members is kept here. BuildKit caches hold the
# registry and the target directory between builds: a source change recompiles only the
# workspace crates. The binaries are copied out of the cache in the same step.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p breakwater-operator -p breakwater-agent \
 && install -m 0755 target/release/breakwater-operator target/release/breakwater-agent /usr/local/bin/

# Runtime: glibc + libgcc only, no shell, no package manager, non-root.
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
