//! The TLS listener requires a client certificate chaining to the configured CA: clients
//! with one work (mosquitto and paho, MQTT 3.1.1 and 5), clients without one or with one
//! from another CA are refused, and the broker keeps serving everyone else.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn tls_broker() -> TestBroker {
    TestBroker::start(BrokerOpts::new().tls().limit("connect_timeout_secs", 2))
}

/// A message published over TLS by `thing-2` reaches a TLS subscriber `thing-1`.
fn assert_mtls_roundtrip(broker: &TestBroker, topic: &str) {
    let pki = broker.pki();
    let sub_args = [
        "-V", "mqttv5", "-q", "1", "-t", topic, "-C", "1", "-W", "15",
    ];
    let mut sub = mosquitto_sub(&with(&broker.mosq_tls(&pki.thing1), &sub_args));
    let pub_args = ["-V", "mqttv311", "-q", "1", "-t", topic, "-m", "over-mtls"];
    mosquitto_pub(&with(&broker.mosq_tls(&pki.thing2), &pub_args));
    assert_eq!(
        expect_mosq_msg(&mut sub, STEP),
        (1, false, topic.to_string(), "over-mtls".to_string())
    );
    sub.expect_success(STEP);
}

#[test]
fn mosquitto_clients_with_client_certificate_exchange_messages() {
    let broker = tls_broker();
    assert_mtls_roundtrip(&broker, "things/thing-1/cmd");

    // Both listeners feed one router: a plain-TCP publish reaches a TLS subscriber.
    let pki = broker.pki();
    let mut sub = mosquitto_sub(&with(
        &broker.mosq_tls(&pki.thing1),
        &["-q", "1", "-t", "mixed/#"],
    ));
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "mixed/x", "-m", "from-tcp"],
    ));
    assert_eq!(
        expect_mosq_msg(&mut sub, STEP),
        (1, false, "mixed/x".to_string(), "from-tcp".to_string())
    );
}

#[test]
fn paho_clients_with_client_certificate_exchange_messages() {
    let broker = tls_broker();
    let pki = broker.pki();
    for protocol in ["3.1.1", "5"] {
        let topic = format!("things/thing-1/paho-{protocol}");
        let mut sub = paho(
            "subscribe.py",
            &with(
                &broker.paho_tls(&pki.thing1),
                &[
                    "--protocol",
                    protocol,
                    "--filter",
                    &topic,
                    "--count",
                    "1",
                    "--timeout",
                    "15",
                ],
            ),
        );
        sub.expect_event("suback", STEP);
        let mut publisher = paho(
            "publish.py",
            &with(
                &broker.paho_tls(&pki.thing2),
                &["--protocol", protocol, "--topic", &topic, "--payload", "hi"],
            ),
        );
        publisher.expect_success(STEP);
        let msg = sub.expect_event("message", STEP);
        assert_eq!(
            (msg.get("topic"), msg.get("payload")),
            (topic.as_str(), "hi")
        );
        sub.expect_success(STEP);
    }
}

/// Runs the refused-client attempts, then checks that certified clients still work.
fn assert_refused(broker: &mut TestBroker, mosq: Vec<String>, paho_args: Vec<String>, what: &str) {
    let output = mosquitto_pub_output(&with(&mosq, &["-q", "1", "-t", "things/x", "-m", "sneaky"]));
    assert!(
        !output.status.success(),
        "mosquitto_pub {what} was let in\n{}",
        describe(&output)
    );

    let mut client = paho(
        "subscribe.py",
        &with(&paho_args, &["--filter", "things/#", "--timeout", "10"]),
    );
    let status = client.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(1),
        "paho {what} was not refused\n{}",
        client.transcript()
    );
    assert!(
        !client.events().iter().any(|e| e.kind == "connack"),
        "paho {what} got a CONNACK\n{}",
        client.transcript()
    );

    broker.assert_healthy();
    assert_mtls_roundtrip(broker, "things/after-refusal");
}

#[test]
fn client_without_certificate_is_refused() {
    let mut broker = tls_broker();
    let (mosq, paho_args) = (broker.mosq_tls_no_cert(), broker.paho_tls_no_cert());
    assert_refused(&mut broker, mosq, paho_args, "without a client certificate");
}

#[test]
fn client_with_certificate_from_another_ca_is_refused() {
    let mut broker = tls_broker();
    let rogue = broker.pki().rogue.clone();
    let (mosq, paho_args) = (broker.mosq_tls(&rogue), broker.paho_tls(&rogue));
    assert_refused(&mut broker, mosq, paho_args, "with a rogue-CA certificate");
}

#[test]
fn silent_socket_on_tls_listener_is_closed_after_connect_timeout() {
    let mut broker = tls_broker();
    let mut socket = TcpStream::connect(("127.0.0.1", broker.tls_port())).expect("connect");
    let start = Instant::now();
    let limit = Duration::from_secs(2 + 5);
    socket.set_read_timeout(Some(limit)).expect("set timeout");
    let mut buf = [0u8; 256];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue, // a TLS alert, say
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("silent TLS socket still open after {:?}", start.elapsed())
            }
            Err(_) => break, // reset
        }
    }
    broker.assert_healthy();
    assert_mtls_roundtrip(&broker, "things/after-silence");
}

/// Clients told to connect to an IP address send it as SNI (mosquitto does); that is
/// no reason for a WARN line per connection in the broker's log.
#[test]
fn an_ip_address_as_sni_logs_no_warning() {
    let broker = tls_broker();
    let pki = broker.pki();
    let mut args = broker.mosq_tls(&pki.thing2);
    let h = args
        .iter()
        .position(|a| a == "-h")
        .expect("-h in the TLS args");
    args[h + 1] = "127.0.0.1".into();
    for i in 0..3 {
        mosquitto_pub(&with(
            &args,
            &["-q", "1", "-t", "sni/ip", "-m", &i.to_string()],
        ));
    }
    let log = broker.log();
    assert!(
        log.matches("client connected").count() >= 3,
        "the clients did not connect\n{log}"
    );
    let warns: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(warns.is_empty(), "{warns:#?}");
}
