# Builds the GCA binaries (gcs, gcactl) into a slim image. Used by docker-compose.yml.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p gcs -p gcactl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gcs /src/target/release/gcactl /usr/local/bin/
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gcs"]
