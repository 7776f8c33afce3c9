# fleetcore in a container: `docker build -t fleetcore .`
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
VOLUME /var/lib/fleetcore
EXPOSE 1883 8883 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["fleetcore"]
CMD ["serve", "--config", "/etc/fleetcore/fleetcore.toml"]
