# syntax=docker/dockerfile:1
#
#   docker build -t cbgate .
#
# The runtime base. distroless cc-debian12 has glibc and libgcc_s (what aws-lc-rs links), no
# shell, no package manager; the Mozilla roots are compiled into the binary, so no CA bundle.
# CI, which reaches no registry, builds the same runtime stage on a local Debian base made of
# those two packages (see .ci/run).
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot
# Where the binary comes from: `build` (compiled here) or `prebuilt` (a release binary named
# `cbgate` at the root of the build context, as CI passes it).
ARG BINARY_FROM=build

# Build: the same locked release build that `cargo build --release --locked` runs in CI.
# Rust 1.91: the newest rust-version in Cargo.lock (notify-types).
FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin cbgate \
 && install -D -m 0755 target/release/cbgate /out/cbgate

FROM scratch AS prebuilt
COPY cbgate /out/cbgate

FROM ${BINARY_FROM} AS binary

# Run: non-root (distroless's nonroot, by number so that Kubernetes' runAsNonRoot can check it
# and a base without that user in /etc/passwd works the same).
FROM ${RUNTIME_BASE} AS runtime
COPY --from=binary /out/cbgate /usr/local/bin/cbgate
USER 65532:65532
EXPOSE 8750 8751
STOPSIGNAL SIGTERM
# Probes the admin /readyz without curl (there is no shell or curl in this image).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/cbgate", "health"]
ENTRYPOINT ["/usr/local/bin/cbgate"]
CMD ["serve"]
