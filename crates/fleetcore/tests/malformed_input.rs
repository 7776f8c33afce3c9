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

/// The Reason String (property 0x1F) of a CONNACK or DISCONNECT body whose properties
/// start at `at`, if it has one.
fn reason_string_of(body: &[u8], at: usize) -> Option<Vec<u8>> {
    let mut i = at;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = *body.get(i)?;
        i += 1;
        len |= usize::from(b & 0x7F) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let props = body.get(i..i + len)?;
    let mut j = 0;
    while j < props.len() {
        let id = props[j];
        j += 1;
        let two = |j: usize| usize::from(u16::from_be_bytes([props[j], props[j + 1]]));
        match id {
            0x1F => return Some(props[j + 2..j + 2 + two(j)].to_vec()),
            // Strings and binary data: two-byte length.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C => j += 2 + two(j),
            0x26 => {
                j += 2 + two(j);
                j += 2 + two(j);
            }
            0x11 | 0x27 | 0x02 | 0x18 => j += 4,
            0x13 | 0x21 | 0x22 | 0x23 => j += 2,
            0x0B => {
                while props[j] & 0x80 != 0 {
                    j += 1;
                }
                j += 1;
            }
            _ => j += 1,
        }
    }
    None
}

/// A U+0000 in a topic, a topic filter or a user property is a malformed packet (0x81),
/// not an invalid topic (0x90/0x8F), and fleetcore's DISCONNECT does not copy the NUL
/// into its Reason String (which would make it malformed in turn).
#[test]
fn nul_in_a_string_is_malformed_and_never_echoed() {
    let mut arena = Arena::new();
    let mut publish_v311 = string("a\0b");
    publish_v311.extend(b"x");
    let mut publish_v5 = string("a\0b");
    publish_v5.push(0);
    publish_v5.extend(b"x");
    let mut subscribe_v311 = vec![0, 1];
    subscribe_v311.extend(string("f\0/#"));
    subscribe_v311.push(0);
    let mut subscribe_v5 = vec![0, 1, 0];
    subscribe_v5.extend(string("f\0/#"));
    subscribe_v5.push(0);
    let mut user_prop_v5 = string("t");
    user_prop_v5.push(7);
    user_prop_v5.push(0x26);
    user_prop_v5.extend(string("k"));
    user_prop_v5.extend(string("\0"));
    let cases = [
        (
            "topic",
            packet(0x30, &publish_v5),
            Some(packet(0x30, &publish_v311)),
        ),
        (
            "topic filter",
            packet(0x82, &subscribe_v5),
            Some(packet(0x82, &subscribe_v311)),
        ),
        ("user property", packet(0x30, &user_prop_v5), None),
    ];
    for (what, v5, v311) in cases {
        let mut stream = connected(arena.port(), V5, "nul-v5");
        let _ = stream.write_all(&v5);
        match read_packet(&mut stream, Instant::now() + STEP) {
            Incoming::Packet(0xE0, body) => {
                assert_eq!(body[0], MALFORMED_PACKET, "U+0000 in a {what}: {body:02x?}");
                if let Some(reason) = reason_string_of(&body, 1) {
                    assert!(
                        !reason.contains(&0),
                        "U+0000 in a {what}: the Reason String has the NUL: {body:02x?}"
                    );
                }
            }
            other => panic!("U+0000 in a {what}: expected DISCONNECT 0x81, got {other:?}"),
        }
        expect_closed(&mut stream, STEP, what);
        if let Some(v311) = v311 {
            let mut stream = connected(arena.port(), V311, "nul-v311");
            let _ = stream.write_all(&v311);
            expect_closed(&mut stream, STEP, &format!("{what} (3.1.1)"));
        }
        arena.bystander_still_served();
    }
    arena.finish();
}

/// A U+0000 in the client identifier or the user name: MQTT 5 gets CONNACK 0x81 (with no
/// NUL in its Reason String), 3.1.1 is closed without CONNACK (3.1.1 1.5.3: a malformed
/// string closes the connection).
#[test]
fn nul_in_client_id_or_user_name_is_refused() {
    let mut arena = Arena::new();
    for (client_id, user) in [("dev\0ice", None), ("device", Some("us\0er"))] {
        for version in [V5, V311] {
            let mut body = string("MQTT");
            body.push(version);
            body.push(0x02 | if user.is_some() { 0x80 } else { 0 });
            body.extend(30u16.to_be_bytes());
            if version == V5 {
                body.push(0);
            }
            body.extend(string(client_id));
            if let Some(u) = user {
                body.extend(string(u));
            }
            let mut stream = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
            stream
                .write_all(&packet(0x10, &body))
                .expect("send CONNECT");
            let what = format!("client id {client_id:?}, user {user:?}, level {version}");
            match read_packet(&mut stream, Instant::now() + STEP) {
                Incoming::Packet(0x20, ack) if version == V5 => {
                    assert_eq!(ack[1], MALFORMED_PACKET, "{what}: CONNACK {ack:02x?}");
                    if let Some(reason) = reason_string_of(&ack, 2) {
                        assert!(!reason.contains(&0), "{what}: NUL in the Reason String");
                    }
                    expect_closed(&mut stream, STEP, &what);
                }
                Incoming::Closed if version == V311 => {}
                other => panic!("{what}: got {other:?}"),
            }
        }
        arena.bystander_still_served();
    }
    arena.finish();
}

/// MQTT 3.1 (protocol name MQIsdp, level 3) is followed as 3.1, not as 3.1.1: its CONNACK
/// has no Session Present flag (the byte is reserved, 0, even when a session is resumed),
/// and a client id of 0 or more than 23 characters gets CONNACK 2 (identifier rejected).
#[test]
fn mqtt_3_1_is_served_as_3_1() {
    let mut arena = Arena::new();
    let connect31 = |client_id: &str, clean: bool| {
        let mut body = string("MQIsdp");
        body.push(3);
        body.push(u8::from(clean) << 1);
        body.extend(30u16.to_be_bytes());
        body.extend(string(client_id));
        packet(0x10, &body)
    };
    let connack = |bytes: &[u8]| {
        let mut stream = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
        stream.write_all(bytes).expect("send CONNECT");
        match read_packet(&mut stream, Instant::now() + STEP) {
            Incoming::Packet(0x20, ack) => (stream, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    };
    // A persistent session, then its resumption: accepted, and byte 1 stays 0.
    let (first, ack) = connack(&connect31("old-client-31", false));
    assert_eq!(ack, [0, 0]);
    first.shutdown(Shutdown::Both).unwrap();
    let (second, ack) = connack(&connect31("old-client-31", false));
    assert_eq!(ack, [0, 0], "a 3.1 CONNACK has no Session Present flag");
    drop(second);
    for id in ["", "a-client-id-of-24-chars!"] {
        let (_, ack) = connack(&connect31(id, true));
        assert_eq!(ack, [0, 2], "client id {id:?}");
    }
    let (_, ack) = connack(&connect31("twenty-three-characters", true));
    assert_eq!(ack, [0, 0]);
    arena.bystander_still_served();
    arena.finish();
}

/// A CONNECT that breaks the rules is refused: MQTT 5 with CONNACK 0x81 (or 0x90 for an
/// invalid will topic), 3.1.1 by closing the connection without CONNACK (3.1.1 has no
/// return code for it; 0x03 "server unavailable" was sent for a zero-length will topic,
/// and trailing bytes or inconsistent flags were accepted).
#[test]
fn connect_breaking_the_rules_is_refused() {
    let mut arena = Arena::new();
    // flags, then what follows the client id "c"; the properties (v5) are empty.
    let cases: [(&str, u8, &[u8], u8); 5] = [
        ("zero-length will topic", 0x06, &[0, 0, 0, 1, b'w'], 0x90),
        ("trailing bytes", 0x02, &[0xFF, 0xFF], MALFORMED_PACKET),
        ("will QoS without will", 0x0A, &[], MALFORMED_PACKET),
        ("will retain without will", 0x22, &[], MALFORMED_PACKET),
        ("reserved flag set", 0x03, &[], MALFORMED_PACKET),
    ];
    for (what, flags, tail, v5_code) in cases {
        for version in [V5, V311] {
            let mut body = string("MQTT");
            body.push(version);
            body.push(flags);
            body.extend(30u16.to_be_bytes());
            if version == V5 {
                body.push(0);
            }
            body.extend(string("c"));
            if version == V5 && flags & 0x04 != 0 {
                body.push(0); // will properties
            }
            body.extend_from_slice(tail);
            let mut stream = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
            stream
                .write_all(&packet(0x10, &body))
                .expect("send CONNECT");
            let what = format!("{what} (level {version})");
            match read_packet(&mut stream, Instant::now() + STEP) {
                Incoming::Packet(0x20, ack) if version == V5 => {
                    assert_eq!(ack[1], v5_code, "{what}: CONNACK {ack:02x?}");
                    expect_closed(&mut stream, STEP, &what);
                }
                Incoming::Closed if version == V311 => {}
                other => panic!("{what}: got {other:?}"),
            }
        }
        arena.bystander_still_served();
    }
    arena.finish();
}

/// The client's Maximum Packet Size holds for CONNACK too: a refusal goes without its
/// Reason String when that would make it too large, and a CONNACK that cannot be made
/// small enough (here: an assigned client id) is not sent; the connection is closed.
#[test]
fn connack_respects_the_clients_maximum_packet_size() {
    let mut arena = Arena::new();
    let connect = |client_id: &str, props: &[u8]| {
        let mut body = string("MQTT");
        body.push(V5);
        body.push(0x02);
        body.extend(30u16.to_be_bytes());
        body.extend(varint(props.len()));
        body.extend_from_slice(props);
        body.extend(string(client_id));
        packet(0x10, &body)
    };
    // Receive Maximum 0 (a protocol error, refused with a Reason String), Maximum Packet
    // Size 16.
    let refused = connect("small", &[0x21, 0, 0, 0x27, 0, 0, 0, 16]);
    let mut stream = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
    stream.write_all(&refused).expect("send CONNECT");
    match read_packet(&mut stream, Instant::now() + STEP) {
        Incoming::Packet(0x20, ack) => {
            assert_eq!(ack[1], PROTOCOL_ERROR, "CONNACK {ack:02x?}");
            assert!(ack.len() + 2 <= 16, "CONNACK of {} bytes", ack.len() + 2);
        }
        other => panic!("expected CONNACK 0x82, got {other:?}"),
    }
    // An empty client id gets one assigned: CONNACK is some 40 bytes, over 24.
    let assigned = connect("", &[0x27, 0, 0, 0, 24]);
    let mut stream = TcpStream::connect(("127.0.0.1", arena.port())).expect("connect");
    stream.write_all(&assigned).expect("send CONNECT");
    match read_packet(&mut stream, Instant::now() + STEP) {
        Incoming::Closed => {}
        Incoming::Packet(t, body) => panic!(
            "a packet of {} bytes over the client's maximum of 24: {t:#04x} {body:02x?}",
            body.len() + 2
        ),
        other => panic!("expected the connection closed, got {other:?}"),
    }
    arena.bystander_still_served();
    arena.finish();
}

/// An acknowledgement of the wrong kind for a message in flight is a protocol error:
/// PUBREC for QoS 1 (it was answered with PUBREL), PUBACK for QoS 2 and PUBCOMP before
/// PUBREC (they were ignored).
#[test]
fn wrong_acknowledgement_types_are_protocol_errors() {
    let mut arena = Arena::new();
    // (QoS published, the acknowledgement the client answers with)
    for (qos, ack) in [(1u8, 0x50u8), (2, 0x40), (2, 0x70)] {
        for version in [V5, V311] {
            let what = format!("QoS {qos} answered with {ack:#04x} (level {version})");
            let mut sub = connected(arena.port(), version, &format!("acker-v{version}"));
            let mut body = vec![0, 1];
            if version == V5 {
                body.push(0);
            }
            body.extend(string("acks/#"));
            body.push(2);
            sub.write_all(&packet(0x82, &body)).expect("SUBSCRIBE");
            match read_packet(&mut sub, Instant::now() + STEP) {
                Incoming::Packet(0x90, _) => {}
                other => panic!("{what}: expected SUBACK, got {other:?}"),
            }
            mosquitto_pub(&with(
                &arena.broker.mosq_tcp(),
                &["-q", &qos.to_string(), "-t", "acks/x", "-m", "m"],
            ));
            let pid = match read_packet(&mut sub, Instant::now() + STEP) {
                Incoming::Packet(t, body) if t >> 4 == 3 => {
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    [body[2 + topic_len], body[3 + topic_len]]
                }
                other => panic!("{what}: expected PUBLISH, got {other:?}"),
            };
            let _ = sub.write_all(&[ack, 2, pid[0], pid[1]]);
            if version == V5 {
                expect_disconnect(&mut sub, PROTOCOL_ERROR, &what);
            } else {
                expect_closed(&mut sub, STEP, &what);
            }
            arena.bystander_still_served();
        }
    }
    arena.finish();
}

/// A property not valid for the packet type is a Malformed Packet (MQTT 5 2.2.2.2), 0x81,
/// not a protocol error; a duplicated one is a protocol error, 0x82.
#[test]
fn property_not_allowed_in_a_packet_is_malformed() {
    let mut arena = Arena::new();
    for (what, props, reason) in [
        (
            "Session Expiry Interval in PUBLISH",
            &[0x11u8, 0, 0, 0, 1][..],
            MALFORMED_PACKET,
        ),
        (
            "Payload Format Indicator twice",
            &[0x01, 0, 0x01, 0][..],
            PROTOCOL_ERROR,
        ),
    ] {
        let mut body = string("props/x");
        body.extend(varint(props.len()));
        body.extend_from_slice(props);
        body.extend(b"x");
        let mut stream = connected(arena.port(), V5, "props-v5");
        let _ = stream.write_all(&packet(0x30, &body));
        expect_disconnect(&mut stream, reason, what);
        arena.bystander_still_served();
    }
    arena.finish();
}

/// What mosquitto's msg_sequence_test found the codec letting through: DUP on a QoS 0
/// PUBLISH (MQTT-3.3.1-2, invalid flags: malformed, 2.1.3), a PINGREQ with a body
/// (3.12.1), an acknowledgement or DISCONNECT with bytes beyond its fields (3.1.1
/// 3.4.1/3.14.1; MQTT 5 3.4.2.2/3.14.2.2). Each is malformed: 0x81, 3.1.1 closed.
#[test]
fn short_packets_with_extra_bytes_and_dup_on_qos0_are_malformed() {
    let mut arena = Arena::new();
    // Topic "t", (v5: no properties,) payload: the same bytes are a 3.1.1 QoS 0 PUBLISH.
    let mut body = string("t");
    body.extend([0x00, b'p']);
    for (bytes, what) in [
        (packet(0x38, &body), "QoS 0 PUBLISH with DUP"),
        (vec![0xC0, 1, 0], "PINGREQ with a body"),
        (
            vec![0x40, 5, 0, 1, 0, 0, 0],
            "PUBACK with a byte after its properties",
        ),
        (
            vec![0xE0, 3, 0, 0, 0],
            "DISCONNECT with a byte after its properties",
        ),
    ] {
        answered(&mut arena, &bytes, MALFORMED_PACKET, what);
    }
    arena.finish();
}
