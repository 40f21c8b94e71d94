# syntax=docker/dockerfile:1
#
# The dynamodb-stream-consumer image: a static-ish Rust binary on distroless (glibc, no shell), running as
# the image's non-root user. Multi-arch ready: nothing below names an architecture, so
#   docker buildx build --platform linux/amd64,linux/arm64 -t dynamodb-stream-consumer .
# builds each platform natively (or under emulation) from the same file.

FROM rust:1.95-bookworm AS builder
WORKDIR /src

# 1. Dependencies only: the workspace manifests, the lock file and empty sources for every member, so
#    this (slow: the AWS SDK) layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY coordination/Cargo.toml coordination/Cargo.toml
COPY tests/support/Cargo.toml tests/support/Cargo.toml
COPY tests/emulator/Cargo.toml tests/emulator/Cargo.toml
COPY tests/tools/Cargo.toml tests/tools/Cargo.toml
RUN mkdir -p src coordination/src tests/support/src tests/emulator/src tests/tools/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs coordination/src/lib.rs tests/support/src/lib.rs tests/emulator/src/lib.rs \
       tests/tools/src/lib.rs \
    && cargo build --release --locked -p dynamodb-stream-consumer \
    && rm -rf src coordination/src tests/support/src tests/emulator/src tests/tools/src

# 2. The real sources. `touch` makes them newer than the stub build, so cargo rebuilds the workspace's
#    own crates (COPY keeps the build context's modification times, which may be older).
COPY src src
COPY coordination/src coordination/src
COPY tests/support/src tests/support/src
COPY tests/emulator/src tests/emulator/src
COPY tests/tools/src tests/tools/src
RUN touch src/main.rs src/lib.rs coordination/src/lib.rs \
    && cargo build --release --locked -p dynamodb-stream-consumer \
    && cp target/release/dynamodb-stream-consumer /dynamodb-stream-consumer

# Distroless with the C runtime (glibc, libgcc) the binary links against; the `nonroot` tag runs as
# uid/gid 65532 and has no shell, so there is no HEALTHCHECK here: orchestrators probe /livez and /readyz.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /dynamodb-stream-consumer /dynamodb-stream-consumer
USER nonroot:nonroot
# PORT's default: /livez, /readyz, /metrics, /status.
EXPOSE 8080
ENTRYPOINT ["/dynamodb-stream-consumer"]
