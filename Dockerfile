# syntax=docker/dockerfile:1
# walsweep container image.
#
#   docker build -t walsweep .
#   docker run --rm -v $PWD/my.toml:/etc/walsweep/walsweep.toml:ro \
#     -e WALSWEEP_SOURCE_URL=postgres://... -e WALSWEEP_REDIS_URL=redis://... -p 9187:9187 walsweep
#
# The image holds no configuration: mount one at /etc/walsweep/walsweep.toml. Its [metrics]
# listen must be "0.0.0.0:9187" (not the 127.0.0.1 default) for the port to be reachable from
# outside the container, as in config/compose.toml.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artifacts between builds (BuildKit); the binary is
# copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin walsweep \
    && install -m 0755 target/release/walsweep /usr/local/bin/walsweep

FROM debian:bookworm-slim
# ca-certificates: the platform trust store walsweep uses to verify Postgres and Redis TLS
# (sslmode=verify-* without sslrootcert, rediss://).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 walsweep \
    && useradd --system --uid 10001 --gid walsweep --no-create-home --shell /usr/sbin/nologin walsweep
COPY --from=build /usr/local/bin/walsweep /usr/local/bin/walsweep
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 9187
# No HEALTHCHECK: the slim image has no curl or wget, and walsweep has no probe subcommand.
# Orchestrators probe GET /healthz (liveness) and /readyz (readiness) on port 9187 themselves
# (deploy/kubernetes/walsweep-sidecar.yaml).
ENTRYPOINT ["walsweep"]
CMD ["run", "--config", "/etc/walsweep/walsweep.toml"]
