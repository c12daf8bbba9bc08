# syntax=docker/dockerfile:1
# The s3grant operator image: the one binary on debian-slim, running as uid/gid 65532.
#
# NOT BUILT HERE: the machines this project is developed and tested on have no Docker
# engine, so this file has never been built. It is deliberately minimal (the usual
# two-stage cargo build) to leave little to go wrong. Build with BuildKit:
#
#   docker build -t s3grant:0.1.0 .
#
# The locked dependencies (aws-smithy-*) need rustc >= 1.94.1.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cache mounts keep the registry and target dir between builds; the binary is copied out
# of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin s3grant \
    && install -m 0755 target/release/s3grant /s3grant

# Same Debian release as the builder, so the binary's glibc matches.
FROM debian:bookworm-slim
# CA roots for TLS to AWS and the API server (rustls reads the system store).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /s3grant /s3grant
# The chart's pod security context expects this uid (runAsNonRoot needs a numeric USER).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/s3grant"]
CMD ["run"]
