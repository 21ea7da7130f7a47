# syntax=docker/dockerfile:1
# The one r4 image: the controller (`r4 controller`) and the engine sidecar, intake and repair
# pods it renders (`r4 engine`) run the same binary. `make docker` builds it as r4:dev (the
# last stage, the default target). `--target sim-agent` builds the simulated agent image from
# the same binary (`make sim-agent-image`).

# Build stage: the `r4` binary, release profile, locked dependencies. The build context is
# filtered by .dockerignore; besides the crate, the build reads config/samples/ (the benches
# embed the worked example with include_str!). No build.rs, no other targets are needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config/samples ./config/samples
RUN cargo build --release --locked --bin r4 && strip target/release/r4

# Runtime base: distroless with glibc and CA certificates (the binary links glibc; mimalloc and
# ring are built in), no shell, no package manager; non-root uid/gid 65532 (distroless
# `nonroot`, numeric so that runAsNonRoot can verify it), nothing but /usr/local/bin/r4. The two
# images below are this stage with their own command and title.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
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

# The simulated agent (`docker build --target sim-agent`, `make sim-agent-image`): the same
# binary running `r4 sim-agent`, an agent container for a workflow on a cluster (the e2e run on
# kind). It serves on $R4_AGENT_PORT (the controller sets it), else 8081; its behaviour comes
# from the R4_SIM_* variables (README, "A simulated agent: r4 sim-agent").
FROM runtime AS sim-agent
LABEL org.opencontainers.image.title="r4-sim-agent" \
      org.opencontainers.image.description="r4's simulated agent: serves the engine's POST /tasks with a set latency, failure rates and tool calls, for trying and testing r4 on a cluster"
EXPOSE 8081
CMD ["sim-agent"]

# The r4 image (the default target: the last stage): controller and engine.
FROM runtime AS r4
CMD ["--help"]
