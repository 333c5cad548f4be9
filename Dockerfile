# sesame as the ENTRYPOINT of the official Envoy image: a static (musl) binary, nothing else added.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --target x86_64-unknown-linux-musl

FROM envoyproxy/envoy:v1.40.0
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/sesame /usr/local/bin/sesame
# sesame turns SIGTERM into a graceful drain of Envoy; `docker stop -t` must exceed the drain timeout.
STOPSIGNAL SIGTERM
# Healthy while the current epoch is LIVE and no drain is under way (exit 0), over the control socket.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/sesame", "status"]
# The official image's contract (Envoy as the user envoy unless ENVOY_UID=0; ENVOY_UID, ENVOY_GID,
# loglevel), kept by a few lines of shell that end in `exec sesame run --`: sesame is PID 1.
COPY --chmod=755 docker-entrypoint.sh /usr/local/bin/sesame-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/sesame-entrypoint.sh"]
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
