//! Abusive and broken clients, spoken to with raw TCP sockets: each is answered with the
//! right MQTT 5 reason code (DISCONNECT 0xE0 .. reason) or has its socket closed, within a
//! bound, while a well-behaved subscriber keeps receiving messages and the broker neither
//! dies nor panics.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

const CONNECT_TIMEOUT_SECS: u64 = 1;
const MAX_PACKET_SIZE: usize = 1024;

const MALFORMED_PACKET: u8 = 0x81;
const PROTOCOL_ERROR: u8 = 0x82;
const PACKET_TOO_LARGE: u8 = 0x95;

const V311: u8 = 4;
const V5: u8 = 5;

/// A broker with short connect timeout and small packet limit, and a bystander that must
/// keep getting messages throughout.
struct Arena {
    broker: TestBroker,
    bystander: LineChild,
    published: u32,
}

impl Arena {
    fn new() -> Arena {
        let broker = TestBroker::start(
            BrokerOpts::new()
                .limit("connect_timeout_secs", CONNECT_TIMEOUT_SECS)
                .limit("max_packet_size", MAX_PACKET_SIZE),
        );
        let bystander = mosquitto_sub(&with(
            &broker.mosq_tcp(),
            &["-V", "mqttv5", "-q", "1", "-t", "bystander/#"],
        ));
        let mut arena = Arena {
            broker,
            bystander,
            published: 0,
        };
        arena.bystander_still_served();
        arena
    }

    fn port(&self) -> u16 {
        self.broker.tcp_port()
    }

    /// Publishes to the bystander and waits for it to arrive.
    fn bystander_still_served(&mut self) {
        self.published += 1;
        let payload = format!("still-here-{}", self.published);
        mosquitto_pub(&with(
            &self.broker.mosq_tcp(),
            &["-q", "1", "-t", "bystander/ping", "-m", &payload],
        ));
        let (_, _, _, got) = expect_mosq_msg(&mut self.bystander, STEP);
        assert_eq!(got, payload);
    }

    /// The final check of every test.
    fn finish(mut self) {
        self.bystander_still_served();
        self.broker.assert_healthy();
    }
}

// ---- MQTT bytes -------------------------------------------------------------------------

fn connect_packet(version: u8, client_id: &str) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(version);
    body.push(0x02); // clean session / clean start
    body.extend(30u16.to_be_bytes()); // keep alive
    if version == V5 {
        body.push(0); // no properties
    }
    body.extend(string(client_id));
    packet(0x10, &body)
}

/// Opens a connection and completes CONNECT/CONNACK.
fn connected(port: u16, version: u8, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(&connect_packet(version, client_id))
        .expect("send CONNECT");
    match read_packet(&mut stream, Instant::now() + STEP) {
        Incoming::Packet(0x20, body) => {
            assert_eq!(body.get(1), Some(&0), "CONNACK refused: {body:02x?}");
        }
        Incoming::Packet(t, body) => panic!("expected CONNACK, got {t:#04x} {body:02x?}"),
        Incoming::Closed => panic!("connection closed instead of CONNACK"),
        Incoming::TimedOut => panic!("no CONNACK within {STEP:?}"),
    }
    stream
}

/// Expects the peer to close the connection within `within` (any bytes before that are
/// ignored); returns how long it took.
fn expect_closed(stream: &mut TcpStream, within: Duration, what: &str) -> Duration {
    let start = Instant::now();
    let deadline = start + within;
    let mut buf = [0u8; 512];
    loop {
        match read_exact_by(stream, &mut buf[..1], deadline) {
            Ok(()) => continue,
            Err(Incoming::Closed) => return start.elapsed(),
            Err(_) => panic!("{what}: socket still open after {within:?}"),
        }
    }
}

/// Expects an MQTT 5 DISCONNECT with `reason`, then the close of the connection.
fn expect_disconnect(stream: &mut TcpStream, reason: u8, what: &str) {
    match read_packet(stream, Instant::now() + STEP) {
        Incoming::Packet(0xE0, body) => {
            let got = body.first().copied().unwrap_or(0);
            assert_eq!(
                got, reason,
                "{what}: DISCONNECT reason {got:#04x}, expected {reason:#04x}"
            );
        }
        Incoming::Packet(t, body) => {
            panic!("{what}: expected DISCONNECT {reason:#04x}, got {t:#04x} {body:02x?}")
        }
        Incoming::Closed => panic!("{what}: connection closed without DISCONNECT {reason:#04x}"),
        Incoming::TimedOut => panic!("{what}: no DISCONNECT {reason:#04x} within {STEP:?}"),
    }
    expect_closed(stream, STEP, what);
}

/// After `bytes` on a connected client: MQTT 5 gets DISCONNECT `reason`, 3.1.1 is closed.
fn answered(arena: &mut Arena, bytes: &[u8], reason: u8, what: &str) {
    for version in [V5, V311] {
        let mut stream = connected(arena.port(), version, &format!("abuser-v{version}"));
        // The broker may close while we write; what counts is what it answers.
        let _ = stream.write_all(bytes);
        let what = format!("{what} (protocol level {version})");
        if version == V5 {
            expect_disconnect(&mut stream, reason, &what);
        } else {
            expect_closed(&mut stream, STEP, &what);
        }
        arena.bystander_still_served();
    }
}

// ---- Tests ------------------------------------------------------------------------------

#[test]
fn garbage_instead_of_connect_is_closed() {
    let mut arena = Arena::new();
    let garbage: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        &[0x00, 0xFF, 0x13, 0x37, 0xDE, 0xAD, 0xBE, 0xEF],
        &[0xF0, 0x00], // reserved packet type 15
    ];
    for bytes in garbage {
        let mut stream = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
        let _ = stream.write_all(bytes);
        expect_closed(&mut stream, STEP, &format!("garbage {bytes:02x?}"));
        arena.bystander_still_served();
    }
    arena.finish();
}

#[test]
fn truncated_connect_then_eof_is_closed() {
    let arena = Arena::new();
    let connect = connect_packet(V5, "truncated");
    let mut stream = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
    stream
        .write_all(&connect[..connect.len() / 2])
        .expect("send half a CONNECT");
    stream.shutdown(Shutdown::Write).expect("shutdown write");
    expect_closed(&mut stream, STEP, "half a CONNECT then EOF");
    arena.finish();
}

#[test]
fn socket_without_connect_is_closed_after_connect_timeout() {
    let mut arena = Arena::new();
    let mut silent = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
    let connect = connect_packet(V311, "slowloris");
    let mut partial = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
    partial
        .write_all(&connect[..connect.len() - 3])
        .expect("send most of a CONNECT");
    // The broker serves others while these sockets hang.
    arena.bystander_still_served();
    let bound = Duration::from_secs(CONNECT_TIMEOUT_SECS + 5);
    expect_closed(&mut silent, bound, "socket that never sends CONNECT");
    expect_closed(&mut partial, bound, "socket that never finishes CONNECT");
    arena.finish();
}

#[test]
fn publish_with_qos_3_is_malformed() {
    let mut arena = Arena::new();
    let mut v5_body = string("bad/qos");
    v5_body.extend([0x00, 0x01, 0x00]); // packet id 1, no properties
    v5_body.extend(b"x");
    // The v5 body is also a plausible 3.1.1 body; only the QoS bits (0x06) matter.
    answered(
        &mut arena,
        &packet(0x36, &v5_body),
        MALFORMED_PACKET,
        "PUBLISH with QoS 3",
    );
    arena.finish();
}

#[test]
fn remaining_length_of_five_bytes_is_malformed() {
    let mut arena = Arena::new();
    let bytes = [0x30, 0x80, 0x80, 0x80, 0x80, 0x01];
    answered(
        &mut arena,
        &bytes,
        MALFORMED_PACKET,
        "remaining length of 5 bytes",
    );
    arena.finish();
}

#[test]
fn packet_larger_than_max_packet_size_is_refused_from_its_header() {
    let mut arena = Arena::new();
    // Only the header and the topic are sent: the broker must decide from the declared
    // length, without waiting for (or buffering) the body.
    let declared = MAX_PACKET_SIZE * 4;
    let mut bytes = vec![0x30];
    bytes.extend(varint(declared));
    bytes.extend(string("big/one"));
    answered(
        &mut arena,
        &bytes,
        PACKET_TOO_LARGE,
        "PUBLISH larger than max_packet_size",
    );
    arena.finish();
}

#[test]
fn second_connect_is_a_protocol_error() {
    let mut arena = Arena::new();
    for version in [V5, V311] {
        let second = connect_packet(version, &format!("twice-v{version}"));
        let mut stream = connected(arena.port(), version, &format!("twice-v{version}"));
        let _ = stream.write_all(&second);
        let what = format!("second CONNECT (protocol level {version})");
        if version == V5 {
            expect_disconnect(&mut stream, PROTOCOL_ERROR, &what);
        } else {
            expect_closed(&mut stream, STEP, &what);
        }
        arena.bystander_still_served();
    }
    arena.finish();
}
