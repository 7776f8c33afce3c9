# fleetcore in a container: `docker build -t fleetcore .` (or `docker compose up`).
# Untested here: the machines this was written on cannot pull base images, so neither
# this file nor docker-compose.yml has been built or run; report what fails.
# .dockerignore keeps target/, data/, keys, admin.token and *.redb out of the context.
# The build needs Rust 1.90 or newer (rust-version in Cargo.toml): rust:1 is the latest.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fleetcore

FROM debian:bookworm-slim
RUN useradd --system --home-dir /var/lib/fleetcore --create-home fleetcore \
 && mkdir -p /etc/fleetcore
COPY --from=build /src/target/release/fleetcore /usr/local/bin/fleetcore
COPY config/docker.toml /etc/fleetcore/fleetcore.toml
USER fleetcore
# The data directory for `serve` and for the admin CLI alike (clap reads
# FLEETCORE_DATA_DIR), so `docker compose exec fleetcore fleetcore thing list` finds
# /var/lib/fleetcore/admin.token without --data-dir.
ENV FLEETCORE_DATA_DIR=/var/lib/fleetcore
VOLUME /var/lib/fleetcore
EXPOSE 1883 8883 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["fleetcore"]
CMD ["serve", "--config", "/etc/fleetcore/fleetcore.toml"]
