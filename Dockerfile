# syntax=docker/dockerfile:1
# Build stage: the one `r4` binary, release profile, locked dependencies.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin r4 && strip target/release/r4

# Runtime stage: distroless, non-root (uid 65532), read-only root FS friendly, nothing but r4.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/r4 /usr/local/bin/r4
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/r4"]
CMD ["--help"]
