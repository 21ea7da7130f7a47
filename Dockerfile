# syntax=docker/dockerfile:1
# The one r4 image: the controller (`r4 controller`) and the engine sidecar, intake and repair
# pods it renders (`r4 engine`) run the same binary. `make docker` builds it as r4:dev.

# Build stage: the `r4` binary, release profile, locked dependencies. The build context is
# filtered by .dockerignore; besides the crate, the build reads config/samples/ (the benches
# embed the worked example with include_str!). No build.rs, no other targets are needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config/samples ./config/samples
RUN cargo build --release --locked --bin r4 && strip target/release/r4

# Runtime stage: distroless with glibc and CA certificates (the binary links glibc; mimalloc
# and ring are built in), no shell, no package manager; non-root uid/gid 65532 (distroless
# `nonroot`, numeric so that runAsNonRoot can verify it), nothing but /usr/local/bin/r4.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="r4" \
      org.opencontainers.image.description="Kubernetes operator that keeps teams of autonomous agents working through failures: controller and engine" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build --chown=0:0 --chmod=0555 /src/target/release/r4 /usr/local/bin/r4
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/r4"]
CMD ["--help"]
