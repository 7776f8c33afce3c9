//! The port-443 listener (`kind = "tls"`, `websocket = true`): one TLS port that serves
//! MQTT (ALPN `x-amzn-mqtt-ca` or `mqtt`, or no ALPN and a CONNECT first) and MQTT over
//! WebSocket (ALPN `http/1.1`, `GET /mqtt`), with the same identity, policies and
//! revocation as the 8883-style listener; plain HTTP gets plain errors; every handshake
//! is bounded by the connect timeout; PROXY protocol v2 names the real client.
//! Real clients throughout: mosquitto_pub/sub, paho-mqtt over WSS, curl, the AWS IoT
//! Device SDK v2 on a real port 443.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::*;
use common::raw::{packet, string};
use common::*;
use serde_json::json;

const SEC: Duration = Duration::from_secs(1);

/// Every client may use `acct/<its certificate CN>/...` only, with client ids that
/// start with its CN.
const PER_DEVICE: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect",
      "Resource": "arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}*" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/acct/${iot:Certificate.Subject.CommonName}/*" },
    { "Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
      "Resource": "arn:aws:iot:*:*:topic/acct/${iot:Certificate.Subject.CommonName}/*" }
  ]
}"#;

fn args(base: Vec<String>, more: &[&str]) -> Vec<String> {
    with(&base, more)
}

#[test]
fn mosquitto_without_alpn_and_with_alpn_mqtt_speak_mqtt_over_tls_on_443() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(PER_DEVICE).wss(""));
    let pki = broker.pki();
    // mosquitto's clients send no ALPN: the listener sees a CONNECT first.
    let mut sub = mosquitto_sub(&args(
        broker.mosq_wss(&pki.thing1),
        &["-i", "thing-1", "-q", "1", "-t", "acct/thing-1/#"],
    ));
    // With --tls-alpn mqtt the handshake itself picks MQTT.
    mosquitto_pub(&args(
        broker.mosq_wss(&pki.thing1),
        &[
            "--tls-alpn",
            "mqtt",
            "-i",
            "thing-1-pub",
            "-q",
            "1",
            "-t",
            "acct/thing-1/orders",
            "-m",
            "order-over-alpn-mqtt",
        ],
    ));
    let (_, _, topic, payload) = expect_mosq_msg(&mut sub, 10 * SEC);
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("acct/thing-1/orders", "order-over-alpn-mqtt")
    );
    // The listener's policy holds on 443 as on 8883: thing-1 cannot publish as thing-2.
    let out = mosquitto_pub_output(&args(
        broker.mosq_wss(&pki.thing1),
        &[
            "-V",
            "mqttv5",
            "-i",
            "thing-2",
            "-t",
            "acct/thing-2/x",
            "-m",
            "no",
        ],
    ));
    assert!(!out.status.success(), "{}", describe(&out));
    // A certificate from a CA the broker does not trust fails the handshake.
    let out = mosquitto_pub_output(&args(
        broker.mosq_wss(&pki.rogue),
        &["-i", "thing-1", "-t", "acct/thing-1/x", "-m", "no"],
    ));
    assert!(
        !out.status.success(),
        "rogue certificate let in\n{}",
        describe(&out)
    );
    broker.assert_no_panic_logged();
}

#[test]
fn paho_over_wss_with_a_client_certificate_gets_orders_in_both_protocol_versions() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(PER_DEVICE).wss(""));
    let pki = broker.pki();
    for protocol in ["5", "3.1.1"] {
        let mut agent = paho(
            "subscribe.py",
            &args(
                broker.paho_wss(Some(&pki.thing1)),
                &[
                    "--protocol",
                    protocol,
                    "--client-id",
                    "thing-1",
                    "--filter",
                    "acct/thing-1/#",
                    "--count",
                    "2",
                ],
            ),
        );
        assert_eq!(
            agent.expect_event("suback", 10 * SEC).get("codes"),
            "1",
            "{}",
            agent.transcript()
        );
        // The backend publishes on the mTLS listener; one order is big enough to span
        // several TLS records and WebSocket reads.
        let big = "x".repeat(100_000);
        for payload in [format!("order-{protocol}"), big.clone()] {
            mosquitto_pub(&args(
                broker.mosq_tls(&pki.thing1),
                &[
                    "-i",
                    "thing-1-pub",
                    "-q",
                    "1",
                    "-t",
                    "acct/thing-1/orders",
                    "-m",
                    &payload,
                ],
            ));
        }
        agent.expect_success(10 * SEC);
        let got = payloads(&agent.events());
        assert_eq!(got, vec![format!("order-{protocol}"), big], "v{protocol}");
    }
    assert!(
        broker.log().contains("transport=\"wss\""),
        "connections over WebSocket are logged as such"
    );
    broker.assert_no_panic_logged();
}

/// `curl` with these TLS arguments against the 443 listener; returns (status, body).
fn curl(broker: &TestBroker, url_path: &str, extra: &[&str]) -> (String, String) {
    require_program("curl");
    let pki = broker.pki();
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(&pki.ca_cert)
    .arg("--cert")
    .arg(&pki.thing1.cert)
    .arg("--key")
    .arg(&pki.thing1.key)
    .args(extra)
    .arg(format!("https://localhost:{}{url_path}", broker.wss_port()));
    let out = run(cmd, 20 * SEC);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

#[test]
fn plain_http_on_443_gets_a_plain_error_never_a_hang() {
    let broker = TestBroker::start(
        BrokerOpts::new()
            .tls()
            .policy(PER_DEVICE)
            .wss("")
            .ws("")
            .limit("connect_timeout_secs", 3),
    );
    // curl offers ALPN h2 and http/1.1: the listener picks http/1.1.
    let (code, body) = curl(&broker, "/", &[]);
    assert_eq!(code, "404", "{body}");
    assert!(
        body.contains("/mqtt"),
        "the error says where MQTT is: {body}"
    );
    let (code, body) = curl(&broker, "/mqtt", &[]);
    assert_eq!(code, "426", "a GET without Upgrade: {body}");
    // Without ALPN the first bytes decide: "GET" is HTTP.
    let (code, _) = curl(&broker, "/status", &["--no-alpn"]);
    assert_eq!(code, "404");
    let (code, _) = curl(&broker, "/mqtt", &["-X", "POST", "--http1.1"]);
    assert_eq!(code, "405");

    // The plain WebSocket listener answers the same way over plain HTTP.
    let mut s = TcpStream::connect(("127.0.0.1", broker.ws_port())).unwrap();
    s.set_read_timeout(Some(10 * SEC)).unwrap();
    s.write_all(b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404 "), "{reply}");

    // Half a request, then silence: closed at the connect timeout, not held.
    let mut s = TcpStream::connect(("127.0.0.1", broker.ws_port())).unwrap();
    s.set_read_timeout(Some(15 * SEC)).unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n").unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the close, got {:?}", &buf[..n]);
    assert!(
        start.elapsed() < 8 * SEC,
        "closed after {:?}",
        start.elapsed()
    );

    // A TCP connection to the TLS port that never starts a handshake: same bound.
    let mut s = TcpStream::connect(("127.0.0.1", broker.wss_port())).unwrap();
    s.set_read_timeout(Some(15 * SEC)).unwrap();
    let start = Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        start.elapsed() < 8 * SEC,
        "closed after {:?}",
        start.elapsed()
    );
    broker.assert_no_panic_logged();
}

/// A v3.1.1 CONNECT with this client id.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = string("MQTT");
    body.extend([4, 0x02, 0, 60]);
    body.extend(string(client_id));
    packet(0x10, &body)
}

/// Reads binary WebSocket messages until `want` bytes of MQTT have arrived.
fn read_ws_bytes(
    ws: &mut tungstenite::WebSocket<TcpStream>,
    want: usize,
    deadline: Instant,
) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        assert!(Instant::now() < deadline, "only {got:02x?} arrived");
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => got.extend_from_slice(&b),
            Ok(other) => panic!("unexpected WebSocket message {other:?}"),
            Err(e) => panic!("WebSocket read failed after {got:02x?}: {e}"),
        }
    }
    got
}

/// Splits a byte stream into whole MQTT packets (remaining length < 128 here).
fn split_packets(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let len = 2 + bytes[1] as usize;
        out.push(bytes[..len].to_vec());
        bytes = &bytes[len..];
    }
    out
}

#[test]
fn mqtt_packets_may_span_websocket_frames_and_share_them() {
    let broker = TestBroker::start(BrokerOpts::new().ws(""));
    let stream = TcpStream::connect(("127.0.0.1", broker.ws_port())).unwrap();
    stream.set_read_timeout(Some(10 * SEC)).unwrap();
    let request = tungstenite::http::Request::builder()
        .uri(format!("ws://127.0.0.1:{}/mqtt", broker.ws_port()))
        .header("Host", "127.0.0.1")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tungstenite::handshake::client::generate_key(),
        )
        .header("Sec-WebSocket-Protocol", "mqtt")
        .body(())
        .unwrap();
    let (mut ws, response) = tungstenite::client(request, stream).expect("upgrade");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("mqtt")
    );
    // CONNECT split over three frames.
    let connect = connect_packet("ws-frames");
    for part in [&connect[..1], &connect[1..5], &connect[5..]] {
        ws.send(tungstenite::Message::binary(part.to_vec()))
            .unwrap();
    }
    let deadline = Instant::now() + 10 * SEC;
    assert_eq!(
        read_ws_bytes(&mut ws, 4, deadline),
        [0x20, 2, 0, 0],
        "CONNACK"
    );
    // SUBSCRIBE, a PUBLISH to the same topic and a PINGREQ, all in one frame.
    let mut sub = vec![0, 1];
    sub.extend(string("ws/frames"));
    sub.push(0);
    let mut publish = string("ws/frames");
    publish.extend_from_slice(b"hello");
    let mut frame = packet(0x82, &sub);
    frame.extend(packet(0x30, &publish));
    frame.extend([0xC0, 0]);
    ws.send(tungstenite::Message::binary(frame)).unwrap();
    let suback = packet(0x90, &[0, 1, 0]);
    let delivered = packet(0x30, &publish);
    let pingresp = vec![0xD0, 0];
    let total = suback.len() + delivered.len() + pingresp.len();
    let got = split_packets(&read_ws_bytes(&mut ws, total, deadline));
    // The PINGRESP may overtake the routed PUBLISH; SUBACK comes first.
    assert_eq!(got.first(), Some(&suback), "{got:02x?}");
    let mut rest = got[1..].to_vec();
    rest.sort();
    let mut want = vec![delivered, pingresp];
    want.sort();
    assert_eq!(rest, want, "the PUBLISH back and PINGRESP");
    // A text frame is not MQTT: the broker closes.
    ws.send(tungstenite::Message::text("hello")).unwrap();
    let closed = loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(_)) | Err(_) => break true,
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => break false,
        }
    };
    assert!(closed, "text frame did not end the connection");
    broker.assert_no_panic_logged();
}

#[test]
fn proxy_protocol_v2_puts_the_real_client_address_in_the_log() {
    let broker = TestBroker::start(
        BrokerOpts::new().ws("proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.0/8\"]"),
    );
    // What HAProxy sends for a client 203.0.113.9:4242 reaching 10.0.0.1:1883.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([0x21, 0x11, 0, 12, 203, 0, 113, 9, 10, 0, 0, 1]);
    header.extend(4242u16.to_be_bytes());
    header.extend(1883u16.to_be_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", broker.ws_port())).unwrap();
    s.write_all(&header).unwrap();
    s.write_all(&connect_packet("behind-haproxy")).unwrap();
    let deadline = Instant::now() + 10 * SEC;
    match raw::read_packet(&mut s, deadline) {
        raw::Incoming::Packet(0x20, body) => assert_eq!(body, [0, 0]),
        other => panic!("no CONNACK: {other:?}\n{}", broker.log_tail()),
    }
    let log = broker.log();
    let line = log
        .lines()
        .find(|l| l.contains("client connected") && l.contains("behind-haproxy"))
        .unwrap_or_else(|| panic!("no connect line\n{log}"));
    assert!(line.contains("peer=203.0.113.9:4242"), "{line}");
    assert!(line.contains("via=127.0.0.1:"), "{line}");

    // Without the header the connection is refused.
    let mut s = TcpStream::connect(("127.0.0.1", broker.ws_port())).unwrap();
    s.write_all(&connect_packet("no-header")).unwrap();
    assert!(matches!(
        raw::read_packet(&mut s, Instant::now() + 10 * SEC),
        raw::Incoming::Closed
    ));
    assert!(broker.log().contains("bad PROXY protocol header"));

    // Only the balancers named in proxy_protocol_from may send the header: from any
    // other address a well-formed header is refused, so no one can claim an address
    // by reaching the port directly.
    let strict = TestBroker::start(
        BrokerOpts::new().ws("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\"]"),
    );
    let mut s = TcpStream::connect(("127.0.0.1", strict.ws_port())).unwrap();
    s.write_all(&header).unwrap();
    // The broker may refuse (and close) as soon as it has read the header, so this
    // write can meet a closed socket (EPIPE); the refusal is what is checked.
    let _ = s.write_all(&connect_packet("spoofer"));
    assert!(matches!(
        raw::read_packet(&mut s, Instant::now() + 10 * SEC),
        raw::Incoming::Closed
    ));
    assert!(strict
        .log()
        .contains("not from a balancer in proxy_protocol_from"));
    assert!(!strict.log().contains("spoofer"));
}

#[test]
fn registered_identity_on_443_is_the_one_on_8883_and_revocation_cuts_wss_off() {
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin().wss(""));
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision_fleet(&broker, dir.path());
    let mut agent = paho(
        "subscribe.py",
        &args(
            broker.paho_wss(Some(&fleet.agent)),
            &[
                "--client-id",
                "computer-a",
                "--filter",
                "customer-a/computer-a/#",
                "--timeout",
                "60",
            ],
        ),
    );
    assert_eq!(agent.expect_event("suback", 10 * SEC).get("codes"), "1");
    // The shared policy's thing variables bind over WSS as over 8883: another
    // account's topics are refused.
    let mut other = paho(
        "subscribe.py",
        &args(
            broker.paho_wss(Some(&fleet.agent)),
            &[
                "--client-id",
                "computer-a-2",
                "--filter",
                "customer-a/computer-a/#",
                "--exit-after-subscribe",
            ],
        ),
    );
    assert_eq!(
        other.expect_event("connack", 10 * SEC).get("reason_code"),
        "135",
        "client id other than the thing name: no thing variables, no CONNECT"
    );
    mosquitto_pub(&args(
        broker.mosq_tls(&fleet.backend),
        &[
            "-i",
            "backend",
            "-q",
            "1",
            "-t",
            AGENT_ORDERS,
            "-m",
            "order-1",
        ],
    ));
    assert_eq!(
        agent.expect_event("message", 10 * SEC).get("payload"),
        "order-1"
    );

    revoke_and_expect_cut_off(&broker, &fleet, &mut agent);
    // Refused again over WSS and over MQTT-over-TLS on the same port.
    let mut again = paho(
        "subscribe.py",
        &args(
            broker.paho_wss(Some(&fleet.agent)),
            &["--client-id", "computer-a", "--exit-after-subscribe"],
        ),
    );
    assert_eq!(
        again.expect_event("connack", 10 * SEC).get("reason_code"),
        "135"
    );
    let out = mosquitto_pub_output(&args(
        broker.mosq_wss(&fleet.agent),
        &[
            "-V",
            "mqttv5",
            "-i",
            "computer-a",
            "-t",
            AGENT_ORDERS,
            "-m",
            "x",
        ],
    ));
    assert!(!out.status.success(), "{}", describe(&out));
    broker.assert_no_panic_logged();
}

/// The AWS IoT Device SDK v2 turns on ALPN `x-amzn-mqtt-ca` by itself when the port is
/// 443 (and only then), so this test serves the real port 443 on 127.0.0.1 (root or
/// CAP_NET_BIND_SERVICE needed, as CI has) and checks in the broker's metrics that
/// exactly that ALPN was negotiated, for the SDK's 3.1.1 and MQTT 5 clients.
#[test]
fn aws_iot_sdk_on_port_443_negotiates_alpn_x_amzn_mqtt_ca() {
    let broker = TestBroker::start(
        BrokerOpts::new()
            .tls()
            .policy(PER_DEVICE)
            .admin()
            .wss_on_port(443, ""),
    );
    let pki = broker.pki();
    for protocol in ["3.1.1", "5"] {
        let mut args = vec!["--protocol", protocol];
        args.extend(SDK_THING1_ARGS);
        run_awsiot_agent(443, &pki.ca_cert, &pki.thing1, &args);
    }
    let metrics = broker.admin("GET", "/metrics", None).text();
    let alpn_line = metrics
        .lines()
        .find(|l| l.starts_with("fleetcore_tls_alpn_total") && l.contains("x-amzn-mqtt-ca"))
        .unwrap_or_else(|| panic!("no x-amzn-mqtt-ca handshakes counted\n{metrics}"));
    let count: f64 = alpn_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 2.0, "{alpn_line}");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("fleetcore_tls_alpn_total") && l.contains("alpn=\"none\"")),
        "every SDK handshake carried ALPN\n{metrics}"
    );
    broker.assert_no_panic_logged();
}

#[test]
fn mqtt_js_over_wss_with_a_client_certificate_gets_an_order() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(PER_DEVICE).wss(""));
    let pki = broker.pki();
    for protocol in ["5", "4"] {
        let mut agent = mqttjs(&strings_of(&[
            "--url",
            &format!("wss://localhost:{}/mqtt", broker.wss_port()),
            "--ca",
            &pki.ca_cert.display().to_string(),
            "--cert",
            &pki.thing1.cert.display().to_string(),
            "--key",
            &pki.thing1.key.display().to_string(),
            "--client-id",
            "thing-1",
            "--protocol",
            protocol,
            "--filter",
            "acct/thing-1/#",
            "--count",
            "1",
        ]));
        assert_eq!(
            agent.expect_event("suback", 15 * SEC).get("codes"),
            "1",
            "{}",
            agent.transcript()
        );
        mosquitto_pub(&args(
            broker.mosq_tls(&pki.thing1),
            &[
                "-i",
                "thing-1-pub",
                "-q",
                "1",
                "-t",
                "acct/thing-1/orders",
                "-m",
                "from-mqtt.js",
            ],
        ));
        agent.expect_success(10 * SEC);
        assert_eq!(
            payloads(&agent.events()),
            ["from-mqtt.js"],
            "MQTT {protocol}"
        );
    }
    broker.assert_no_panic_logged();
}

fn strings_of(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A registry broker with the 443 listener and a provisioned fleet.
fn token_broker(extra: BrokerOpts) -> (TestBroker, Fleet, tempfile::TempDir) {
    let broker = TestBroker::start(extra.server_pki().registry().admin().wss(""));
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision_fleet(&broker, dir.path());
    (broker, fleet, dir)
}

fn issue_token(broker: &TestBroker, thing: &str, ttl: &str) -> String {
    let v = ok(
        broker.admin(
            "POST",
            "/tokens",
            Some(&json!({"thing": thing, "ttl": ttl})),
        ),
        201,
    );
    v["token"].as_str().expect("token").to_string()
}

/// paho over WSS without a client certificate, authenticating with a token.
fn paho_token(broker: &TestBroker, user: &str, token: &str, more: &[&str]) -> LineChild {
    let mut a = args(
        broker.paho_wss(None),
        &["--username", user, "--password", token],
    );
    a.extend(more.iter().map(|s| s.to_string()));
    paho("subscribe.py", &a)
}

/// Revokes the agent's certificate through the admin API and checks that `agent`
/// (connected with that certificate or a token standing for it) is cut off at once
/// with 0x87.
fn revoke_and_expect_cut_off(broker: &TestBroker, fleet: &Fleet, agent: &mut LineChild) {
    let start = Instant::now();
    ok(
        broker.admin(
            "PUT",
            &format!("/certificates/{}/state", fleet.agent_id),
            Some(&json!({"state": "REVOKED"})),
        ),
        200,
    );
    let ev = agent.expect_event("disconnected", 5 * SEC);
    assert_eq!(ev.get("reason_code"), "135", "{}", agent.transcript());
    assert!(
        start.elapsed() < 2 * SEC,
        "cut off after {:?}",
        start.elapsed()
    );
}

/// computer-a over WSS with `token`, subscribed to its own topics (SUBACK checked).
fn token_agent(broker: &TestBroker, token: &str) -> LineChild {
    let mut agent = paho_token(
        broker,
        "computer-a",
        token,
        &[
            "--client-id",
            "computer-a",
            "--filter",
            "customer-a/computer-a/#",
            "--timeout",
            "30",
        ],
    );
    assert_eq!(agent.expect_event("suback", 10 * SEC).get("codes"), "1");
    agent
}

/// The CONNACK reason code computer-a gets over WSS with `token`.
fn token_connack(broker: &TestBroker, token: &str) -> String {
    let mut c = paho_token(
        broker,
        "computer-a",
        token,
        &["--client-id", "computer-a", "--exit-after-subscribe"],
    );
    c.expect_event("connack", 10 * SEC)
        .get("reason_code")
        .to_string()
}

#[test]
fn a_device_token_opens_wss_and_alpn_mqtt_with_the_certificates_policies() {
    let (broker, fleet, _dir) = token_broker(BrokerOpts::new().ws("tokens = true"));
    let token = issue_token(&broker, "computer-a", "1h");

    // Over WSS, no client certificate, both protocol versions.
    let mut agents = Vec::new();
    for protocol in ["5", "3.1.1"] {
        let mut agent = paho_token(
            &broker,
            "computer-a",
            &token,
            &[
                "--protocol",
                protocol,
                "--client-id",
                "computer-a",
                "--filter",
                "customer-a/computer-a/#",
                "--count",
                "1",
                "--persistent",
            ],
        );
        assert_eq!(
            agent.expect_event("suback", 10 * SEC).get("codes"),
            "1",
            "v{protocol}: {}",
            agent.transcript()
        );
        mosquitto_pub(&args(
            broker.mosq_tls(&fleet.backend),
            &[
                "-i",
                "backend",
                "-q",
                "1",
                "-t",
                AGENT_ORDERS,
                "-m",
                protocol,
            ],
        ));
        agent.expect_success(10 * SEC);
        assert_eq!(payloads(&agent.events()), [protocol]);
        agents.push(agent);
    }
    // The same policy variables as the certificate: another account's topics are refused.
    let mut nosy = paho_token(
        &broker,
        "computer-a",
        &token,
        &[
            "--client-id",
            "computer-a",
            "--filter",
            "customer-b/computer-b/#",
            "--exit-after-subscribe",
        ],
    );
    assert_eq!(nosy.expect_event("suback", 10 * SEC).get("codes"), "135");

    // Over MQTT-over-TLS with ALPN "mqtt", no certificate: mosquitto with the token.
    let mut sub = mosquitto_sub(&strings_of(&[
        "-h",
        "localhost",
        "-p",
        &broker.wss_port().to_string(),
        "--cafile",
        &broker.ca_file().display().to_string(),
        "--tls-alpn",
        "mqtt",
        "-V",
        "mqttv5",
        "-i",
        "computer-a",
        "-u",
        "computer-a",
        "-P",
        &token,
        "-q",
        "1",
        "-t",
        "customer-a/computer-a/#",
    ]));
    mosquitto_pub(&args(
        broker.mosq_tls(&fleet.backend),
        &[
            "-i",
            "backend",
            "-q",
            "1",
            "-t",
            AGENT_ORDERS,
            "-m",
            "via-alpn-mqtt",
        ],
    ));
    assert_eq!(expect_mosq_msg(&mut sub, 10 * SEC).3, "via-alpn-mqtt");
    drop(sub);

    // On the plain WebSocket listener (behind a TLS-terminating reverse proxy).
    let mut behind_proxy = paho(
        "subscribe.py",
        &strings_of(&[
            "--host",
            "127.0.0.1",
            "--port",
            &broker.ws_port().to_string(),
            "--websocket",
            "/mqtt",
            "--username",
            "computer-a",
            "--password",
            &token,
            "--client-id",
            "computer-a",
            "--filter",
            "customer-a/computer-a/#",
            "--exit-after-subscribe",
        ]),
    );
    assert_eq!(
        behind_proxy.expect_event("suback", 10 * SEC).get("codes"),
        "1"
    );
    // ... and without a token nobody gets in there.
    let mut nobody = paho(
        "subscribe.py",
        &strings_of(&[
            "--host",
            "127.0.0.1",
            "--port",
            &broker.ws_port().to_string(),
            "--websocket",
            "/mqtt",
            "--client-id",
            "computer-a",
            "--exit-after-subscribe",
        ]),
    );
    assert_eq!(
        nobody.expect_event("connack", 10 * SEC).get("reason_code"),
        "135",
        "{}",
        nobody.transcript()
    );

    // Refusals: wrong user name, a tampered token, no credentials at all.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for (user, password, code) in [
        ("computer-b", token.as_str(), "134"),
        ("computer-a", tampered.as_str(), "134"),
        ("computer-a", "not-a-token", "134"),
    ] {
        let mut c = paho_token(
            &broker,
            user,
            password,
            &["--client-id", "computer-a", "--exit-after-subscribe"],
        );
        assert_eq!(
            c.expect_event("connack", 10 * SEC).get("reason_code"),
            code,
            "{user} / {password}: {}",
            c.transcript()
        );
    }
    let mut anonymous = paho(
        "subscribe.py",
        &args(
            broker.paho_wss(None),
            &["--client-id", "computer-a", "--exit-after-subscribe"],
        ),
    );
    assert_eq!(
        anonymous
            .expect_event("connack", 10 * SEC)
            .get("reason_code"),
        "135"
    );
    let metrics = broker.admin("GET", "/metrics", None).text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fleetcore_clients_connected_total")
                && l.contains("auth=\"token\"")
                && l.contains("transport=\"wss\"")),
        "{metrics}"
    );
    broker.assert_no_panic_logged();
}

#[test]
fn an_expired_token_is_refused_and_a_live_session_ends_when_it_expires() {
    let (broker, _fleet, _dir) = token_broker(BrokerOpts::new());
    let token = issue_token(&broker, "computer-a", "3s");
    let mut agent = token_agent(&broker, &token);
    // Cut off at expiry with MQTT 5's "maximum connect time".
    let ev = agent.expect_event("disconnected", 10 * SEC);
    assert_eq!(
        (ev.get("reason_code"), ev.get("from_broker")),
        ("160", "1"),
        "{}",
        agent.transcript()
    );
    assert_eq!(token_connack(&broker, &token), "134");
    assert!(
        broker.log().contains("token expired at"),
        "the refusal names the reason\n{}",
        broker.log_tail()
    );
}

#[test]
fn revoking_the_certificate_behind_a_token_cuts_its_sessions_off() {
    let (broker, fleet, _dir) = token_broker(BrokerOpts::new());
    let token = issue_token(&broker, "computer-a", "1h");
    let mut agent = token_agent(&broker, &token);
    revoke_and_expect_cut_off(&broker, &fleet, &mut agent);
    // The token's signature is still good, but what it stands for is gone.
    assert_eq!(token_connack(&broker, &token), "135");
    // And no new token is issued for a thing without an active certificate.
    let resp = broker.admin(
        "POST",
        "/tokens",
        Some(&json!({"thing": "computer-a", "ttl": "1h"})),
    );
    assert!(resp.status >= 400, "{}", resp.text());
}

#[test]
fn listeners_are_told_apart_in_logs_by_name_or_address() {
    let broker = TestBroker::start(BrokerOpts::new().ws("name = \"edge-ws\"").wss(""));
    // The log is written by the broker as it goes: wait for the lines rather than
    // read it once (the ports may accept before the last "listening" line is out).
    let log_has = |pred: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = broker.log();
            if log.lines().any(pred) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let tcp = format!("listener=\"tcp/127.0.0.1:{}\"", broker.tcp_port());
    let wss = format!("listener=\"wss/127.0.0.1:{}\"", broker.wss_port());
    for label in [tcp.as_str(), wss.as_str(), "listener=\"edge-ws\""] {
        log_has(&|l| l.contains("listening") && l.contains(label));
    }
    mosquitto_pub(&with(&broker.mosq_tcp(), &["-t", "a", "-m", "b"]));
    // the connection is labelled with its listener
    log_has(&|l| l.contains("client connected") && l.contains(&tcp));
}

/// The AWS IoT Device SDKs send `thing?SDK=...&Platform=...` as the MQTT user name (their
/// metrics, on by default): with a token it counts as `thing`, and only the part before `?`
/// names the thing.
#[test]
fn an_aws_iot_sdk_user_name_with_metrics_is_taken_as_the_thing_name() {
    let (broker, _fleet, _dir) = token_broker(BrokerOpts::new());
    let token = issue_token(&broker, "computer-a", "1h");
    let sdk = "?SDK=IoTDeviceSDK/Python&Version=1.11.0&Platform=Linux";
    for protocol in ["5", "3.1.1"] {
        let mut agent = paho_token(
            &broker,
            &format!("computer-a{sdk}"),
            &token,
            &[
                "--protocol",
                protocol,
                "--client-id",
                "computer-a",
                "--filter",
                "customer-a/computer-a/#",
                "--exit-after-subscribe",
            ],
        );
        assert_eq!(
            agent.expect_event("suback", 10 * SEC).get("codes"),
            "1",
            "v{protocol}: {}",
            agent.transcript()
        );
    }
    for user in [format!("computer-b{sdk}"), format!("x?computer-a{sdk}")] {
        let mut c = paho_token(
            &broker,
            &user,
            &token,
            &["--client-id", "computer-a", "--exit-after-subscribe"],
        );
        assert_eq!(
            c.expect_event("connack", 10 * SEC).get("reason_code"),
            "134",
            "{user}: {}",
            c.transcript()
        );
    }
    broker.assert_no_panic_logged();
}
