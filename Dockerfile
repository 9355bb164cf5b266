# syntax=docker/dockerfile:1
#
# The Freshness hub image: freshness-hub as the entrypoint, freshctl beside it
# for `kubectl exec ... freshctl status`, and freshness-relay (the outbox
# relay; the Helm chart runs it with its own command). No protoc is needed: the protocol
# crate compiles proto/ with protox.
#
#   docker build -t freshness-hub .
#   docker run --rm -p 50051:50051 -p 9464:9464 freshness-hub --region eu
#
# Without arguments the hub listens on 0.0.0.0 (CMD below), where it refuses
# to start without TLS and an auth source (README, "Securing a hub"): give
# them, or --insecure on a network you trust. Arguments replace CMD, so pass
# --listen/--metrics-listen or a --config file that sets them (as the Helm
# chart does) when giving any.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# .git is not in the context: freshness_build_info{revision} comes from
# `docker build --build-arg FRESHNESS_REVISION=$(git rev-parse --short=12 HEAD)`.
ARG FRESHNESS_REVISION=unknown
ENV FRESHNESS_REVISION=${FRESHNESS_REVISION}
# The registry and target caches survive between builds (BuildKit); the
# binaries are copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p freshness-hub -p freshness-client -p freshness-agent -p freshness-relay \
    && mkdir -p /out /data/var/lib/freshness \
    && cp target/release/freshness-hub target/release/freshctl target/release/freshness-agent target/release/freshness-relay /out/

# glibc and libgcc, no shell, no package manager; user nonroot is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="freshness-hub" \
      org.opencontainers.image.description="Freshness regional hub: event-driven cache invalidation" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/freshness-hub /out/freshctl /out/freshness-agent /out/freshness-relay /usr/local/bin/
# The durable log (epoch, events, replication cursors): mount a volume here so
# that a new container keeps the epoch and no cache is flushed.
COPY --from=build --chown=65532:65532 /data/var/lib/freshness /var/lib/freshness
ENV FRESHNESS_DATA_DIR=/var/lib/freshness
VOLUME ["/var/lib/freshness"]
USER 65532:65532
# gRPC (Hub, grpc.health.v1, reflection) and Prometheus metrics (/metrics).
EXPOSE 50051 9464
# SIGTERM starts the graceful shutdown (shutdown_grace).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/freshness-hub"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]
