//! A second connection with the same client id takes the session over; the first one is
//! disconnected (MQTT 5: DISCONNECT with reason 0x8E, Session taken over).

mod common;

use std::io::Write;
use std::time::Instant;

use common::raw::{packet, read_packet, string, Incoming};
use common::*;

fn takeover(protocol: &str) -> (LineChild, LineChild, TestBroker) {
    let broker = TestBroker::start(BrokerOpts::new());
    let args = with(
        &broker.paho_tcp(),
        &[
            "--protocol",
            protocol,
            "--client-id",
            "twin",
            "--filter",
            "takeover/#",
            "--timeout",
            "25",
        ],
    );
    let mut first = paho("subscribe.py", &args);
    first.expect_event("suback", STEP);
    let mut second = paho("subscribe.py", &args);
    second.expect_event("suback", STEP);
    (first, second, broker)
}

/// The connection that took over is fully working.
fn assert_second_receives(broker: &TestBroker, second: &mut LineChild) {
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "takeover/x", "-m", "for-second"],
    ));
    let msg = second.expect_event("message", STEP);
    assert_eq!(msg.get("payload"), "for-second");
}

#[test]
fn v5_first_connection_gets_disconnect_session_taken_over() {
    let (mut first, mut second, broker) = takeover("5");
    let gone = first.expect_event("disconnected", STEP);
    assert_eq!(gone.num("reason_code"), 0x8E, "{}", first.transcript());
    assert_eq!(
        gone.get("from_broker"),
        "1",
        "no DISCONNECT packet was sent\n{}",
        first.transcript()
    );
    assert_eq!(first.wait_exit(STEP).code(), Some(2));
    assert_second_receives(&broker, &mut second);
}

#[test]
fn v311_first_connection_is_closed_on_takeover() {
    let (mut first, mut second, broker) = takeover("3.1.1");
    first.expect_event("disconnected", STEP);
    assert_eq!(first.wait_exit(STEP).code(), Some(2));
    assert_second_receives(&broker, &mut second);
}

// ---- The takeover race: the old connection's last packets are not thrown away ----------

mod race {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::Instant;

    use super::common::STEP;
    use super::*;

    pub const ROUNDS: usize = 200;

    /// CONNECT: `level` 4 or 5, `clean`, MQTT 5 Session Expiry `expiry`, an optional will.
    pub fn connect(
        level: u8,
        client_id: &str,
        clean: bool,
        expiry: u32,
        will: Option<&str>,
    ) -> Vec<u8> {
        let mut body = string("MQTT");
        body.push(level);
        body.push(u8::from(clean) << 1 | if will.is_some() { 0x04 } else { 0 });
        body.extend(30u16.to_be_bytes());
        if level == 5 {
            body.extend([5, 0x11]);
            body.extend(expiry.to_be_bytes());
        }
        body.extend(string(client_id));
        if let Some(topic) = will {
            if level == 5 {
                body.push(0); // no will properties
            }
            body.extend(string(topic));
            body.extend(string("the will"));
        }
        packet(0x10, &body)
    }

    /// Connects and returns the stream and the CONNACK's session-present flag.
    pub fn open(port: u16, connect: &[u8]) -> (TcpStream, bool) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_nodelay(true).unwrap();
        s.write_all(connect).expect("send CONNECT");
        match read_packet(&mut s, Instant::now() + STEP) {
            Incoming::Packet(0x20, body) => {
                assert_eq!(body.get(1), Some(&0), "CONNACK refused: {body:02x?}");
                (s, body[0] & 1 == 1)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

/// DISCONNECT with Session Expiry 0, then at once a reconnect with clean start 0: the
/// session was ended by the DISCONNECT, so it is never present, however fast the reconnect
/// comes (before the fix, the takeover threw the old socket's unread DISCONNECT away and
/// the session came back some 1 time in 6).
#[test]
fn v5_disconnect_with_expiry_0_then_immediate_reconnect_finds_no_session() {
    use race::*;
    let broker = TestBroker::start(BrokerOpts::new());
    let port = broker.tcp_port();
    let mut revived = 0;
    for _ in 0..ROUNDS {
        let (mut old, _) = open(port, &connect(5, "racer5", true, 300, None));
        // DISCONNECT, reason 0, properties: Session Expiry Interval 0.
        old.write_all(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 0])
            .expect("send DISCONNECT");
        let (mut new, present) = open(port, &connect(5, "racer5", false, 300, None));
        revived += usize::from(present);
        let _ = new.write_all(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 0]);
        drop(old);
    }
    assert_eq!(
        revived, 0,
        "a session ended by DISCONNECT came back {revived} times in {ROUNDS}"
    );
}

/// MQTT 3.1.1: a clean DISCONNECT, then at once a reconnect with the same client id: the
/// will is never published (before the fix it sometimes was, when the takeover came before
/// the old socket's DISCONNECT was read).
#[test]
fn v311_clean_disconnect_then_immediate_reconnect_never_fires_the_will() {
    use race::*;
    let broker = TestBroker::start(BrokerOpts::new());
    let port = broker.tcp_port();
    let (mut watcher, _) = open(port, &connect(4, "will-watcher", true, 0, None));
    // SUBSCRIBE pid 1 to race/will/# at QoS 0.
    let mut sub = vec![0, 1];
    sub.extend(string("race/will/#"));
    sub.push(0);
    watcher.write_all(&packet(0x82, &sub)).unwrap();
    match read_packet(&mut watcher, Instant::now() + STEP) {
        Incoming::Packet(0x90, _) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
    for clean in [true, false] {
        for _ in 0..ROUNDS {
            let (mut old, _) = open(port, &connect(4, "racer311", clean, 0, Some("race/will/x")));
            old.write_all(&[0xE0, 0x00]).expect("send DISCONNECT");
            let (mut new, _) = open(port, &connect(4, "racer311", clean, 0, None));
            let _ = new.write_all(&[0xE0, 0x00]);
            drop(old);
        }
    }
    // A marker after the rounds: any will was routed before it.
    let (mut marker, _) = open(port, &connect(4, "marker", true, 0, None));
    let mut publish = string("race/will/marker");
    publish.extend(b"end");
    marker.write_all(&packet(0x30, &publish)).unwrap();
    let mut wills = 0;
    loop {
        match read_packet(&mut watcher, Instant::now() + STEP) {
            Incoming::Packet(0x30, body) => {
                if body.ends_with(b"end") {
                    break;
                }
                wills += 1;
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(
        wills,
        0,
        "the will was published {wills} times after a clean DISCONNECT in {} rounds",
        2 * ROUNDS
    );
}
