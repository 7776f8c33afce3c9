//! Metric names and the few helpers that record them.
//!
//! Recording goes through the `metrics` facade; with no recorder installed it
//! costs next to nothing, and the admin API installs the Prometheus exporter.
//! Every name the broker emits is listed here so docs and dashboards have one
//! place to look.

use metrics::{counter, gauge};

pub const CONNECTIONS_OPEN: &str = "fleetcore_connections_open";
pub const CONNECTIONS_TOTAL: &str = "fleetcore_connections_total";
pub const CONNECTIONS_REFUSED: &str = "fleetcore_connections_refused_total";
pub const PACKETS_IN: &str = "fleetcore_packets_received_total";
pub const PACKETS_OUT: &str = "fleetcore_packets_sent_total";
pub const BYTES_IN: &str = "fleetcore_bytes_received_total";
pub const BYTES_OUT: &str = "fleetcore_bytes_sent_total";
pub const MESSAGES_IN: &str = "fleetcore_messages_received_total";
pub const MESSAGES_OUT: &str = "fleetcore_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "fleetcore_messages_dropped_total";
pub const SESSIONS: &str = "fleetcore_sessions";
pub const RETAINED: &str = "fleetcore_retained_messages";
pub const ACCEPT_ERRORS: &str = "fleetcore_accept_errors_total";
/// MQTT sessions begun (CONNACK success), by listener and transport
/// (mqtt, mqtts, ws, wss) and how the client authenticated.
pub const CLIENTS_CONNECTED: &str = "fleetcore_clients_connected_total";
pub const TLS_ALPN: &str = "fleetcore_tls_alpn_total";
pub const WEBSOCKET_UPGRADES: &str = "fleetcore_websocket_upgrades_total";

pub fn connection_opened(listener: &'static str) {
    counter!(CONNECTIONS_TOTAL, "listener" => listener).increment(1);
    gauge!(CONNECTIONS_OPEN).increment(1.0);
}

pub fn client_connected(listener: &'static str, transport: &'static str, auth: &'static str) {
    counter!(CLIENTS_CONNECTED, "listener" => listener, "transport" => transport, "auth" => auth)
        .increment(1);
}

/// The ALPN protocol a TLS client and a dispatching listener agreed on.
pub fn tls_alpn(listener: &'static str, alpn: Option<&[u8]>) {
    let alpn = match alpn {
        None => "none",
        Some(b"x-amzn-mqtt-ca") => "x-amzn-mqtt-ca",
        Some(b"mqtt") => "mqtt",
        Some(b"http/1.1") => "http/1.1",
        Some(_) => "other",
    };
    counter!(TLS_ALPN, "listener" => listener, "alpn" => alpn).increment(1);
}

pub fn websocket_upgraded(listener: &'static str, subprotocol: &'static str) {
    counter!(WEBSOCKET_UPGRADES, "listener" => listener, "subprotocol" => subprotocol).increment(1);
}

pub fn connection_closed() {
    gauge!(CONNECTIONS_OPEN).decrement(1.0);
}

pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

pub fn accept_error(kind: &'static str) {
    counter!(ACCEPT_ERRORS, "kind" => kind).increment(1);
}

pub fn packet_in(kind: &'static str, bytes: usize) {
    counter!(PACKETS_IN, "type" => kind).increment(1);
    counter!(BYTES_IN).increment(bytes as u64);
}

pub fn bytes_out(bytes: usize) {
    counter!(BYTES_OUT).increment(bytes as u64);
}

pub fn packet_out(kind: &'static str) {
    counter!(PACKETS_OUT, "type" => kind).increment(1);
}

pub fn message_in(qos: u8) {
    counter!(MESSAGES_IN, "qos" => qos_label(qos)).increment(1);
}

pub fn message_out(qos: u8) {
    counter!(MESSAGES_OUT, "qos" => qos_label(qos)).increment(1);
}

pub fn dropped(reason: &'static str) {
    counter!(MESSAGES_DROPPED, "reason" => reason).increment(1);
}

pub fn gauge_sessions(n: usize) {
    gauge!(SESSIONS).set(n as f64);
}

pub fn gauge_retained(n: usize) {
    gauge!(RETAINED).set(n as f64);
}

fn qos_label(qos: u8) -> &'static str {
    match qos {
        0 => "0",
        1 => "1",
        _ => "2",
    }
}
