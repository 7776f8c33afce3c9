# fleetcore in a container: `docker build -t fleetcore .` (or `docker compose up`).
# What has been tested (2026-12-03, Docker 20.10.24 from Debian on a machine that
# cannot pull images): the runtime stage below, built on a bookworm base imported from
# `debootstrap --variant=minbase bookworm` (`docker import`), with the host's
# `cargo build --release` binary in place of the build stage's. It ran as user
# fleetcore with a published port on 127.0.0.1: mosquitto_pub/mosquitto_sub through it,
# `docker exec <c> fleetcore thing create/list` without --data-dir, /healthz without a
# token, data (0600 admin.token and fleetcore.redb) kept across `docker restart`, and
# `docker stop` a clean exit 0. .dockerignore was checked by building from this
# directory with dummy data/admin.token, certs/*.key, *.redb in place: a 2.9 MB
# context with none of them, no target/, certs/ holding only README.md.
# Not tested: the build stage (rust:1-bookworm cannot be pulled there) and
# docker-compose.yml (no compose there); report what fails.
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
