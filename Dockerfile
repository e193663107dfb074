# syntax=docker/dockerfile:1
# Build: the same locked release build that `cargo build --release --locked` runs in CI.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin cbgate

# Run: distroless (no shell, no package manager), non-root. The Mozilla roots are compiled into
# the binary, so no CA bundle is needed; cc-debian12 provides the glibc that aws-lc-rs links.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/cbgate /usr/local/bin/cbgate
USER nonroot:nonroot
EXPOSE 8750 8751
STOPSIGNAL SIGTERM
# Probes the admin /readyz without curl (there is no shell or curl in this image).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/cbgate", "health"]
ENTRYPOINT ["/usr/local/bin/cbgate"]
CMD ["serve"]
