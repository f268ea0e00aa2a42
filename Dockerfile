# One image with every GCA binary (gcs, cts, gcactl, gca-exec, gca-recover), CRIU for the CTS and
# the example configurations; docker-compose.yml runs each service from it with its own command.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gcs -p gcactl -p cts -p gca-wrappers

# Debian 13: its CRIU is 4.1 (Debian 12's 3.17 fails on kernels >= 6.13). The binaries, built on
# Debian 12, run on its newer glibc.
FROM debian:trixie-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates criu \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gcs /src/target/release/gcactl /src/target/release/cts \
    /src/target/release/gca-exec /src/target/release/gca-recover /usr/local/bin/
# The CTS configurations and descriptors, in the same layout as the repository (each
# configuration names its descriptor relative to itself).
COPY examples /usr/share/gca/examples
COPY schemas/examples /usr/share/gca/schemas/examples
EXPOSE 8080 8090
CMD ["gcs", "--help"]
