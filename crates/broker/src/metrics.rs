//! Metric names and the few helpers that record them.
//!
//! Recording goes through the `metrics` facade; with no recorder installed it
//! costs next to nothing, and the admin API installs the Prometheus exporter.
//! Every name the broker emits is listed here so docs and dashboards have one
//! place to look.
//!
//! The per-packet and per-message counters are on the hot path: `counter!`
//! builds a key, hashes it and looks it up in the recorder's registry on every
//! call, which cost more than the routing of a message. Their handles are
//! looked up once, on first use, and kept in statics, so the recorder must be
//! installed before the broker starts (as `install_metrics` says).

use std::sync::OnceLock;

use metrics::{counter, gauge, Counter};

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
/// Takeovers whose old connection still had input in its socket that the runtime had
/// not reported yet (read before the new connection attached).
pub const TAKEOVER_DRAIN_WAITS: &str = "fleetcore_takeover_drain_waits_total";

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

pub fn takeover_drain_waited() {
    counter!(TAKEOVER_DRAIN_WAITS).increment(1);
}

pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

pub fn accept_error(kind: &'static str) {
    counter!(ACCEPT_ERRORS, "kind" => kind).increment(1);
}

/// MQTT packet types, as the `type` label of the packet counters.
const PACKET_TYPES: [&str; 15] = [
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

fn packet_type_index(kind: &str) -> Option<usize> {
    Some(match kind {
        "connect" => 0,
        "connack" => 1,
        "publish" => 2,
        "puback" => 3,
        "pubrec" => 4,
        "pubrel" => 5,
        "pubcomp" => 6,
        "subscribe" => 7,
        "suback" => 8,
        "unsubscribe" => 9,
        "unsuback" => 10,
        "pingreq" => 11,
        "pingresp" => 12,
        "disconnect" => 13,
        "auth" => 14,
        _ => return None,
    })
}

/// A counter handle registered on first use (so a counter never incremented
/// is not exported, as with `counter!`), then reused.
struct Cached(OnceLock<Counter>);

impl Cached {
    const fn new() -> Cached {
        Cached(OnceLock::new())
    }

    #[inline]
    fn get(&self, register: impl FnOnce() -> Counter) -> &Counter {
        self.0.get_or_init(register)
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const CACHED: Cached = Cached::new();
static PACKETS_IN_BY_TYPE: [Cached; 15] = [CACHED; 15];
static PACKETS_OUT_BY_TYPE: [Cached; 15] = [CACHED; 15];
static MESSAGES_IN_BY_QOS: [Cached; 3] = [CACHED; 3];
static MESSAGES_OUT_BY_QOS: [Cached; 3] = [CACHED; 3];
static BYTES_IN_TOTAL: Cached = Cached::new();
static BYTES_OUT_TOTAL: Cached = Cached::new();

pub fn packet_in(kind: &'static str, bytes: usize) {
    match packet_type_index(kind) {
        Some(i) => PACKETS_IN_BY_TYPE[i]
            .get(|| counter!(PACKETS_IN, "type" => PACKET_TYPES[i]))
            .increment(1),
        None => counter!(PACKETS_IN, "type" => kind).increment(1),
    }
    BYTES_IN_TOTAL
        .get(|| counter!(BYTES_IN))
        .increment(bytes as u64);
}

pub fn bytes_out(bytes: usize) {
    BYTES_OUT_TOTAL
        .get(|| counter!(BYTES_OUT))
        .increment(bytes as u64);
}

pub fn packet_out(kind: &'static str) {
    match packet_type_index(kind) {
        Some(i) => PACKETS_OUT_BY_TYPE[i]
            .get(|| counter!(PACKETS_OUT, "type" => PACKET_TYPES[i]))
            .increment(1),
        None => counter!(PACKETS_OUT, "type" => kind).increment(1),
    }
}

pub fn message_in(qos: u8) {
    let i = qos.min(2) as usize;
    MESSAGES_IN_BY_QOS[i]
        .get(|| counter!(MESSAGES_IN, "qos" => qos_label(qos)))
        .increment(1);
}

pub fn message_out(qos: u8) {
    let i = qos.min(2) as usize;
    MESSAGES_OUT_BY_QOS[i]
        .get(|| counter!(MESSAGES_OUT, "qos" => qos_label(qos)))
        .increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packet_type_has_its_cached_counter() {
        for (i, kind) in PACKET_TYPES.iter().enumerate() {
            assert_eq!(packet_type_index(kind), Some(i));
        }
        assert_eq!(packet_type_index("nonsense"), None);
    }
}
