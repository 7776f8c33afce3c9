//! The `[limits]` bounds, end to end with raw MQTT bytes over TCP: keep-alive,
//! Server Keep Alive, client identifier length, connection count, file-descriptor
//! exhaustion, topic length and depth, subscription quotas and the offline queue.
//! Each bound is answered with the reason code the configuration file promises, and
//! what stays within the bounds keeps working.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

const V311: u8 = 4;
const V5: u8 = 5;

// ---- MQTT bytes -------------------------------------------------------------------------

/// Reads a variable byte integer at `*i`, advancing it.
fn read_varint(bytes: &[u8], i: &mut usize) -> Option<usize> {
    let mut n = 0usize;
    for shift in [0, 7, 14, 21] {
        let b = *bytes.get(*i)?;
        *i += 1;
        n |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// CONNECT; `props` are MQTT 5 CONNECT properties (ignored for 3.1.1).
fn connect_packet(
    version: u8,
    client_id: &str,
    keep_alive: u16,
    clean: bool,
    props: &[u8],
) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(version);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend(keep_alive.to_be_bytes());
    if version == V5 {
        body.extend(varint(props.len()));
        body.extend_from_slice(props);
    }
    body.extend(string(client_id));
    packet(0x10, &body)
}

/// The Session Expiry Interval CONNECT property.
fn session_expiry(secs: u32) -> Vec<u8> {
    let mut p = vec![0x11];
    p.extend(secs.to_be_bytes());
    p
}

/// The value of the integer property `id` in an MQTT 5 property block.
fn int_property(props: &[u8], id: u8) -> Option<u32> {
    let mut j = 0;
    while j < props.len() {
        let pid = props[j];
        j += 1;
        let str_len = |at: usize| -> Option<usize> {
            Some(2 + usize::from(u16::from_be_bytes([*props.get(at)?, *props.get(at + 1)?])))
        };
        let (value, width) = match pid {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => (u32::from(*props.get(j)?), 1),
            0x13 | 0x21 | 0x22 | 0x23 => (
                u32::from(u16::from_be_bytes([*props.get(j)?, *props.get(j + 1)?])),
                2,
            ),
            0x02 | 0x11 | 0x18 | 0x27 => {
                (u32::from_be_bytes(props.get(j..j + 4)?.try_into().ok()?), 4)
            }
            0x0B => {
                let mut k = j;
                let v = read_varint(props, &mut k)?;
                (v as u32, k - j)
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => (0, str_len(j)?),
            0x26 => {
                let k = str_len(j)?;
                (0, k + str_len(j + k)?)
            }
            _ => return None,
        };
        if pid == id {
            return Some(value);
        }
        j += width;
    }
    None
}

/// An incoming PUBLISH.
#[derive(Debug)]
struct Publish {
    topic: String,
    qos: u8,
    payload: String,
}

fn parse_publish(version: u8, first: u8, body: &[u8]) -> (Publish, Option<u16>) {
    let qos = (first >> 1) & 3;
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
    let mut i = 2 + tlen;
    let pid = (qos > 0).then(|| {
        i += 2;
        u16::from_be_bytes([body[i - 2], body[i - 1]])
    });
    if version == V5 {
        let plen = read_varint(body, &mut i).expect("property length");
        i += plen;
    }
    let payload = String::from_utf8_lossy(&body[i..]).into_owned();
    (
        Publish {
            topic,
            qos,
            payload,
        },
        pid,
    )
}

/// One raw MQTT client connection.
struct Raw {
    name: String,
    stream: TcpStream,
    version: u8,
    next_pid: u16,
    /// The CONNACK body.
    connack: Vec<u8>,
    /// PUBLISHes read while waiting for something else.
    inbox: Vec<Publish>,
}

impl Raw {
    /// Connects and returns the CONNACK body, or what came instead.
    fn try_open(
        port: u16,
        version: u8,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
        props: &[u8],
        within: Duration,
    ) -> Result<Raw, Incoming> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|_| Incoming::Closed)?;
        let _ = stream.write_all(&connect_packet(
            version, client_id, keep_alive, clean, props,
        ));
        match read_packet(&mut stream, Instant::now() + within) {
            Incoming::Packet(0x20, connack) => Ok(Raw {
                name: client_id.to_string(),
                stream,
                version,
                next_pid: 1,
                connack,
                inbox: Vec::new(),
            }),
            other => Err(other),
        }
    }

    /// Connects with a clean start and keep-alive 30; panics unless the broker accepts.
    fn open(port: u16, version: u8, client_id: &str) -> Raw {
        Raw::open_with(port, version, client_id, 30, true, &[])
    }

    fn open_with(
        port: u16,
        version: u8,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
        props: &[u8],
    ) -> Raw {
        let raw = Raw::try_open(port, version, client_id, keep_alive, clean, props, STEP)
            .unwrap_or_else(|got| panic!("{client_id}: no CONNACK, got {got:?}"));
        assert_eq!(
            raw.reason(),
            0,
            "{client_id}: CONNACK refused: {:02x?}",
            raw.connack
        );
        raw
    }

    /// The CONNACK reason code (3.1.1: return code).
    fn reason(&self) -> u8 {
        self.connack.get(1).copied().unwrap_or(0xFF)
    }

    fn session_present(&self) -> bool {
        self.connack.first().is_some_and(|f| f & 1 == 1)
    }

    /// An integer property of the (MQTT 5) CONNACK.
    fn connack_property(&self, id: u8) -> Option<u32> {
        let mut i = 2;
        let len = read_varint(&self.connack, &mut i)?;
        int_property(self.connack.get(i..i + len)?, id)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("{}: write: {e}", self.name));
    }

    fn pid(&mut self) -> u16 {
        let pid = self.next_pid;
        self.next_pid += 1;
        pid
    }

    /// Reads until a packet of type `kind` (high nibble) arrives; PUBLISHes on the way are
    /// acknowledged and kept in the inbox.
    fn expect(&mut self, kind: u8, what: &str) -> Vec<u8> {
        let deadline = Instant::now() + STEP;
        loop {
            match read_packet(&mut self.stream, deadline) {
                Incoming::Packet(first, body) if first >> 4 == kind => return body,
                Incoming::Packet(first, body) if first >> 4 == 3 => self.take_publish(first, &body),
                other => panic!("{}: waiting for {what}, got {other:?}", self.name),
            }
        }
    }

    fn take_publish(&mut self, first: u8, body: &[u8]) {
        let (publish, pid) = parse_publish(self.version, first, body);
        if let Some(pid) = pid {
            assert_eq!(publish.qos, 1, "QoS 2 is not used here");
            let ack = pid.to_be_bytes();
            self.send(&packet(0x40, &ack));
        }
        self.inbox.push(publish);
    }

    /// The next PUBLISH (acknowledged).
    fn next_publish(&mut self) -> Publish {
        if self.inbox.is_empty() {
            let deadline = Instant::now() + STEP;
            match read_packet(&mut self.stream, deadline) {
                Incoming::Packet(first, body) if first >> 4 == 3 => self.take_publish(first, &body),
                other => panic!("{}: waiting for PUBLISH, got {other:?}", self.name),
            }
        }
        self.inbox.remove(0)
    }

    /// SUBSCRIBE with `filters` at QoS 1; returns the SUBACK reason codes.
    fn subscribe(&mut self, filters: &[&str]) -> Vec<u8> {
        let mut body = self.pid().to_be_bytes().to_vec();
        if self.version == V5 {
            body.push(0);
        }
        for f in filters {
            body.extend(string(f));
            body.push(1);
        }
        self.send(&packet(0x82, &body));
        let suback = self.expect(9, "SUBACK");
        let mut i = 2;
        if self.version == V5 {
            let plen = read_varint(&suback, &mut i).expect("property length");
            i += plen;
        }
        suback[i..].to_vec()
    }

    /// QoS 1 PUBLISH; returns the PUBACK reason code (0 when the PUBACK has none).
    fn publish(&mut self, topic: &str, payload: &str) -> u8 {
        let pid = self.pid();
        let mut body = string(topic);
        body.extend(pid.to_be_bytes());
        if self.version == V5 {
            body.push(0);
        }
        body.extend(payload.as_bytes());
        self.send(&packet(0x32, &body));
        let puback = self.expect(4, &format!("PUBACK for {topic}"));
        assert_eq!(puback[..2], pid.to_be_bytes(), "PUBACK for another packet");
        puback.get(2).copied().unwrap_or(0)
    }

    /// PINGREQ answered by PINGRESP: the connection is up and served.
    fn ping(&mut self) {
        self.send(&[0xC0, 0x00]);
        self.expect(0xD, "PINGRESP");
    }

    /// A normal DISCONNECT; returns once the broker has closed the connection (it does
    /// so after it has detached the session).
    fn disconnect(mut self) {
        self.send(&[0xE0, 0x00]);
        assert_eq!(
            self.expect_closed(STEP),
            None,
            "{}: DISCONNECT answered",
            self.name
        );
    }

    /// Waits for the broker to close the connection; returns the DISCONNECT reason if
    /// one came first.
    fn expect_closed(&mut self, within: Duration) -> Option<u8> {
        let deadline = Instant::now() + within;
        let mut reason = None;
        loop {
            match read_packet(&mut self.stream, deadline) {
                Incoming::Packet(0xE0, body) => reason = Some(body.first().copied().unwrap_or(0)),
                Incoming::Packet(first, body) => {
                    panic!("{}: unexpected packet {first:#04x} {body:02x?}", self.name)
                }
                Incoming::Closed => return reason,
                Incoming::TimedOut => panic!("{}: still open after {within:?}", self.name),
            }
        }
    }

    /// Panics if the broker sends anything or closes within `quiet`.
    fn expect_quiet(&mut self, quiet: Duration) {
        match read_packet(&mut self.stream, Instant::now() + quiet) {
            Incoming::TimedOut => {}
            other => panic!("{}: expected silence, got {other:?}", self.name),
        }
    }
}

// ---- keep-alive -----------------------------------------------------------------------

#[test]
fn v5_client_silent_past_one_and_a_half_keep_alives_gets_disconnect_0x8d() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut client = Raw::open_with(broker.tcp_port(), V5, "ka-v5", 1, true, &[]);
    let connected = Instant::now();
    let reason = client.expect_closed(Duration::from_secs(6));
    let after = connected.elapsed();
    assert_eq!(
        reason,
        Some(0x8D),
        "expected DISCONNECT 0x8D (Keep Alive timeout)"
    );
    assert!(
        after >= Duration::from_millis(1400) && after <= Duration::from_secs(3),
        "keep-alive 1 s: disconnected after {after:?}, expected 1.5 s"
    );
}

#[test]
fn v311_client_silent_past_one_and_a_half_keep_alives_is_closed() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut client = Raw::open_with(broker.tcp_port(), V311, "ka-v3", 1, true, &[]);
    let connected = Instant::now();
    assert_eq!(client.expect_closed(Duration::from_secs(6)), None);
    let after = connected.elapsed();
    assert!(
        after >= Duration::from_millis(1400) && after <= Duration::from_secs(3),
        "keep-alive 1 s: closed after {after:?}, expected 1.5 s"
    );
}

#[test]
fn keep_alive_counts_from_the_last_packet_received() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut client = Raw::open_with(broker.tcp_port(), V5, "ka-moving", 1, true, &[]);
    // Pings every 0.5 s keep it well past 1.5 s ...
    let mut last = Instant::now();
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(500));
        client.ping();
        last = Instant::now();
    }
    // ... and once it falls silent it is cut off 1.5 s after its last packet.
    let reason = client.expect_closed(Duration::from_secs(6));
    let after = last.elapsed();
    assert_eq!(
        reason,
        Some(0x8D),
        "expected DISCONNECT 0x8D (Keep Alive timeout)"
    );
    assert!(
        after >= Duration::from_millis(1400) && after <= Duration::from_secs(3),
        "keep-alive 1 s: disconnected {after:?} after the last ping, expected 1.5 s"
    );
}

#[test]
fn client_with_keep_alive_0_is_not_disconnected() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut v5 = Raw::open_with(broker.tcp_port(), V5, "ka0-v5", 0, true, &[]);
    let mut v3 = Raw::open_with(broker.tcp_port(), V311, "ka0-v3", 0, true, &[]);
    // A v5 client asking for 0 is given the maximum (default 1200 s) as Server Keep Alive.
    assert_eq!(v5.connack_property(0x13), Some(1200));
    thread::sleep(Duration::from_secs(3));
    for client in [&mut v5, &mut v3] {
        client.expect_quiet(Duration::from_millis(10));
        client.ping();
    }
}

#[test]
fn server_keep_alive_caps_a_longer_keep_alive() {
    let broker = TestBroker::start(BrokerOpts::new().limit("max_keep_alive_secs", 60));
    let asked_more = Raw::open_with(broker.tcp_port(), V5, "ka-120", 120, true, &[]);
    assert_eq!(
        asked_more.connack_property(0x13),
        Some(60),
        "Server Keep Alive in CONNACK {:02x?}",
        asked_more.connack
    );
    let asked_less = Raw::open_with(broker.tcp_port(), V5, "ka-30", 30, true, &[]);
    assert_eq!(
        asked_less.connack_property(0x13),
        None,
        "a keep-alive within the maximum is kept: {:02x?}",
        asked_less.connack
    );
}

// ---- client identifiers and connections -------------------------------------------------

#[test]
fn client_id_longer_than_max_client_id_len_is_refused() {
    let broker = TestBroker::start(BrokerOpts::new().limit("max_client_id_len", 16));
    let port = broker.tcp_port();
    let too_long = "x".repeat(17);
    let refused = |version| {
        Raw::try_open(port, version, &too_long, 30, true, &[], STEP)
            .unwrap_or_else(|got| panic!("v{version}: no CONNACK, got {got:?}"))
            .reason()
    };
    assert_eq!(refused(V5), 0x85, "MQTT 5: Client Identifier not valid");
    assert_eq!(refused(V311), 2, "MQTT 3.1.1: identifier rejected");
    // Exactly at the limit is fine.
    let at_limit = "y".repeat(16);
    Raw::open(port, V5, &at_limit).ping();
    Raw::open(port, V311, &format!("{}3", &at_limit[..15])).ping();
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let broker = TestBroker::start(BrokerOpts::new().limit("max_connections", 3));
    let port = broker.tcp_port();
    // The harness's readiness probe is a connection too; until the broker has seen it
    // close it may still count, so the first three are retried briefly.
    let open_retrying = |id: &str| {
        let deadline = Instant::now() + STEP;
        loop {
            match Raw::try_open(port, V5, id, 30, true, &[], Duration::from_secs(2)) {
                Ok(raw) => return raw,
                Err(got) if Instant::now() >= deadline => {
                    panic!("{id}: not accepted within {STEP:?}: {got:?}")
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let mut sub = open_retrying("mc-1");
    let mut publisher = open_retrying("mc-2");
    let mut third = open_retrying("mc-3");
    assert_eq!(sub.subscribe(&["mc/#"]), [1]);

    let start = Instant::now();
    match Raw::try_open(port, V5, "mc-4", 30, true, &[], STEP) {
        Err(Incoming::Closed) => {}
        Ok(raw) => panic!(
            "a 4th connection was accepted: CONNACK {:02x?}",
            raw.connack
        ),
        Err(other) => panic!("4th connection: expected it closed, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "4th connection closed only after {:?}",
        start.elapsed()
    );

    // The three keep working.
    third.ping();
    publisher.publish("mc/x", "still-served");
    let got = sub.next_publish();
    assert_eq!(
        (got.topic.as_str(), got.payload.as_str()),
        ("mc/x", "still-served")
    );

    // One leaves: a new one gets its place.
    third.disconnect();
    let mut fourth = open_retrying("mc-4");
    fourth.ping();
    broker.assert_no_panic_logged();
}

// ---- file-descriptor exhaustion ---------------------------------------------------------

/// A broker started by this file under `ulimit -n`: the shell execs the binary, so the
/// PID is the broker's. Killed by PID when dropped.
struct LimitedBroker {
    child: Child,
    _dir: tempfile::TempDir,
    log_path: PathBuf,
    port: u16,
}

impl LimitedBroker {
    fn start(fd_limit: u32) -> LimitedBroker {
        let bin = match std::env::var_os("FLEETCORE_BIN") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(env!("CARGO_BIN_EXE_fleetcore")),
        };
        let dir = tempfile::Builder::new()
            .prefix("fleetcore-e2e-fd-")
            .tempdir()
            .expect("create temp dir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.local_addr().expect("local_addr").port()
        };
        let config = dir.path().join("fleetcore.toml");
        fs::write(
            &config,
            format!(
                "data_dir = {:?}\n\n[admin]\nenabled = false\n\n[log]\nformat = \"human\"\nlevel = \"info\"\n\n\
                 [[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:{port}\"\nallow_anonymous = true\n",
                dir.path().join("data").to_str().expect("utf-8 path")
            ),
        )
        .expect("write config");
        let log_path = dir.path().join("broker.log");
        let log = File::create(&log_path).expect("create log");
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {fd_limit} && exec \"$0\" \"$@\""))
            .arg(&bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut broker = LimitedBroker {
            child,
            _dir: dir,
            log_path,
            port,
        };
        let deadline = Instant::now() + STEP;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            broker.assert_running();
            assert!(
                Instant::now() < deadline,
                "broker not listening within {STEP:?}\n{}",
                broker.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("broker exited ({status})\n{}", self.log());
        }
    }
}

impl Drop for LimitedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_timeout(&mut self.child, STEP);
        if thread::panicking() {
            eprintln!("---- fleetcore log ----\n{}", self.log());
        }
    }
}

#[test]
fn out_of_file_descriptors_backs_off_and_keeps_serving_existing_clients() {
    let test_start = Instant::now();
    let mut broker = LimitedBroker::start(40);
    let port = broker.port;
    let mut sub = Raw::open(port, V5, "fd-sub");
    assert_eq!(sub.subscribe(&["fd/#"]), [1]);
    let mut publisher = Raw::open(port, V5, "fd-pub");

    // Open connections until the broker cannot take another one.
    let mut extra: Vec<TcpStream> = Vec::new();
    let mut exhausted = false;
    while extra.len() < 200 {
        let id = format!("fd-extra-{}", extra.len());
        match Raw::try_open(port, V5, &id, 30, true, &[], Duration::from_secs(1)) {
            Ok(raw) => extra.push(raw.stream),
            Err(Incoming::TimedOut) => {
                // Connected at the TCP level (the kernel's backlog) but never served.
                exhausted = true;
                break;
            }
            Err(other) => panic!("{id}: {other:?}"),
        }
    }
    assert!(
        exhausted,
        "200 connections were all served under ulimit -n 40"
    );
    let served = extra.len();

    let deadline = Instant::now() + STEP;
    while !broker.log().contains("out of file descriptors") {
        assert!(
            Instant::now() < deadline,
            "no back-off warning in the log after {served} connections\n{}",
            broker.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    broker.assert_running();

    // Clients connected before the exhaustion are still served.
    assert_eq!(publisher.publish("fd/x", "during"), 0);
    let got = sub.next_publish();
    assert_eq!(
        (got.topic.as_str(), got.payload.as_str()),
        ("fd/x", "during")
    );

    // Descriptors come back: new clients are accepted again.
    drop(extra);
    let deadline = Instant::now() + STEP;
    let mut again = loop {
        match Raw::try_open(port, V5, "fd-again", 30, true, &[], Duration::from_secs(2)) {
            Ok(raw) => break raw,
            Err(got) => assert!(
                Instant::now() < deadline,
                "no new client accepted after the extra sockets closed: {got:?}\n{}",
                broker.log()
            ),
        }
    };
    assert_eq!(again.reason(), 0);
    again.ping();
    assert_eq!(publisher.publish("fd/x", "after"), 0);
    assert_eq!(sub.next_publish().payload, "after");
    broker.assert_running();
    assert!(!broker.log().contains("panicked"), "{}", broker.log());
    assert!(test_start.elapsed() < Duration::from_secs(20));
}

// ---- topics and subscriptions ---------------------------------------------------------

#[test]
fn topic_levels_beyond_max_topic_levels_are_refused_except_under_aws() {
    let broker = TestBroker::start(BrokerOpts::new().limit("max_topic_levels", 3));
    let mut client = Raw::open(broker.tcp_port(), V5, "levels");
    assert_eq!(
        client.publish("a/b/c/d", "deep"),
        0x90,
        "PUBACK for a 4-level topic"
    );
    // The connection stays up and served.
    client.ping();
    assert_eq!(client.subscribe(&["a/b/c/#", "a/b/#"]), [0x8F, 0x01]);
    assert_eq!(client.publish("a/b/c", "ok"), 0x00);
    assert_eq!(client.next_publish().topic, "a/b/c");

    // A shadow request (5 levels) reaches the shadow service, whose answer (6 levels)
    // reaches the subscriber.
    let aws = "$aws/things/thing-1/shadow/get";
    assert_eq!(client.subscribe(&["$aws/things/+/shadow/#"]), [0x01]);
    assert_eq!(client.publish(aws, ""), 0x00, "PUBACK for {aws}");
    let got = client.next_publish();
    assert_eq!(got.topic, "$aws/things/thing-1/shadow/get/rejected");
    assert!(got.payload.contains("404"), "{}", got.payload);
}

#[test]
fn filters_beyond_max_filters_per_subscribe_get_quota_exceeded() {
    let broker = TestBroker::start(
        BrokerOpts::new()
            .limit("max_subscriptions_per_connection", 2)
            .limit("max_filters_per_subscribe", 2),
    );
    let mut client = Raw::open(broker.tcp_port(), V5, "quota-1");
    assert_eq!(client.subscribe(&["q/a", "q/b", "q/c"]), [0x01, 0x01, 0x97]);
}

#[test]
fn subscriptions_beyond_max_subscriptions_per_connection_get_quota_exceeded() {
    let broker = TestBroker::start(
        BrokerOpts::new()
            .limit("max_subscriptions_per_connection", 2)
            .limit("max_filters_per_subscribe", 2),
    );
    let mut client = Raw::open(broker.tcp_port(), V5, "quota-2");
    assert_eq!(client.subscribe(&["q/a"]), [0x01]);
    assert_eq!(client.subscribe(&["q/b"]), [0x01]);
    assert_eq!(client.subscribe(&["q/c"]), [0x97], "a third subscription");
    assert_eq!(
        client.subscribe(&["q/a"]),
        [0x01],
        "subscribing again to a held filter is not a new subscription"
    );
    // The refused filter delivers nothing: q/c published first, q/a is the first to arrive.
    let mut publisher = Raw::open(broker.tcp_port(), V5, "quota-pub");
    publisher.publish("q/c", "refused");
    publisher.publish("q/a", "held");
    assert_eq!(client.next_publish().topic, "q/a");
}

#[test]
fn offline_queue_keeps_the_oldest_max_queued_messages_and_drops_newer_ones() {
    let broker = TestBroker::start(BrokerOpts::new().limit("max_queued_messages", 5));
    let port = broker.tcp_port();
    let mut session = Raw::open_with(port, V5, "queue-5", 30, true, &session_expiry(300));
    assert_eq!(session.subscribe(&["oq/#"]), [0x01]);
    session.disconnect();

    let mut publisher = Raw::open(port, V5, "queue-pub");
    let mut codes = Vec::new();
    for i in 0..10 {
        codes.push(publisher.publish("oq/m", &format!("m-{i}")));
    }
    let mut session = Raw::open_with(port, V5, "queue-5", 30, false, &session_expiry(300));
    assert!(session.session_present(), "session not resumed");
    let got: Vec<String> = (0..5).map(|_| session.next_publish().payload).collect();
    assert_eq!(
        got,
        ["m-0", "m-1", "m-2", "m-3", "m-4"],
        "PUBACK codes {codes:02x?}"
    );
    publisher.publish("oq/end", "marker");
    let next = session.next_publish();
    assert_eq!(
        (next.topic.as_str(), next.payload.as_str()),
        ("oq/end", "marker"),
        "more than max_queued_messages (5) were kept"
    );
}
