# sesame as the ENTRYPOINT of the official Envoy image.
#   docker build -t envoy-sesame .
#       builds a static (musl) sesame from this repository in a first stage;
#   docker build --build-arg SESAME_FROM=prebuilt -t envoy-sesame .
#       takes a sesame built outside (as release pipelines build), from SESAME_BINARY, a path in
#       the build context (by default where `cargo build --release --target
#       x86_64-unknown-linux-musl` puts it);
#   --build-arg ENVOY_IMAGE=... sets the base (any image with Envoy at /usr/local/bin/envoy and the
#       user envoy, as the official one has).
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0
ARG SESAME_FROM=build
ARG SESAME_BINARY=target/x86_64-unknown-linux-musl/release/sesame

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
    && cp target/x86_64-unknown-linux-musl/release/sesame /sesame

FROM scratch AS prebuilt
ARG SESAME_BINARY
COPY ${SESAME_BINARY} /sesame

# The stage the binary comes from. BuildKit and buildah (podman) skip the stage not used, so the
# prebuilt way pulls no Rust image.
FROM ${SESAME_FROM} AS binary

FROM ${ENVOY_IMAGE}
COPY --from=binary /sesame /usr/local/bin/sesame
# sesame turns SIGTERM into a graceful drain of Envoy; `docker stop -t` must exceed the drain timeout.
STOPSIGNAL SIGTERM
# Healthy while the current epoch is LIVE and no drain is under way (exit 0), over the control socket.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/sesame", "status"]
# The official image's contract (Envoy as the user envoy unless ENVOY_UID=0; ENVOY_UID, ENVOY_GID,
# loglevel), kept by a few lines of shell that end in `exec sesame run --`: sesame is PID 1.
COPY --chmod=755 docker-entrypoint.sh /usr/local/bin/sesame-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/sesame-entrypoint.sh"]
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
